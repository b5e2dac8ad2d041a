"""The demo's shipped data is valid gemel input, and its pictures are what the mentions say."""
import json
from pathlib import Path

import numpy as np
import pytest

from gemel.data import read_mentions
from gemel.demo.images import CANVAS, FLAG_BOXES, draw_flag, flag_specs, materialise
from gemel.demo.run import prepare
from gemel.kb import KnowledgeBase


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    pytest.importorskip("skimage")
    return prepare(tmp_path_factory.mktemp("demo"))


def test_shipped_data_reads_cleanly_and_every_gold_is_in_the_kb(demo_data):
    kb = KnowledgeBase.from_jsonl(demo_data["kb"])
    assert len(kb) >= 200 and len(set(kb.titles)) == len(kb)
    assert all(kb[e].description for e in kb.ids)
    train, test = read_mentions(demo_data["train"]), read_mentions(demo_data["test"])
    assert not {m.id for m in train} & {m.id for m in test}
    for m in train + test:
        assert m.entity_id in kb and kb[m.entity_id].title == m.entity
        if m.image:
            assert Path(m.image).is_file()
    box_only = [m for m in test if m.mention is None]
    assert box_only and all(m.bbox is not None and m.image for m in box_only)
    # every box is one of the two flag slots of a canvas-sized picture
    slots = [[x0 - 4, y0 - 4, x1 + 4, y1 + 4] for x0, y0, x1, y1 in FLAG_BOXES]
    assert all(list(m.bbox) in slots for m in train + test if m.bbox)
    # test flags are pairs never seen in training: the box, not the pair, must decide
    pairs = lambda ms: {Path(m.image).name for m in ms if m.mention is None}
    assert not pairs(train) & pairs(test)


def test_flags_are_drawn_in_their_colours():
    for name, spec in flag_specs().items():
        img = np.asarray(draw_flag(spec, (140, 93)))
        colours = {tuple(int(spec[k].lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))
                   for k in ("field", "color") if k in spec}
        colours |= {tuple(int(c.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4))
                    for c in spec.get("colors", [])}
        present = {tuple(p) for p in img.reshape(-1, 3)}
        assert colours <= present, name


def test_flag_pair_puts_each_flag_in_its_box(tmp_path):
    materialise({"flags-japan-germany.png"}, tmp_path)
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "flags-japan-germany.png").convert("RGB"))
    assert img.shape[:2] == (CANVAS[1], CANVAS[0])
    (lx0, ly0, lx1, ly1), (rx0, ry0, rx1, ry1) = FLAG_BOXES
    left, right = img[ly0:ly1, lx0:lx1], img[ry0:ry1, rx0:rx1]
    assert tuple(left[2, 2]) == (255, 255, 255)  # Japan: white field
    assert tuple(right[2, 2]) == (0, 0, 0)  # Germany: black top band
