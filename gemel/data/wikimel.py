"""WikiMEL (MELBench release): a JSON object keyed by record id::

    {"21717": {"id": "21717", "sentence": "...", "mentions": ["Francis Condon"],
               "entities": ["Francis Condon"], "answer": ["Q1441444"]}}

In other releases of the same shape ``mentions``/``entities``/``answer`` are plain strings (one
mention per record). Ids: a record whose fields are lists gives ``f"{id}-{i}"`` (i from 0, even for
a one-item list); a record whose fields are plain strings *is* one mention and keeps its id. The
image is ``<images folder>/<id>.jpg`` (default folder: ``images/`` beside the file) when present.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from gemel.data.images import ImageFinder
from gemel.data.records import (gold, release_records, id_field, list_or_str, same_lengths,
                                text_field)
from gemel.data.report import ReadReport
from gemel.errors import DataError
from gemel.types import Mention


def record_mentions(rec: dict, rid: str, path: Path, where: str,
                    find_image: Callable[[int], str | None],
                    unquote_text: Callable[[str], str] | None = None) -> list[Mention]:
    """The mentions of one WikiMEL/MIMIC-shaped record (fields list-or-string).

    ``find_image(n)``: the record's image for its n mentions (called once, when n > 0).
    Blank mention strings become ``mention=None`` (VPWiki: the box in the image marks it).
    """
    text = text_field(rec, "sentence", path, where)
    words, was_list = list_or_str(rec, "mentions", path, where)
    answers, _ = list_or_str(rec, "answer", path, where, required=False)
    titles, _ = list_or_str(rec, "entities", path, where, required=False)
    if rec.get("answer") is None:  # unlabelled input
        answers = [None] * len(words)
    n = same_lengths({"mentions": words, "answer": answers,
                      "entities": titles if rec.get("entities") is not None else None},
                     path, where)
    image = find_image(n) if n else None
    out = []
    for i in range(n):
        word = words[i]
        if not isinstance(word, str):
            raise DataError(f"item {i} is a {type(word).__name__}, expected a string", path=path,
                            record=where, field="mentions")
        if unquote_text is not None:
            word = unquote_text(word)
        title = titles[i] if titles else None
        if isinstance(title, str) and unquote_text is not None:
            title = unquote_text(title)
        entity_id, title = gold(answers[i], title, path, where, title_field="entities")
        mid = f"{rid}-{i}" if was_list else rid
        out.append(Mention(mid, text, word if word.strip() else None, image, None, None,
                           entity_id, title))
    return out


def read_wikimel(path: Path, data: Any, select: set[str] | None, images: ImageFinder,
                 report: ReadReport, on_bad: str = "raise") -> Iterator[Mention]:
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object keyed by record id, got a {type(data).__name__}",
                        path=path, fix="is this WikiDiverse or MIMIC (a list)? pass fmt=")
    yield from release_records(data.items(), select, report, on_bad, "id",
                               lambda key, rec: _record(path, key, rec, images, report))


def _record(path: Path, key: str, rec: object, images: ImageFinder,
            report: ReadReport) -> list[Mention]:
    if not isinstance(rec, dict):
        raise DataError(f"expected an object, got {type(rec).__name__}", path=path,
                        record=f"id {key}")
    rid = id_field(rec, "id", path, f"id {key}") or key
    found = record_mentions(rec, rid, path, f"id {rid}",
                            lambda n: images.find([f"{rid}.jpg"], n_mentions=n))
    if not found:
        report.empty_records += 1
    return found
