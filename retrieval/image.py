"""``image``: demonstrations whose images look like the query's (cosine of vision features).

Features come from :class:`gemel.vision.VisionEncoder` through the shared on-disk
:class:`gemel.feature_cache.FeatureCache`, so a dataset's images are encoded once for training, linking
and retrieval alike. A mention without an image has a zero vector: it is similar to nothing
(similarity 0), and a query without an image gets training mentions in their file order — mix
``image`` into ``hybrid`` with a text retriever when some mentions lack images.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from gemel.retrieval.base import ScoredRetriever
from gemel.types import Mention


class ImageRetriever(ScoredRetriever):
    """Cosine similarity of one vision feature per mention image.

    Args:
        model: vision encoder name (offline name such as ``dinov2-small``, folder or hub id).
        feature: ``pooled`` | ``cls`` | ``mean`` | ``layers:4,10,11,12``.
        vp_mode: visual prompt applied before encoding (``none``: the whole image); with
            ``overlay+crop`` the two features are concatenated.
        cache_dir: feature cache folder (default ``gemel.sources.cache_dir()/features``;
            ``"none"``: memory only), read through :func:`gemel.feature_cache.open_feature_cache`.
        encoder: a ready :class:`VisionEncoder` instead of ``model``.
    """

    name = "image"

    def __init__(self, model: str = "dinov2-small", *, feature: str = "pooled",
                 vp_mode: str = "none", cache_dir: str | os.PathLike | None = None,
                 device: str | None = None, encoder=None):
        super().__init__()
        from gemel.visual_prompt import VisualPrompt
        from gemel.vision import VisionEncoder

        self.encoder = encoder if encoder is not None else VisionEncoder.from_name(
            model, feature=feature, **({"device": device} if device else {}))
        self.prompt = VisualPrompt(vp_mode)
        self.cache_dir = cache_dir
        self.vectors: np.ndarray | None = None  # [n_train, d] unit rows (zero rows: no image)

    def _cache(self):
        from gemel.feature_cache import open_feature_cache

        return open_feature_cache(self.cache_dir or "auto")

    def unit_vectors(self, mentions: Sequence[Mention]) -> np.ndarray:
        """[len(mentions), n_images * feature_dim] float32, unit rows; zero rows for no image."""
        mentions = list(mentions)
        with_image = [i for i, m in enumerate(mentions) if m.image]
        dim = self.prompt.n_images * self.encoder.feature_dim
        out = np.zeros((len(mentions), dim), dtype=np.float32)
        if with_image:
            # encode_mentions flushes what it added to the cache, also when an image is bad
            feats = self.encoder.encode_mentions([mentions[i] for i in with_image], self.prompt,
                                                 cache=self._cache())
            # [n, n_images, feature_dim] -> [n, n_images * feature_dim]
            flat = feats.reshape(len(with_image), -1).cpu().numpy().astype(np.float32)
            flat /= np.linalg.norm(flat, axis=1, keepdims=True).clip(min=1e-12)
            out[with_image] = flat
        return out

    def _fit(self, train: list[Mention]) -> None:
        self.vectors = self.unit_vectors(train)

    def _scores(self, mentions: Sequence[Mention]) -> np.ndarray:
        assert self.vectors is not None  # fit() ran: ranked() checks it first
        return self.unit_vectors(mentions) @ self.vectors.T  # [B, n_train]
