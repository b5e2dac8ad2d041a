"""Writing files so that a crash or a ``kill -9`` never leaves one half-written.

Two ways to write: :func:`atomic_file` / :func:`write_atomic` (the whole file at once: written
beside it, fsync'd, then renamed over it, so a reader sees the old file or the new one, never a
mix) and :func:`append_lines` (lines appended, flushed and fsync'd: after a kill at most the last
line is torn). A lock file
(:func:`hold_lock`, ``filelock``: an OS lock, released by the kernel when its process dies, so a
killed run never blocks its resume) keeps two processes from writing the same output.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator

from gemel.errors import GemelError


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """An open file (text: UTF-8; ``mode="wb"``: bytes) that replaces ``path`` in one step when
    the block ends: written beside it under a temporary name, fsync'd, renamed over it, the folder
    fsync'd. When the block raises, the temporary file is removed and ``path`` is untouched. The
    one atomic write: files written whole (KB, mentions, trie arrays, mapper, feature shards,
    assembled models) go through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) in one step (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


def append_lines(f: IO[str], lines: Iterable[str]) -> None:
    """Append whole lines to an open file and push them to the disk before returning."""
    f.write("".join(line + "\n" for line in lines))
    f.flush()
    os.fsync(f.fileno())


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync folders; the rename is still atomic
    finally:
        os.close(fd)


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextmanager
def hold_lock(path: str | Path, what: str = "this output") -> Iterator[None]:
    """Hold ``<path>.lock`` for the duration; another process holding it is an error, not a wait."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path(path)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise GemelError(f"{path}: another gemel process is writing {what} (it holds "
                         f"{lock_path(path)}); wait for it to finish, or choose another --out. "
                         "(A killed process releases the lock by itself.)") from None
    try:
        yield
    finally:
        lock.release()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


__all__ = ["atomic_file", "write_atomic", "append_lines", "hold_lock", "lock_path", "file_sha256", "sync_folder"]
