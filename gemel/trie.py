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

Built with a handful of vectorised numpy passes per trie level (no Python loop over titles); see
``benchmarks/trie.py`` for 25k / 1M / 5M titles. Saved as ``.npy`` files plus ``trie.json``,
loaded memory-mapped; no pickle.
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
from gemel.title_tokens import lengths_to_offsets, tokenize_titles, tokenizer_identity

log = logging.getLogger(__name__)

MASK64 = (1 << 64) - 1
# The prefix hash is CPython's tuple hash of the token ids (xxHash-style, 3.8+), so that a lookup
# hashes in C (~0.15 us for 8 tokens, against ~2 us for a rolling hash in Python) while numpy
# computes the same value for every node, level by level. _NATIVE says whether this interpreter
# agrees (checked at import); if not, queries use the pure-Python version of the same function.
_XXP1, _XXP2, _XXP5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
HASH_NAME = "cpython-tuple-xxh64"
FORMAT = "gemel-entity-trie"
# bump whenever the saved arrays change. 2: hashed prefix buckets (slots); 3: several token paths
# per title (a leaf may follow a token merged with the terminator), alt_leaf
VERSION = 3
_VERSIONS = {2: "one token path per title: titles whose last token merges with the terminator "
                "could only end as `title tokens + terminator`"}
ARRAYS = ("edge_token", "child_start", "parent", "level_start", "prefix_index", "leaf_node",
          "leaf_value", "title_leaf", "title_ids", "duplicates", "alt_leaf")
_OPTIONAL = ("title_ids", "duplicates", "alt_leaf")
_CHUNK = 1 << 20  # elements per chunk where a full-size temporary would cost memory
_KEY_BITS = 64  # a level's (parent, token, row) sort key must fit; else the argsort path
_LOAD = 0.75  # entries per slot of the prefix table (mean probe ~1.5 entries, in one cache line)


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
        _check_sequences(tokens, offsets, terminator)
        n = len(offsets) - 1
        extra = natural is not None and len(natural[0])
        if extra:
            index, ntok, noff = (np.asarray(a, dtype=np.int64) for a in natural)
            _check_paths(index, ntok, noff, n, terminator)
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
        # handed over in a dict that _build_levels empties: no reference stays here, so the
        # rows are freed before the prefix index is built (peak memory)
        rows = {"flat": flat, "start": start, "last": last, "title": row_title}
        del flat, start, last, row_title
        arrays = _build_levels(rows, n)
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
        table, slots, shared = _hash_index(arrays["edge_token"], arrays["child_start"],
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
        h = hash(tuple(prefix)) if _NATIVE else _tuple_hash(prefix)
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
        h = hash(tuple(prefix)) if _NATIVE else _tuple_hash(prefix)
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
        hashes = list(map(hash if _NATIVE else _tuple_hash, hashes))
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
        arrays["prefix_index"], slots, shared = _small_index(hashes, hash_nodes,
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
            tmp = folder / f".{name}.tmp.npy"
            np.save(tmp, np.ascontiguousarray(arr), allow_pickle=False)
            os.replace(tmp, path)  # a trie loaded (mmap) from here keeps the old file's pages
        info = {"format": FORMAT, "version": VERSION, "terminator": self.terminator,
                "hash": HASH_NAME, "slots": self.slots,
                "shared_hashes": sorted(self._shared),
                "n_nodes": len(self.edge_token), "meta": self.meta,
                "boundary_merged": self.boundary_merged,
                "terminator_merged": self.terminator_merged}
        tmp = folder / ".trie.tmp.json"
        tmp.write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "trie.json")

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


def _check_sequences(tokens: np.ndarray, offsets: np.ndarray, terminator: int) -> None:
    if offsets.ndim != 1 or len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens) \
            or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must rise from 0 to len(tokens)")
    if terminator < 0:
        raise DataError(f"terminator {terminator} is negative", field="terminator",
                        fix="pass a token id")
    if len(tokens) and int(tokens.min()) < 0:
        row = int(np.searchsorted(offsets, int(np.argmax(tokens < 0)), side="right") - 1)
        raise DataError("negative token id", record=row, field="tokens", fix="pass token ids >= 0")
    hit = np.flatnonzero(tokens == terminator)
    if len(hit):
        row = int(np.searchsorted(offsets, hit[0], side="right") - 1)
        raise DataError(f"sequence {row} contains the terminator {terminator}", record=row,
                        field="tokens", fix="a title ends at the terminator: remove it from the "
                        "title or choose another terminator")


