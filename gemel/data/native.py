"""gemel's own mentions JSONL (docs/architecture.md, "Contracts"), one mention a line::

    {"id": "m1", "text": "...", "mention": "Paris" | null, "image": "img/1.jpg" | null,
     "bbox": [x0, y0, x1, y1] | null, "polygon": [[x, y], ...] | null,
     "entity_id": "Q90" | null, "entity": "Paris" | null}

``image`` is relative to the JSONL file's folder (or absolute). A mention needs a mention string or
an image (VPWiki-style: the box drawn into the image); ``bbox``/``polygon`` need an image.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

from gemel.data.images import ImageFinder
from gemel.data.records import text_field
from gemel.data.report import ReadReport
from gemel.errors import DataError
from gemel.files import atomic_file
from gemel.textfile import decode_line, iter_lines
from gemel.types import BadMention, Mention

_KEYS = ("id", "text", "mention", "image", "bbox", "polygon", "entity_id", "entity")
_FIX = ('each line: {"id": "m1", "text": "...", "mention": "...", "image": null, "bbox": null, '
        '"polygon": null, "entity_id": "Q90", "entity": "Paris"}')


def sentence_id(mention_id: str) -> str:
    """The record part of an id written by the converters: ``"12-0"`` -> ``"12"``."""
    return mention_id.rsplit("-", 1)[0] if "-" in mention_id else mention_id


def read_native(path: Path, select: set[str] | None, images: ImageFinder,
                report: ReadReport, on_bad: str = "raise") -> Iterator[Mention]:
    """Mentions from our JSONL. ``select``: ids (or their record part, see :func:`sentence_id`).

    ``on_bad`` (see :data:`gemel.errors.ON_BAD`): a bad line raises, is skipped, or becomes a
    :class:`BadMention` (id: its own when it has one, else ``"<line N>"``); each is counted in
    ``report.bad``. A duplicate id is an error under "raise" and "row" (predictions are keyed
    by id), skipped under "skip".
    """
    seen: dict[str, int] = {}
    for lineno, raw in iter_lines(path, "mentions file"):
        if not raw.strip():
            continue
        where = f"line {lineno}"
        rid = None
        try:
            line = decode_line(raw, path, lineno)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err.msg}, column {err.colno})", path=path,
                                record=where, fix=_FIX) from None
            if not isinstance(rec, dict):
                raise DataError(f"expected a JSON object, got {type(rec).__name__}", path=path,
                                record=where, fix=_FIX)
            rid = _raw_id(rec)
            if rid is not None and select is not None and rid not in select \
                    and sentence_id(rid) not in select:
                continue
            m = _parse(rec, path, where)
            if m.id in seen:
                raise _Duplicate(f"duplicate mention id {m.id!r} (first on line {seen[m.id]})",
                                 path=path, record=where, field="id",
                                 fix="mention ids must be unique: predictions are keyed by them")
            seen[m.id] = lineno
            if m.image is not None:
                found = images.find([m.image])
                m = Mention(m.id, m.text, m.mention, found, m.bbox, m.polygon, m.entity_id,
                            m.entity)
        except DataError as err:
            # a repeated id cannot be an error row either: two rows would share the id
            if on_bad == "raise" or (on_bad == "row" and isinstance(err, _Duplicate)):
                raise
            report.bad.add(err)
            if on_bad == "row":
                report.records += 1
                row_id = rid if rid and rid not in seen else f"<line {lineno}>"
                seen[row_id] = lineno
                yield BadMention(row_id, "", error=str(err))
            continue
        report.records += 1
        yield m


class _Duplicate(DataError):
    """A mention id seen on an earlier line."""


def _raw_id(rec: dict) -> str | None:
    """The record's id as a string when it has a usable one (for selection and error rows)."""
    mid = rec.get("id")
    if isinstance(mid, int) and not isinstance(mid, bool):
        return str(mid)
    return mid if isinstance(mid, str) and mid else None


