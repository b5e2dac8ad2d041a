"""The bridge from image slots to soft tokens: frozen vision encoder + trained mapper.

    embedder = ImageTokens(VisionEncoder.from_name("dinov2-small"), mapper, vp_mode="overlay",
                           cache=open_feature_cache("auto"))
    model = GemelModel(tokenizer, llm.get_input_embeddings(), image_embedder=embedder)

``ImageTokens(slots)`` opens each slot's ``mention.image``, renders the visual prompt
(``mention.bbox`` / ``mention.polygon``; see :mod:`gemel.visual_prompt`), encodes the rendered
images without gradient — through the on-disk feature cache when one is given, and an in-memory
memo besides, so an image is encoded once across training epochs, evaluation and sweeps — and maps
the features. The mapper keeps its gradient when it is in training mode and grad is enabled.

Slot shape: a visual prompt renders k images per mention (k = 2 for ``overlay+crop``, else 1); the
mapper maps each, so every slot holds ``k * n_tokens`` soft tokens (overlay tokens, then crop
tokens) — the same number for every slot of a run, since k depends on the mode only. Give
:class:`gemel.prompting.PromptBuilder` ``image_tokens=embedder.tokens_per_slot`` for its budget.
"""
from __future__ import annotations

from typing import Sequence

import torch

from gemel.errors import DataError, MismatchError
from gemel.mapper import LinearMapper
from gemel.prompting import ImageSlot
from gemel.types import Mention
from gemel.feature_cache import FeatureCache
from gemel.vision import VisionEncoder
from gemel.visual_prompt import VisualPrompt


class ImageTokens:
    """Callable ``list[ImageSlot] -> Tensor[n_slots, tokens_per_slot, hidden]``.

    ``vp_mode``: a mode name (``none`` | ``overlay`` | ``crop`` | ``overlay+crop``) or a
    :class:`~gemel.visual_prompt.VisualPrompt`. ``cache``: a :class:`~gemel.feature_cache.FeatureCache`
    (or None: encode in memory only). ``memo``: keep features in memory for the session.
    """

    def __init__(self, vision_encoder: VisionEncoder, mapper: LinearMapper,
                 vp_mode: str | VisualPrompt = "none", cache: FeatureCache | None = None,
                 memo: bool = True):
        self.encoder, self.mapper, self.cache = vision_encoder, mapper, cache
        self.prompt = vp_mode if isinstance(vp_mode, VisualPrompt) else VisualPrompt(vp_mode)
        if mapper.images_per_mention != self.prompt.n_images:
            raise MismatchError(f"visual prompt {self.prompt.mode!r} renders {self.prompt.n_images} "
                                f"image(s) per mention, but the mapper was built for "
                                f"{mapper.images_per_mention} (trained with vp_mode "
                                f"{mapper.meta.get('vp_mode')!r}); use that mode")
        trained = mapper.meta.get("layout", "global")
        if trained != vision_encoder.layout:
            raise MismatchError(f"the mapper was trained on feature layout {trained!r}, the vision "
                                f"encoder gives layout {vision_encoder.layout!r}; load the encoder "
                                f"with layout={trained!r} (or retrain with --layout "
                                f"{vision_encoder.layout})")
        if mapper.feature_dim != vision_encoder.feature_dim:
            raise MismatchError(f"vision encoder {vision_encoder.name!r} gives "
                                f"{vision_encoder.feature_dim}-d features, the mapper takes "
                                f"{mapper.feature_dim}-d ones")
        self._memo: dict[tuple, torch.Tensor] | None = {} if memo else None

    @property
    def tokens_per_slot(self) -> int:
        return self.mapper.tokens_per_slot

    def _key(self, m: Mention) -> tuple:
        return (m.image, self.prompt.key(m.bbox, m.polygon))

    def features(self, mentions: Sequence[Mention]) -> torch.Tensor:
        """Vision features of each mention's rendered images: [n, k, feature_dim] float32 on CPU,
        computed without gradient. Raises DataError for a mention without a (readable) image."""
        for m in mentions:
            if not m.image:
                raise DataError("the prompt has an image slot for this mention but it has no image",
                                record=m.id, field="image",
                                fix="give the mention an image, or drop it from image prompts")
        keys = [self._key(m) for m in mentions]
        memo = self._memo if self._memo is not None else {}
        todo, seen = [], set()
        for m, key in zip(mentions, keys):
            if key not in memo and key not in seen:
                seen.add(key)
                todo.append(m)
        if todo:
            # autocast off: the features (and what the cache stores) are the encoder's own
            # precision, whether or not the caller trains or links under bf16/fp16 autocast
            with torch.no_grad(), torch.autocast(self.encoder.device.type, enabled=False):
                feats = self.encoder.encode_mentions(todo, self.prompt, cache=self.cache)
            for m, f in zip(todo, feats):
                memo[self._key(m)] = f
        k, dim = self.prompt.n_images, self.mapper.feature_dim
        if not keys:
            return torch.zeros(0, k, dim)
        return torch.stack([memo[key] for key in keys])

    def __call__(self, slots: Sequence[ImageSlot]) -> torch.Tensor:
        """[n_slots, k * n_tokens, hidden] in the mapper's output dtype, on the mapper's device."""
        feats = self.features([s.mention for s in slots])
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mapper.training):
            return self.mapper(feats)


__all__ = ["ImageTokens"]
