"""Exact, deterministic top-k over rows of a score matrix.

``np.argpartition`` alone picks an arbitrary subset of equal scores at the k-th place, and which
one it picks depends on the array it sees. Lexical and dense scores tie often (the same mention
string appears many times in a training set), so ties are broken here by the lower column index:
the same scores give the same k columns whether they were computed one query at a time or in a
batch.
"""
from __future__ import annotations

import numpy as np


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best columns of each row, best first.

    Args:
        scores: (B, N) float array; ``-inf`` marks a column that must not be chosen.
        k: how many columns per row.

    Returns:
        ``(values, indices)``, both (B, min(k, N)); sorted by value descending, equal values by
        column index ascending. A row with fewer than k finite scores is padded with ``-inf``
        entries: callers drop them.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, N), got shape {scores.shape}")
    n_rows, n_cols = scores.shape
    k = max(0, min(int(k), n_cols))
    if k == 0 or n_rows == 0:
        return (np.empty((n_rows, 0), dtype=scores.dtype), np.empty((n_rows, 0), dtype=np.int64))
    if k < n_cols:
        picked = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        picked = np.tile(np.arange(n_cols), (n_rows, 1))
    values = np.take_along_axis(scores, picked, axis=1)
    if k < n_cols:
        # Rows where more columns than k reach the k-th value: argpartition chose among the tied
        # ones arbitrarily; redo those rows with "lowest index wins".
        threshold = values.min(axis=1)
        reaching = (scores >= threshold[:, None]).sum(axis=1)
        for r in np.flatnonzero(reaching > k):
            above = np.flatnonzero(scores[r] > threshold[r])
            tied = np.flatnonzero(scores[r] == threshold[r])[: k - len(above)]
            picked[r] = np.concatenate([above, tied])
            values[r] = scores[r, picked[r]]
    order = np.lexsort((picked, -values))  # last key is primary: value descending, then index
    return (np.take_along_axis(values, order, axis=1), np.take_along_axis(picked, order, axis=1))
