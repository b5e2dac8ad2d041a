"""EntityTrie: the KB titles as token sequences, in a static level-ordered trie of flat arrays.

Why not a dict trie or GENRE's marisa trie: a dict of dicts takes ~8.5 GB for 5M titles, and a
marisa trie of token strings answers "which tokens may follow?" by enumerating every key below the
prefix, so its cost grows with the subtree (~22 ms near the root for 5M titles). Here:

* Nodes are numbered level by level (breadth first) and, within a level, in lexicographic order
  of their prefixes. The children of node ``p`` are then the contiguous ids
  ``child_start[p]:child_start[p + 1]``, sorted by token, and ``edge_token[child]`` is the token
  on the edge into ``child``. ``allowed`` returns a slice of ``edge_token``: a view, O(1).
* A prefix is found without walking: every internal node has a 64-bit hash of its prefix,
  CPython's ``hash(tuple(prefix))`` (computed for all nodes at once in numpy, level by level, and
  in C by the interpreter at query time). The (hash, child_lo, child_hi) entries sit in one
  table, sorted by hash, each at the slot its hash maps to or just after (ordered linear
  probing, 75% full): a lookup hashes the prefix, reads that slot and mostly nothing more (one
  cache miss), checks the depth and slices ``edge_token``. Nodes that share a hash (~never) are
  marked and looked up by walking.
* A title may have several token paths, each ending at a leaf that holds the title index: its
  *natural* path, the tokens of ``answer_prefix + title + terminator_text`` after the prefix, up
  to the token that starts the terminator text, and, where that last token merges the title's
  end with the terminator (byte-level BPEs: Qwen2.5 has ``")\n"``), also the title's own tokens
  followed by the terminator token. The model ends a title as its demonstrations showed it, so
  both must close it. A title may not contain the terminator text, so a leaf has no children and
  every other node has some; only internal nodes are hashed.

This module holds the structure, its lookups, sub-tries and save/load. The titles' tokens come
from :mod:`gemel.title_tokens`; the arrays are built with a handful of vectorised numpy passes per
level (:mod:`gemel.trie_levels`, no Python loop over titles) and the prefix table by
:mod:`gemel.trie_hash`; see ``benchmarks/trie.py`` for 25k / 1M / 5M titles and
docs/architecture.md for where the trie sits. Saved as ``.npy`` files plus ``trie.json``, loaded
memory-mapped; no pickle.
"""
from __future__ import annotations

import bisect
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from gemel.errors import DataError, MismatchError
from gemel.files import atomic_file, write_atomic
from gemel.title_tokens import lengths_to_offsets, tokenize_titles, tokenizer_identity
from gemel.trie_hash import HASH_NAME, NATIVE_HASH, hash_index, small_index, tuple_hash
from gemel.trie_levels import build_levels, check_paths, check_sequences

log = logging.getLogger(__name__)

FORMAT = "gemel-entity-trie"
# bump whenever the saved arrays change. 2: hashed prefix buckets (slots); 3: several token paths
# per title (a leaf may follow a token merged with the terminator), alt_leaf
VERSION = 3
_VERSIONS = {2: "one token path per title: titles whose last token merges with the terminator "
                "could only end as `title tokens + terminator`"}
ARRAYS = ("edge_token", "child_start", "parent", "level_start", "prefix_index", "leaf_node",
          "leaf_value", "title_leaf", "title_ids", "duplicates", "alt_leaf")
_OPTIONAL = ("title_ids", "duplicates", "alt_leaf")


