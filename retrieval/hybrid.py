"""``hybrid``: a weighted mix of other retrievers' scores.

Scores of different retrievers live on different scales (cosine in [-1, 1], BM25 unbounded), so
each component's scores are min-max normalised per query before the weighted sum. Every built-in
retriever scores *all* training mentions, so the normalisation and the sum run over the full row
(the query's banned rows left out) rather than over the union of truncated top lists: a mention
that one component ranks 51st still gets its real share instead of a 0.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from gemel.errors import DataError
from gemel.retrieval.base import ScoredRetriever
from gemel.types import Mention


def minmax_rows(scores: np.ndarray) -> np.ndarray:
    """(B, N) -> (B, N) in [0, 1] per row over its finite entries; ``-inf`` stays ``-inf``.
    A row whose finite entries are all equal maps them to 1 (all equally good)."""
    finite = np.isfinite(scores)
    lo = np.where(finite, scores, np.inf).min(axis=1, keepdims=True)
    hi = np.where(finite, scores, -np.inf).max(axis=1, keepdims=True)
    span = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(span > 0, (scores - lo) / np.where(span > 0, span, 1), 1.0)
    return np.where(finite, out, -np.inf).astype(np.float32)


class HybridRetriever(ScoredRetriever):
    """Weighted sum of min-max normalised component scores; ``similarity`` lies in [0, 1].

    Args:
        weights: component name -> weight (non-negative, normalised to sum 1), e.g.
            ``{"simcse": 0.7, "bm25": 0.3}``.
        options: component name -> options for :func:`get_retriever`, e.g.
            ``{"simcse": {"field": "mention+sentence"}}``.
        retrievers: component name -> a ready (unfitted or fitted) retriever instead of building
            one; it is (re)fitted on the hybrid's training set.
    """

    name = "hybrid"

    def __init__(self, *, weights: Mapping[str, float] | None = None,
                 options: Mapping[str, Mapping] | None = None,
                 retrievers: Mapping[str, ScoredRetriever] | None = None):
        super().__init__()
        from gemel.retrieval.registry import get_retriever

        weights = dict(weights) if weights is not None else {"simcse": 0.5, "bm25": 0.5}
        options = dict(options or {})
        retrievers = dict(retrievers or {})
        for name, w in weights.items():
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise DataError(f"weight of {name!r} must be a finite number >= 0, got {w!r}",
                                field="weights")
        total = float(sum(weights.values()))
        if total <= 0:
            raise DataError("hybrid needs at least one positive weight", field="weights",
                            fix='e.g. weights={"simcse": 0.5, "bm25": 0.5}')
        stray = sorted((set(options) | set(retrievers)) - set(weights))
        if stray:
            raise DataError(f"options or retrievers for {stray}, which have no weight",
                            field="weights", fix="give every component a weight")
        if "hybrid" in weights:
            raise DataError("a hybrid cannot contain itself", field="weights")
        self.weights = {name: float(w) / total for name, w in weights.items()}
        self.components: dict[str, ScoredRetriever] = {}
        for name in self.weights:
            component = retrievers.get(name) or get_retriever(name, **dict(options.get(name, {})))
            if not isinstance(component, ScoredRetriever):
                raise DataError(f"component {name!r} ({type(component).__name__}) does not score "
                                "every training mention (not a ScoredRetriever)",
                                field="retrievers")
            self.components[name] = component

    def _fit(self, train: list[Mention]) -> None:
        for component in self.components.values():
            component.fit(train)

    def _scores(self, mentions: Sequence[Mention]) -> np.ndarray:
        assert self._exclusion is not None
        total = np.zeros((len(mentions), len(self.train)), dtype=np.float32)
        for name, component in self.components.items():
            if self.weights[name] == 0:
                continue
            raw = np.array(component._scores(mentions), dtype=np.float32)
            # Banned rows (the query itself scores highest in a dense index) must not set the max.
            for r, m in enumerate(mentions):
                raw[r, self._exclusion.banned(m)] = -np.inf
            total += self.weights[name] * np.where(np.isfinite(raw), minmax_rows(raw), 0)
        return total
