"""Building the entity trie's level-ordered node arrays from token paths, vectorised: one
numpy pass per depth (no Python loop over titles), arrays at their upper bound filled in place
(peak memory for 5M titles). See :class:`gemel.trie.EntityTrie` for the arrays and
docs/architecture.md for where this sits.
"""
from __future__ import annotations

import numpy as np

from gemel.errors import DataError

_KEY_BITS = 64  # a level's (parent, token, row) sort key must fit; else the argsort path


def check_sequences(tokens: np.ndarray, offsets: np.ndarray, terminator: int) -> None:
    """Titles as ``tokens[offsets[i]:offsets[i + 1]]``: offsets rising from 0, token ids >= 0,
    no terminator inside a title."""
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



def check_paths(index: np.ndarray, tokens: np.ndarray, offsets: np.ndarray, n: int,
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



def build_levels(paths: dict, n_titles: int) -> dict:
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
    """The leaves :func:`build_levels` finds, level by level, in arrays at their upper bound
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