def _check_paths(index: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, n: int,
                 terminator: int) -> None:
    """Natural paths: distinct titles in 0..n-1, non-empty, token ids >= 0, the terminator at
    most as the last token."""
    if len(offsets) != len(index) + 1 or offsets[0] != 0 or offsets[-1] != len(tokens) \
            or np.any(np.diff(offsets) <= 0):
        raise ValueError("natural paths: offsets must rise strictly from 0 to len(tokens)")
    if len(index) and (index.min() < 0 or index.max() >= n or len(np.unique(index)) < len(index)):
        raise ValueError(f"natural paths: title indices must be distinct, in 0..{n - 1}")
    if len(tokens) and int(tokens.min()) < 0:
        raise DataError("negative token id in a natural path", field="tokens",
                        fix="pass token ids >= 0")
    hit = np.flatnonzero(tokens == terminator)
    inner = hit[~np.isin(hit, offsets[1:] - 1)]
    if len(inner):
        row = int(index[np.searchsorted(offsets, inner[0], side="right") - 1])
        raise DataError(f"the natural path of title {row} has the terminator {terminator} before "
                        "its end", record=row, field="tokens",
                        fix="a title ends at the terminator: choose another terminator")


def _build_levels(paths: dict, n_titles: int) -> dict:
    """Level-ordered node arrays of the trie of the paths ``flat[start[r]:last[r] + 1]``, each
    complete (with its end token) and non-empty; row ``r`` ends title ``title[r]`` (None: title
    ``r``). Rows ``0..n_titles - 1`` are the titles' natural paths (``title[r] == r``), the others
    their alternatives. ``paths`` holds flat, start, last and title, and is emptied (consumed).

    One pass per depth d over the rows still active (longer than d): sort them by (node at
    depth d, token d) with ONE ``np.sort`` of packed uint64 keys (numpy's vectorised sort is
    ~6x faster than argsort; the row's position rides in the low bits), then a new node starts
    wherever (parent, token) changes. Rows end at their last token, at a leaf; a node where one
    row ends and another goes on is an error (a title would hold the terminator text).
    """
    flat, row_start, row_last = paths.pop("flat"), paths.pop("start"), paths.pop("last")
    row_title = paths.pop("title")
    n = len(row_start)
    tbits = max(int(flat.max()) + 1 if len(flat) else 1, 1).bit_length()
    idx_dtype = np.int32 if len(flat) + 1 < 2 ** 31 else np.int64
    at = row_start.astype(idx_dtype, copy=False)  # each active row's position in flat at depth d
    last = row_last.astype(idx_dtype, copy=False)  # ... and of its last token
    del row_start, row_last
    positions = np.arange(n, dtype=np.uint64)
    # Outputs at their upper bound (a node per token, plus the root), filled level by level:
    # pages never written stay virtual, and no per-level pieces pin the heap between the
    # temporaries (which would keep freed memory resident).
    cap = len(flat) + 1
    edge = np.empty(cap, dtype=np.int32)
    child_start = np.empty(cap + 1, dtype=idx_dtype)
    parent = np.empty(cap, dtype=idx_dtype)
    edge[0], parent[0] = -1, -1
    level_start = [0, 1]
    leaves = _Leaves(n, n_titles, idx_dtype)
    rows = np.arange(n, dtype=idx_dtype)  # active rows, grouped by their node at depth d
    prank = np.zeros(n, dtype=np.uint64)  # that node's rank within depth d
    count = 1
    while len(rows):
        k = len(rows)
        start = level_start[-1]  # the first node id of depth d + 1
        tok = flat[at]  # the one random gather per level; at and rows move with the sort
        any_end = bool((at == last).any())
        order, new, new_par, new_tok = _group_level(prank, tok, positions[:k], count, tbits)
        del tok
        rows, at, last = rows[order], at[order], last[order]
        del order
        ends = at == last if any_end else None
        rank = np.cumsum(new, dtype=np.uint64)
        rank -= np.uint64(1)
        n_new = len(new_tok)
        counts = np.bincount(new_par, minlength=count)
        new_par += level_start[-2]
        parent[start:start + n_new] = new_par
        del new_par
        cs = child_start[level_start[-2]:start]  # this level's nodes: where their children start
        np.cumsum(counts, out=cs)
        cs -= counts
        cs += start
        edge[start:start + n_new] = new_tok
        del cs, counts, new_tok
        if any_end:
            leaves.add(ends, new, rows, rank, start, row_title)
            keep = ~ends
            rows, prank, at, last = rows[keep], rank[keep], at[keep], last[keep]
            del keep, rank
        else:
            prank = rank
        del new, ends
        at += 1
        level_start.append(start + n_new)
        count = n_new
    del flat, at, last, positions, prank, rows
    n_nodes = level_start[-1]
    child_start[level_start[-2]:n_nodes + 1] = n_nodes  # the deepest level has no children
    # views of the first n_nodes entries: the unused tails were never touched (not resident)
    return dict(edge_token=edge[:n_nodes], child_start=child_start[:n_nodes + 1],
                parent=parent[:n_nodes], level_start=np.asarray(level_start, dtype=np.int64),
                title_ids=None, **leaves.arrays())


