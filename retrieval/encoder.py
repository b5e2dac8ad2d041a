"""Sentence embeddings for retrieval: any model :func:`gemel.sources.resolve` knows, loaded lazily.

Two ways to pool, because the models we care about disagree:
  * ``"auto"`` — a sentence-transformers model (a folder with ``modules.json``, e.g. the offline
    ``minilm-l6-v2``) pools the way its own config says;
  * ``"cls"`` / ``"mean"`` / ``"pooler"`` — a plain transformers encoder pooled by us. SimCSE's
    own tool embeds with ``pooler_output`` for supervised checkpoints and the raw [CLS] state for
    unsupervised ones; sentence-transformers would silently fall back to mean pooling for
    ``princeton-nlp/sup-simcse-roberta-large``, so simcse names default to SimCSE's choice.

The model is loaded on the first :meth:`SentenceEncoder.embed` call, never to compute
:meth:`SentenceEncoder.identity` — so a retrieval index found in the cache costs no model load.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gemel.errors import DataError, MissingDependency
from gemel.sources import load_tokenizer, loading, resolve

POOLINGS = ("auto", "cls", "mean", "pooler")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


def default_pooling(model: str) -> str:
    """SimCSE's pooling for SimCSE checkpoints (see module doc), the model's own otherwise."""
    lowered = model.lower()
    if "unsup-simcse" in lowered:
        return "cls"
    if "simcse" in lowered:
        return "pooler"
    return "auto"


class SentenceEncoder:
    """Texts -> L2-normalised float32 vectors.

    Args:
        model: offline name (``minilm-l6-v2``), local folder or hub id (see :mod:`gemel.sources`).
        pooling: ``None`` (see :func:`default_pooling`), ``"auto"``, ``"cls"``, ``"mean"``,
            ``"pooler"``.
        batch_size: texts per forward pass.
        device: torch device string; ``None`` picks CUDA when available.
        max_length: token limit per text for our own pooling paths (SimCSE used 128); the
            sentence-transformers path keeps the model's ``max_seq_length``.
    """

    def __init__(self, model: str = "minilm-l6-v2", *, pooling: str | None = None,
                 batch_size: int = 64, device: str | None = None, max_length: int = 128):
        pooling = default_pooling(model) if pooling is None else pooling
        if pooling not in POOLINGS:
            raise DataError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}",
                            field="pooling")
        self.model_name = model
        self.pooling = pooling
        self.batch_size = int(batch_size)
        self.device = device
        self.max_length = int(max_length)
        self.location = resolve(model, "sentence")
        self.calls = 0  # forward batches run so far (lets callers see that a cache was used)
        self._st = None
        self._hf = None

    # -- identity: what decides whether cached vectors still hold --------------------------------
    def identity(self) -> dict:
        """Model name, where it resolved, pooling, and (for local folders) size+mtime of its files."""
        ident: dict = {"model": self.model_name, "location": self.location,
                       "pooling": self.pooling, "max_length": self.max_length}
        folder = Path(self.location)
        if folder.is_dir():
            ident["files"] = {str(p.relative_to(folder)): [p.stat().st_size, int(p.stat().st_mtime)]
                              for p in sorted(folder.rglob("*"))
                              if p.is_file() and p.suffix in _WEIGHT_SUFFIXES}
        return ident

    # -- embedding ----------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts.

        Returns:
            (len(texts), dim) float32, each row of unit L2 norm.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.pooling == "auto":
            vectors = self._embed_st(texts)
        else:
            vectors = self._embed_hf(texts)
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        # A zero vector (all-padding input) would divide by zero; leave it zero: similarity 0.
        return vectors / np.maximum(norms, 1e-12)

    @property
    def dim(self) -> int:
        if self.pooling == "auto":
            return int(self._load_st().get_sentence_embedding_dimension())
        return int(self._load_hf()[1].config.hidden_size)

    def _device(self) -> str:
        if self.device is not None:
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def _load_st(self):
        if self._st is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as err:  # pragma: no cover - a declared dependency
                raise MissingDependency("sentence-transformers",
                                        "pip install 'sentence-transformers>=3.0'") from err
            with loading(self.model_name, "sentence"):
                self._st = SentenceTransformer(self.location, device=self._device())
        return self._st

    def _embed_st(self, texts: list[str]) -> np.ndarray:
        model = self._load_st()
        out = []
        for start in range(0, len(texts), self.batch_size):
            self.calls += 1
            out.append(model.encode(texts[start:start + self.batch_size],
                                    batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False))
        return np.concatenate(out)

    def _load_hf(self):
        if self._hf is None:
            from transformers import AutoModel

            tokenizer = load_tokenizer(self.model_name, "sentence")
            with loading(self.model_name, "sentence"):
                model = AutoModel.from_pretrained(self.location).to(self._device()).eval()
            self._hf = (tokenizer, model)
        return self._hf

    def _embed_hf(self, texts: list[str]) -> np.ndarray:
        import torch

        tokenizer, model = self._load_hf()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                self.calls += 1
                batch = tokenizer(texts[start:start + self.batch_size], padding=True,
                                  truncation=True, max_length=self.max_length,
                                  return_tensors="pt").to(model.device)
                output = model(**batch)
                hidden = output.last_hidden_state  # (b, seq, hidden)
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                elif self.pooling == "pooler":
                    if getattr(output, "pooler_output", None) is None:
                        raise DataError(f"{self.model_name} has no pooler layer", field="pooling",
                                        fix='use pooling="cls" or "mean"')
                    pooled = output.pooler_output
                else:  # mean over real tokens only: padding must not dilute short texts
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out)
