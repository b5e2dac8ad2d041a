"""EntityTrie: the KB titles as token sequences, in a static level-ordered trie of flat arrays.

Why not a dict trie or GENRE's marisa trie: a dict of dicts takes ~8.5 GB for 5M titles, and a
marisa trie of token strings answers "which tokens may follow?" by enumerating every key below the
prefix (~22 ms near the root for 5M titles). Here every node is a row in numpy arrays:

* nodes are numbered level by level (breadth first), and within a level in lexicographic order of
  their prefixes, so the children of node ``p`` are the contiguous ids
  ``first_child[p] : first_child[p + 1]``, sorted by token;
* ``allowed(prefix)`` finds the prefix's node through a 64-bit rolling hash of the prefix (one
  binary search over the sorted node hashes, then a check of depth and last token) and returns a
  view of ``token[...]``: its cost does not grow with the number of titles below the prefix;
* the beam search walks node ids directly (``children(node)``), without hashing at all.

A title's sequence is its tokens as the model would emit them after the template's answer prefix,
then the terminator; the node reached by the terminator is a leaf whose ``value`` is the title index.
Saved as ``.npy`` files plus ``trie.json``; loaded memory-mapped. No pickle.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from gemel.errors import GemelError, MismatchError

log = logging.getLogger(__name__)

MASK64 = (1 << 64) - 1
HASH_SEED = 0x9E3779B97F4A7C15
HASH_MULTIPLIERS = (0x100000001B3, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)
ARRAYS = ("token", "first_child", "parent", "leaf_value", "depth", "hash_sorted", "hash_node", "leaf")
FORMAT = 1


def tokenizer_identity(tokenizer) -> dict:
    """What decides whether token ids mean the same thing: class, size and a hash of the vocab."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    return {"class": type(tokenizer).__name__, "size": len(vocab),
            "vocab_sha256": digest.hexdigest()[:16]}


