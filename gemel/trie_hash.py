"""The entity trie's prefix table: every internal node's prefix, hashed, with its child range.

The prefix hash is CPython's tuple hash of the token ids (xxHash-style, 3.8+), so that a lookup
hashes in C (~0.15 us for 8 tokens, against ~2 us for a rolling hash in Python) while numpy
computes the same value for every node, level by level. ``NATIVE_HASH`` says whether this
interpreter agrees (checked at import); if not, lookups use the pure-Python :func:`tuple_hash`.

The (hash, child_lo, child_hi) entries sit in one int64 table [R, 2], sorted by hash, each at the
slot its hash maps to or just after (ordered linear probing, 75% full); see
:class:`gemel.trie.EntityTrie` for the layout and the lookup, docs/architecture.md for the rest.
Built in place, by chunks, so that 5M titles fit in memory.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MASK64 = (1 << 64) - 1
_XXP1, _XXP2, _XXP5 = 11400714785074694791, 14029467366897019727, 2870177450012600261
HASH_NAME = "cpython-tuple-xxh64"  # saved in trie.json: a trie hashed otherwise is refused
_CHUNK = 1 << 20  # elements per chunk where a full-size temporary would cost memory
_LOAD = 0.75  # entries per slot of the prefix table (mean probe ~1.5 entries, in one cache line)


def tuple_hash(seq: Sequence[int]) -> int:
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
    return sys.hash_info.width == 64 and all(hash(p) == tuple_hash(p) for p in probes)



NATIVE_HASH = _native_matches()
if not NATIVE_HASH:  # e.g. PyPy or a future CPython: correct, but lookups hash in Python (~10x slower)
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



def hash_index(edge: np.ndarray, child_start: np.ndarray, parent: np.ndarray,
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



def small_index(hashes: list[int], nodes: list[int], child_start: np.ndarray
                 ) -> tuple[np.ndarray, int, list[int]]:
    """:func:`hash_index` from (hash, node) lists, for small tries (sub-tries)."""
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
        out.append(tuple_hash(path[::-1]))
    return np.asarray(out, dtype=np.int64)

