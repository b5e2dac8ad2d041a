"""Reading a KB JSONL file into the columns of a :class:`gemel.kb.KnowledgeBase`.

One entity a line (docs/architecture.md, "Contracts")::

    {"id": "Q90", "title": "Paris", "aliases": [], "description": "", "image": null}

Only ``id`` and ``title`` are required. Lines are decoded a chunk at a time and checked column-wise
(fast at millions of entities); a chunk with a bad record is checked again record by record, so
that the :class:`DataError` names the file, the line and the field, or, under ``on_bad="skip"``,
the record is left out and counted. The field checks are shared with
:meth:`KnowledgeBase.from_entities`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from gemel.errors import BadRecords, DataError
from gemel.textfile import decode_line, iter_lines

FIX_LINE = 'each line must be a JSON object like {"id": "Q90", "title": "Paris"}'


@dataclass
class KBColumns:
    """A KB file's entities as columns, one row per kept entity in file order. ``aliases`` and
    ``images`` are sparse (row -> value): most KBs carry neither."""

    ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    aliases: dict[int, tuple[str, ...]] = field(default_factory=dict)
    images: dict[int, str] = field(default_factory=dict)
    lines: list[int] = field(default_factory=list)  # the file line of each row


def read_kb_jsonl(path: str | os.PathLike, on_bad: str = "raise") -> tuple[KBColumns, BadRecords]:
    """The columns of a KB JSONL file, and the records left out (``on_bad="skip"``).

    ``on_bad="skip"`` leaves bad records out (undecodable or invalid JSON, a missing or empty
    id or title, wrong types, a repeated id: the later one) and counts them; ``"raise"``
    (default) stops at the first. A KB with no entity left is an error either way.
    """
    if on_bad not in ("raise", "skip"):
        raise DataError(f"on_bad must be 'raise' or 'skip' for a KB, not {on_bad!r}",
                        field="on_bad")
    path = Path(path)
    bad = BadRecords(path)
    c = KBColumns()
    for linenos, recs in _json_chunks(path, on_bad, bad):
        base = len(c.ids)
        if not _well_formed(recs):
            # Find and name the bad records (slow path, only on bad input).
            kept = [(n, r) for n, r in zip(linenos, recs)
                    if _kept(lambda: _check_record(r, path, f"line {n}"), on_bad, bad)]
            linenos, recs = [n for n, _ in kept], [r for _, r in kept]
        # Whole-chunk column extraction: list comprehensions run several times faster than
        # one Python-level loop body per entity, which matters at millions of entities.
        c.ids.extend([r["id"] for r in recs])
        c.titles.extend([r["title"] for r in recs])
        c.descriptions.extend([r.get("description") or "" for r in recs])
        for i, r in enumerate(recs):
            if r.get("aliases"):
                c.aliases[base + i] = tuple(a for a in r["aliases"] if a.strip())
            if r.get("image"):
                c.images[base + i] = r["image"]
        c.lines.extend(linenos)
    if on_bad == "skip" and len(set(c.ids)) != len(c.ids):
        keep = _first_of_each_id(c.ids, c.lines, path, bad)
        c.ids, c.titles, c.descriptions, c.lines = (
            [col[p] for p in keep] for col in (c.ids, c.titles, c.descriptions, c.lines))
        new_pos = {old: new for new, old in enumerate(keep)}
        c.aliases = {new_pos[p]: a for p, a in c.aliases.items() if p in new_pos}
        c.images = {new_pos[p]: a for p, a in c.images.items() if p in new_pos}
    if not c.ids:
        raise DataError("the KB has no entities" + (f" ({bad.count} bad records skipped: "
                                                    f"{bad.examples[0]})" if bad.count else ""),
                        path=path, fix=FIX_LINE + ", one entity a line")
    return c, bad


# -- chunks and records ---------------------------------------------------------------------------
_CHUNK = 20000  # lines decoded per json.loads call
_STR = {str}
_STR_OR_NONE = {str, type(None)}


def _kept(check, on_bad: str, bad: BadRecords) -> bool:
    """Run ``check``; False (the record counted in ``bad``) when it raises under "skip"."""
    try:
        check()
    except DataError as err:
        if on_bad != "skip":
            raise
        bad.add(err)
        return False
    return True


def _first_of_each_id(ids: list[str], lines: list[int], path: Path, bad: BadRecords) -> list[int]:
    """Positions to keep: the first entity of each id; each later one is counted as bad."""
    first: dict[str, int] = {}
    keep = []
    for pos, entity_id in enumerate(ids):
        seen = first.setdefault(entity_id, pos)
        if seen == pos:
            keep.append(pos)
        else:
            bad.add(DataError(f"duplicate id {entity_id!r} (first on line {lines[seen]})",
                              path=path, record=f"line {lines[pos]}", field="id",
                              fix="ids must be unique: drop or rename one of the two entities"))
    return keep


def _json_chunks(path: Path, on_bad: str, bad: BadRecords) -> Iterator[tuple[list[int], list]]:
    """(line numbers, parsed values) for the non-blank lines of a JSONL file, a chunk at a time.

    A chunk is decoded as one JSON array (one C call instead of one Python call per line: ~3x
    faster on millions of lines); a chunk that fails is decoded line by line to name the bad line.
    Under ``on_bad="skip"`` lines that are not UTF-8 or not JSON are left out, counted in ``bad``.
    """
    chunk: list[tuple[int, str]] = []
    for lineno, raw in iter_lines(path, "KB file"):
        if raw.strip():
            try:
                chunk.append((lineno, raw.decode("utf-8")))
            except UnicodeDecodeError:  # decode_line raises the DataError that names it
                _kept(lambda: decode_line(raw, path, lineno), on_bad, bad)
            if len(chunk) >= _CHUNK:
                yield _decode(chunk, path, on_bad, bad)
                chunk = []
    if chunk:
        yield _decode(chunk, path, on_bad, bad)


def _decode(chunk: list[tuple[int, str]], path: Path, on_bad: str,
            bad: BadRecords) -> tuple[list[int], list]:
    linenos = [n for n, _ in chunk]
    try:
        values = json.loads("[" + ",".join(line for _, line in chunk) + "]")
    except json.JSONDecodeError:
        values = None
    # Joined lines could pair up differently from the file's lines (`1, 2` on one line is two
    # values; an object cut across two lines is one). Each line must hold one whole object: the
    # brace check and the count check send anything else down the line-by-line path.
    if (values is not None and len(values) == len(chunk)
            and all(line.lstrip().startswith("{") and line.rstrip().endswith("}")
                    for _, line in chunk)):
        return linenos, values
    kept_lines, values = [], []
    for lineno, line in chunk:
        try:
            values.append(json.loads(line))
            kept_lines.append(lineno)
        except json.JSONDecodeError as err:
            error = DataError(f"not valid JSON ({err.msg}, column {err.colno})", path=path,
                              record=f"line {lineno}", fix=FIX_LINE)
            if on_bad != "skip":
                raise error from None
            bad.add(error)
    return kept_lines, values


def _well_formed(recs: list) -> bool:
    """True when every record passes :func:`_check_record` (checked column-wise, in C loops)."""
    if set(map(type, recs)) != {dict}:
        return False
    ids = [r.get("id") for r in recs]
    titles = [r.get("title") for r in recs]
    return (set(map(type, ids)) == _STR and set(map(type, titles)) == _STR
            and all(map(str.strip, ids)) and all(map(str.strip, titles))
            and set(type(r.get("description")) for r in recs) <= _STR_OR_NONE
            and set(type(r.get("image")) for r in recs) <= _STR_OR_NONE
            and all(_aliases_ok(r.get("aliases")) for r in recs if r.get("aliases") is not None))


def _aliases_ok(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(a, str) for a in value)


def _check_record(rec: object, path: Path, where: str) -> None:
    """Raise the DataError that names what is wrong with one record, if anything is."""
    if type(rec) is not dict:
        raise DataError(f"expected a JSON object, got {type(rec).__name__}", path=path,
                        record=where, fix=FIX_LINE)
    entity_id = rec.get("id")
    if isinstance(entity_id, int) and not isinstance(entity_id, bool):
        rec["id"] = str(entity_id)  # numeric ids are kept as their decimal string
    else:
        check_id(entity_id, path, where)
    check_title(rec.get("title"), path, where)
    check_optional_str(rec.get("description"), "description", path, where)
    check_optional_str(rec.get("image"), "image", path, where)
    check_aliases(rec.get("aliases"), path, where)


# -- field checks (shared by the file and the Entity readers) -------------------------------------
def check_id(value: object, path, where: str) -> str:
    # Integer ids are accepted (numeric KBs exist) and kept as their decimal string.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"{value!r} ({type(value).__name__})"
        raise DataError(f"the entity id must be a non-empty string, got {got}", path=path,
                        record=where, field="id", fix=FIX_LINE)
    return value


def check_title(value: object, path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"{value!r} ({type(value).__name__})"
        raise DataError(f"the title must be a non-empty string, got {got}", path=path,
                        record=where, field="title",
                        fix="give every entity the title the model should generate")
    return value


def check_optional_str(value: object, name: str, path, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected a string or null, got {type(value).__name__}", path=path,
                        record=where, field=name)
    return value


def check_aliases(value: object, path, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DataError("expected a list of strings", path=path, record=where, field="aliases",
                        fix='write aliases as ["alias one", "alias two"] or leave the field out')
    return tuple(a for a in value if a.strip())
