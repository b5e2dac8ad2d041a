"""Hits@k over prediction rows (ARCHITECTURE.md "Predictions JSONL")."""
from __future__ import annotations

from typing import Iterable, Sequence


def hits_at_k(rows: Iterable[dict], ks: Sequence[int] = (1, 5)) -> dict:
    """H@k in percent over rows that have a gold id; a failed row counts as a miss.

    A hit at k: the gold entity id is among the first k candidates. Rows of a NIL-mode run whose
    gold is NIL (``gold_nil: true``) count too: their hit is the NIL answer (``entity_id`` null).
    Without NIL mode, NIL golds have no id and are left out.
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
