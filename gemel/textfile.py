"""Reading user text files: every decoding problem names the file, the line and the fix.

gemel reads UTF-8 (a UTF-8 byte-order mark is accepted). A file in another encoding is an error
that says which byte could not be decoded, on which line, what the file probably is, and how to
re-encode it; it never ends in a ``UnicodeDecodeError`` traceback.
"""
from __future__ import annotations

import codecs
from pathlib import Path
from typing import Iterator

from gemel.errors import DataError

_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _guess(raw: bytes) -> str:
    """The likeliest other encoding of bytes that are not UTF-8 (for the fix's iconv line)."""
    if raw.count(b"\x00") * 4 > len(raw):
        return "UTF-16"
    return "WINDOWS-1252"


def reencode_fix(path: object, encoding: str) -> str:
    return (f"re-encode the file as UTF-8, e.g. iconv -f {encoding} -t UTF-8 '{path}' > "
            f"'{path}.utf8.jsonl'")


def decode_line(raw: bytes, path: object, lineno: int) -> str:
    """One line of a UTF-8 file as text; DataError naming the line, column and byte otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start:err.start + 1]
        column = len(raw[:err.start].decode("utf-8", errors="replace")) + 1
        guess = _guess(raw)
        raise DataError(f"not UTF-8: byte 0x{bad.hex()} at column {column} cannot be decoded "
                        f"(the file looks like {guess})", path=path, record=f"line {lineno}",
                        field="encoding", fix=reencode_fix(path, guess)) from None


def _check_bom(head: bytes, path: object) -> None:
    for bom, name in _BOMS:
        if head.startswith(bom):
            raise DataError(f"the file is {name} (it starts with a {name} byte-order mark); "
                            "gemel reads UTF-8", path=path, field="encoding",
                            fix=reencode_fix(path, name))


def _open(path: Path, what: str):
    try:
        return path.open("rb")
    except OSError as err:
        raise DataError(f"cannot read the {what}: {err.strerror}", path=path,
                        fix=f"check the path given as the {what}") from err


def iter_lines(path: str | Path, what: str = "file") -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every line; a UTF-8 BOM on line 1 is dropped.

    Decode each with :func:`decode_line` (so one bad line can be skipped rather than the file).
    A UTF-16/32 file is refused at once (every line of it would be bad).
    """
    path = Path(path)
    with _open(path, what) as f:
        first = f.readline()
        if not first:
            return
        _check_bom(first, path)
        yield 1, first[len(codecs.BOM_UTF8):] if first.startswith(codecs.BOM_UTF8) else first
        yield from enumerate(f, 2)


def read_text(path: str | Path, what: str = "file") -> str:
    """The whole file as text (UTF-8, BOM accepted); DataError naming the line of a bad byte."""
    path = Path(path)
    with _open(path, what) as f:
        raw = f.read()
    _check_bom(raw, path)
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        start = raw.rfind(b"\n", 0, err.start) + 1
        end = raw.find(b"\n", err.start)
        lineno = raw.count(b"\n", 0, err.start) + 1
        decode_line(raw[start:end if end >= 0 else len(raw)], path, lineno)
        # a sequence cut by the line break itself: name the line all the same
        raise DataError(f"not UTF-8 ({err.reason})", path=path, record=f"line {lineno}",
                        field="encoding", fix=reencode_fix(path, _guess(raw))) from None