class EntityTrie:
    root = 0

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict):
        self.meta = meta
        self.terminator = int(meta["terminator"])
        self.multiplier = int(meta["hash_multiplier"])
        for name in ARRAYS:
            setattr(self, name, arrays[name])
        self.boundary_merged: list[str] = list(meta.get("boundary_merged", []))
        # memoryviews: Python-int indexing without numpy scalar overhead (the hot path of allowed()).
        self._hash = memoryview(self.hash_sorted)
        self._hash_node = memoryview(self.hash_node)
        self._depth = memoryview(self.depth)
        self._token = memoryview(self.token)
        self._first = memoryview(self.first_child)

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, sequences: Sequence[Sequence[int]], terminator: int, meta: dict | None = None,
              values: Sequence[int] | None = None) -> "EntityTrie":
        """Trie of ``sequences[i] + [terminator]`` whose leaf holds ``values[i]`` (default ``i``).

        Identical sequences keep the first one's value; the others are listed in meta["duplicates"].
        """
        n = len(sequences)
        values = np.arange(n, dtype=np.int64) if values is None else np.asarray(values, np.int64)
        lengths = np.fromiter((len(s) + 1 for s in sequences), dtype=np.int64, count=n)
        width = int(lengths.max()) if n else 1
        vmax = max((max(s) for s in sequences if len(s)), default=0)
        vmax = max(vmax, terminator)
        dtype = np.uint16 if vmax + 1 < 2 ** 16 else np.uint32
        # Rows: tokens + 1 (0 is padding, which sorts before every token), then the terminator.
        mat = np.zeros((n, width), dtype=dtype)
        flat = np.fromiter((t + 1 for s in sequences for t in s), dtype=np.int64,
                           count=int(lengths.sum()) - n)
        rows = np.repeat(np.arange(n), lengths - 1)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths - 1) - (lengths - 1), lengths - 1)
        mat[rows, cols] = flat
        mat[np.arange(n), lengths - 1] = terminator + 1
        del flat, rows, cols
        order = np.lexsort(mat.T[::-1]) if n else np.zeros(0, np.int64)  # stable: first title first
        mat, lengths, values = mat[order], lengths[order], values[order]
        # lcp[i]: first column where row i differs from row i-1 (width if identical).
        lcp = np.zeros(n, dtype=np.int64)
        step = max(1, 2 ** 24 // max(width, 1))
        for lo in range(1, n, step):
            hi = min(n, lo + step)
            diff = mat[lo:hi] != mat[lo - 1:hi - 1]
            lcp[lo:hi] = np.where(diff.any(1), diff.argmax(1), width)
        tokens, parents, depths = [np.zeros(1, np.int64)], [np.full(1, -1, np.int64)], [np.zeros(1, np.int64)]
        leaf_value_node, leaf_value = [], []
        dup_rows = lcp >= lengths
        dup_rows[0] = False
        node_of_row = np.zeros(n, dtype=np.int64)  # the root, for depth -1
        offset = 1
        for d in range(width):
            active = np.flatnonzero(lengths > d)
            is_new = lcp[active] <= d
            local = np.cumsum(is_new) - 1
            new_rows = active[is_new]
            tokens.append(mat[new_rows, d].astype(np.int64) - 1)
            parents.append(node_of_row[new_rows])
            depths.append(np.full(len(new_rows), d + 1, np.int64))
            node_of_row[active] = offset + local
            ends = active[(lengths[active] == d + 1) & is_new]
            leaf_value_node.append(node_of_row[ends])
            leaf_value.append(values[ends])
            offset += len(new_rows)
        token = np.concatenate(tokens)
        parent = np.concatenate(parents)
        depth = np.concatenate(depths)
        n_nodes = len(token)
        counts = np.bincount(parent[1:], minlength=n_nodes)
        first_child = np.concatenate([[1], 1 + np.cumsum(counts)])
        value = np.full(n_nodes, -1, dtype=np.int64)
        value[np.concatenate(leaf_value_node)] = np.concatenate(leaf_value)
        leaf = np.full(int(values.max()) + 1 if n else 0, -1, dtype=np.int64)
        leaf[value[value >= 0]] = np.flatnonzero(value >= 0)
        duplicates = sorted(int(v) for v in values[dup_rows])
        leaf_of_dup = node_of_row[dup_rows]  # identical rows end on the first one's leaf
        leaf[values[dup_rows]] = leaf_of_dup
        hash_sorted, hash_node, multiplier = _node_hashes(token, parent, offset_levels=depth)
        idx_dtype = np.int32 if n_nodes < 2 ** 31 else np.int64
        arrays = {"token": token.astype(np.int32), "first_child": first_child.astype(idx_dtype),
                  "parent": parent.astype(idx_dtype), "leaf_value": value.astype(np.int64),
                  "depth": depth.astype(np.uint16), "hash_sorted": hash_sorted,
                  "hash_node": hash_node.astype(idx_dtype), "leaf": leaf.astype(idx_dtype)}
        meta = dict(meta or {})
        meta.update({"format": FORMAT, "terminator": int(terminator), "n_titles": n,
                     "n_nodes": int(n_nodes), "hash_multiplier": multiplier,
                     "duplicates": duplicates[:1000], "n_duplicates": len(duplicates)})
        return cls(arrays, meta)

    @classmethod
    def from_titles(cls, titles: Sequence[str], tokenizer, answer_prefix: str,
                    terminator: int | str = "\n", kb_fingerprint: str = "") -> "EntityTrie":
        """Tokenize each title exactly as the model would emit it after ``answer_prefix``.

        ``terminator``: a token id, or the text the template puts right after the answer (its
        first token, in context, is the terminator).
        """
        term_id = resolve_terminator(tokenizer, answer_prefix, terminator)
        prefix_ids = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
        encoded = tokenizer([answer_prefix + t for t in titles], add_special_tokens=False)["input_ids"]
        sequences, merged = [], []
        k = len(prefix_ids)
        for title, ids in zip(titles, encoded):
            if ids[:k] == prefix_ids and len(ids) > k:
                sequences.append(ids[k:])
            else:  # a BPE merge crosses the prefix/title boundary: tokenize the title alone
                merged.append(title)
                sequences.append(tokenizer(title, add_special_tokens=False)["input_ids"])
        if merged:
            log.warning("%d title(s) merge with the answer prefix %r when tokenized; they are "
                        "tokenized alone instead (e.g. %r)", len(merged), answer_prefix, merged[:3])
        meta = {"tokenizer": tokenizer_identity(tokenizer), "answer_prefix": answer_prefix,
                "kb_fingerprint": kb_fingerprint, "boundary_merged": merged}
        return cls.build(sequences, term_id, meta)

    # -- queries ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.meta["n_titles"])

    def node_of(self, prefix_tokens) -> int:
        """The node reached by ``prefix_tokens`` from the root, or -1."""
        if hasattr(prefix_tokens, "tolist"):
            prefix_tokens = prefix_tokens.tolist()
        if not prefix_tokens:
            return 0
        h, m = HASH_SEED, self.multiplier
        for t in prefix_tokens:
            h = (h * m + t + 1) & MASK64
        i = bisect.bisect_left(self._hash, h)
        if i == len(self._hash) or self._hash[i] != h:
            return -1
        node = self._hash_node[i]
        if self._depth[node] != len(prefix_tokens) or self._token[node] != prefix_tokens[-1]:
            return -1  # a hash collision with a prefix that is not in the trie
        return node

    def allowed(self, prefix_tokens) -> np.ndarray:
        """Tokens that may follow ``prefix_tokens`` (sorted int32 view; empty if none)."""
        node = self.node_of(prefix_tokens)
        if node < 0:
            return self.token[:0]
        return self.token[self._first[node]:self._first[node + 1]]

    def children(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, child node ids) of ``node``; children ids are contiguous."""
        lo, hi = self._first[node], self._first[node + 1]
        return self.token[lo:hi], np.arange(lo, hi)

    def step(self, node: int, token: int) -> int:
        tokens, _ = self.children(node)
        i = int(np.searchsorted(tokens, token))
        return self._first[node] + i if i < len(tokens) and tokens[i] == token else -1

    def value(self, node: int) -> int:
        """The title index if ``node`` is the leaf reached by a title's terminator, else -1."""
        return int(self.leaf_value[node])

    def sequence(self, title_index: int) -> list[int]:
        """Title ``title_index``'s tokens including the terminator (walks up from its leaf)."""
        node = int(self.leaf[title_index]) if title_index < len(self.leaf) else -1
        if node < 0:
            raise KeyError(f"title index {title_index} is not in this trie")
        out = []
        while node > 0:
            out.append(int(self.token[node]))
            node = int(self.parent[node])
        return out[::-1]

    def subtrie(self, title_indices: Sequence[int]) -> "EntityTrie":
        """The trie restricted to some titles; leaves keep the original title indices."""
        idx = [int(i) for i in title_indices if 0 <= int(i) < len(self.leaf) and self.leaf[int(i)] >= 0]
        seqs = [self.sequence(i)[:-1] for i in idx]
        meta = {k: v for k, v in self.meta.items() if k not in ("boundary_merged", "duplicates")}
        return EntityTrie.build(seqs, self.terminator, meta, values=idx)

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(self, name)), allow_pickle=False)
        (tmp / "trie.json").write_text(json.dumps(self.meta, indent=1, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        if folder.exists():
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
        tmp.rename(folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, expect: dict | None = None, mmap: bool = True
             ) -> "EntityTrie":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "trie.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise GemelError(f"{folder} is not a saved entity trie ({err}); build one with "
                             "`gemel build-trie`") from err
        for key, want in (expect or {}).items():
            if meta.get(key) != want:
                raise MismatchError(f"trie {folder} was built for {key}={meta.get(key)!r}, but this "
                                    f"run needs {key}={want!r}; rebuild it with `gemel build-trie`")
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None,
                                allow_pickle=False) for name in ARRAYS}
        return cls(arrays, meta)