def _parse(rec: dict, path: Path, where: str) -> Mention:
    mid = _raw_id(rec)
    if mid is None:
        raise DataError("the mention id must be a non-empty string", path=path, record=where,
                        field="id", fix=_FIX)
    where = f"{where} (id {mid!r})"
    unknown = sorted(set(rec) - set(_KEYS))
    if unknown:
        raise DataError(f"unknown field(s) {unknown}", path=path, record=where, field=unknown[0],
                        fix=f"the fields are {list(_KEYS)}; rename or remove the others")
    text = _opt_str(rec, "text", path, where, required=True)
    mention = _opt_str(rec, "mention", path, where)
    image = _opt_str(rec, "image", path, where) or None
    entity_id = rec.get("entity_id")
    if isinstance(entity_id, int) and not isinstance(entity_id, bool):
        entity_id = str(entity_id)
    entity_id = _opt_str({"entity_id": entity_id}, "entity_id", path, where)
    entity = _opt_str(rec, "entity", path, where)
    bbox = _bbox(rec.get("bbox"), path, where)
    polygon = _polygon(rec.get("polygon"), path, where)
    if (bbox is not None or polygon is not None) and image is None:
        raise DataError("a bbox or polygon marks a region of an image, but 'image' is null",
                        path=path, record=where, field="image",
                        fix="give the image path (relative to this file) or drop the region")
    if not (mention and mention.strip()) and image is None:
        raise DataError("nothing marks the mention: 'mention' is empty and there is no image",
                        path=path, record=where, field="mention",
                        fix="give the mention string, or an image with the region to link")
    return Mention(mid, text, mention, image, bbox, polygon, entity_id or None, entity)


def _opt_str(rec: dict, name: str, path: Path, where: str, required: bool = False) -> str | None:
    return text_field(rec, name, path, where, fix=_FIX, required=required)


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bbox(value: object, path: Path, where: str) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 4 and all(_number(v) for v in value)):
        raise DataError(f"expected 4 numbers [x0, y0, x1, y1], got {value!r}", path=path,
                        record=where, field="bbox", fix="pixels, top-left and bottom-right corners")
    x0, y0, x1, y1 = (float(v) for v in value)
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"empty box {value!r}: need x1 > x0 and y1 > y0", path=path,
                        record=where, field="bbox",
                        fix="corners are [left, top, right, bottom], not [x, y, width, height]"
                        if x1 > 0 and y1 > 0 else None)
    return (x0, y0, x1, y1)


def _polygon(value: object, path: Path, where: str) -> tuple[tuple[float, float], ...] | None:
    if value is None:
        return None
    ok = (isinstance(value, list) and len(value) >= 3
          and all(isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p)
                  for p in value))
    if not ok:
        shown = repr(value) if len(repr(value)) < 80 else repr(value)[:77] + "..."
        raise DataError(f"expected 3 or more [x, y] points, got {shown}", path=path,
                        record=where, field="polygon", fix="pixels, e.g. [[0, 0], [10, 0], [5, 8]]")
    return tuple((float(x), float(y)) for x, y in value)


def write_mentions(mentions: Iterable[Mention], path: str | os.PathLike) -> int:
    """Write mentions as our JSONL (images relative to the file's folder); returns the count.

    Written to a temporary file and renamed (:func:`gemel.files.atomic_file`), so an interrupted
    write never leaves half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    n = 0
    with atomic_file(path) as f:
        for m in mentions:
            d = m.to_json()
            if m.image is not None:
                d["image"] = _relative(m.image, folder)
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            n += 1
    return n


def _relative(image: str, folder: Path) -> str:
    """Relative to ``folder`` when the image lies under it; absolute otherwise (a ``../..`` path
    would break as soon as the JSONL file moves without the images)."""
    p = Path(image)
    if not p.is_absolute():
        return image
    try:
        return p.relative_to(folder).as_posix()
    except ValueError:
        return str(p)
