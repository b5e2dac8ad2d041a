"""KnowledgeBase: the entities a mention can link to, and the title index the entity trie uses.

The KB file is JSONL, one entity a line (docs/architecture.md, "Contracts")::

    {"id": "Q90", "title": "Paris", "aliases": [], "description": "", "image": null}

Only ``id`` and ``title`` are required. Ids are unique; titles need not be: several entities may
share a title ("Jordan" the country and a "Jordan" disambiguation page), and generation produces a
*title*, so every index here goes through the list of unique titles, :attr:`KnowledgeBase.titles`,
whose positions are the entity trie's leaf values.

Storage is columnar (lists and numpy arrays, no ``Entity`` object per row until one is asked for)
and the title index is a ``marisa_trie.Trie``, so that a KB of millions of entities stays within
memory a laptop has.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import marisa_trie
import numpy as np

from gemel.errors import BadRecords, DataError
from gemel.textfile import decode_line, iter_lines
from gemel.types import Entity

_FIX_LINE = 'each line must be a JSON object like {"id": "Q90", "title": "Paris"}'


def normalize(text: str, casefold: bool = True) -> str:
    """Key of :meth:`KnowledgeBase.lookup`: whitespace runs collapsed, optionally casefolded."""
    text = " ".join(text.split())
    return text.casefold() if casefold else text


class KnowledgeBase:
    """Entities in file order, with id -> entity and title -> entities indexes.

    Build it with :meth:`from_jsonl` or :meth:`from_entities`.
    """

    def __init__(self, ids: list[str], titles_of: list[str], descriptions: list[str],
                 aliases: dict[int, tuple[str, ...]], images: dict[int, str],
                 source: str | None = None, lines: list[int] | None = None):
        # Columns, one row per entity in file order. ``aliases``/``images`` are sparse: most KBs
        # carry neither, and a dict of the few that do costs nothing for the rest.
        self.source = source
        self._ids = ids
        self._descriptions = descriptions
        self._aliases = aliases
        self._images = images
        self._pos: dict[str, int] = dict(zip(ids, range(len(ids))))
        if len(self._pos) != len(ids):
            _raise_duplicate(ids, source, lines)
        # Unique titles in order of first appearance; a temporary dict dedupes them, then the
        # marisa trie (compact, no per-key Python objects) replaces it as the lookup structure.
        first_index = {t: i for i, t in enumerate(dict.fromkeys(titles_of))}
        title_of_pos = np.fromiter(map(first_index.__getitem__, titles_of), dtype=np.int32,
                                   count=len(titles_of))
        self.titles: list[str] = list(first_index)
        del first_index
        self._title_trie = marisa_trie.Trie(self.titles)
        # marisa assigns its own key ids; map them back to our title index.
        self._key_to_title = np.empty(len(self.titles), dtype=np.int32)
        key_ids = np.fromiter(map(self._title_trie.__getitem__, self.titles), dtype=np.int64,
                              count=len(self.titles))
        self._key_to_title[key_ids] = np.arange(len(self.titles), dtype=np.int32)
        # title index -> entity positions, CSR style: members[ptr[i]:ptr[i+1]], in file order.
        self._title_of_pos = title_of_pos
        self._members = np.argsort(title_of_pos, kind="stable").astype(np.int32)
        counts = np.bincount(title_of_pos, minlength=len(self.titles))
        self._ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._fold: dict[bool, dict[str, list[tuple[int, bool]]]] = {}
        self._fingerprint: str | None = None
        self.bad = BadRecords(source)  # records left out by from_jsonl(on_bad="skip")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, on_bad: str = "raise") -> "KnowledgeBase":
        """Read a KB JSONL file; a DataError names the file, line and field of a bad record.

        ``on_bad="skip"`` leaves bad records out (undecodable or invalid JSON, a missing or empty
        id or title, wrong types, a repeated id: the later one) and counts them in
        :attr:`bad`; ``"raise"`` (default) stops at the first. A KB with no entity left is an
        error either way.
        """
        if on_bad not in ("raise", "skip"):
            raise DataError(f"on_bad must be 'raise' or 'skip' for a KB, not {on_bad!r}",
                            field="on_bad")
        path = Path(path)
        bad = BadRecords(path)
        ids: list[str] = []
        titles: list[str] = []
        descriptions: list[str] = []
        aliases: dict[int, tuple[str, ...]] = {}
        images: dict[int, str] = {}
        lines: list[int] = []
        for linenos, recs in _json_chunks(path, on_bad, bad):
            base = len(ids)
            if not _well_formed(recs):
                # Find and name the bad records (slow path, only on bad input).
                kept = [(n, r) for n, r in zip(linenos, recs)
                        if _kept(lambda: _check_record(r, path, f"line {n}"), on_bad, bad)]
                linenos, recs = [n for n, _ in kept], [r for _, r in kept]
            # Whole-chunk column extraction: list comprehensions run several times faster than
            # one Python-level loop body per entity, which matters at millions of entities.
            ids.extend([r["id"] for r in recs])
            titles.extend([r["title"] for r in recs])
            descriptions.extend([r.get("description") or "" for r in recs])
            for i, r in enumerate(recs):
                if r.get("aliases"):
                    aliases[base + i] = tuple(a for a in r["aliases"] if a.strip())
                if r.get("image"):
                    images[base + i] = r["image"]
            lines.extend(linenos)
        if on_bad == "skip" and len(set(ids)) != len(ids):
            keep = _first_of_each_id(ids, lines, path, bad)
            ids, titles, descriptions, lines = ([col[p] for p in keep]
                                                for col in (ids, titles, descriptions, lines))
            new_pos = {old: new for new, old in enumerate(keep)}
            aliases = {new_pos[p]: a for p, a in aliases.items() if p in new_pos}
            images = {new_pos[p]: a for p, a in images.items() if p in new_pos}
        if not ids:
            raise DataError("the KB has no entities" + (f" ({bad.count} bad records skipped: "
                                                        f"{bad.examples[0]})" if bad.count else ""),
                            path=path, fix=_FIX_LINE + ", one entity a line")
        kb = cls(ids, titles, descriptions, aliases, images, source=str(path), lines=lines)
        kb.bad = bad
        return kb

    @classmethod
    def from_entities(cls, entities: Iterable[Entity]) -> "KnowledgeBase":
        """A KB from Entity records (same checks as the file reader; records named by position)."""
        ids, titles, descriptions = [], [], []
        aliases: dict[int, tuple[str, ...]] = {}
        images: dict[int, str] = {}
        for pos, e in enumerate(entities):
            where = f"entity {pos}"
            ids.append(_entity_id(e.id, None, where))
            titles.append(_title(e.title, None, where))
            descriptions.append(_optional_str(e.description, "description", None, where))
            al = _aliases(list(e.aliases) if e.aliases else None, None, where)
            if al:
                aliases[pos] = al
            if e.image:
                images[pos] = e.image
        return cls(ids, titles, descriptions, aliases, images)

    # -- container protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, entity_id: object) -> bool:
        return entity_id in self._pos

    def __getitem__(self, entity_id: str) -> Entity:
        try:
            pos = self._pos[entity_id]
        except KeyError:
            raise KeyError(f"entity id {entity_id!r} is not in the KB"
                           + (f" {self.source}" if self.source else "")) from None
        return self.entity_at(pos)

    def __iter__(self) -> Iterator[Entity]:
        """Entities in file order."""
        return (self.entity_at(pos) for pos in range(len(self._ids)))

    def __repr__(self) -> str:
        return (f"KnowledgeBase({len(self)} entities, {len(self.titles)} titles"
                + (f", from {self.source!r})" if self.source else ")"))

    def entity_at(self, pos: int) -> Entity:
        """The entity at position ``pos`` in file order."""
        return Entity(self._ids[pos], self.titles[self._title_of_pos[pos]],
                      self._aliases.get(pos, ()), self._descriptions[pos], self._images.get(pos))

    @property
    def ids(self) -> list[str]:
        """Entity ids in file order (the list itself: do not modify it)."""
        return self._ids

    def shared_titles(self) -> tuple[int, int]:
        """(titles held by more than one entity, entities holding them). Allowed: generation
        yields a title, so the entities sharing it are all its candidates, with its score."""
        counts = np.diff(self._ptr)
        shared = counts > 1
        return int(shared.sum()), int(counts[shared].sum())

    # -- title index -----------------------------------------------------------------------------
    def title_index(self, title: str) -> int:
        """Position of ``title`` in :attr:`titles` (exact match), or -1."""
        key = self._title_trie.get(title)
        return -1 if key is None else int(self._key_to_title[key])

    def ids_for_title_index(self, i: int) -> list[str]:
        """Ids of the entities titled ``titles[i]``, in file order."""
        if not 0 <= i < len(self.titles):
            raise IndexError(f"title index {i} out of range (the KB has {len(self.titles)} titles)")
        return [self._ids[p] for p in self._members[self._ptr[i]:self._ptr[i + 1]]]

    def ids_for_title(self, title: str) -> list[str]:
        """Ids of the entities whose title is exactly ``title``; [] if none."""
        i = self.title_index(title)
        return [] if i < 0 else self.ids_for_title_index(i)

    def titles_with_prefix(self, prefix: str) -> list[str]:
        """Titles starting with ``prefix`` (for inspection; order unspecified)."""
        return self._title_trie.keys(prefix)

    def lookup(self, text: str, casefold: bool = True, aliases: bool = True) -> list[str]:
        """Entity ids whose title (or alias) equals ``text``: the exact-match baseline.

        Whitespace runs are collapsed on both sides; ``casefold`` also ignores case. Title matches
        come first, then alias-only matches, each in file order, without repeats.
        """
        index = self._fold.get(casefold)
        if index is None:  # built on first use: only the baseline needs it
            index = self._fold[casefold] = self._build_lookup(casefold)
        hits = index.get(normalize(text, casefold), [])
        seen: set[int] = set()
        out: list[str] = []
        for want_alias in (False, True):
            if want_alias and not aliases:
                break
            for pos, is_alias in hits:
                if is_alias == want_alias and pos not in seen:
                    seen.add(pos)
                    out.append(self._ids[pos])
        return out

    def _build_lookup(self, casefold: bool) -> dict[str, list[tuple[int, bool]]]:
        index: dict[str, list[tuple[int, bool]]] = {}
        for pos, t in enumerate(self._title_of_pos):
            index.setdefault(normalize(self.titles[t], casefold), []).append((pos, False))
        for pos in sorted(self._aliases):
            for alias in self._aliases[pos]:
                index.setdefault(normalize(alias, casefold), []).append((pos, True))
        return index

    # -- identity and output ---------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 over the (id, title) pairs in order: changes whenever an id or a title does."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            titles, tpos, ids = self.titles, self._title_of_pos.tolist(), self._ids
            step = 65536
            for start in range(0, len(ids), step):
                # Length-prefixed (in characters), so that no choice of characters inside ids or
                # titles can make two different KBs produce the same stream.
                h.update("".join(
                    f"{len(i)}:{i}{len(t)}:{t}"
                    for i, t in zip(ids[start:start + step],
                                    map(titles.__getitem__, tpos[start:start + step]))
                ).encode("utf-8"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def write_jsonl(self, path: str | os.PathLike) -> None:
        """Write the KB as JSONL (every field present), atomically (a temp file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for e in self:
                f.write(json.dumps({"id": e.id, "title": e.title, "aliases": list(e.aliases),
                                    "description": e.description, "image": e.image},
                                   ensure_ascii=False) + "\n")
        os.replace(tmp, path)


def _raise_duplicate(ids: list[str], source: str | None, lines: list[int] | None) -> None:
    first: dict[str, int] = {}
    for pos, entity_id in enumerate(ids):
        seen = first.setdefault(entity_id, pos)
        if seen != pos:
            where = (lambda p: f"line {lines[p]}") if lines else (lambda p: f"entity {p}")
            raise DataError(f"duplicate id {entity_id!r} (first on {where(seen)})", path=source,
                            record=where(pos), field="id",
                            fix="ids must be unique: drop or rename one of the two entities")


# -- reading ---------------------------------------------------------------------------------------
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


def _json_chunks(path: Path, on_bad: str = "raise",
                 bad: BadRecords | None = None) -> Iterator[tuple[list[int], list]]:
    """(line numbers, parsed values) for the non-blank lines of a JSONL file, a chunk at a time.

    A chunk is decoded as one JSON array (one C call instead of one Python call per line: ~3x
    faster on millions of lines); a chunk that fails is decoded line by line to name the bad line.
    Under ``on_bad="skip"`` lines that are not UTF-8 or not JSON are left out, counted in ``bad``.
    """
    bad = bad if bad is not None else BadRecords(path)
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


def _decode(chunk: list[tuple[int, str]], path: Path, on_bad: str = "raise",
            bad: BadRecords | None = None) -> tuple[list[int], list]:
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
                              record=f"line {lineno}", fix=_FIX_LINE)
            if on_bad != "skip":
                raise error from None
            (bad if bad is not None else BadRecords(path)).add(error)
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
                        record=where, fix=_FIX_LINE)
    entity_id = rec.get("id")
    if isinstance(entity_id, int) and not isinstance(entity_id, bool):
        rec["id"] = str(entity_id)  # numeric ids are kept as their decimal string
    else:
        _entity_id(entity_id, path, where)
    _title(rec.get("title"), path, where)
    _optional_str(rec.get("description"), "description", path, where)
    _optional_str(rec.get("image"), "image", path, where)
    _aliases(rec.get("aliases"), path, where)


# -- field checks (shared by the file and the Entity readers) -------------------------------------
def _entity_id(value: object, path, where: str) -> str:
    # Integer ids are accepted (numeric KBs exist) and kept as their decimal string.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"{value!r} ({type(value).__name__})"
        raise DataError(f"the entity id must be a non-empty string, got {got}", path=path,
                        record=where, field="id", fix=_FIX_LINE)
    return value


def _title(value: object, path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"{value!r} ({type(value).__name__})"
        raise DataError(f"the title must be a non-empty string, got {got}", path=path,
                        record=where, field="title",
                        fix="give every entity the title the model should generate")
    return value


def _optional_str(value: object, field: str, path, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected a string or null, got {type(value).__name__}", path=path,
                        record=where, field=field)
    return value


def _aliases(value: object, path, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DataError("expected a list of strings", path=path, record=where, field="aliases",
                        fix='write aliases as ["alias one", "alias two"] or leave the field out')
    return tuple(a for a in value if a.strip())


__all__ = ["KnowledgeBase", "normalize"]
