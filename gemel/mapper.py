"""LinearMapper: one vision feature -> ``n_tokens`` soft tokens in the LLM's embedding space.

GEMEL maps CLIP ViT-L/14's pooled 1024-d feature through a single ``nn.Linear`` to 4 visual
tokens of the LLM's hidden size; only this layer is trained. With a visual prompt that renders
k images per mention (``overlay+crop``: k = 2) the same layer maps each of the k features, so one
image slot holds ``k * n_tokens`` soft tokens (overlay tokens first, then crop tokens).

A saved mapper is a folder::

    mapper.safetensors   proj.weight [n_tokens * hidden, feature_dim], proj.bias [n_tokens * hidden]
    config.json          sizes, the vision encoder's and the LLM's identity, feature and feature
                         layout (global | grid:N | region, see gemel.vision), visual-prompt mode,
                         template and the training config it was trained with
    lora/                (optional) peft LoRA adapters of the LLM, adapters only

:meth:`LinearMapper.load` refuses (:class:`~gemel.errors.MismatchError`) to load into another LLM
or vision encoder than the one it was trained with, naming both.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gemel.errors import DataError, MismatchError
from gemel.vision import check_vision

FORMAT = "gemel-mapper"
VERSION = 1
WEIGHTS = "mapper.safetensors"
CONFIG = "config.json"
LORA = "lora"
_PROBE = 16  # embedding values kept in the config to tell two LLMs of the same shape apart

# vision-identity fields that change the features (hard) and those that may differ harmlessly


def llm_identity(model: nn.Module, name: str | None = None) -> dict:
    """What a mapper depends on in the LLM: name, model type, hidden size, vocabulary size, and a
    small strided probe of the input-embedding table (two random inits of one config differ there).

    ``model`` is any HF causal LM (also a peft-wrapped one); ``name`` defaults to its
    ``config._name_or_path``.
    """
    config = getattr(model, "config", None)
    weight = model.get_input_embeddings().weight
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // _PROBE)
    probe = [float(x) for x in flat[::step][:_PROBE].float().cpu()]
    return {"name": name or getattr(config, "_name_or_path", "") or type(model).__name__,
            "model_type": str(getattr(config, "model_type", type(model).__name__)),
            "hidden_size": int(weight.shape[1]), "vocab_size": int(weight.shape[0]),
            "embedding_probe": probe}


def _describe_llm(ident: dict) -> str:
    return (f"{ident.get('name')!r} ({ident.get('model_type')}, hidden {ident.get('hidden_size')}, "
            f"vocab {ident.get('vocab_size')})")


def check_llm(saved: dict, mine: dict, source: object = None, warn_rename: bool = True) -> None:
    """Raise MismatchError when ``mine`` is not the LLM ``saved`` describes.

    Shapes and model type must be equal; the embedding probe must agree to bf16 precision (so a
    mapper trained in fp32 loads into the same LLM in bf16), and a renamed copy of the same
    weights is accepted with a warning."""
    where = f"{source}: " if source is not None else ""
    fix = (f"load LLM {saved.get('name')!r}, or train a mapper for {mine.get('name')!r} "
           f"(gemel train --model ...)")
    hard = [k for k in ("model_type", "hidden_size", "vocab_size") if saved.get(k) != mine.get(k)]
    saved_probe, my_probe = saved.get("embedding_probe"), mine.get("embedding_probe")
    same_weights = (saved_probe is None or my_probe is None or len(saved_probe) != len(my_probe)
                    or all(math.isclose(x, y, rel_tol=2e-2, abs_tol=1e-3)
                           for x, y in zip(saved_probe, my_probe)))
    if hard or not same_weights:
        what = ", ".join(hard) if hard else "the embedding weights"
        raise MismatchError(f"{where}this mapper was trained for LLM {_describe_llm(saved)} but "
                            f"is being loaded into LLM {_describe_llm(mine)} ({what} differ) — {fix}")
    if warn_rename and saved.get("name") != mine.get("name"):
        warnings.warn(f"{where}mapper trained for LLM {saved.get('name')!r}, loaded into "
                      f"{mine.get('name')!r}: same shapes and embedding weights, so accepted",
                      stacklevel=3)


class LinearMapper(nn.Module):
    """``feature_dim`` -> ``n_tokens`` x ``hidden`` with one ``nn.Linear``.

    ``images_per_mention`` (k) is how many images the visual prompt renders per mention; it does
    not change the weights, only the slot size ``k * n_tokens``. ``meta`` holds what the config
    records besides the sizes (``vision``, ``llm``, ``vp_mode``, ``template``, ``train`` ...).
    ``out_dtype``: the dtype of the soft tokens (the LLM's); None keeps the weights' dtype.
    """

    def __init__(self, feature_dim: int, hidden: int, n_tokens: int = 4, *,
                 images_per_mention: int = 1, meta: dict | None = None,
                 out_dtype: torch.dtype | None = None):
        super().__init__()
        if min(feature_dim, hidden, n_tokens, images_per_mention) < 1:
            raise ValueError(f"sizes must be >= 1: feature_dim {feature_dim}, hidden {hidden}, "
                             f"n_tokens {n_tokens}, images_per_mention {images_per_mention}")
        self.feature_dim, self.hidden, self.n_tokens = feature_dim, hidden, n_tokens
        self.images_per_mention = images_per_mention
        self.meta: dict[str, Any] = dict(meta or {})
        self.out_dtype = out_dtype
        self.proj = nn.Linear(feature_dim, n_tokens * hidden)

    @property
    def tokens_per_slot(self) -> int:
        """Soft tokens one image slot takes: ``images_per_mention * n_tokens``."""
        return self.images_per_mention * self.n_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[n, feature_dim] or [n, k, feature_dim] -> [n, k * n_tokens, hidden] (k = 1 for 2-D),
        in ``out_dtype``."""
        if features.ndim == 2:
            features = features[:, None]
        if features.ndim != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(f"expected features [n, k, {self.feature_dim}], got "
                             f"{list(features.shape)}")
        n, k, _ = features.shape
        w = self.proj.weight
        out = self.proj(features.to(device=w.device, dtype=w.dtype))
        out = out.reshape(n, k * self.n_tokens, self.hidden)
        return out.to(self.out_dtype) if self.out_dtype is not None else out

    # -- saving -----------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "feature_dim": self.feature_dim,
                "hidden": self.hidden, "n_tokens": self.n_tokens,
                "images_per_mention": self.images_per_mention, **self.meta}

    def save(self, folder: str | os.PathLike, lora_model: nn.Module | None = None) -> Path:
        """Write ``mapper.safetensors`` + ``config.json`` (and ``lora/`` adapters of a peft model)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        # write under temporary names, then rename: a crash never leaves a half-written mapper
        tmp = folder / f".{WEIGHTS}.tmp"
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, folder / WEIGHTS)
        tmp = folder / f".{CONFIG}.tmp"
        tmp.write_text(json.dumps(self.config_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, folder / CONFIG)
        if lora_model is not None:
            # peft writes only the adapter weights (adapter_model.safetensors + adapter_config.json)
            lora_model.save_pretrained(str(folder / LORA), safe_serialization=True)
        return folder

    @staticmethod
    def read_config(folder: str | os.PathLike) -> dict:
        folder = Path(folder)
        path = folder / CONFIG
        if not path.is_file() or not (folder / WEIGHTS).is_file():
            raise DataError(f"not a mapper folder: needs {WEIGHTS} and {CONFIG}", path=folder,
                            fix="give the folder that `gemel train` wrote (e.g. CKPT_DIR/best)")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON ({err})", path=path) from None
        if config.get("format") != FORMAT:
            raise DataError(f"format is {config.get('format')!r}, expected {FORMAT!r}", path=path,
                            field="format")
        if config.get("version", 0) > VERSION:
            raise DataError(f"mapper format version {config.get('version')} is newer than this "
                            f"gemel reads ({VERSION})", path=path, field="version",
                            fix="upgrade gemel")
        return config

    @classmethod
    def load(cls, folder: str | os.PathLike, *, expect_llm: nn.Module | dict | None = None,
             expect_vision: object = None, device: str | torch.device = "cpu",
             out_dtype: torch.dtype | None = None) -> "LinearMapper":
        """Load a saved mapper, checking it fits the LLM and vision encoder it will serve.

        ``expect_llm``: the LLM (a model, or :func:`llm_identity`'s dict); ``expect_vision``: a
        :class:`gemel.vision.VisionEncoder` or its ``identity`` dict. ``out_dtype`` defaults to
        the expected LLM's embedding dtype when a model is given.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        config = cls.read_config(folder)
        if expect_llm is not None:
            if isinstance(expect_llm, nn.Module):
                if out_dtype is None:
                    out_dtype = expect_llm.get_input_embeddings().weight.dtype
                mine = llm_identity(expect_llm)
            else:
                mine = dict(expect_llm)
            # a model built in memory has no name: nothing to warn about when only names differ
            named = not isinstance(expect_llm, nn.Module) or bool(
                getattr(getattr(expect_llm, "config", None), "_name_or_path", ""))
            check_llm(config.get("llm") or {}, mine, source=folder, warn_rename=named)
        if expect_vision is not None:
            mine_v = expect_vision if isinstance(expect_vision, dict) else expect_vision.identity
            check_vision(config.get("vision") or {}, mine_v, source=folder)
        sizes = {k: config.get(k) for k in ("feature_dim", "hidden", "n_tokens")}
        if not all(isinstance(v, int) for v in sizes.values()):
            raise DataError(f"config lacks integer sizes {sizes}", path=folder / CONFIG)
        meta = {k: v for k, v in config.items()
                if k not in ("format", "version", "images_per_mention", *sizes)}
        mapper = cls(**sizes, images_per_mention=int(config.get("images_per_mention", 1)),
                     meta=meta, out_dtype=out_dtype)
        state = load_file(str(folder / WEIGHTS))
        try:
            mapper.load_state_dict(state)
        except RuntimeError as err:
            raise DataError(f"weights do not match the config's sizes ({err})",
                            path=folder / WEIGHTS) from None
        return mapper.to(device)


def resolve_checkpoint(folder: str | os.PathLike) -> Path:
    """The mapper checkpoint a ``--mapper`` folder means: the folder itself when it holds a
    mapper, else the ``best/`` checkpoint of a `gemel train --out` folder (``last/`` when
    training had no dev set, with a warning)."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        return folder
    for sub in ("best", "last"):
        if (folder / sub / WEIGHTS).is_file():
            if sub == "last":
                warnings.warn(f"{folder} has no best/ checkpoint (training without dev "
                              "mentions): using last/", stacklevel=2)
            return folder / sub
    raise DataError(f"not a mapper checkpoint: no {WEIGHTS} in it, nor in best/ or last/",
                    path=folder, field="mapper",
                    fix="give the folder `gemel train --out` wrote, or one of its checkpoints")


def checkpoint_template(folder: str | os.PathLike, config: dict):
    """The prompt template a checkpoint was trained with (:class:`gemel.prompting.Template`): the
    text saved in its config (so an edited template file cannot change it), else by name."""
    from gemel.errors import GemelError
    from gemel.prompting import Template, load_template

    name, block = config.get("template"), config.get("template_block")
    if not name:
        return None
    try:
        shipped = load_template(name)
    except GemelError:
        shipped = None
    forms = config.get("template_forms") or {}  # one block per kind of mention, when it has them
    if block is None or (shipped is not None and shipped.block == block
                         and shipped.forms == (forms or shipped.forms)):
        if shipped is None:
            raise DataError(f"the checkpoint's template {name!r} is neither saved in it nor "
                            "shipped", path=Path(folder) / CONFIG, field="template")
        return shipped
    chat = config.get("template_chat", shipped.chat if shipped is not None else False)
    return Template(name=name, block=block, chat=bool(chat), source=str(Path(folder) / CONFIG),
                    forms=dict(forms))


def has_lora(folder: str | os.PathLike) -> bool:
    return (Path(folder) / LORA / "adapter_config.json").is_file()


def attach_lora(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """The LLM with the mapper folder's LoRA adapters applied (peft), or ``model`` unchanged when
    the folder has none."""
    if not has_lora(folder):
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(Path(folder) / LORA))


__all__ = ["LinearMapper", "attach_lora", "check_llm", "checkpoint_template",
           "has_lora", "llm_identity", "resolve_checkpoint"]
