"""``simcse``: demonstrations by sentence-embedding cosine similarity (GEMEL's retriever).

GEMEL embeds the mention string with ``princeton-nlp/sup-simcse-roberta-large`` and takes the
16 nearest training mentions. Here any sentence model :func:`gemel.sources.resolve` knows will
do; the default is the offline ``minilm-l6-v2`` so that it runs with no model hub.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from gemel.retrieval.base import ScoredRetriever, check_field, field_text
from gemel.retrieval.dense import DenseIndex
from gemel.retrieval.encoder import SentenceEncoder
from gemel.types import Mention


class SimCSERetriever(ScoredRetriever):
    """Cosine similarity of normalised sentence embeddings.

    Args:
        model: sentence model name (offline name, folder or hub id).
        field: ``"mention"`` (GEMEL), ``"mention+sentence"`` or ``"sentence"``.
        cache_dir: where the training embeddings are cached (default
            ``gemel.sources.cache_dir()/retrieval``); ``cache=False`` turns caching off.
        pooling, batch_size, device, max_length: passed to :class:`SentenceEncoder`.
        encoder: a ready encoder (anything with ``embed`` and ``identity``) instead of ``model``.
    """

    name = "simcse"

    def __init__(self, model: str = "minilm-l6-v2", *, field: str = "mention",
                 cache_dir: str | os.PathLike | None = None, cache: bool = True,
                 pooling: str | None = None, batch_size: int = 64, device: str | None = None,
                 max_length: int = 128, encoder=None):
        super().__init__()
        self.field = check_field(field)
        self.encoder = encoder if encoder is not None else SentenceEncoder(
            model, pooling=pooling, batch_size=batch_size, device=device, max_length=max_length)
        self.cache_dir = cache_dir
        self.cache = cache
        self.index: DenseIndex | None = None

    def _fit(self, train: list[Mention]) -> None:
        self.index = DenseIndex.build([field_text(m, self.field) for m in train], self.encoder,
                                      ids=[m.id for m in train], cache_dir=self.cache_dir,
                                      cache=self.cache, extra={"field": self.field})

    def _scores(self, mentions: Sequence[Mention]) -> np.ndarray:
        assert self.index is not None  # fit() ran: ranked() checks it first
        vectors = self.index.vectors_for([field_text(m, self.field) for m in mentions])
        return self.index.scores(vectors)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), d) unit float32 vectors from this retriever's encoder."""
        return self.encoder.embed(texts)
