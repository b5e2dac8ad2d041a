"""``random``: uniformly random demonstrations, reproducible per (seed, query).

The baseline against which similarity-based retrieval earns its keep. Each query draws from its
own generator, seeded from the seed and the query's id, mention and sentence (SHA-256, not
Python's salted ``hash``), so a query gets the same demonstrations in any batch, any order and
any process, and different queries get different ones.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from gemel.retrieval.base import ScoredRetriever
from gemel.types import Mention


class RandomRetriever(ScoredRetriever):
    """Random demonstrations; ``similarity`` is the uniform [0, 1) draw that ranked them."""

    name = "random"

    def __init__(self, *, seed: int = 0):
        super().__init__()
        self.seed = int(seed)

    def _fit(self, train: list[Mention]) -> None:
        pass  # nothing to index: every query draws afresh

    def _generator(self, m: Mention) -> np.random.Generator:
        key = "\x00".join([str(self.seed), m.id, m.mention or "", m.text]).encode()
        return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    def _scores(self, mentions: Sequence[Mention]) -> np.ndarray:
        n = len(self.train)
        out = np.empty((len(mentions), n), dtype=np.float32)
        for r, m in enumerate(mentions):
            out[r] = self._generator(m).random(n, dtype=np.float32)
        return out
