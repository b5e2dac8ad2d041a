"""Metrics over prediction rows (docs/architecture.md "Predictions JSONL"): hits@k, bootstrap
intervals."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from gemel.errors import GemelError


def hits_at_k(rows: Iterable[dict], ks: Sequence[int] = (1, 5)) -> dict:
    """H@k in percent over rows that have a gold id; a failed row counts as a miss.

    A hit at k: the gold entity id is among the first k candidates. Rows of a NIL-mode run whose
    gold is NIL (``gold_nil: true``) count too: their hit is the NIL answer (``entity_id`` null).
    Without NIL mode, NIL golds have no id and are left out.

    The quick H@k of training, fusion fitting and benchmarks: it trusts each row's own gold and
    gives no interval. ``gemel eval`` (:mod:`gemel.eval.summary`) ranks the gold of the mentions
    the rows were made from, with bootstrap intervals and subsets.
    """
    n, hits, errors = 0, {k: 0 for k in ks}, 0
    for row in rows:
        gold = row.get("gold_id")
        if gold is None and not row.get("gold_nil"):
            continue
        n += 1
        errors += row.get("error") is not None
        ids = [c["entity_id"] for c in row.get("candidates", [])]
        for k in ks:
            hits[k] += gold in ids[:k]
    out = {"n": n, "errors": errors}
    out.update({f"H@{k}": round(100.0 * hits[k] / n, 2) if n else None for k in ks})
    return out


def format_hits(name: str, metrics: dict) -> str:
    cells = "  ".join(f"{k} {v:.1f}" for k, v in metrics.items() if k.startswith("H@") and v is not None)
    return f"{name:<24} {cells}  (n={metrics['n']}, errors={metrics['errors']})"


def generation_rows(rows: Iterable[dict]) -> list[dict]:
    """Rows as pure generation ranked them (fused runs keep those ids under "generated")."""
    return [{**r, "candidates": [{"entity_id": e} for e in r.get("generated", [])]} for r in rows]


# ---- intervals -------------------------------------------------------------------------------------

_BLOCK = 1 << 22  # resampled indices drawn per block (~32 MiB of int64): caps memory for large n


def top1_agreement(a: Sequence[dict], b: Sequence[dict]) -> dict:
    """How far two runs over the same mentions (prediction rows, same order) agree: top-1 equal
    in % of the mentions, and the |top-1 score difference| (nats) where it is."""
    same = [(x, y) for x, y in zip(a, b) if x.get("candidates") and y.get("candidates")
            and x["candidates"][0]["entity_id"] == y["candidates"][0]["entity_id"]]
    gaps = [abs(x["candidates"][0]["score"] - y["candidates"][0]["score"]) for x, y in same]
    return {"mentions": len(a), "top1_agree": len(same),
            "top1_agree_pct": round(100.0 * len(same) / max(len(a), 1), 2),
            "max_score_gap": round(max(gaps), 6) if gaps else None,
            "mean_score_gap": round(sum(gaps) / len(gaps), 6) if gaps else None}


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` bootstrap resamples of ``values`` (shape [n]) -> shape [n_resamples]."""
    rng = np.random.default_rng(seed)
    n = len(values)
    per_block = max(1, _BLOCK // n)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, per_block):
        stop = min(start + per_block, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def _as_values(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.size == 0:
        raise GemelError(f"{name}: no values to bootstrap (empty sequence); pass at least one value")
    if not np.isfinite(arr).all():
        raise GemelError(f"{name}: values must be finite numbers (got NaN or inf)")
    return arr


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise GemelError(f"n_resamples={n_resamples}: need at least 1 resample")
    if not 0.0 < confidence < 1.0:
        raise GemelError(f"confidence={confidence}: must lie strictly between 0 and 1 (e.g. 0.95)")


def bootstrap_interval(values, *, n_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``, in percent (x100).

    ``values``: per-mention scores in [0, 1], shape [n] — 0/1 hits or reciprocal ranks.
    Returns ``(lo, hi)`` such that the mean lies in it with about ``confidence`` probability.
    """
    _check(n_resamples, confidence)
    arr = _as_values(values, "bootstrap_interval")
    means = _resampled_means(arr, n_resamples, seed)
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(100.0 * lo), float(100.0 * hi)


def paired_bootstrap(a, b, *, n_resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Paired bootstrap of ``mean(b) - mean(a)`` over aligned per-mention scores (shape [n] each).

    Returns ``{"diff", "lo", "hi", "p"}``: the difference and its percentile interval in points
    (x100), and a two-sided p-value: twice the smaller share of resampled differences on either
    side of zero (add-one smoothed, capped at 1), i.e. how often resampling the same mentions
    flips the sign of the difference.
    """
    _check(n_resamples, confidence)
    xa, xb = _as_values(a, "paired_bootstrap a"), _as_values(b, "paired_bootstrap b")
    if xa.shape != xb.shape:
        raise GemelError(f"paired_bootstrap: a has {xa.size} values and b {xb.size}; "
                         "pass scores aligned mention by mention (same mentions, same order)")
    d = xb - xa
    means = _resampled_means(d, n_resamples, seed)
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    below = (np.count_nonzero(means <= 0) + 1) / (n_resamples + 1)
    above = (np.count_nonzero(means >= 0) + 1) / (n_resamples + 1)
    p = min(1.0, 2.0 * min(below, above))
    return {"diff": float(100.0 * d.mean()), "lo": float(100.0 * lo), "hi": float(100.0 * hi),
            "p": float(p)}