class EntityTrie:
    """A static token trie over entity titles. Build with :meth:`from_titles` or :meth:`build`.

    Arrays (N nodes, M = internal nodes but the root, L leaves, n titles):
      edge_token  int32 [N]      token on the edge into each node (root: -1)
      child_start int32 [N + 1]  children of p are ids child_start[p]:child_start[p + 1]
      parent      int32 [N]      parent of each node (root: -1)
      level_start int64 [D + 2]  nodes of depth d are ids level_start[d]:level_start[d + 1]
      prefix_index int64 [R, 2]  the prefix table, R ~ M / 0.75 + 1 rows: column 0 a hash, column
                     1 read as two int32, child_lo and child_hi (-1, -1 where two nodes share a
                     hash). Entry h sits at slot((h >> 32) + 2**31) * S >> 32) or after, rows
                     sorted by hash; an empty row holds the smallest hash of the next slot (so a
                     scan stops there); the last row is int64 max.
      leaf_node int32 [L] (sorted), leaf_value int32 [L]: title index of each leaf
      title_leaf int32 [n]       the leaf of each title's natural path (duplicates share the
                                 first one's leaf)
      alt_leaf int64 [a, 2]      (title position, leaf) of the titles' other paths, sorted: the
                                 ``title tokens + terminator`` path of a terminator-merged title
      title_ids int64 [n]        original title indices (sub-tries only; the full trie: 0..n-1)
      duplicates int64 [k, 2]    (title, kept title): a path of ``title`` repeats one of an
                                 earlier title, whose index its leaf keeps
    """

    root = 0

    def __init__(self, arrays: dict[str, np.ndarray], info: dict):
        for name in ARRAYS:
            setattr(self, name, arrays.get(name))
        self.terminator = int(info["terminator"])
        self.slots = int(info["slots"])  # S
        self.meta: dict = dict(info.get("meta") or {})
        self.meta.setdefault("terminator", self.terminator)
        self.meta["n_titles"] = len(self.title_leaf)
        self.boundary_merged: list[str] = list(info.get("boundary_merged") or [])
        self.terminator_merged: list[str] = list(info.get("terminator_merged") or [])
        if self.duplicates is None:
            self.duplicates = np.zeros((0, 2), dtype=np.int64)
        if self.alt_leaf is None:
            self.alt_leaf = np.zeros((0, 2), dtype=np.int64)
        # memoryviews give Python ints without numpy-scalar overhead: the hot path of allowed().
        self._tok = memoryview(self.edge_token)
        self._cs = memoryview(self.child_start)
        self._par = memoryview(self.parent)
        # the prefix table read two ways: entry e's hash at _hash_at[2e], its child_lo and
        # child_hi at _range_at[4e + 2] and _range_at[4e + 3]
        self._hash_at = memoryview(self.prefix_index.reshape(-1))
        self._range_at = memoryview(self.prefix_index.view(np.int32).reshape(-1))
        self._leaf = memoryview(self.leaf_node)
        self._lval = memoryview(self.leaf_value)
        self._ls = [int(x) for x in self.level_start]
        self._shared = list(info.get("shared_hashes") or ())  # hashes of 2+ nodes (~never)
        self._empty = self.edge_token[:0]
        self._root_allowed = self.edge_token[self._cs[0]:self._cs[1]]

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]], terminator: int,
              meta: dict | None = None,
              natural: dict[int, Sequence[int]] | None = None) -> "EntityTrie":
        """Trie whose title ``i`` is ``sequences[i] + [terminator]``, with leaf value ``i``.

        ``natural``: title index -> another complete path of that title (ending in a token that
        merges the title's end with the terminator); it becomes the title's natural path
        (:meth:`sequence`) and ``sequences[i] + [terminator]`` its alternative.
        Identical paths keep the first index (the others are rows ``(index, kept_index)``
        of ``trie.duplicates``). Raises DataError if a sequence contains the terminator.
        """
        n = len(sequences)
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=n)
        total = int(lengths.sum())
        tokens = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=total)
        extra = None
        if natural:
            index = sorted(natural)
            extra = (np.asarray(index, dtype=np.int64),
                     np.fromiter((t for i in index for t in natural[i]), dtype=np.int64),
                     lengths_to_offsets(np.fromiter((len(natural[i]) for i in index),
                                                    dtype=np.int64)))
        return cls.build_flat(tokens, lengths_to_offsets(lengths), terminator, meta, natural=extra)

    @classmethod
    def build_flat(cls, tokens: np.ndarray, offsets: np.ndarray, terminator: int,
                   meta: dict | None = None, *, report: dict | None = None,
                   natural: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                   ) -> "EntityTrie":
        """:meth:`build` from concatenated sequences: title ``i`` is
        ``tokens[offsets[i]:offsets[i + 1]]`` (without the terminator); offsets int [n + 1].
        ``natural``: (title indices int [k], tokens, offsets int [k + 1]) of the titles' natural
        paths where they differ from ``tokens + [terminator]`` (each complete, with its end)."""
        tokens = np.asarray(tokens)
        offsets = np.asarray(offsets, dtype=np.int64)
        terminator = int(terminator)
        check_sequences(tokens, offsets, terminator)
        n = len(offsets) - 1
        extra = natural is not None and len(natural[0])
        if extra:
            index, ntok, noff = (np.asarray(a, dtype=np.int64) for a in natural)
            check_paths(index, ntok, noff, n, terminator)
        # the paths `title + [terminator]`, concatenated: row i starts at offsets[i] + i and
        # ends (its terminator) at offsets[i + 1] + i; positions in the narrowest dtype (memory)
        flat = np.insert(tokens, offsets[1:], terminator)
        size = len(flat) + (len(ntok) if extra else 0)
        idx = np.int32 if size + 1 < 2 ** 31 else np.int64
        step = np.arange(n, dtype=idx)
        start, last = offsets[:-1].astype(idx), offsets[1:].astype(idx)
        start += step
        last += step
        del step
        row_title = None  # row r is title r
        if extra:
            base = len(flat)
            flat = np.concatenate([flat, ntok])
            # the natural path is each title's first row; `title + [terminator]` moves behind
            start, last = (np.concatenate([a, a[index]]) for a in (start, last))
            start[index], last[index] = base + noff[:-1], base + noff[1:] - 1
            row_title = np.concatenate([np.arange(n, dtype=np.int64), index])
        if len(flat) and int(flat.max()) < 2 ** 31:
            flat = flat.astype(np.int32, copy=False)
        # handed over in a dict that build_levels empties: no reference stays here, so the
        # rows are freed before the prefix index is built (peak memory)
        rows = {"flat": flat, "start": start, "last": last, "title": row_title}
        del flat, start, last, row_title
        arrays = build_levels(rows, n)
        if len(arrays["duplicates"]):
            log.warning("entity trie: %d title(s) have a token path of an earlier title; that "
                        "leaf keeps the first title index (see trie.duplicates)",
                        len(np.unique(arrays["duplicates"][:, 0])))
        info = {"terminator": terminator, "meta": dict(meta or {}), **(report or {})}
        return cls._finish(arrays, info)

    @classmethod
    def from_titles(cls, titles: Sequence[str], tokenizer, answer_prefix: str,
                    terminator: int | str = "\n", kb_fingerprint: str = "") -> "EntityTrie":
        """Trie of ``titles`` tokenized exactly as the model emits them after ``answer_prefix``.

        ``terminator``: a token id, or the text the template puts right after the answer (its
        first token, in context, is the terminator; GEMEL's template: ``"\\n"``). Titles whose
        tokens merge with the answer prefix are tokenized alone and listed in
        ``trie.boundary_merged``; titles whose last token merges with the terminator text end
        either way (that merged token, or their own tokens + the terminator) and are listed in
        ``trie.terminator_merged``.
        """
        tok = tokenize_titles(titles, tokenizer, answer_prefix, terminator)
        meta = {"tokenizer": tokenizer_identity(tokenizer), "answer_prefix": answer_prefix,
                "terminator": tok.terminator, "terminator_text": tok.terminator_text,
                "kb_fingerprint": kb_fingerprint}
        report = {"boundary_merged": [titles[i] for i in tok.boundary_merged],
                  "terminator_merged": [titles[i] for i in tok.terminator_merged]}
        natural = (np.asarray(tok.terminator_merged, dtype=np.int64),
                   np.fromiter((t for p in tok.natural_paths for t in p), dtype=np.int64),
                   lengths_to_offsets(np.fromiter(map(len, tok.natural_paths), dtype=np.int64)))
        try:
            return cls.build_flat(tok.tokens, tok.offsets, tok.terminator, meta, report=report,
                                  natural=natural)
        except DataError as err:
            if err.record is None:
                raise
            raise DataError(f"title {titles[err.record]!r} contains the terminator token "
                            f"{tok.terminator} ({tok.terminator_text!r}), or ends where another "
                            "title's path continues", record=err.record,
                            field="title", fix="remove it from the title (a generated answer "
                            "ends at the terminator) or choose another terminator") from None

    @classmethod
    def _finish(cls, arrays: dict, info: dict) -> "EntityTrie":
        """Add the prefix-hash index to level-ordered arrays."""
        table, slots, shared = hash_index(arrays["edge_token"], arrays["child_start"],
                                           arrays["parent"], arrays["level_start"])
        arrays["prefix_index"] = table
        return cls(arrays, {**info, "slots": slots, "shared_hashes": shared})

    # -- queries -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of titles."""
        return len(self.title_leaf)

    def __repr__(self) -> str:
        return (f"EntityTrie({len(self)} titles, {len(self.edge_token)} nodes, "
                f"terminator={self.terminator})")

    def _children_of(self, prefix: list) -> tuple[int, int]:
        """(child_lo, child_hi) of the internal node of a non-empty prefix of Python ints, or
        (-1, -1) if it is not in the trie. Reads the hash's slot and, mostly, nothing more."""
        h = hash(tuple(prefix)) if NATIVE_HASH else tuple_hash(prefix)
        hash_at = self._hash_at
        i = ((((h >> 32) + 2147483648) * self.slots) >> 32) << 1  # the slot's flat offset
        x = hash_at[i]
        while x < h:  # rows are sorted by hash; a larger one or an empty row stops the scan
            i += 2
            x = hash_at[i]
        if x != h:
            return -1, -1
        lo, hi = self._range_at[2 * i + 2], self._range_at[2 * i + 3]
        if lo < 0:  # a hash two nodes share: walk
            node = self._walk(prefix)
            return (self._cs[node], self._cs[node + 1]) if node >= 0 else (-1, -1)
        # Node hashes are unique (else lo < 0), so a prefix in the trie finds its own node. A
        # prefix NOT in the trie hits a node's hash with p ~ nodes / 2**64; the node's depth
        # (its first child's level) must match too.
        d = len(prefix) + 1
        ls = self._ls
        if d + 1 < len(ls) and ls[d] <= lo < ls[d + 1]:
            return lo, hi
        return -1, -1

    def _walk(self, prefix: list) -> int:
        """Exact lookup, child by child from the root."""
        node = 0
        for t in prefix:
            node = self.step(node, t)
        return node

    def node_of(self, prefix_tokens: Sequence[int]) -> int:
        """The node reached from the root by ``prefix_tokens`` (leaves included), or -1."""
        prefix = _as_ints(prefix_tokens)
        if not prefix:
            return 0
        if prefix[-1] != self.terminator:
            lo, _ = self._children_of(prefix)
            if lo >= 0:
                node = self._par[lo]
                return node if self._tok[node] == prefix[-1] else -1  # last-token check
        # not an internal node: a leaf (only internal nodes are hashed) below an internal parent
        if len(prefix) == 1:
            parent = 0
        else:
            lo, _ = self._children_of(prefix[:-1])
            parent = self._par[lo] if lo >= 0 and self._tok[self._par[lo]] == prefix[-2] else -1
        node = self.step(parent, prefix[-1])
        return node if node > 0 and self._cs[node] == self._cs[node + 1] else -1

    def allowed(self, prefix_tokens: Sequence[int]) -> np.ndarray:
        """Tokens that may follow ``prefix_tokens``: a sorted int32 view [k]; empty when the
        prefix is not in the trie or ends a title. O(len(prefix)), whatever the subtree size."""
        # The hot path of constrained decoding: _children_of() inlined, state in memoryviews.
        prefix = prefix_tokens if type(prefix_tokens) is list else _as_ints(prefix_tokens)
        if not prefix:
            return self._root_allowed
        last = prefix[-1]
        if type(last) is not int:
            prefix = _as_ints(prefix)
            last = prefix[-1]
        if last == self.terminator:
            return self._empty
        h = hash(tuple(prefix)) if NATIVE_HASH else tuple_hash(prefix)
        hash_at = self._hash_at
        i = ((((h >> 32) + 2147483648) * self.slots) >> 32) << 1
        x = hash_at[i]
        while x < h:
            i += 2
            x = hash_at[i]
        if x != h:
            return self._empty
        i += i
        range_at = self._range_at
        lo = range_at[i + 2]
        d = len(prefix) + 1
        try:
            if self._ls[d] <= lo < self._ls[d + 1]:
                return self.edge_token[lo:range_at[i + 3]]
        except IndexError:  # longer than any title
            pass
        if lo < 0:  # a hash that two nodes share (~never): exact walk
            lo, hi = self._children_of(prefix)
            if lo >= 0:
                return self.edge_token[lo:hi]
        return self._empty

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [k] view, child node ids int64 [k]) of ``node``, sorted by token."""
        lo, hi = self._cs[node], self._cs[node + 1]
        return self.edge_token[lo:hi], np.arange(lo, hi)

    def step(self, node: int, token: int) -> int:
        """The child of ``node`` along ``token``, or -1."""
        if node < 0:
            return -1
        lo, hi = self._cs[node], self._cs[node + 1]
        i = bisect.bisect_left(self._tok, token, lo, hi)
        return i if i < hi and self._tok[i] == token else -1

    def value(self, node: int) -> int:
        """The title index of a leaf (where a title's path ends: after its terminator, or after
        a token merged with the terminator), else -1. O(1) for inner nodes."""
        if node <= 0 or node >= len(self._tok) or self._cs[node] != self._cs[node + 1]:
            return -1  # an inner node has children; only the root and leaves have none
        i = bisect.bisect_left(self._leaf, node)
        return self._lval[i] if i < len(self._leaf) and self._leaf[i] == node else -1

    def leaf_mask(self, nodes: np.ndarray) -> np.ndarray:
        """bool [k]: which of ``nodes`` (ids > 0, e.g. from :meth:`children`) end a title's path."""
        nodes = np.asarray(nodes)
        return self.child_start[nodes] == self.child_start[nodes + 1]

    def _title_pos(self, title_index: int) -> int:
        if self.title_ids is None:
            pos = title_index if 0 <= title_index < len(self.title_leaf) else -1
        else:
            pos = int(np.searchsorted(self.title_ids, title_index))
            if pos == len(self.title_ids) or self.title_ids[pos] != title_index:
                pos = -1
        if pos < 0:
            raise KeyError(f"title index {title_index} is not in this trie ({len(self)} titles)")
        return pos

    def sequence(self, title_index: int) -> list[int]:
        """Title ``title_index``'s natural path: its tokens after the answer prefix in
        ``answer_prefix + title + terminator_text``, up to the token that starts the terminator
        text (the terminator, or a token merged with it). Training targets use it."""
        return self._path(int(self.title_leaf[self._title_pos(int(title_index))]))

    def paths(self, title_index: int) -> list[list[int]]:
        """Every token path that ends title ``title_index``, the natural one first (a
        terminator-merged title also ends as its own tokens + the terminator)."""
        return [self._path(leaf) for leaf in self._leaves(self._title_pos(int(title_index)))]

    def _leaves(self, pos: int) -> list[int]:
        """Every leaf of the title at position ``pos``, natural first."""
        alt = self.alt_leaf
        lo, hi = np.searchsorted(alt[:, 0], [pos, pos + 1]) if len(alt) else (0, 0)
        return [int(self.title_leaf[pos])] + alt[lo:hi, 1].tolist()

    def _path(self, node: int) -> list[int]:
        out = []
        tok, par = self._tok, self._par
        while node > 0:
            out.append(tok[node])
            node = par[node]
        return out[::-1]

    def lengths(self) -> np.ndarray:
        """Tokens per title, terminator included, int64 [n] (a leaf's depth in the trie): a title
        longer than a search's ``max_new_tokens`` can never be generated."""
        return np.searchsorted(self.level_start, self.title_leaf, side="right") - 1

    def subtrie(self, title_indices: Sequence[int]) -> "EntityTrie":
        """The trie restricted to some titles; values keep the original title indices.

        Made of this trie's nodes on the root paths of every path of the chosen titles (kept in
        id order, which keeps level order), without re-tokenizing. Plain Python: for a few dozen
        titles that beats numpy's per-call overhead (~0.1-0.2 ms for 32 titles).
        """
        want = sorted({int(i) for i in title_indices})
        pos = [self._title_pos(i) for i in want] if self.title_ids is not None else want
        if self.title_ids is None and want and (want[0] < 0 or want[-1] >= len(self.title_leaf)):
            raise KeyError(f"title indices outside 0..{len(self.title_leaf) - 1}: "
                           f"{[i for i in want if not 0 <= i < len(self.title_leaf)][:5]}")
        par, tok, term = self._par, self._tok, self.terminator
        parent = {0: -1}
        leaves = [self._leaves(p) for p in pos]  # per title: natural leaf first
        for node in (x for ls in leaves for x in ls):
            while node not in parent:  # stop at the first node already on a chosen path
                parent[node] = node = par[node]
        old = sorted(parent)
        new_id = {o: i for i, o in enumerate(old)}
        up = [-1] + [new_id[parent[o]] for o in old[1:]]
        edge = [-1] + [tok[o] for o in old[1:]]
        ls = self._ls
        depth = [bisect.bisect_right(ls, o) - 1 for o in old]
        counts = np.bincount(up[1:], minlength=len(old)) if len(old) > 1 else np.zeros(1, int)
        paths = [()] * len(old)
        hashes, hash_nodes = [], []
        for i in range(1, len(old)):
            if counts[i]:  # inner nodes only: a leaf has no children to look up
                paths[i] = path = paths[up[i]] + (edge[i],)
                hashes.append(path)
                hash_nodes.append(i)
        hashes = list(map(hash if NATIVE_HASH else tuple_hash, hashes))
        leaf_value = {}
        for title, ls_ in zip(want, leaves):  # ascending titles: the first one per leaf is kept
            for leaf in ls_:
                leaf_value.setdefault(new_id[leaf], title)
        leaf_node = sorted(leaf_value)
        alt = [(i, new_id[x]) for i, ls_ in enumerate(leaves) for x in ls_[1:]]
        arrays = {"edge_token": np.array(edge, dtype=np.int32),
                  "child_start": np.concatenate([[1], np.cumsum(counts) + 1]).astype(np.int32),
                  "parent": np.array(up, dtype=np.int32),
                  "level_start": np.searchsorted(depth, np.arange(depth[-1] + 2)).astype(np.int64),
                  "leaf_node": np.array(leaf_node, dtype=np.int32),
                  "leaf_value": np.array([leaf_value[x] for x in leaf_node], dtype=np.int64),
                  "title_leaf": np.array([new_id[ls_[0]] for ls_ in leaves], dtype=np.int32),
                  "title_ids": np.array(want, dtype=np.int64),
                  "alt_leaf": np.array(alt, dtype=np.int64).reshape(-1, 2)}
        arrays["prefix_index"], slots, shared = small_index(hashes, hash_nodes,
                                                             arrays["child_start"])
        meta = {**self.meta, "subtrie_of": self.meta.get("n_titles")}
        return EntityTrie(arrays, {"terminator": term, "meta": meta, "slots": slots,
                                   "shared_hashes": shared})

    # -- persistence -------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Write ``<name>.npy`` arrays and ``trie.json`` (written last: a folder without it is
        an unfinished save)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "trie.json").unlink(missing_ok=True)
        for name in ARRAYS:
            arr = getattr(self, name)
            path = folder / f"{name}.npy"
            if arr is None or (name in ("duplicates", "alt_leaf") and not len(arr)):
                path.unlink(missing_ok=True)
                continue
            # renamed over the old file: a trie loaded (mmap) from here keeps the old file's pages
            with atomic_file(path, "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        info = {"format": FORMAT, "version": VERSION, "terminator": self.terminator,
                "hash": HASH_NAME, "slots": self.slots,
                "shared_hashes": sorted(self._shared),
                "n_nodes": len(self.edge_token), "meta": self.meta,
                "boundary_merged": self.boundary_merged,
                "terminator_merged": self.terminator_merged}
        write_atomic(folder / "trie.json", json.dumps(info, indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike, expect: dict | None = None,
             mmap: bool = True) -> "EntityTrie":
        """Load a saved trie (memory-mapped unless ``mmap=False``).

        ``expect``: metadata the caller needs (tokenizer identity, kb_fingerprint, answer_prefix,
        terminator ...); any differing key raises MismatchError naming both values.
        """
        folder = Path(folder)
        path = folder / "trie.json"
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError("no trie.json: not a saved entity trie, or an unfinished save",
                            path=folder, fix="build it again (`gemel build-trie`)") from None
        except json.JSONDecodeError as err:
            raise DataError(f"unreadable JSON ({err})", path=path,
                            fix="build the trie again (`gemel build-trie`)") from None
        if info.get("format") != FORMAT or info.get("version") != VERSION \
                or info.get("hash") != HASH_NAME:
            old = _VERSIONS.get(info.get("version")) if info.get("format") == FORMAT else None
            raise DataError(f"format {info.get('format')!r} version {info.get('version')!r}, "
                            f"expected {FORMAT!r} version {VERSION}"
                            + (f" (version {info.get('version')}: {old})" if old else ""),
                            path=path, fix="build the trie again with this gemel version "
                            "(`gemel build-trie`, or delete the folder if it is a cached trie)")
        meta = info.get("meta") or {}
        for key, want in (expect or {}).items():
            have = meta.get(key)
            if _normal(_same_ids(key, have)) != _normal(_same_ids(key, want)):
                raise MismatchError(f"entity trie {folder} was built for {key}={have!r}, but this "
                                    f"run needs {key}={want!r}; rebuild it (`gemel build-trie`) "
                                    "or point to the trie built for this setting")
        arrays = {}
        for name in ARRAYS:
            p = folder / f"{name}.npy"
            if p.exists():
                # np.asarray: a plain ndarray view of the map (slicing a np.memmap runs Python
                # code, which would add ~1 us to every allowed())
                arrays[name] = np.asarray(np.load(p, mmap_mode="r" if mmap else None,
                                                  allow_pickle=False))
            elif name not in _OPTIONAL:
                raise DataError(f"missing {p.name}", path=folder,
                                fix="build the trie again (`gemel build-trie`)")
        if len(arrays["edge_token"]) != info.get("n_nodes"):
            raise DataError(f"edge_token.npy has {len(arrays['edge_token'])} nodes, trie.json says "
                            f"{info.get('n_nodes')}", path=folder, fix="build the trie again")
        return cls(arrays, info)


# -- construction internals ------------------------------------------------------------------------


def _as_ints(prefix) -> list:
    if not isinstance(prefix, (list, tuple)):
        prefix = prefix.tolist() if hasattr(prefix, "tolist") else list(prefix)
    if prefix and type(prefix[-1]) is not int:  # numpy / torch scalars would overflow the hash
        prefix = [int(t) for t in prefix]
    return prefix


def _same_ids(key: str, value):
    """What must match: a tokenizer's vocabulary, not the path it was loaded from (the same
    tokenizer copied elsewhere makes the same token ids)."""
    if key == "tokenizer" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "name_or_path"}
    return value


def _normal(value):
    """JSON round trip, so that tuples and lists (and int keys) compare like the saved value."""
    return json.loads(json.dumps(value, sort_keys=True))


__all__ = ["EntityTrie"]
