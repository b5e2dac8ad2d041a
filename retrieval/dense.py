"""DenseIndex: normalised vectors for a list of texts, cached on disk, searched by matrix product.

Used by the ``simcse`` retriever over training mentions, and meant for any other text list (KB
titles + descriptions for candidate-aware decoding)::

    encoder = SentenceEncoder("minilm-l6-v2")
    index = DenseIndex.build([f"{e.title}. {e.description}" for e in kb], encoder,
                             ids=[e.id for e in kb])
    scores, rows = index.search(encoder.embed(queries), k=50)   # (B, 50), (B, 50)

Identical texts are embedded once (training sets repeat mention strings a lot) and share one
vector, so their scores tie exactly and the tie-break by row order is exact.

Cache: ``<cache_dir>/dense-<digest>.npy`` (unique-text vectors, float32) and ``.json`` (the
fingerprint: encoder identity, caller's extra keys such as the field, number of texts and a
SHA-256 of texts and ids). The digest is the fingerprint's hash, so an index over other data or
with another model gets its own files; an entry is used only when its JSON matches in full.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gemel.errors import DataError, MismatchError
from gemel.retrieval.topk import top_k

FORMAT = 1
#: Bytes of one (queries x index rows) float32 score block.
SCORE_BLOCK_BYTES = 64 * 2**20


def default_cache_dir() -> Path:
    from gemel.sources import cache_dir

    return cache_dir() / "retrieval"


def data_digest(texts: Sequence[str], ids: Sequence[str] | None) -> str:
    """SHA-256 over texts and ids, length-prefixed so that no two lists hash alike by joining."""
    h = hashlib.sha256()
    for seq in (texts, ids or ()):
        h.update(f"#{len(seq)}|".encode())
        for item in seq:
            raw = str(item).encode("utf-8", "surrogatepass")
            h.update(f"{len(raw)}:".encode())
            h.update(raw)
    return h.hexdigest()


class DenseIndex:
    """Unit vectors for N texts (stored once per distinct text) with chunked top-k search.

    Args:
        vectors: (U, d) float32, rows of unit norm (normalised here if not).
        inverse: (N,) int, row of ``vectors`` for each indexed item; ``None`` means U == N.
        texts: the N texts (optional); lets :meth:`vectors_for` reuse known vectors.
        encoder: embeds texts not in the index (see :meth:`vectors_for`, :meth:`search_texts`).
    """

    def __init__(self, vectors: np.ndarray, inverse: np.ndarray | None = None,
                 texts: Sequence[str] | None = None, encoder=None):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise MismatchError(f"index vectors must be (U, d), got shape {vectors.shape}")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.vectors = vectors / np.maximum(norms, 1e-12)
        self.inverse = None if inverse is None else np.asarray(inverse, dtype=np.int64)
        if self.inverse is not None and len(self.inverse) and self.inverse.max() >= len(vectors):
            raise MismatchError("inverse points past the stored vectors")
        self.texts = list(texts) if texts is not None else None
        self._row_of = ({t: int(self.inverse[i] if self.inverse is not None else i)
                         for i, t in enumerate(self.texts)} if self.texts is not None else {})
        self.encoder = encoder
        self.cache_path: Path | None = None  # the .npy this index came from or went to
        self.loaded_from_cache = False

    @property
    def size(self) -> int:
        """N, the number of indexed items (duplicates counted)."""
        return len(self.inverse) if self.inverse is not None else len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, texts: Sequence[str], encoder, *, ids: Sequence[str] | None = None,
              cache_dir: str | os.PathLike | None = None, cache: bool = True,
              extra: dict | None = None) -> "DenseIndex":
        """Embed ``texts`` with ``encoder`` (anything with ``embed(texts) -> (n, d)`` and
        ``identity() -> dict``), or load the vectors from the cache when nothing changed.

        ``ids`` and ``extra`` (e.g. ``{"field": "mention"}``) only enter the fingerprint.
        """
        texts = [str(t) for t in texts]
        if ids is not None and len(ids) != len(texts):
            raise DataError(f"{len(ids)} ids for {len(texts)} texts", field="ids")
        unique: dict[str, int] = {}
        inverse = np.fromiter((unique.setdefault(t, len(unique)) for t in texts), dtype=np.int64,
                              count=len(texts))
        distinct = list(unique)
        fingerprint = {"format": FORMAT, "encoder": encoder.identity(), "extra": extra or {},
                       "n_texts": len(texts), "n_unique": len(distinct),
                       "data_sha256": data_digest(texts, ids)}
        # Compared with what json.loads gives back from disk: tuples must already be lists.
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]
        npy, meta = folder / f"dense-{digest}.npy", folder / f"dense-{digest}.json"

        vectors = _load_cached(npy, meta, fingerprint) if cache else None
        loaded = vectors is not None
        if vectors is None:
            vectors = np.asarray(encoder.embed(distinct), dtype=np.float32)
            if vectors.shape[0] != len(distinct):
                raise MismatchError(f"encoder returned {vectors.shape[0]} vectors for "
                                    f"{len(distinct)} texts")
            if cache:
                _save_cached(npy, meta, fingerprint, vectors)
        index = cls(vectors, inverse if len(distinct) < len(texts) else None, texts, encoder)
        index.loaded_from_cache = loaded
        index.cache_path = npy if cache else None
        return index

    # -- querying -----------------------------------------------------------------------------------
    def vectors_for(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), d) query vectors: indexed texts reuse their stored vector, others are
        embedded (needs an encoder). Reuse keeps a training mention's query vector identical to
        its indexed one, whatever batch it is embedded in."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        known = [i for i, t in enumerate(texts) if t in self._row_of]
        if known:
            out[known] = self.vectors[[self._row_of[texts[i]] for i in known]]
        new: dict[str, list[int]] = {}  # each unseen text embedded once, however often it recurs
        for i, t in enumerate(texts):
            if t not in self._row_of:
                new.setdefault(t, []).append(i)
        if new:
            if self.encoder is None:
                raise DataError(f"{len(new)} query texts are not in the index and it has no "
                                "encoder to embed them", field="texts",
                                fix="build the index with DenseIndex.build(texts, encoder)")
            vectors = np.asarray(self.encoder.embed(list(new)), dtype=np.float32)
            for vector, rows in zip(vectors, new.values()):
                out[rows] = vector
        return out

    def scores(self, query_vectors: np.ndarray) -> np.ndarray:
        """Cosine similarities: (B, d) unit query vectors -> (B, N) float32."""
        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise MismatchError(f"query vectors must be (B, {self.dim}), got shape {q.shape}")
        s = q @ self.vectors.T
        return s[:, self.inverse] if self.inverse is not None else s

    def search(self, query_vectors: np.ndarray, k: int,
               banned: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows per query, by cosine similarity, in blocks of queries.

        Args:
            query_vectors: (B, d) float32 unit vectors.
            k: rows per query (at most N).
            banned: optional, per query, row indices it must not get.

        Returns:
            ``(scores, indices)``, both (B, min(k, N)), best first, ties by row ascending. Where
            ``banned`` leaves fewer than k rows, the tail holds ``-inf`` scores: drop those.
        """
        q = np.asarray(query_vectors, dtype=np.float32)
        n = self.size
        kk = max(0, min(int(k), n))
        all_scores = np.empty((len(q), kk), dtype=np.float32)
        all_rows = np.empty((len(q), kk), dtype=np.int64)
        block = max(1, SCORE_BLOCK_BYTES // (4 * max(n, 1)))
        for start in range(0, len(q), block):
            s = self.scores(q[start:start + block])
            if banned is not None:
                for r, rows in enumerate(banned[start:start + block]):
                    s[r, np.asarray(rows, dtype=np.int64)] = -np.inf
            all_scores[start:start + block], all_rows[start:start + block] = top_k(s, kk)
        return all_scores, all_rows

    def search_texts(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` for query texts (embedded with the index's encoder)."""
        return self.search(self.vectors_for(texts), k)


def _load_cached(npy: Path, meta: Path, fingerprint: dict) -> np.ndarray | None:
    """The cached vectors when the JSON fingerprint matches in full and the array is sane."""
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        stored = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if stored.get("fingerprint") != fingerprint:
        return None
    try:
        vectors = np.load(npy, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if vectors.ndim != 2 or vectors.shape[0] != fingerprint["n_unique"]:
        return None
    return vectors.astype(np.float32, copy=False)


def _save_cached(npy: Path, meta: Path, fingerprint: dict, vectors: np.ndarray) -> None:
    """Write vectors, then the JSON: the JSON's presence marks a complete entry. Each file goes
    to a process-unique temporary name first, so concurrent builders never see half a file."""
    npy.parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp{os.getpid()}"
    tmp_npy = npy.with_name(npy.stem + tag + ".npy")
    np.save(tmp_npy, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
    os.replace(tmp_npy, npy)
    tmp_meta = meta.with_name(meta.name + tag)
    tmp_meta.write_text(json.dumps({"fingerprint": fingerprint, "dim": int(vectors.shape[1])},
                                   indent=1, sort_keys=True))
    os.replace(tmp_meta, meta)