class _Leaves:
    """The leaves :func:`_build_levels` finds, level by level, in arrays at their upper bound
    (a leaf per path row) filled in place."""

    def __init__(self, n_rows: int, n_titles: int, idx_dtype):
        self.node = np.empty(n_rows, dtype=idx_dtype)  # leaf node ids, ascending
        self.value = np.empty(n_rows, dtype=idx_dtype)  # each leaf's title index
        self.count = 0
        self.n_titles = n_titles
        self.title_leaf = np.empty(n_titles, dtype=idx_dtype)  # natural leaf of each title
        self.alt_pairs: list[np.ndarray] = []  # (title, leaf) of the other paths
        self.dup_pairs: list[np.ndarray] = []  # (title, kept title) sharing a leaf

    def add(self, ends: np.ndarray, new: np.ndarray, rows: np.ndarray, rank: np.ndarray,
            start: int, row_title: np.ndarray | None) -> None:
        """Record the rows of one level (sorted by node) that end there. ``ends`` bool [k]: the
        row ends at this depth; ``new`` bool [k]: the row starts a node; ``rank`` [k]: its node's
        rank in the level, whose first id is ``start``; ``row_title``: row -> title (None: same)."""
        # rows of one node are adjacent: a node where one path ends and another goes on
        # shows as two neighbours of one group that disagree
        mixed = np.flatnonzero((ends[1:] != ends[:-1]) & ~new[1:])
        if len(mixed):
            i = int(mixed[0]) + (0 if ends[mixed[0]] else 1)
            r = int(rows[i]) if row_title is None else int(row_title[rows[i]])
            raise DataError(f"a token path of title {r} ends where another "
                            "title's path goes on", record=r, field="tokens",
                            fix="a title may not contain the terminator text: choose "
                            "another terminator")
        e = np.flatnonzero(ends)
        erows, egroup = rows[e], rank[e].astype(np.int64) + start
        etitle = row_title[erows] if row_title is not None else erows.astype(np.int64)
        heads = np.flatnonzero(new[e])  # each leaf's first row (a leaf's rows are adjacent)
        values = np.minimum.reduceat(etitle, heads)
        self.node[self.count:self.count + len(heads)] = egroup[heads]
        self.value[self.count:self.count + len(heads)] = values
        self.count += len(heads)
        natural = erows < self.n_titles
        self.title_leaf[erows[natural]] = egroup[natural]
        if not natural.all():
            self.alt_pairs.append(np.stack([etitle[~natural], egroup[~natural]], axis=1))
        if len(heads) < len(e):  # a path of several titles: report all but the first
            kept = np.repeat(values, np.diff(np.append(heads, len(e))))
            dup = etitle != kept
            self.dup_pairs.append(np.stack([etitle[dup], kept[dup]], axis=1).astype(np.int64))

    def arrays(self) -> dict[str, np.ndarray]:
        """leaf_node, leaf_value, title_leaf, alt_leaf and duplicates (see :class:`EntityTrie`)."""
        dups = np.concatenate(self.dup_pairs) if self.dup_pairs else np.zeros((0, 2), np.int64)
        alt = (np.concatenate(self.alt_pairs).astype(np.int64) if self.alt_pairs
               else np.zeros((0, 2), np.int64))
        alt = np.unique(alt[alt[:, 1] != self.title_leaf[alt[:, 0]]], axis=0)  # same as natural
        return dict(leaf_node=self.node[:self.count], leaf_value=self.value[:self.count],
                    title_leaf=self.title_leaf, alt_leaf=alt.reshape(-1, 2),
                    duplicates=np.unique(dups, axis=0).reshape(-1, 2))


