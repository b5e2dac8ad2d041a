"""The retriever interface, demonstrations, the exclusion rule and prompt ordering.

Every built-in retriever scores *all* training mentions for a query (a dense matrix product, a
BM25 pass, seeded random draws) and then shares one selection step here: ban the query's own
record and its duplicates, take an exact top-k with ties broken by training order, apply the
caller's extra predicate. Sharing that step is what makes ``query`` and ``query_batch`` agree.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from gemel.errors import DataError, GemelError
from gemel.retrieval.topk import top_k
from gemel.types import Mention

#: What can be embedded / indexed for a mention (option ``field`` of simcse and bm25).
FIELDS = ("mention", "mention+sentence", "sentence")

#: Bytes of one (queries x training mentions) float32 score block; bounds memory per chunk.
SCORE_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Demonstration:
    """A training mention retrieved for a query, with its similarity (higher is more similar)."""

    mention: Mention
    similarity: float


@runtime_checkable
class Retriever(Protocol):
    """What the prompt builder needs: fit on training mentions, then k demonstrations per query."""

    name: str

    def fit(self, train: Sequence[Mention]) -> "Retriever": ...

    def query(self, mention: Mention, k: int,
              exclude: Callable[[Mention], bool] | None = None) -> list[Demonstration]: ...

    def query_batch(self, mentions: Sequence[Mention], k: int) -> list[list[Demonstration]]: ...


def check_field(field: str) -> str:
    if field not in FIELDS:
        raise DataError(f"unknown field {field!r}; choose one of {list(FIELDS)}", field="field",
                        fix='"mention" embeds the mention string (GEMEL), '
                            '"mention+sentence" adds its sentence')
    return field


def field_text(mention: Mention, field: str) -> str:
    """The string that represents ``mention`` for retrieval.

    A mention marked only by a visual prompt has no mention string; its sentence stands in, since
    an empty string would make every such mention equally (and meaninglessly) similar.
    """
    words = (mention.mention or "").strip()
    if field == "sentence" or not words:
        return mention.text
    if field == "mention":
        return words
    return f"{words}. {mention.text}"


def order_demonstrations(demos: Sequence[Demonstration], order: str = "ascending") -> list:
    """Order demonstrations for the prompt.

    ``"ascending"`` (GEMEL): least similar first, so the most similar one sits right before the
    query. ``"descending"``: most similar first. Ascending is the exact mirror of descending, ties
    included (among equal similarities the earlier-retrieved one stays nearer the query).
    """
    ranked = sorted(demos, key=lambda d: -d.similarity)  # stable: keeps retrieval order on ties
    if order == "descending":
        return ranked
    if order == "ascending":
        return ranked[::-1]
    raise DataError(f"unknown order {order!r}; choose 'ascending' (least similar first, GEMEL) "
                    "or 'descending'", field="order")


class ExclusionIndex:
    """Which training rows a query may never get: its own record and same-(mention, sentence) ones.

    GEMEL never shows a training item as its own demonstration; a record that repeats the query's
    mention in the same sentence (a duplicate, or the same item under another id) would leak the
    answer just the same.
    """

    def __init__(self, train: Sequence[Mention]):
        self._by_id: dict[str, list[int]] = {}
        self._by_key: dict[tuple[str, str], list[int]] = {}
        for row, m in enumerate(train):
            self._by_id.setdefault(m.id, []).append(row)
            self._by_key.setdefault(self.key(m), []).append(row)

    @staticmethod
    def key(m: Mention) -> tuple[str, str]:
        return (m.mention or "", m.text)

    def banned(self, query: Mention) -> np.ndarray:
        """Row indices (int64, sorted, unique) the query must not receive."""
        rows = self._by_id.get(query.id, []) + self._by_key.get(self.key(query), [])
        return np.unique(np.asarray(rows, dtype=np.int64))


class ScoredRetriever:
    """Base class: subclasses score every training mention; selection happens here.

    Subclasses implement ``_fit(train)`` and ``_scores(mentions) -> (B, N) float32`` (higher is
    more similar). Results come back sorted by similarity descending, ties by training order.
    """

    name: str = ""

    def __init__(self) -> None:
        self.train: list[Mention] = []
        self._exclusion: ExclusionIndex | None = None

    # -- subclass hooks --------------------------------------------------------------------------
    def _fit(self, train: list[Mention]) -> None:
        raise NotImplementedError

    def _scores(self, mentions: Sequence[Mention]) -> np.ndarray:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------------------
    def fit(self, train: Sequence[Mention]) -> "ScoredRetriever":
        train = list(train)
        if not train:
            raise DataError("no training mentions to retrieve demonstrations from", field="train",
                            fix="pass the (non-empty) training split to fit()")
        for row, m in enumerate(train):
            if not isinstance(m, Mention):
                raise DataError(f"expected a gemel.types.Mention, got {type(m).__name__}",
                                record=row, field="train")
        self.train = train
        self._exclusion = ExclusionIndex(train)
        self._fit(train)
        return self

    def query(self, mention: Mention, k: int,
              exclude: Callable[[Mention], bool] | None = None) -> list[Demonstration]:
        """The k most similar training mentions, most similar first.

        ``exclude(candidate) -> True`` drops a candidate on top of the built-in rule (the query's
        own id and any record with the same mention and sentence). Fewer than k come back only
        when the training set runs out.
        """
        return self._to_demos(self.ranked([mention], k, exclude)[0])

    def query_batch(self, mentions: Sequence[Mention], k: int) -> list[list[Demonstration]]:
        """``[query(m, k) for m in mentions]``, computed in blocks of queries."""
        return [self._to_demos(r) for r in self.ranked(mentions, k)]

    # -- shared selection --------------------------------------------------------------------------
    def ranked(self, mentions: Sequence[Mention], k: int,
               exclude: Callable[[Mention], bool] | None = None) -> list[list[tuple[int, float]]]:
        """For each query, ``[(training row, score), ...]`` best first (see :meth:`query`)."""
        if self._exclusion is None:
            raise GemelError(f"the {self.name or type(self).__name__} retriever is not fitted: "
                             "call fit(train) first")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise DataError(f"k must be a non-negative integer, got {k!r}", field="k")
        mentions = list(mentions)
        n = len(self.train)
        out: list[list[tuple[int, float]]] = []
        if k == 0:
            return [[] for _ in mentions]
        block = max(1, SCORE_BLOCK_BYTES // (4 * n))
        for start in range(0, len(mentions), block):
            chunk = mentions[start:start + block]
            scores = np.array(self._scores(chunk), dtype=np.float32)  # a copy we may write -inf to
            banned = [self._exclusion.banned(m) for m in chunk]
            for r, rows in enumerate(banned):
                scores[r, rows] = -np.inf
            if exclude is None:
                values, picked = top_k(scores, k)
                for r in range(len(chunk)):
                    out.append([(int(i), float(v)) for i, v in zip(picked[r], values[r])
                                if v != -np.inf])
            else:
                for r in range(len(chunk)):
                    out.append(self._filtered(scores[r:r + 1], k, exclude))
        return out

    def _filtered(self, scores: np.ndarray, k: int,
                  exclude: Callable[[Mention], bool]) -> list[tuple[int, float]]:
        """Top-k of one (1, N) row under a predicate: widen the window until k survive."""
        n = scores.shape[1]
        window = min(n, 2 * k + 8)
        while True:
            values, picked = top_k(scores, window)
            kept = [(int(i), float(v)) for i, v in zip(picked[0], values[0])
                    if v != -np.inf and not exclude(self.train[int(i)])]
            if len(kept) >= k or window >= n:
                return kept[:k]
            window = min(n, window * 4)

    def _to_demos(self, ranked: list[tuple[int, float]]) -> list[Demonstration]:
        return [Demonstration(self.train[i], s) for i, s in ranked]
