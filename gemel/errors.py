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


class ModelUnavailable(GemelError):
    """A model that cannot be had here (no hub, no such file or folder); names the offline ones."""


class MismatchError(GemelError, ValueError):
    """A saved artefact (trie, mapper, index) was built for something else."""


# What a reader does with a bad record: "raise" (the DataError ends the read; CLI --strict),
# "skip" (left out, counted, the first few reported: KBs and demonstration pools) or "row" (the
# mentions to link: the record becomes an error row in the predictions, the run goes on).
ON_BAD = ("raise", "skip", "row")


def check_on_bad(on_bad: str) -> None:
    if on_bad not in ON_BAD:
        raise GemelError(f"unknown on_bad {on_bad!r}; choose one of {list(ON_BAD)}")


class BadRecords:
    """Bad records met while reading one file, each a :class:`DataError` (the first few kept)."""

    SHOWN = 3  # examples kept for the message

    def __init__(self, path: object = None):
        self.path = None if path is None else str(path)
        self.count = 0
        self.examples: list[str] = []

    def add(self, err: DataError) -> None:
        self.count += 1
        if len(self.examples) < self.SHOWN:
            self.examples.append(str(err))

    def message(self, what: str = "records", action: str = "skipped") -> str | None:
        """One warning naming how many were left out and the first few (None when none were)."""
        if not self.count:
            return None
        more = f" (first {len(self.examples)} shown)" if self.count > len(self.examples) else ""
        return (f"{self.path}: {self.count} bad {what} {action}{more}:\n  "
                + "\n  ".join(self.examples) + "\n  (--strict makes a bad record an error)")

    def to_json(self) -> dict:
        return {"count": self.count, "examples": list(self.examples)}