def _group_level(prank: np.ndarray, tok: np.ndarray, positions: np.ndarray, count: int,
                 tbits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort one level's k active rows by (parent rank, token) and find where new nodes start.

    prank: uint64 [k], each row's node rank at depth d (consumed: the fast path shifts it in
    place); tok: [k] each row's token d; positions: uint64 [k] = 0..k-1; count: nodes at depth d.
    Returns order [k] (rows in sorted order), new: bool [k] (a row that starts a node), and the
    new nodes' parent ranks (int64) and tokens (int32).
    """
    k = len(tok)
    ibits = max(k - 1, 1).bit_length()
    pbits = max(count - 1, 1).bit_length()
    new = np.empty(k, dtype=bool)
    new[0] = True
    if pbits + tbits + ibits <= _KEY_BITS:
        # ONE np.sort of packed keys (parent | token | position) instead of an argsort
        key = prank
        key <<= np.uint64(tbits + ibits)
        t64 = tok.astype(np.uint64)
        t64 <<= np.uint64(ibits)
        key |= t64
        del t64
        key |= positions
        key.sort()
        order = (key & np.uint64((1 << ibits) - 1)).view(np.int64)
        key >>= np.uint64(ibits)  # (parent rank, token)
        np.not_equal(key[1:], key[:-1], out=new[1:])
        kf = key[np.flatnonzero(new)]
        del key
        return (order, new, (kf >> np.uint64(tbits)).astype(np.int64),
                (kf & np.uint64((1 << tbits) - 1)).astype(np.int32))
    # too many bits to pack: an argsort-based (slower) path, same result
    order = np.lexsort((tok, prank))
    par_s, tok_s = prank[order], tok[order]
    new[1:] = (par_s[1:] != par_s[:-1]) | (tok_s[1:] != tok_s[:-1])
    first = np.flatnonzero(new)
    return order, new, par_s[first].astype(np.int64), tok_s[first].astype(np.int32)


def _tuple_hash(seq: Sequence[int]) -> int:
    """CPython's ``hash(tuple(seq))`` (3.8+) for ints in [0, 2**61 - 1), in pure Python."""
    acc = _XXP5
    for t in seq:
        acc = (acc + t * _XXP2) & MASK64
        acc = ((acc << 31) | (acc >> 33)) & MASK64
        acc = (acc * _XXP1) & MASK64
    acc = (acc + (len(seq) ^ (_XXP5 ^ 3527539))) & MASK64
    if acc == MASK64:
        return 1546275796
    return acc - (1 << 64) if acc >> 63 else acc


def _native_matches() -> bool:
    import random
    import sys

    rng = random.Random(0)
    probes = [()] + [tuple(rng.randrange(2 ** 31) for _ in range(rng.randint(1, 9)))
                     for _ in range(64)]
    return sys.hash_info.width == 64 and all(hash(p) == _tuple_hash(p) for p in probes)


_NATIVE = _native_matches()
if not _NATIVE:  # e.g. PyPy or a future CPython: correct, but lookups hash in Python (~10x slower)
    log.warning("this Python's tuple hash differs from CPython 3.8+; entity-trie lookups use "
                "the slower pure-Python hash")


