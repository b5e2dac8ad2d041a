"""Loading a release file and telling its shape (format) from its JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gemel.errors import DataError
from gemel.textfile import iter_lines, read_text

FORMATS = ("native", "wikidiverse", "wikimel", "mimic", "vpwiki")

_FIX = ("pass the format explicitly (fmt=..., CLI --format) if the file is one of "
        + ", ".join(FORMATS))


def load_json(path: Path) -> Any:
    """The parsed JSON document, or a DataError naming the file and the position."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        hint = (" (it looks like JSONL: one object per line; read it with fmt='native')"
                if err.msg == "Extra data" else "")
        raise DataError(f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
                        + hint, path=path) from err


def is_jsonl(path: Path) -> bool:
    """True when the file is JSON lines (our native mentions) rather than one JSON document."""
    if path.suffix.lower() == ".jsonl":
        return True
    first = next((raw for _, raw in iter_lines(path) if raw.strip()), b"")
    try:
        # only the shape matters here: a bad byte is named later, with its line, by the reader
        rec = json.loads(first.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return False  # a multi-line JSON document
    return isinstance(rec, dict) and "text" in rec


def detect(path: Path, data: Any) -> str:
    """The format of a parsed release document (not native JSONL, see :func:`is_jsonl`)."""
    if isinstance(data, dict):
        sample = next(iter(data.values()), None)
        if isinstance(sample, dict) and "sentence" in sample:
            return "wikimel"
        if "text" in data:  # a one-line native file
            return "native"
    elif isinstance(data, list):
        sample = next((r for r in data if isinstance(r, dict)), None)
        if sample is not None:
            if "mention" in sample and "sentence" in sample:
                return "wikidiverse"
            if "mentions" in sample and "sentence" in sample:
                # VPWiki is MIMIC-shaped with the mention words blanked out (the box is drawn in
                # the image instead).
                blank = all(isinstance(r, dict) and isinstance(r.get("mentions"), str)
                            and not r["mentions"].strip() for r in data)
                return "vpwiki" if blank else "mimic"
            if "text" in sample:
                raise DataError("a JSON list of native records: native mentions are JSONL, one "
                                "object per line", path=path, fix="write one record per line")
    raise DataError("cannot tell the format from the JSON shape", path=path, field=None, fix=_FIX)
