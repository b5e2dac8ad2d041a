"""The frozen vision encoder (any Hugging Face vision model): images in, feature vectors out.

``VisionEncoder`` wraps CLIP (``CLIPVisionModel``; GEMEL uses the pooled 1024-d feature of
ViT-L/14), SigLIP, DINOv2 (``Dinov2Model``) or any model the Auto classes load, and turns images
into one feature vector each. Which vector is a name (see :data:`FEATURES`):

* ``pooled`` — the model's ``pooler_output`` (CLIP: post-layernorm CLS; SigLIP: attention-pool head;
  DINOv2: normed CLS);
* ``cls`` — ``last_hidden_state[:, 0]``;
* ``mean`` — mean of the patch tokens (class and register tokens left out);
* ``layers:4,10,11,12`` — the CLS token of those ``hidden_states`` (0 = embeddings, i = after block
  i) concatenated, as VP-MEL does.

A *layout* says what one image's feature vector is made of (see :data:`LAYOUTS`); the parts are
concatenated, so the mapper stays one ``nn.Linear``:

* ``global`` — the feature above alone (GEMEL);
* ``grid:N`` — the global feature, then the patch tokens mean-pooled over an N x N grid of cells
  (row by row), so where something is in the image survives: ``(1 + N*N) * hidden``;
* ``region`` — the global feature, then the patch tokens under the mention's region (bbox or
  polygon), each patch weighted by how much of it the region covers: ``2 * hidden``. The region is
  drawn as a mask and sent through the image processor with the image, so resizing and cropping
  move it exactly as they move the pixels. An image without a region (a crop, or a mention with
  no box) pools all patches.
* ``region:L`` — the same, pooling the patch tokens of hidden state L (``hidden_states[L]``; 1 =
  after the first block, negative counts from the end: -4 = four states before the last one),
  each token layer-normed without weights, and the global feature and the pooled region each
  layer-normed again (so neither outweighs the other in the mapper). Late layers mix every patch
  with the whole image;
  a few blocks earlier the patches still say what is under them (two-emblem probe, DINOv2-S:
  last layer 90-97, ``region:-4`` 99-100 — benchmarks/visual_prompts.py).

``encoder.encode_paths`` / ``encoder.encode_mentions`` read and fill an on-disk
:class:`gemel.feature_cache.FeatureCache` when given one (a second run over the same images encodes
nothing) and return ``[n, k, feature_dim]`` — k images per mention (2 for the ``overlay+crop``
visual prompt); the model maps each of the k features to its own image slot.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from gemel.errors import DataError, GemelError, MismatchError
from gemel.feature_cache import FeatureCache, lookup
from gemel.types import Mention
from gemel.visual_prompt import VisualPrompt

log = logging.getLogger(__name__)

FEATURES = ("pooled", "cls", "mean", "layers:<i>,<j>,...")
LAYOUTS = ("global", "grid:<n>", "region", "region:<layer>")
# config fields that do not change what the model computes (or change with the library version)
_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "architectures", "output_hidden_states",
             "output_attentions", "return_dict", "id2label", "label2id", "use_cache",
             "problem_type", "tie_word_embeddings", "chunk_size_feed_forward"}


def _sha256_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _stable_dict(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE}


def parse_feature(feature: str) -> tuple[str, tuple[int, ...]]:
    """``"layers:4,10"`` -> ("layers", (4, 10)); ``"pooled"`` -> ("pooled", ())."""
    if feature in ("pooled", "cls", "mean"):
        return feature, ()
    if feature.startswith("layers:"):
        try:
            layers = tuple(int(x) for x in feature[len("layers:"):].split(","))
        except ValueError:
            layers = ()
        if layers:
            return "layers", layers
    raise GemelError(f"unknown vision feature {feature!r}; choose one of {', '.join(FEATURES)} "
                     f"(e.g. layers:4,10,11,12)")


def parse_layout(layout: str) -> tuple[str, int | None]:
    """``"grid:2"`` -> ("grid", 2); ``"global"`` -> ("global", 0); ``"region"`` -> ("region", None)
    (the model's output tokens); ``"region:-4"`` -> ("region", -4) (hidden state -4)."""
    if layout == "global":
        return layout, 0
    if layout == "region":
        return layout, None
    kind, _, arg = layout.partition(":")
    try:
        n = int(arg)
    except ValueError:
        n = None
    if kind == "grid" and n is not None and 1 <= n <= 16:
        return "grid", n
    if kind == "region" and n:
        return "region", n
    raise GemelError(f"unknown feature layout {layout!r}; choose one of {', '.join(LAYOUTS)} "
                     f"(e.g. grid:2, grid:4 with n from 1 to 16; region:-4, region:9 with a hidden "
                     f"state other than 0)")


def layout_parts(layout: str) -> int:
    """How many hidden-size vectors the layout adds after the global feature."""
    kind, n = parse_layout(layout)
    return n * n if kind == "grid" else int(kind == "region")


def _load_processor(path: str):
    from transformers import AutoImageProcessor

    # the PIL backend gives the same pixels with or without torchvision installed, so cached
    # features stay valid across machines
    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    except (ValueError, KeyError, ImportError):
        return AutoImageProcessor.from_pretrained(path)


@contextmanager
def _quiet_transformers():
    """Loading CLIP's vision tower from a full CLIP checkpoint lists every text weight as
    unexpected; we check the missing keys ourselves instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class VisionEncoder:
    """A frozen vision model + its image processor; images in, one feature vector per image out.

    Build it from a name (``VisionEncoder.from_name("dinov2-small")``, a local folder or a hub id)
    or from objects (``VisionEncoder(model, processor, feature="cls", name="tiny")``).
    The model is put in eval mode with ``requires_grad`` off; encoding runs under ``no_grad``.
    """

    def __init__(self, model: torch.nn.Module, processor, feature: str = "pooled",
                 name: str | None = None, batch_size: int = 16,
                 device: str | torch.device | None = None, layout: str = "global"):
        config = getattr(model, "config", None)
        # a full CLIP / SigLIP model: keep its vision tower
        if getattr(config, "vision_config", None) is not None and hasattr(model, "vision_model"):
            model = model.vision_model
            config = model.config
        if config is None:
            raise GemelError(f"{type(model).__name__} has no .config: pass a transformers model")
        self.kind, self.layers = parse_feature(feature)
        self.feature = feature
        self.layout_kind, n = parse_layout(layout)
        self.grid = n if self.layout_kind == "grid" else 0
        # hidden state the region layout pools (None: the model's output tokens)
        self.region_layer = n if self.layout_kind == "region" else None
        self.layout = layout
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.config = config
        self.batch_size = max(1, int(batch_size))
        self.name = name or getattr(config, "_name_or_path", "") or type(model).__name__
        n_layers = getattr(config, "num_hidden_layers", None)
        if self.kind == "layers" and n_layers is not None and not all(
                0 <= i <= n_layers for i in self.layers):
            raise GemelError(f"feature {feature!r}: {self.name} has hidden states 0..{n_layers} "
                             f"(0 = embeddings)")
        if self.kind in ("cls", "layers") and str(config.model_type).startswith("siglip"):
            raise GemelError(f"feature {feature!r} takes the class token, but {config.model_type} "
                             f"has none; use 'pooled' or 'mean'")
        if self.region_layer is not None and n_layers is not None and not (
                -n_layers - 1 <= self.region_layer <= n_layers):
            raise GemelError(f"layout {layout!r}: {self.name} has hidden states 0..{n_layers} "
                             f"(or -{n_layers + 1}..-1 from the end)")
        if self.layout_kind != "global" and getattr(config, "hidden_size", None) is None:
            raise GemelError(f"layout {layout!r} pools patch tokens of hidden_size; "
                             f"{type(model).__name__} has no hidden_size: use layout 'global'")
        self._feature_dim: int | None = None
        self._identity: dict | None = None
        # images encoded (cache misses) and the seconds spent on them: read, render, forward
        self.stats = {"images": 0, "seconds": 0.0}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, feature: str = "pooled", batch_size: int = 16,
                  device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, layout: str = "global") -> VisionEncoder:
        """Load through :func:`gemel.sources.resolve` (offline name, local folder or hub id).

        A checkpoint holding a vision-language model (CLIP, SigLIP) loads only its vision tower
        (``CLIPVisionModel`` / ``SiglipVisionModel``).
        """
        from transformers import AutoConfig, AutoModel
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        from gemel.sources import loading, resolve

        path = resolve(name, "vision")
        with loading(name, "vision"):
            config = AutoConfig.from_pretrained(path)
            vision_config = getattr(config, "vision_config", None)
            model_class = (MODEL_MAPPING[type(vision_config)] if vision_config is not None
                           else AutoModel)
            with _quiet_transformers():
                model, info = model_class.from_pretrained(path, dtype=dtype or torch.float32,
                                                          output_loading_info=True)
        missing = sorted(info.get("missing_keys", ()))
        kind, _ = parse_feature(feature)
        if kind != "pooled":  # an absent pooler does not matter when we do not read it
            missing = [k for k in missing if "pooler" not in k and "head" not in k]
        if missing:
            raise GemelError(f"{name}: the checkpoint at {path} lacks weights of "
                             f"{type(model).__name__}: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                             f" — these would be random; check the model name or choose another "
                             f"feature than {feature!r}")
        with loading(name, "vision"):
            processor = _load_processor(path)
        return cls(model, processor, feature=feature, name=name,
                   batch_size=batch_size, device=device, layout=layout)

    # ---- what it is ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def feature_dim(self) -> int:
        """Length of one feature vector (the global feature plus the layout's parts)."""
        if self._feature_dim is None:
            hidden = getattr(self.config, "hidden_size", None)
            if hidden is not None:
                self._feature_dim = hidden * ((len(self.layers) if self.kind == "layers" else 1)
                                              + layout_parts(self.layout))
            else:  # e.g. convolutional backbones: ask the model once
                self._feature_dim = int(self.encode([Image.new("RGB", (64, 64))]).shape[1])
        return self._feature_dim

    @property
    def identity(self) -> dict:
        """What the features depend on: name, config hash, processor hash, weights fingerprint,
        feature choice. Stored in mapper checkpoints; its hash keys the feature cache."""
        if self._identity is None:
            proc = self.processor.to_dict() if hasattr(self.processor, "to_dict") else {}
            proc = {k: v for k, v in proc.items() if k not in ("image_processor_type",
                                                               "processor_class")}
            self._identity = {
                "model": self.name,
                "model_type": str(self.config.model_type),
                "config_sha256": _sha256_json(_stable_dict(self.config.to_dict()))[:16],
                "processor_sha256": _sha256_json(_stable_dict(proc))[:16],
                "weights_sha256": self._weights_fingerprint(),
                "feature": self.feature,
                "layout": self.layout,
                "feature_dim": self.feature_dim,
                "dtype": str(self.dtype).removeprefix("torch."),
            }
        return dict(self._identity)

    @property
    def identity_key(self) -> str:
        """Short hash of :attr:`identity`: the encoder part of feature-cache keys."""
        return _sha256_json(self.identity)[:16]

    def _weights_fingerprint(self) -> str:
        """Hash of a strided sample of every parameter (cheap even for ViT-L): a randomly
        initialised or fine-tuned model never shares cached features with another. Values are
        rounded to bfloat16 first, so the same weights loaded in fp32 or bf16 agree."""
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(flat[::step][:256].to(torch.bfloat16).float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_identity(self, saved: dict, source: object = None) -> None:
        """:func:`check_vision` of this encoder against ``saved``."""
        check_vision(saved, self.identity, source)

    # ---- encoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image],
               masks: Sequence[Image.Image | None] | None = None) -> torch.Tensor:
        """Images -> float32 features [n, feature_dim] on the CPU, ``batch_size`` at a time.

        ``masks[i]``: image i's region as an ``L`` image of its size (255 inside), or None for
        the whole image; read by the ``region`` layout only."""
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im if im.mode == "RGB" else im.convert("RGB")
                     for im in images[start:start + self.batch_size]]
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            weights = None
            if self.layout_kind == "region":
                weights = self._mask_weights(chunk, (masks or [None] * len(images))
                                             [start:start + self.batch_size], pixels.shape[-2:])
            out.append(self._features(pixels.to(self.device, self.dtype), weights).float().cpu())
        if not out:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(out)

    def _mask_weights(self, images: Sequence[Image.Image], masks: Sequence[Image.Image | None],
                      size: torch.Size) -> torch.Tensor:
        """Region masks -> per-pixel weights in [0, 1], [b, H, W] like ``pixel_values``.

        Each mask goes through the image processor (as a grey RGB image) beside a black and a white
        image of the same size, so the processor's resizing and cropping move the region exactly
        as they move the pixels, and its rescaling and normalisation cancel out."""
        out = torch.ones(len(images), *size)
        todo = [i for i, m in enumerate(masks) if m is not None]
        if not todo:
            return out
        batch = []
        for i in todo:
            mask = masks[i]
            if mask.size != images[i].size:
                raise GemelError(f"region mask {mask.size} differs from its image {images[i].size}")
            batch += [mask.convert("RGB"), Image.new("RGB", mask.size, (0, 0, 0)),
                      Image.new("RGB", mask.size, (255, 255, 255))]
        px = self.processor(images=batch, return_tensors="pt")["pixel_values"][:, 0].float()
        m, black, white = px[0::3], px[1::3], px[2::3]
        out[todo] = ((m - black) / (white - black).clamp_min(1e-6)).clamp(0.0, 1.0)
        return out

    def _patch_map(self, pixels: torch.Tensor, out) -> torch.Tensor:
        """The patch tokens of the last layer (of ``region_layer``, layer-normed) as a map
        [b, hidden, h, w]."""
        hidden = out.last_hidden_state
        if self.region_layer is not None:
            hidden = out.hidden_states[self.region_layer]
            if hidden.ndim == 3:  # tokens: normed one by one, as the model's last norm would
                hidden = torch.nn.functional.layer_norm(hidden.float(), hidden.shape[-1:])
        if hidden.ndim == 4:  # convolutional: already [b, C, h, w]
            return hidden
        patch = getattr(self.config, "patch_size", None)
        if patch is None or hidden.ndim != 3:
            raise GemelError(f"layout {self.layout!r} needs patch tokens; {self.name} gives none: "
                             f"use layout 'global'")
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        h, w = pixels.shape[-2] // ph, pixels.shape[-1] // pw
        tokens = hidden[:, hidden.shape[1] - h * w:]  # class and register tokens come first
        return tokens.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], h, w)

    def _layout_parts(self, pixels: torch.Tensor, out, weights: torch.Tensor | None) -> torch.Tensor:
        """The layout's extra vectors, concatenated: [b, parts * hidden]."""
        fmap = self._patch_map(pixels, out)  # [b, d, h, w]
        b, d, h, w = fmap.shape
        if self.layout_kind == "grid":
            cells = torch.nn.functional.adaptive_avg_pool2d(fmap.float(), self.grid)  # [b, d, n, n]
            return cells.flatten(2).transpose(1, 2).reshape(b, -1)  # cell by cell, row by row
        # region: each patch weighted by the share of it the region covers
        wts = torch.nn.functional.adaptive_avg_pool2d(weights[:, None].to(fmap.device), (h, w))
        wts = wts.reshape(b, 1, h * w)
        total = wts.sum(-1, keepdim=True)
        # a region too thin to cover any patch noticeably: pool every patch instead
        wts = torch.where(total > 1e-3, wts, torch.ones_like(wts))
        flat = fmap.float().reshape(b, d, h * w)
        return (flat * wts).sum(-1) / wts.sum(-1)

    def _features(self, pixels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values [b, 3, H, W] -> [b, feature_dim] (``weights`` [b, H, W]: region layout)."""
        out = self.model(pixel_values=pixels, output_hidden_states=self.kind == "layers"
                         or self.region_layer is not None)
        main = self._global(pixels, out)
        if self.layout_kind == "global":
            return main
        parts = [main.float(), self._layout_parts(pixels, out, weights)]
        if self.region_layer is not None:
            # each part layer-normed: across images the pooled vector varies ~3x more than the
            # region token (DINOv2-S), and one linear mapper then learns mostly from the pooled one
            parts = [torch.nn.functional.layer_norm(p, p.shape[-1:]) for p in parts]
        return torch.cat(parts, dim=-1)

    def _global(self, pixels: torch.Tensor, out) -> torch.Tensor:
        """The ``feature`` vector of each image: [b, hidden (x layers)]."""
        if self.kind == "pooled":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise GemelError(f"{self.name} ({type(self.model).__name__}) has no pooled "
                                 f"output; use feature 'cls' or 'mean'")
            return pooled.reshape(pooled.shape[0], -1)
        hidden = out.last_hidden_state
        if self.kind == "mean":
            if hidden.ndim == 4:  # convolutional: [b, C, h, w]
                return hidden.mean(dim=(2, 3))
            return hidden[:, self._n_prefix_tokens(pixels, hidden):].mean(dim=1)
        if hidden.ndim != 3:
            raise GemelError(f"{self.name} has no token sequence; use feature 'pooled' or 'mean'")
        if self.kind == "cls":
            return hidden[:, 0]
        return torch.cat([out.hidden_states[i][:, 0] for i in self.layers], dim=-1)

    def _n_prefix_tokens(self, pixels: torch.Tensor, hidden: torch.Tensor) -> int:
        """Class + register tokens before the patches: sequence length minus the patch count."""
        patch = getattr(self.config, "patch_size", None)
        if patch is None:
            return 0
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        n_patches = (pixels.shape[-2] // ph) * (pixels.shape[-1] // pw)
        return max(0, hidden.shape[1] - n_patches)

    def encode_paths(self, paths: Sequence[str | Path], vp_settings: Sequence[str] | str | None = None,
                     cache: FeatureCache | None = None,
                     render: Callable[[int, Image.Image], list[Image.Image]] | None = None,
                     ids: Sequence[object] | None = None,
                     regions: Callable[[int, Image.Image], list[Image.Image | None]] | None = None
                     ) -> torch.Tensor:
        """Encode image files, each through an optional visual prompt; [n, k, feature_dim] float32.

        ``render(i, image)`` returns the k images to encode for item i (k the same for every item;
        without ``render`` k = 1 and the image is encoded as it is). ``vp_settings[i]`` (or one
        string for all) must spell out everything ``render`` does to item i
        (:func:`gemel.visual_prompt.settings_key`): it is part of the cache key. Items whose key is
        in ``cache`` are not opened; identical (image, settings) pairs are encoded once.
        ``ids`` name the items in errors (mention ids). ``regions(i, image)`` gives the region
        mask of each of the k rendered images (None: the whole image), for the ``region`` layout;
        ``vp_settings`` must then spell out the region too (``settings_key`` does).
        """
        n = len(paths)
        settings = _settings_per_item(vp_settings, n)
        unknown_render = render is not None and vp_settings is None
        if unknown_render and cache is not None:
            raise GemelError("a cache with a render function needs vp_settings describing it "
                             "(gemel.visual_prompt.settings_key), or cached features would mix up")
        ids = list(ids) if ids is not None else [None] * n
        keys = self._item_keys(paths, settings, ids, cache, unknown_render)
        found, todo = lookup(keys, cache)
        try:
            self._encode_missing(todo, paths, ids, render, regions, found, cache)
        finally:  # keep what was encoded, even when a bad image stops the run
            if cache is not None:
                cache.flush()
        if cache is not None:
            log.info("%s", cache.summary())
        if n == 0:
            return torch.zeros(0, 1, self.feature_dim)
        per_item = {found[key].shape[0] for key in keys}
        if len(per_item) != 1:
            raise GemelError(f"items have {sorted(per_item)} features each (a cache shared by "
                             f"visual prompts with different image counts under equal settings "
                             f"strings?)")
        return torch.from_numpy(np.stack([found[key] for key in keys]).astype(np.float32, copy=False))

    def _item_keys(self, paths: Sequence[str | Path], settings: list[str], ids: list,
                   cache: FeatureCache | None, unknown_render: bool) -> list[str]:
        """One key per item; items with equal keys share one encoding (and one cache entry)."""
        keys: list[str] = []
        for i, path in enumerate(paths):
            if cache is not None:
                image_hash = cache.file_hash(path, record=ids[i])
                keys.append(FeatureCache.key(self.identity_key, image_hash, settings[i]))
            elif unknown_render:
                keys.append(f"item {i}")  # unknown rendering: nothing can be shared
            else:
                keys.append(f"{Path(path).resolve()}\0{settings[i]}")
        return keys

    def _encode_missing(self, todo: dict[str, int], paths: Sequence[str | Path], ids: list,
                        render, regions, found: dict[str, np.ndarray],
                        cache: FeatureCache | None) -> None:
        """Open, render and encode the items of ``todo`` (key -> first item needing it), about
        ``batch_size`` images at a time; each item's [k, feature_dim] goes to ``found`` (and
        ``cache``)."""
        pending = list(todo.items())
        per_item: int | None = None  # images per item, known after the first chunk
        start = 0
        while start < len(pending):
            chunk = pending[start:start + max(1, self.batch_size // (per_item or 1))]
            start += len(chunk)
            t0 = time.perf_counter()
            images, masks, per_item = self._render_chunk(chunk, paths, ids, render, regions,
                                                         per_item)
            feats = self.encode(images, masks).numpy().reshape(len(chunk), per_item, -1)
            self.stats["images"] += len(chunk)
            self.stats["seconds"] += time.perf_counter() - t0
            for (key, _i), item_features in zip(chunk, feats):
                found[key] = item_features
                if cache is not None:
                    cache.put(key, item_features)

    def _render_chunk(self, chunk: list[tuple[str, int]], paths: Sequence[str | Path], ids: list,
                      render, regions, per_item: int | None
                      ) -> tuple[list[Image.Image], list[Image.Image | None], int]:
        """The images to encode for the items of ``chunk``, their region masks, and k (images
        per item, which must be the same for every item)."""
        images: list[Image.Image] = []
        masks: list[Image.Image | None] = []
        counts = set()
        for _key, i in chunk:
            image = _open_image(paths[i], ids[i])
            rendered = render(i, image) if render is not None else [image]
            counts.add(len(rendered))
            images.extend(rendered)
            masks.extend(regions(i, image) if regions is not None and
                         self.layout_kind == "region" else [None] * len(rendered))
        if len(counts | ({per_item} if per_item else set())) != 1 or 0 in counts:
            raise GemelError(f"render returned {sorted(counts)} images per item; it must "
                             f"return the same number (>= 1) for every item")
        return images, masks, counts.pop()

    def encode_mentions(self, mentions: Iterable[Mention], prompt: VisualPrompt | None = None,
                        cache: FeatureCache | None = None) -> torch.Tensor:
        """Each mention's image through ``prompt`` -> [n, prompt.n_images, feature_dim] float32.

        Every mention must have an image (those without one have no image slot: filter them out).
        """
        mentions = list(mentions)
        prompt = prompt or VisualPrompt("none")
        for m in mentions:
            if not m.image:
                raise DataError("mention has no image to encode", record=m.id, field="image",
                                fix="leave mentions without an image out of vision encoding")
        return self.encode_paths(
            [m.image for m in mentions], [prompt.key(m.bbox, m.polygon) for m in mentions],
            cache=cache, ids=[m.id for m in mentions],
            render=lambda i, im: prompt.render(im, mentions[i].bbox, mentions[i].polygon,
                                               mentions[i].id),
            regions=lambda i, im: prompt.regions(im, mentions[i].bbox, mentions[i].polygon,
                                                 mentions[i].id))


# identity keys that change the features (a mismatch is an error), and those that may differ
# in a copy of the same model (a warning); the name and dtype may differ silently
_VISION_HARD = ("model_type", "config_sha256", "feature", "layout", "feature_dim")
_VISION_SOFT = ("weights_sha256", "processor_sha256")


def check_vision(saved: dict, mine: dict, source: object = None) -> None:
    """Raise :class:`MismatchError` when the features of the encoder with identity ``mine`` are
    not those of ``saved`` (a :attr:`VisionEncoder.identity` stored with a mapper); warn when only
    its weights or processor differ. The one check of a vision encoder against a saved one."""
    where = f"{source}: " if source is not None else ""
    # identities written before feature layouts existed are the global layout
    saved, mine = {"layout": "global", **saved}, {"layout": "global", **mine}
    hard = [k for k in _VISION_HARD if k in saved and k in mine and saved[k] != mine[k]]
    if hard:
        diff = ", ".join(f"{k}: saved {saved[k]!r}, now {mine[k]!r}" for k in hard)
        raise MismatchError(f"{where}vision encoder {mine.get('model')!r} differs from "
                            f"{saved.get('model')!r}, the one this was built with ({diff}); load "
                            f"{saved.get('model')!r} with feature {saved.get('feature')!r} and "
                            f"layout {saved.get('layout')!r}, or retrain the mapper")
    soft = [k for k in _VISION_SOFT if k in saved and k in mine and saved[k] != mine[k]]
    if soft:
        warnings.warn(f"{where}vision encoder {mine.get('model')!r} has other {', '.join(soft)} "
                      f"than {saved.get('model')!r}, the one this was built with", stacklevel=3)


def _open_image(path: str | Path, record: object) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError("image file not found", path=path, record=record, field="image",
                        fix="check the dataset's image folder (paths are relative to the "
                            "mentions file)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read the image ({exc})", path=path, record=record, field="image",
                        fix="re-download the image or drop the mention's image") from None


def _settings_per_item(vp_settings: Sequence[str] | str | None, n: int) -> list[str]:
    """One visual-prompt settings string per item (one string, or none, stands for all)."""
    if isinstance(vp_settings, str) or vp_settings is None:
        return [vp_settings or "vp1/full"] * n
    settings = list(vp_settings)
    if len(settings) != n:
        raise GemelError(f"{n} paths but {len(settings)} visual-prompt settings")
    return settings
