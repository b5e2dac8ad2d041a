"""The demo's pictures: photos that scikit-image ships, and flags drawn by code.

An image's file name is its recipe, so the mentions files stay plain gemel JSONL:
``photo-NAME.png`` is ``skimage.data.NAME()``; ``flags-A-B.png`` is a 320x200 picture with flag A
on the left and flag B on the right (drawn from ``data/flags.json``), the layout whose boxes the
box-only mentions mark.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from PIL import Image, ImageDraw

from gemel.errors import GemelError, MissingDependency

CANVAS = (320, 200)  # width, height of a two-flag picture
FLAG_BOXES = ((10, 40, 150, 133), (170, 40, 310, 133))  # where the left and right flags sit


def flag_specs() -> dict[str, dict]:
    text = resources.files("gemel.demo").joinpath("data/flags.json").read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def draw_flag(spec: dict, size: tuple[int, int]) -> Image.Image:
    """One flag as an RGB image of ``size`` (width, height)."""
    w, h = size
    kind = spec["kind"]
    img = Image.new("RGB", size, spec.get("field", "#ffffff"))
    draw = ImageDraw.Draw(img)
    if kind in ("vertical", "horizontal"):
        colors = spec["colors"]
        weights = spec.get("weights", [1] * len(colors))
        total, start = sum(weights), 0.0
        extent = w if kind == "vertical" else h
        for color, weight in zip(colors, weights):
            end = start + extent * weight / total
            box = (start, 0, end, h) if kind == "vertical" else (0, start, w, end)
            draw.rectangle(box, fill=color)
            start = end
    elif kind == "disc":
        r, cx = 0.3 * h, spec["cx"] * w
        draw.ellipse((cx - r, h / 2 - r, cx + r, h / 2 + r), fill=spec["color"])
    elif kind == "cross":  # Nordic cross: the vertical bar sits left of centre
        bar = h / 5
        x = w * 0.36
        draw.rectangle((x - bar / 2, 0, x + bar / 2, h), fill=spec["color"])
        draw.rectangle((0, h / 2 - bar / 2, w, h / 2 + bar / 2), fill=spec["color"])
    elif kind == "swiss":
        arm, thick, cx, cy = 0.3 * h, 0.1 * h, w / 2, h / 2
        draw.rectangle((cx - thick, cy - arm, cx + thick, cy + arm), fill=spec["color"])
        draw.rectangle((cx - arm, cy - thick, cx + arm, cy + thick), fill=spec["color"])
    else:
        raise GemelError(f"flags.json: unknown flag kind {kind!r}; use vertical, horizontal, "
                         "disc, cross or swiss")
    return img


def flag_pair(left: str, right: str) -> Image.Image:
    specs = flag_specs()
    canvas = Image.new("RGB", CANVAS, "#8fa8bf")  # a sky-grey background
    for name, (x0, y0, x1, y1) in zip((left, right), FLAG_BOXES):
        if name not in specs:
            raise GemelError(f"the demo has no drawing for the flag {name!r}; known: {sorted(specs)}")
        canvas.paste(draw_flag(specs[name], (x1 - x0, y1 - y0)), (x0, y0))
    return canvas


def photo(name: str) -> Image.Image:
    try:
        import skimage.data
    except ImportError as err:
        raise MissingDependency("The demo's photos come from scikit-image, which",
                                'pip install -e ".[vision]"') from err
    array = getattr(skimage.data, name)()
    return Image.fromarray(array).convert("RGB")


def materialise(names: set[str], folder: Path) -> None:
    """Write every image named by the mentions into ``folder`` (skipping those already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(names):
        target = folder / name
        if target.exists():
            continue
        stem = Path(name).stem
        if stem.startswith("photo-"):
            img = photo(stem[len("photo-"):])
        elif stem.startswith("flags-"):
            left, right = stem[len("flags-"):].split("-")
            img = flag_pair(left, right)
        else:
            raise GemelError(f"demo image {name!r}: names start with photo- or flags-")
        img.save(target)
