"""Retrievers by name: ``get_retriever("simcse", field="mention")``.

Built-in names are imported only when asked for (``image`` loads a vision encoder);
:func:`register_retriever` adds more.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from gemel.errors import DataError

_BUILTIN: dict[str, str] = {
    # "simcse" names GEMEL's method (nearest mentions by sentence-embedding cosine); the model is
    # the config's sentence_model, by default MiniLM (minilm-l6-v2), not a SimCSE checkpoint
    "simcse": "gemel.retrieval.simcse:SimCSERetriever",
    "bm25": "gemel.retrieval.bm25:BM25Retriever",
    "random": "gemel.retrieval.random_demos:RandomRetriever",
    "hybrid": "gemel.retrieval.hybrid:HybridRetriever",
    "image": "gemel.retrieval.image:ImageRetriever",
}
_REGISTERED: dict[str, Callable] = {}


def register_retriever(name: str, factory: Callable | None = None):
    """Register ``factory(**options) -> Retriever`` under ``name``; usable as a decorator."""
    def add(f: Callable) -> Callable:
        if name in _BUILTIN or name in _REGISTERED:
            raise DataError(f"a retriever named {name!r} already exists", field="name")
        _REGISTERED[name] = f
        return f

    return add(factory) if factory is not None else add


def retriever_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTERED))


def _factory(name: str) -> Callable:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _BUILTIN:
        module, attr = _BUILTIN[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise DataError(f"unknown retriever {name!r}; known: {retriever_names()}", field="retriever")


def get_retriever(name: str, **options):
    """A new, unfitted retriever. Unknown options fail with the list of the ones it takes."""
    factory = _factory(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        known = [p for p, v in params.items()
                 if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD) and p != "self"]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise DataError(f"unknown option(s) {unknown} for retriever {name!r}; it takes "
                            f"{known}", field="retriever options")
    return factory(**options)
