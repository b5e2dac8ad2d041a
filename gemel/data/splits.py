"""Split files: ``{"train": [ids], "val" | "dev": [ids], "test": [ids]}`` selecting records.

Ids may be integers or strings; they are compared as strings. Some releases list a record in two
splits (WikiDiverse: 29 sentences, 14 of them in both train and test). Each record then belongs to
one split only, by priority **test > val/dev > train**: reading ``train`` drops the records that
are also in val/dev or test, reading ``val`` drops those also in test, and ``test`` is never
changed, so that no evaluation sentence is ever trained on and test numbers stay comparable.
"""
from __future__ import annotations

import json
from pathlib import Path

from gemel.errors import DataError
from gemel.textfile import read_text

_EVAL = ("val", "dev", "valid", "validation")
# Lower number wins a record listed in two splits.
_PRIORITY = {"test": 0, **{k: 1 for k in _EVAL}, "train": 2}


def _synonyms(split: str) -> tuple[str, ...]:
    return _EVAL if split in _EVAL else (split,)


def load_split(path: str | Path, split: str) -> tuple[set[str], int, int]:
    """Ids (as strings) of ``split`` in the split file at ``path``.

    Returns (ids, n_listed, n_dropped): the ids kept, how many the split lists, and how many were
    dropped by the priority rule above.
    """
    path = Path(path)
    try:
        data = json.loads(read_text(path, "split file"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err.msg}, line {err.lineno})", path=path) from err
    if not isinstance(data, dict):
        raise DataError("expected a JSON object of split name -> list of ids", path=path,
                        fix='write it as {"train": [...], "val": [...], "test": [...]}')
    key = next((k for k in _synonyms(split) if k in data), None)
    if key is None:
        raise DataError(f"no split {split!r} (the file has {sorted(data)})", path=path,
                        field=split, fix=f"pick one of {sorted(data)}")
    listed = _ids(data[key], path, key)
    ids = set(listed)
    rank = _PRIORITY.get(key)
    dropped: set[str] = set()
    if rank is not None:
        for other, values in data.items():
            if other != key and _PRIORITY.get(other, rank) < rank:
                dropped |= ids & set(_ids(values, path, other))
    return ids - dropped, len(listed), len(dropped)


def _ids(values: object, path: Path, key: str) -> list[str]:
    if not isinstance(values, list):
        raise DataError(f"expected a list of ids, got {type(values).__name__}", path=path,
                        field=key)
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise DataError(f"item {i} is a {type(v).__name__}, expected an id (string or "
                            "integer)", path=path, field=key)
        out.append(str(v))
    return out
