"""Visual prompts: mark the mention's region in its image before the vision encoder sees it.

Modes (what :func:`render` returns, one list per mention):

* ``none``          — ``[image]``, the image as it is;
* ``overlay``       — ``[image with the region's outline drawn in]`` (VP-MEL draws a red box);
* ``crop``          — ``[the region's bounding box plus a margin]``;
* ``overlay+crop``  — ``[overlay, crop]``: context and close-up, two vision features per mention.

A region is a ``bbox`` ``[x0, y0, x1, y1]`` or a ``polygon`` ``[[x, y], ...]`` (>= 3 points), in pixels
of the original image (x to the right, y down). Regions reaching outside the image are clipped to it;
one left without area is a :class:`~gemel.errors.DataError` naming the mention. A mention with no
region keeps its whole image: ``overlay`` and ``crop`` then return the image unchanged, so the
number of images per mention depends on the mode only (:func:`n_images`).

:func:`settings_key` spells out everything that changes the rendered pixels, for feature-cache keys.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from gemel.errors import DataError, GemelError

MODES = ("none", "overlay", "crop", "overlay+crop")
# bump when the drawing changes, so that cached features of the old drawing are not reused
KEY_VERSION = "vp1"

Box = tuple[float, float, float, float]


def n_images(mode: str) -> int:
    """How many images :func:`render` returns per mention in ``mode``."""
    _check_mode(mode)
    return 2 if mode == "overlay+crop" else 1


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise GemelError(f"unknown visual prompt mode {mode!r}; choose one of {', '.join(MODES)}")


def _numbers(values: Sequence, count: int | None, field: str, mention_id: object) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"{field} must hold numbers, got {values!r}", record=mention_id,
                        field=field) from None
    if count is not None and len(out) != count:
        raise DataError(f"{field} must have {count} numbers, got {values!r}", record=mention_id,
                        field=field, fix="give [x0, y0, x1, y1] in pixels")
    if not all(math.isfinite(v) for v in out):
        raise DataError(f"{field} holds a non-finite number: {values!r}", record=mention_id,
                        field=field)
    return out


def _clip_box(box: Sequence[float], size: tuple[int, int], field: str,
              mention_id: object) -> Box:
    """Clip [x0, y0, x1, y1] to the image; raise when nothing of it is left."""
    w, h = size
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"region [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is empty (needs x0 < x1 and "
                        f"y0 < y1)", record=mention_id, field=field,
                        fix="give [x0, y0, x1, y1] in pixels, top-left corner first")
    cx0, cy0 = min(max(x0, 0.0), w), min(max(y0, 0.0), h)
    cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
    if cx1 <= cx0 or cy1 <= cy0:
        raise DataError(f"region [{x0:g}, {y0:g}, {x1:g}, {y1:g}] lies outside the {w}x{h} image",
                        record=mention_id, field=field,
                        fix="check that the coordinates are pixels of this image, not fractions "
                            "or another image's size")
    return cx0, cy0, cx1, cy1


def _polygon_points(polygon: Sequence, mention_id: object) -> list[tuple[float, float]]:
    points = []
    for p in polygon:
        if not isinstance(p, Sequence) or isinstance(p, str):
            raise DataError(f"polygon points must be [x, y] pairs, got {p!r}", record=mention_id,
                            field="polygon")
        x, y = _numbers(p, 2, "polygon", mention_id)
        points.append((x, y))
    if len(points) < 3:
        raise DataError(f"a polygon needs at least 3 points, got {len(points)}", record=mention_id,
                        field="polygon", fix="give [[x, y], [x, y], [x, y], ...] in pixels, or a bbox")
    return points


def clip_polygon(points: list[tuple[float, float]], rect: Box) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: the part of a polygon inside ``rect`` [x0, y0, x1, y1] (may be empty).

    Clamping each vertex would bend edges that cross the border; clipping keeps their slope.
    """
    x0, y0, x1, y1 = rect
    # each edge of the rectangle: (is the point inside?, where does segment a-b cross the edge?)
    def cross_x(a, b, x):
        t = (x - a[0]) / (b[0] - a[0])
        return x, a[1] + t * (b[1] - a[1])

    def cross_y(a, b, y):
        t = (y - a[1]) / (b[1] - a[1])
        return a[0] + t * (b[0] - a[0]), y

    edges = [(lambda p: p[0] >= x0, lambda a, b: cross_x(a, b, x0)),
             (lambda p: p[0] <= x1, lambda a, b: cross_x(a, b, x1)),
             (lambda p: p[1] >= y0, lambda a, b: cross_y(a, b, y0)),
             (lambda p: p[1] <= y1, lambda a, b: cross_y(a, b, y1))]
    out = list(points)
    for inside, cross in edges:
        src, out = out, []
        for i, cur in enumerate(src):
            prev = src[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(cross(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(cross(prev, cur))
    return out


@dataclass(frozen=True)
class _Region:
    box: Box  # clipped bounding box in pixels
    polygon: list[tuple[float, float]] | None  # clipped points; None: draw the box


def _region(size: tuple[int, int], bbox, polygon, mention_id: object) -> _Region | None:
    """The mention's region inside an image of ``size``; a polygon wins over a bbox for drawing."""
    if polygon is not None:
        points = _polygon_points(polygon, mention_id)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        box = _clip_box((min(xs), min(ys), max(xs), max(ys)), size, "polygon", mention_id)
        clipped = clip_polygon(points, (0.0, 0.0, size[0] - 1.0, size[1] - 1.0))
        if len(clipped) < 3:  # a sliver along the last pixel row/column: draw its box instead
            clipped = None
        if bbox is not None:  # an explicit bbox still decides the crop
            box = _clip_box(_numbers(bbox, 4, "bbox", mention_id), size, "bbox", mention_id)
        return _Region(box, clipped)
    if bbox is not None:
        return _Region(_clip_box(_numbers(bbox, 4, "bbox", mention_id), size, "bbox", mention_id),
                       None)
    return None


def line_width(size: tuple[int, int], width_frac: float) -> int:
    """Outline width in pixels: ``width_frac`` of the shorter side, at least 1."""
    return max(1, round(width_frac * min(size)))


def _overlay(image: Image.Image, region: _Region, color: tuple[int, int, int],
             width_frac: float) -> Image.Image:
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = line_width(image.size, width_frac)
    if region.polygon is not None:
        # a closed line with round joints: ImageDraw.polygon's wide outlines leave notches at corners
        points = region.polygon + [region.polygon[0]]
        draw.line(points, fill=color, width=width, joint="curve")
    else:
        x0, y0, x1, y1 = region.box
        # the outline grows inward from the box edge, so a box touching the border stays visible;
        # pixel (x, y) covers [x, x+1): the last pixel inside the box is ceil(x1) - 1
        draw.rectangle([math.floor(x0), math.floor(y0), max(math.floor(x0), math.ceil(x1) - 1),
                        max(math.floor(y0), math.ceil(y1) - 1)], outline=color, width=width)
    return out


def crop_box(size: tuple[int, int], box: Box, margin: float) -> tuple[int, int, int, int]:
    """Integer crop [x0, y0, x1, y1): ``box`` grown by ``margin`` x its width/height on each side,
    rounded outward and clipped to the image."""
    w, h = size
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    cx0, cy0 = max(0, math.floor(x0 - dx)), max(0, math.floor(y0 - dy))
    cx1, cy1 = min(w, math.ceil(x1 + dx)), min(h, math.ceil(y1 + dy))
    return cx0, cy0, max(cx1, cx0 + 1), max(cy1, cy0 + 1)


def render(image: Image.Image, bbox: Sequence[float] | None = None,
           polygon: Sequence[Sequence[float]] | None = None, mode: str = "overlay",
           color: tuple[int, int, int] = (255, 0, 0), width_frac: float = 0.01,
           margin: float = 0.1, mention_id: object = None) -> list[Image.Image]:
    """Apply the visual prompt; returns ``n_images(mode)`` new RGB images (the input is untouched).

    ``width_frac``: outline width as a fraction of the image's shorter side (>= 1 pixel).
    ``margin``: crop margin as a fraction of the region's width / height, on each side.
    ``mention_id`` is only used to name the mention in errors.
    """
    _check_mode(mode)
    if margin < 0 or width_frac < 0:
        raise GemelError(f"margin and width_frac must be >= 0, got {margin} and {width_frac}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if mode == "none":
        return [rgb.copy()]
    region = _region(rgb.size, bbox, polygon, mention_id)
    out = []
    if mode in ("overlay", "overlay+crop"):
        out.append(rgb.copy() if region is None else _overlay(rgb, region, color, width_frac))
    if mode in ("crop", "overlay+crop"):
        # the close-up is cut from the unmarked image: the overlay already says where it is
        out.append(rgb.copy() if region is None else rgb.crop(crop_box(rgb.size, region.box, margin)))
    return out


def region_masks(image: Image.Image, bbox: Sequence[float] | None = None,
                 polygon: Sequence[Sequence[float]] | None = None, mode: str = "overlay",
                 mention_id: object = None) -> list[Image.Image | None]:
    """Where the region lies in each image :func:`render` returns: an ``L`` mask of the image's
    size (255 inside the region) for the overlay image of a mention with a region, None (the whole
    image) for a crop, for mode ``none`` and for a mention without a region. The feature layout
    ``region`` pools the encoder's patch tokens under it."""
    _check_mode(mode)
    if mode == "none":
        return [None]
    region = _region(image.size, bbox, polygon, mention_id)
    out: list[Image.Image | None] = []
    if mode in ("overlay", "overlay+crop"):
        mask = None
        if region is not None:
            mask = Image.new("L", image.size, 0)
            draw = ImageDraw.Draw(mask)
            if region.polygon is not None:
                draw.polygon(region.polygon, fill=255)
            else:
                x0, y0, x1, y1 = region.box
                draw.rectangle([math.floor(x0), math.floor(y0), max(math.floor(x0), math.ceil(x1) - 1),
                                max(math.floor(y0), math.ceil(y1) - 1)], fill=255)
        out.append(mask)
    if mode in ("crop", "overlay+crop"):
        out.append(None)
    return out


def _fmt(values: Sequence[float]) -> str:
    return ",".join(f"{float(v):.2f}" for v in values)


def settings_key(mode: str = "overlay", bbox: Sequence[float] | None = None,
                 polygon: Sequence[Sequence[float]] | None = None,
                 color: tuple[int, int, int] = (255, 0, 0), width_frac: float = 0.01,
                 margin: float = 0.1) -> str:
    """A string that is equal exactly when :func:`render` draws the same pixels on the same image.

    Only the settings that matter for the mode are included (a crop ignores the colour; a mention
    without a region is the whole image in every mode), so equal renderings share cache entries.
    Example: ``vp1/overlay:c=255,0,0:w=0.0100:box=10.00,20.00,50.00,60.00``.
    """
    _check_mode(mode)
    geometry = None
    if polygon is not None:
        geometry = "poly=" + ";".join(_fmt(p) for p in polygon)
        if bbox is not None:
            geometry += "|box=" + _fmt(bbox)
    elif bbox is not None:
        geometry = "box=" + _fmt(bbox)
    parts = []
    for part in mode.split("+"):
        if part == "none" or geometry is None:
            parts.append("full")
        elif part == "overlay":
            parts.append(f"overlay:c={','.join(str(int(c)) for c in color)}:w={width_frac:.4f}:"
                         f"{geometry}")
        else:
            parts.append(f"crop:m={margin:.4f}:{geometry}")
    return KEY_VERSION + "/" + "+".join(parts)


@dataclass(frozen=True)
class VisualPrompt:
    """The visual-prompt settings of a run; ``render`` / ``key`` apply them to one mention."""

    mode: str = "overlay"
    color: tuple[int, int, int] = (255, 0, 0)
    width_frac: float = 0.01
    margin: float = 0.1

    def __post_init__(self) -> None:
        _check_mode(self.mode)

    @property
    def n_images(self) -> int:
        return n_images(self.mode)

    def render(self, image: Image.Image, bbox=None, polygon=None,
               mention_id: object = None) -> list[Image.Image]:
        return render(image, bbox, polygon, self.mode, self.color, self.width_frac, self.margin,
                      mention_id)

    def regions(self, image: Image.Image, bbox=None, polygon=None,
                mention_id: object = None) -> list[Image.Image | None]:
        return region_masks(image, bbox, polygon, self.mode, mention_id)

    def key(self, bbox=None, polygon=None) -> str:
        return settings_key(self.mode, bbox, polygon, self.color, self.width_frac, self.margin)
