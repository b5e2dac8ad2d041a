"""Configs are dataclasses, loadable from YAML or dicts; unknown keys are an error."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gemel.errors import DataError
from gemel.textfile import read_text

#: the weight precisions a config or a --dtype flag may name (resolved by gemel.machine.pick_dtype)
DTYPES = ("auto", "fp32", "bf16", "fp16")

T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any], source: str = "<config>") -> T:
    """Build dataclass ``cls`` from ``values``; an unknown key names the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"unknown key(s) {unknown}; known keys: {sorted(known)}", path=source,
                        field=unknown[0])
    try:
        return cls(**values)
    except DataError as err:
        if err.path is not None:
            raise
        raise DataError(err.message, path=source, field=err.field, fix=err.fix) from None


def load_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(read_text(path, "config file")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else None
        raise DataError(f"not valid YAML: {getattr(err, 'problem', None) or err}", path=path,
                        record=where, fix="check the indentation and the key: value lines") from None
    if not isinstance(data, dict):
        raise DataError("expected a mapping of keys to values at the top level", path=path)
    return data


def merge(config: T, **overrides) -> T:
    """A copy of ``config`` with the non-None overrides applied (CLI flags left unset stay out)."""
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def check_values(config: object, minimum: dict[str, float] | None = None,
                 choices: dict[str, tuple] | None = None) -> None:
    """Range and choice checks of a config dataclass (call from ``__post_init__``): a value out of
    range is a :class:`DataError` naming the field, the value and what it may be."""
    for name, low in (minimum or {}).items():
        value = getattr(config, name)
        if value is None:
            continue
        kind = int if isinstance(low, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise DataError(f"{name}={value!r} must be a number" + (" (an integer)" if kind is int
                                                                    else ""), field=name,
                            fix=f"give a value >= {low}")
        if value < low:
            raise DataError(f"{name}={value!r} is out of range", field=name,
                            fix=f"give a value >= {low}")
    for name, allowed in (choices or {}).items():
        value = getattr(config, name)
        if value not in allowed:
            raise DataError(f"{name}={value!r} is not one of {list(allowed)}", field=name,
                            fix=f"use one of {list(allowed)}")
