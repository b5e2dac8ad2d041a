"""Errors that tell the user where the bad input is and what to do about it."""
from __future__ import annotations


class GemelError(Exception):
    """Base class of every error gemel raises on purpose."""


class DataError(GemelError, ValueError):
    """Bad input data: names the file, the record (line or id), the field and the fix."""

    def __init__(self, message: str, *, path: object = None, record: object = None,
                 field: str | None = None, fix: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        text = (", ".join(where) + ": " if where else "") + message
        if fix:
            text += f" — {fix}"
        super().__init__(text)
        self.path, self.record, self.field = path, record, field
        self.message, self.fix = message, fix


class MissingDependency(GemelError, ImportError):
    """An optional package is missing; the message carries the exact pip line."""

    def __init__(self, what: str, pip_line: str):
        super().__init__(f"{what} is not installed. Install it with:\n    {pip_line}")
        self.pip_line = pip_line


class MismatchError(GemelError, ValueError):
    """A saved artefact (trie, mapper, index) was built for something else."""