def _level_hashes(acc: np.ndarray, tokens: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(rolling accumulators, final signed hashes) of nodes at ``depth`` from their parents'
    accumulators ``acc`` (uint64 [k]) and their edge tokens [k]: CPython's tuple hash, stepwise."""
    acc = acc + tokens.astype(np.uint64) * np.uint64(_XXP2)
    acc = (acc << np.uint64(31)) | (acc >> np.uint64(33))
    acc *= np.uint64(_XXP1)
    final = acc + np.uint64(depth ^ (_XXP5 ^ 3527539))
    final[final == np.uint64(MASK64)] = np.uint64(1546275796)
    return acc, final.view(np.int64)


def _hash_index(edge: np.ndarray, child_start: np.ndarray, parent: np.ndarray,
                level_start: np.ndarray) -> tuple[dict, int, list[int]]:
    """The prefix index of a level-ordered trie: every internal node's (but the root's) prefix
    hash with its child range, placed in the prefix table (see the class docstring). Returns
    (table, slots S, hashes shared by two nodes).

    Built inside the table's own memory plus one column-sized buffer at a time: the hashes go to
    column 0 and the sort keys to column 1 of its first M rows, each column is sorted through a
    contiguous copy, the keys become child ranges in place, then the rows move to their slots.
    """
    n_nodes = len(edge)
    if n_nodes >= 2 ** 31:
        raise ValueError("entity trie: more than 2**31 nodes are not supported")
    internal = child_start[1:n_nodes + 1] > child_start[:n_nodes]  # leaves have no children
    internal[0] = False
    m = int(internal.sum())
    slots = _slot_count(m)
    index = np.empty((slots + _SPARE, 2), dtype=np.int64)  # untouched rows cost no memory
    hashes, keys = index[:m, 0], index[:m, 1].view(np.uint64)
    nbits = max(n_nodes - 1, 1).bit_length()
    # key = (hash top bits, in unsigned order) | node id. Sorting it (numpy's fast sort; an
    # argsort of the hashes is ~6x slower) lists the node ids in hash order, up to ties in the
    # top bits, fixed below.
    top = np.uint64(MASK64 ^ ((1 << nbits) - 1))
    sign = np.uint64(1 << 63)
    acc = np.full(1, _XXP5, dtype=np.uint64)
    filled = 0
    for d in range(len(level_start) - 2):
        lo, hi, nxt = (int(x) for x in level_start[d:d + 3])
        new_acc = np.empty(nxt - hi, dtype=np.uint64)
        for c in range(hi, nxt, _CHUNK):
            c_end = min(c + _CHUNK, nxt)
            a, final = _level_hashes(acc[parent[c:c_end] - lo], edge[c:c_end], d + 1)
            new_acc[c - hi:c_end - hi] = a
            sel = internal[c:c_end]
            h = final[sel]
            hashes[filled:filled + len(h)] = h
            k = h.view(np.uint64)
            k ^= sign
            k &= top
            k |= (np.flatnonzero(sel) + c).astype(np.uint64)
            keys[filled:filled + len(h)] = k
            filled += len(h)
        acc = new_acc
    del acc, internal
    buffer = np.ascontiguousarray(hashes)
    buffer.sort()
    hashes[:] = buffer
    del buffer
    keys = np.ascontiguousarray(keys)  # sorted apart; column 1 then gets the child ranges
    keys.sort()
    low = np.uint64((1 << nbits) - 1)
    # Where two hashes share their top bits (rare: ~m**2 / 2**(65 - nbits) pairs) the key order
    # is by node id: re-pair those nodes with their hashes, recomputed from their paths.
    tie = []
    for c in range(0, m, _CHUNK):
        tops = keys[c:c + _CHUNK + 1] >> np.uint64(nbits)
        tie.append(np.flatnonzero(tops[1:] == tops[:-1]) + c)
    tie = np.concatenate(tie) if tie else np.zeros(0, np.int64)
    if len(tie):
        where = np.unique(np.concatenate([tie, tie + 1]))
        nodes = (keys[where] & low).astype(np.int64)
        order = np.argsort(_path_hashes(nodes, edge, parent), kind="stable")
        keys[where] = (keys[where] & ~low) | nodes[order].astype(np.uint64)
    keys &= low  # node ids, in hash order
    nodes = keys.view(np.int64)
    span = index.view(np.int32).reshape(-1, 4)
    for c in range(0, m, _CHUNK):
        nd = nodes[c:c + _CHUNK]
        span[c:c + len(nd), 2] = child_start[nd]
        span[c:c + len(nd), 3] = child_start[nd + 1]
    del keys, nodes
    return _place(index, m, slots)


_SPARE = 4096  # rows past the S slots for the last cluster's overflow (grown if ever short)


def _slot_count(m: int) -> int:
    return max(int(m / _LOAD) + 1, 1)


def _slot_of(hashes: np.ndarray, slots: int) -> np.ndarray:
    """int64 slot of each signed hash: ((h >> 32) + 2**31) * S >> 32 (exact in uint64, S < 2**32),
    the same arithmetic as the lookup's."""
    u = ((hashes >> 32) + (1 << 31)).astype(np.uint64)
    u *= np.uint64(slots)
    u >>= np.uint64(32)
    return u.view(np.int64)


def _place(table: np.ndarray, m: int, slots: int) -> tuple[np.ndarray, int, list[int]]:
    """Move the M entries sorted by hash in ``table[:m]`` to their slots: entry e goes to
    pos[e] = max(slot[e], pos[e - 1] + 1), which keeps rows sorted; fill the empty rows with
    the smallest hash of the next slot, and end with an int64-max row. In place, by chunks,
    last chunk first (pos[e] >= e, so no entry is overwritten before it moves)."""
    hashes = table[:m, 0]
    same = np.flatnonzero(hashes[1:] == hashes[:-1]) if m > 1 else np.zeros(0, np.int64)
    shared = sorted({int(h) for h in hashes[same]})
    if shared:  # ~1e-5 for 5M titles; lookups of these hashes walk from the root instead
        log.info("entity trie: %d prefix hash(es) shared by two nodes", len(shared))
        table.view(np.int32).reshape(-1, 4)[:m, 2:][np.isin(hashes, shared)] = -1
    # pos[e] = e + max over j <= e of (slot[j] - j): a running maximum, carried across chunks
    carry, carries = np.iinfo(np.int64).min, []
    for c in range(0, m, _CHUNK):
        carries.append(carry)
        gap = _slot_of(hashes[c:c + _CHUNK], slots) - np.arange(c, min(c + _CHUNK, m))
        carry = max(carry, int(gap.max()))
    rows = max(slots, m + carry if m else 0) + 1  # the last entry's row + 1, or the S slots
    if rows + 1 > len(table):  # the last cluster ran past the spare rows (never seen)
        table = np.concatenate([table, np.empty((rows + 1 - len(table), 2), np.int64)])
    filled = np.zeros(rows + 1, dtype=bool)
    for k in range(len(carries) - 1, -1, -1):
        c = k * _CHUNK
        block = table[c:c + _CHUNK].copy() if c + _CHUNK <= m else table[c:m].copy()
        gap = _slot_of(block[:, 0], slots) - np.arange(c, c + len(block))
        np.maximum.accumulate(gap, out=gap)
        pos = np.maximum(gap, carries[k]) + np.arange(c, c + len(block))
        table[pos] = block
        filled[pos] = True
    table = table[:rows + 1]
    for c in range(0, rows, _CHUNK):  # empty row p: the smallest hash whose slot is > p
        p = np.flatnonzero(~filled[c:c + _CHUNK]) + c
        p = p[p < rows]
        first = -((-(p + 1) * (1 << 32)) // slots)  # ceil((p + 1) * 2**32 / S)
        table[p, 0] = np.where(first >= 1 << 32, np.iinfo(np.int64).max,
                               (np.minimum(first, (1 << 32) - 1) - (1 << 31)) << 32)
        table[p, 1] = 0
    table[rows] = (np.iinfo(np.int64).max, 0)  # stops every scan
    return table, slots, shared


def _small_index(hashes: list[int], nodes: list[int], child_start: np.ndarray
                 ) -> tuple[np.ndarray, int, list[int]]:
    """:func:`_hash_index` from (hash, node) lists, for small tries (sub-tries)."""
    pairs = sorted(zip(hashes, nodes))
    m = len(pairs)
    slots = _slot_count(m)
    table = np.empty((slots + _SPARE, 2), dtype=np.int64)
    table[:m, 0] = [h for h, _ in pairs]
    span = table.view(np.int32).reshape(-1, 4)
    span[:m, 2] = [child_start[x] for _, x in pairs]
    span[:m, 3] = [child_start[x + 1] for _, x in pairs]
    return _place(table, m, slots)


def _path_hashes(nodes: np.ndarray, edge: np.ndarray, parent: np.ndarray) -> np.ndarray:
    """Prefix hashes (signed) of some nodes, from their root paths."""
    out, tok, par = [], memoryview(edge), memoryview(parent)
    for node in nodes.tolist():
        path = []
        while node > 0:
            path.append(tok[node])
            node = par[node]
        out.append(_tuple_hash(path[::-1]))
    return np.asarray(out, dtype=np.int64)


__all__ = ["EntityTrie"]
