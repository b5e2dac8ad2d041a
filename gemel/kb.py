"""KnowledgeBase: the entities a mention can link to, and the title index the entity trie uses.

The KB file is JSONL, one entity a line (docs/architecture.md, "Contracts")::

    {"id": "Q90", "title": "Paris", "aliases": [], "description": "", "image": null}

Only ``id`` and ``title`` are required. Ids are unique; titles need not be: several entities may
share a title ("Jordan" the country and a "Jordan" disambiguation page), and generation produces a
*title*, so every index here goes through the list of unique titles, :attr:`KnowledgeBase.titles`,
whose positions are the entity trie's leaf values.

Storage is columnar (lists and numpy arrays, no ``Entity`` object per row until one is asked for)
and the title index is a ``marisa_trie.Trie``, so that a KB of millions of entities stays within
memory a laptop has. Reading the file (chunked decoding, record checks, the bad-record policy)
is :mod:`gemel.kb_jsonl`'s.
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
from gemel.files import atomic_file
from gemel.kb_jsonl import (check_aliases, check_id, check_optional_str, check_title,
                            read_kb_jsonl)
from gemel.types import Entity


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
        """Read a KB JSONL file (:func:`gemel.kb_jsonl.read_kb_jsonl`); a DataError names the
        file, line and field of a bad record.

        ``on_bad="skip"`` leaves bad records out (undecodable or invalid JSON, a missing or empty
        id or title, wrong types, a repeated id: the later one) and counts them in
        :attr:`bad`; ``"raise"`` (default) stops at the first. A KB with no entity left is an
        error either way.
        """
        c, bad = read_kb_jsonl(path, on_bad)
        kb = cls(c.ids, c.titles, c.descriptions, c.aliases, c.images, source=str(Path(path)),
                 lines=c.lines)
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
            ids.append(check_id(e.id, None, where))
            titles.append(check_title(e.title, None, where))
            descriptions.append(check_optional_str(e.description, "description", None, where))
            al = check_aliases(list(e.aliases) if e.aliases else None, None, where)
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
        """Write the KB as JSONL (every field present), atomically (:func:`gemel.files.atomic_file`)."""
        with atomic_file(path) as f:
            for e in self:
                f.write(json.dumps({"id": e.id, "title": e.title, "aliases": list(e.aliases),
                                    "description": e.description, "image": e.image},
                                   ensure_ascii=False) + "\n")


def _raise_duplicate(ids: list[str], source: str | None, lines: list[int] | None) -> None:
    first: dict[str, int] = {}
    for pos, entity_id in enumerate(ids):
        seen = first.setdefault(entity_id, pos)
        if seen != pos:
            where = (lambda p: f"line {lines[p]}") if lines else (lambda p: f"entity {p}")
            raise DataError(f"duplicate id {entity_id!r} (first on {where(seen)})", path=source,
                            record=where(pos), field="id",
                            fix="ids must be unique: drop or rename one of the two entities")


__all__ = ["KnowledgeBase", "normalize"]
