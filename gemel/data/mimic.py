"""MIMIC-shaped releases (KDD'23 cleaned WikiMEL / RichpediaMEL / WikiDiverse) and VPWiki.

Mention files (``WIKIMEL_train.json`` ...) are JSON lists, one mention per record::

    {"id": "...", "sentence": "...", "mentions": "Francis Condon", "entities": "Francis Condon",
     "answer": "Q1441444", "imgPath": "1234.jpg"}

``mentions`` may be URL-quoted (MIMIC unquotes it; so do we); ``imgPath`` is "" when the record
has no image; MIMIC converted every image to JPEG, so ``<stem>.jpg`` is tried after the name as
written. ``answer: "nil"`` marks a NIL mention (MIMIC drops them; we keep and mark them, see
:mod:`gemel.data.nil`). The KB side (``kb_entity.json`` + ``qid2id.json``) is read by
:func:`gemel.data.kbsources.kb_from_mimic`.

VPWiki (VP-MEL) has the same shape with ``mentions`` blank (``" "``): the mention is the red box
drawn into the image, so it becomes ``Mention(mention=None, image=..., bbox=None)``.

Ids: the record ``id`` (the list index when absent); a record whose fields are lists gives
``f"{id}-{i}"`` as in WikiMEL.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import unquote

from gemel.data.images import ImageFinder
from gemel.data.records import indexed_record, release_records, text_field
from gemel.data.report import ReadReport
from gemel.data.wikimel import record_mentions
from gemel.errors import DataError
from gemel.types import Mention

# Where MIMIC-shaped releases keep mention images, relative to the mention file.
IMAGE_FOLDERS = ("images", "mention_image", "mention_images")


def image_names(img_path: str) -> list[str]:
    """Names to try for a MIMIC ``imgPath``: as written, its file name, and ``<stem>.jpg``."""
    p = PurePosixPath(img_path.replace("\\", "/"))
    names = [img_path, p.name, p.stem + ".jpg"]
    return list(dict.fromkeys(names))


def read_mimic(path: Path, data: Any, select: set[str] | None, images: ImageFinder,
               report: ReadReport, on_bad: str = "raise") -> Iterator[Mention]:
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of mention records, got a {type(data).__name__}",
                        path=path,
                        fix="is this WikiMEL (an object keyed by id)? pass fmt='wikimel'")
    yield from release_records(enumerate(data), select, report, on_bad, "index",
                               lambda key, rec: _record(path, key, rec, images, report))


def _record(path: Path, index: int, rec: object, images: ImageFinder,
            report: ReadReport) -> list[Mention]:
    rid, where = indexed_record(rec, path, index)
    img_path = text_field(rec, "imgPath", path, where, required=False)
    found = record_mentions(
        rec, rid, path, where,
        lambda n: images.find(image_names(img_path), n_mentions=n) if img_path else None,
        unquote_text=unquote)
    if not found:
        report.empty_records += 1
    return found
