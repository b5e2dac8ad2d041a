"""WikiDiverse as redistributed by KGMEL/MIMIC: a JSON list of sentences::

    {"id": 0, "sentence": "...", "imgPath": "mention_0.jpg", "mention": ["UK", "parliament"],
     "entity": ["United Kingdom", "Parliament of the United Kingdom"], "answer": ["Q145", "Q11010"]}

One Mention per item of ``mention``, id ``f"{sentence_id}-{i}"`` (i from 0), gold
``entity_id = answer[i]`` (a QID), ``entity = entity[i]`` (the Wikipedia title). The image is
``imgPath`` under the images folder (default: ``images/`` beside the file).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

from gemel.data.images import ImageFinder
from gemel.data.records import (gold, indexed_record, list_or_str, release_records, same_lengths,
                                text_field)
from gemel.data.report import ReadReport
from gemel.errors import DataError
from gemel.types import Mention


def read_wikidiverse(path: Path, data: Any, select: set[str] | None, images: ImageFinder,
                     report: ReadReport, on_bad: str = "raise") -> Iterator[Mention]:
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of sentences, got a {type(data).__name__}",
                        path=path,
                        fix="is this WikiMEL (an object keyed by id)? pass fmt='wikimel'")
    yield from release_records(enumerate(data), select, report, on_bad, "index",
                               lambda key, rec: _sentence(path, key, rec, images, report))


def _sentence(path: Path, index: int, rec: object, images: ImageFinder,
              report: ReadReport) -> list[Mention]:
    sid, where = indexed_record(rec, path, index)
    text = text_field(rec, "sentence", path, where)
    words, _ = list_or_str(rec, "mention", path, where)
    answers, _ = list_or_str(rec, "answer", path, where)
    titles, _ = list_or_str(rec, "entity", path, where, required=False)
    n = same_lengths({"mention": words, "answer": answers,
                      "entity": titles if "entity" in rec else None}, path, where)
    if n == 0:
        report.empty_records += 1
        return []
    img_path = text_field(rec, "imgPath", path, where, required=False)
    out = []
    for i in range(n):
        mention = words[i]
        if not isinstance(mention, str) or not mention.strip():
            got = (f"a {type(mention).__name__}" if not isinstance(mention, str)
                   else f"{mention!r} (blank)")
            raise DataError(f"item {i} is {got}, expected the mention string", path=path,
                            record=where, field="mention",
                            fix="give each mention its words in the sentence, or drop the item "
                            "from the mention, entity and answer lists")
        entity_id, title = gold(answers[i], titles[i] if titles else None, path, where)
        out.append(Mention(f"{sid}-{i}", text, mention, None, None, None, entity_id, title))
    image = images.find([img_path], n_mentions=n) if img_path else None
    if image is not None:
        out = [dataclasses.replace(m, image=image) for m in out]
    return out
