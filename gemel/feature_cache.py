"""Vision features on disk, shared by training, linking and the image retriever.

:class:`FeatureCache` stores features as ``.npy`` shards plus a JSON index, keyed by (encoder
identity, sha256 of the image file's bytes, visual-prompt settings string), so a second run over
the same images encodes nothing (:meth:`gemel.vision.VisionEncoder.encode_paths` reads and fills
it). :func:`open_feature_cache` turns a ``--feature-cache`` setting into a cache (or none): the one
place that knows where the default folder is.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from gemel.errors import DataError
from gemel.files import atomic_file, file_sha256, write_atomic


def open_feature_cache(setting: str | os.PathLike | None = "auto") -> FeatureCache | None:
    """The cache a ``feature_cache`` setting names: ``"auto"`` -> ``<gemel cache>/features``,
    ``None`` / ``""`` / ``"none"`` -> no cache (features live in memory only), else that folder."""
    if setting is None or str(setting) in ("", "none"):
        return None
    if str(setting) == "auto":
        from gemel.sources import cache_dir

        return FeatureCache(cache_dir() / "features")
    return FeatureCache(Path(setting))


class FeatureCache:
    """Vision features on disk: ``shards/*.npy`` (float32 [rows, dim]) plus ``index.json``.

    The index maps a key — :meth:`key` (encoder identity hash, image sha256, visual-prompt
    settings) — to (shard, first row, number of rows): one mention's k features are k consecutive
    rows. A shard is written to a temporary name and renamed before the index names it, and the
    index is replaced atomically under a lock after merging what other processes wrote, so an
    interrupted or concurrent run never leaves an index naming missing or half-written rows.

    ``stats`` counts ``hits`` and ``misses`` (per requested item) and ``written`` (feature sets
    stored); :meth:`summary` gives the hit rate.
    """

    FORMAT = "gemel-feature-cache"
    VERSION = 1

    def __init__(self, folder: str | Path, flush_rows: int = 4096):
        self.folder = Path(folder)
        (self.folder / "shards").mkdir(parents=True, exist_ok=True)
        self.flush_rows = flush_rows
        self.stats = {"hits": 0, "misses": 0, "written": 0}
        self._entries: dict[str, list] = self._read_index()
        self._pending: dict[str, np.ndarray] = {}
        self._shards: dict[str, np.ndarray] = {}
        self._hashes: dict[tuple, str] = {}

    # ---- keys ---------------------------------------------------------------------------------
    @staticmethod
    def key(encoder_key: str, image_sha256: str, vp_setting: str) -> str:
        return hashlib.sha256(f"{encoder_key}\0{image_sha256}\0{vp_setting}".encode()).hexdigest()[:40]

    def file_hash(self, path: str | Path, record: object = None) -> str:
        """sha256 of the file's bytes, remembered per (path, size, mtime) for this session."""
        file = Path(path)
        try:
            stat = file.stat()
        except FileNotFoundError:
            raise DataError("image file not found", path=path, record=record, field="image",
                            fix="check the dataset's image folder") from None
        memo = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in self._hashes:
            self._hashes[memo] = file_sha256(file)
        return self._hashes[memo]

    # ---- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(set(self._entries) | set(self._pending))

    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._entries

    def get(self, key: str) -> np.ndarray | None:
        """The k features stored under ``key`` as float32 [k, dim], or None."""
        if key in self._pending:
            return self._pending[key]
        entry = self._entries.get(key)
        if entry is None:
            return None
        shard, row, n = entry
        try:
            array = self._shard(shard)
        except FileNotFoundError:  # someone deleted a shard: its rows are simply gone
            self._entries = {k: e for k, e in self._entries.items() if e[0] != shard}
            return None
        return np.array(array[row:row + n], dtype=np.float32)

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            self._shards[name] = np.load(self.folder / "shards" / name, mmap_mode="r",
                                         allow_pickle=False)
        return self._shards[name]

    # ---- writing ------------------------------------------------------------------------------
    def put(self, key: str, features: np.ndarray | torch.Tensor) -> None:
        """Store [k, dim] (or [dim]) features under ``key``; written at :meth:`flush`."""
        if isinstance(features, torch.Tensor):
            features = features.detach().float().cpu().numpy()
        array = np.asarray(features, dtype=np.float32)
        self._pending[key] = array.reshape(1, -1) if array.ndim == 1 else array
        if sum(a.shape[0] for a in self._pending.values()) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write pending features as new shards, then merge them into the index."""
        if not self._pending:
            return
        new: dict[str, list] = {}
        by_dim: dict[int, list[tuple[str, np.ndarray]]] = {}
        for key, array in self._pending.items():
            by_dim.setdefault(array.shape[1], []).append((key, array))
        for group in by_dim.values():
            name = f"{uuid.uuid4().hex[:16]}.npy"
            rows = np.concatenate([a for _, a in group])
            with atomic_file(self.folder / "shards" / name, "wb") as f:
                np.save(f, rows)
            row = 0
            for key, array in group:
                new[key] = [name, row, int(array.shape[0])]
                row += array.shape[0]
        with _locked(self.folder / ".lock"):
            merged = self._read_index()
            merged.update(new)
            index = {"format": self.FORMAT, "version": self.VERSION, "entries": merged}
            write_atomic(self.folder / "index.json", json.dumps(index, separators=(",", ":")))
        self._entries = merged
        self.stats["written"] += len(self._pending)
        self._pending = {}

    def _read_index(self) -> dict[str, list]:
        path = self.folder / "index.json"
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"feature cache index is not valid JSON ({exc})", path=path,
                            fix=f"delete {self.folder} to rebuild the cache") from None
        if data.get("format") != self.FORMAT or data.get("version") != self.VERSION:
            raise DataError(f"not a version-{self.VERSION} gemel feature cache", path=path,
                            fix=f"delete {self.folder} or choose another cache folder")
        return data["entries"]

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()

    # ---- reporting ----------------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        total = self.stats["hits"] + self.stats["misses"]
        return self.stats["hits"] / total if total else 0.0

    def summary(self) -> str:
        stats = self.stats
        return (f"feature cache {self.folder}: {stats['hits']} hits, {stats['misses']} misses "
                f"({100 * self.hit_rate:.1f}% hit rate), {len(self)} entries")

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.folder)!r}, entries={len(self)}, stats={self.stats})"


def lookup(keys: list[str], cache: FeatureCache | None
           ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Split distinct keys into those the cache holds (key -> [k, feature_dim]) and those to
    encode (key -> first item needing it, in order of first use); count the cache's hits and
    misses per item. No cache: every key is to encode."""
    found: dict[str, np.ndarray] = {}
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key in found or key in todo:
            continue
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            found[key] = hit
        else:
            todo[key] = i
    if cache is not None:
        hits = sum(1 for key in keys if key in found)
        cache.stats["hits"] += hits
        cache.stats["misses"] += len(keys) - hits
    return found, todo


@contextmanager
def _locked(path: Path):
    """An exclusive advisory lock (POSIX); elsewhere, index merges are last-writer-wins."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