def resolve_terminator(tokenizer, answer_prefix: str, terminator: int | str) -> int:
    """The first token of ``terminator`` text as it follows an answer (or the given id)."""
    if isinstance(terminator, int):
        return terminator
    without = tokenizer(answer_prefix + "x", add_special_tokens=False)["input_ids"]
    with_term = tokenizer(answer_prefix + "x" + terminator, add_special_tokens=False)["input_ids"]
    if with_term[:len(without)] == without and len(with_term) > len(without):
        return int(with_term[len(without)])
    raise GemelError(f"cannot find the token of terminator {terminator!r}: it merges with the "
                     "answer when tokenized; pass the terminator as a token id")


def _node_hashes(token: np.ndarray, parent: np.ndarray, offset_levels: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """Rolling 64-bit hash of every node's prefix, sorted, with the node of each hash.

    Nodes are level-ordered, so parents are hashed before children; one vectorised pass per level.
    Retries with another multiplier in the (astronomically unlikely) case of a collision.
    """
    bounds = np.flatnonzero(np.diff(offset_levels)) + 1
    levels = np.split(np.arange(len(token)), bounds)
    for m in HASH_MULTIPLIERS:
        h = np.empty(len(token), dtype=np.uint64)
        h[0] = HASH_SEED
        mul = np.uint64(m)
        with np.errstate(over="ignore"):
            for ids in levels[1:]:
                h[ids] = h[parent[ids]] * mul + (token[ids].astype(np.uint64) + np.uint64(1))
        order = np.argsort(h, kind="stable")
        hs = h[order]
        if not np.any(hs[1:] == hs[:-1]):
            return hs, order, m
    raise GemelError("entity trie: hash collision with every multiplier; please report this")
