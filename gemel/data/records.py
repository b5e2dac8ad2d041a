"""Checked access to the fields of release records: every error names file, record and field."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from gemel.data.nil import NIL
from gemel.data.report import ReadReport
from gemel.errors import DataError
from gemel.types import BadMention, Mention

# Gold answers that mean "not in the KB" in the public releases (MIMIC drops them; we keep them).
NIL_ANSWERS = frozenset({"nil", "none", ""})


def text_field(rec: dict, name: str, path: Path, record: object, fix: str | None = None,
               required: bool = True) -> str | None:
    """A string field; None when absent and not ``required``. The one check of a string field
    of a mention record, native or a release's."""
    value = rec.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"expected a string{'' if required else ' or null'}, got {got}",
                        path=path, record=record, field=name, fix=fix)
    return value


def id_field(rec: dict, name: str, path: Path, record: object) -> str | None:
    """An id given as a string or an integer, as a string; None when absent."""
    value = rec.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"expected a string or integer id, got {type(value).__name__}",
                        path=path, record=record, field=name)
    return str(value)


def indexed_record(rec: object, path: Path, index: int) -> tuple[str, str]:
    """A record of a release that is a JSON list: checked to be an object; returns its id (the
    list index where it has none) and how messages name it."""
    if not isinstance(rec, dict):
        raise DataError(f"expected an object, got {type(rec).__name__}", path=path,
                        record=f"index {index}")
    rid = id_field(rec, "id", path, f"index {index}")
    rid = str(index) if rid is None else rid
    return rid, f"index {index} (id {rid})"


def list_or_str(rec: dict, name: str, path: Path, record: object,
                required: bool = True) -> tuple[list[Any], bool]:
    """A field that some releases write as a list and others as one plain string.

    Returns (values, was_list). Absent and not ``required``: ([], True).
    """
    if name not in rec or rec[name] is None:
        if required:
            raise DataError("field is missing", path=path, record=record, field=name,
                            fix="each record needs its mentions, gold entities and answers")
        return [], True
    value = rec[name]
    if isinstance(value, list):
        return value, True
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return [value], False
    raise DataError(f"expected a list or a string, got {type(value).__name__}", path=path,
                    record=record, field=name)


def same_lengths(fields: dict[str, list], path: Path, record: object) -> int:
    """The common length of parallel list fields, or a DataError naming the odd one."""
    lengths = {k: len(v) for k, v in fields.items() if v is not None}
    if len(set(lengths.values())) > 1:
        first = next(iter(lengths))
        odd = next(k for k in lengths if lengths[k] != lengths[first])
        raise DataError(f"{lengths[odd]} items but {first!r} has {lengths[first]}", path=path,
                        record=record, field=odd,
                        fix="item i of each list describes mention i: the lists must be parallel")
    return next(iter(lengths.values()), 0)


def gold(answer: object, title: object, path: Path, record: object,
         field: str = "answer", title_field: str = "entity") -> tuple[str | None, str | None]:
    """(entity_id, entity title) for one mention.

    NIL answers ("nil", "", "none", any case) give (None, NIL); no answer at all (null) gives an
    unlabelled mention (None, None).
    """
    if answer is None:
        return None, None
    if isinstance(answer, str) and answer.strip().lower() in NIL_ANSWERS:
        return None, NIL
    if isinstance(answer, bool) or not isinstance(answer, (str, int)):
        raise DataError(f"expected an entity id (string), got {type(answer).__name__}", path=path,
                        record=record, field=field)
    if title is not None and not isinstance(title, str):
        raise DataError(f"expected an entity title (string), got {type(title).__name__}",
                        path=path, record=record, field=title_field)
    return str(answer).strip(), (title if title else None)


def guarded(produce: Callable[[], list[Mention]], report: ReadReport, on_bad: str, where: str,
            rid: str | None) -> list[Mention]:
    """The mentions of one release record, or what ``on_bad`` makes of its DataError: raised,
    skipped (counted in ``report.bad``), or one :class:`BadMention` row for the whole record."""
    try:
        return produce()
    except DataError as err:
        if on_bad == "raise":
            raise
        report.bad.add(err)
        return [BadMention(rid or f"<{where}>", "", error=str(err))] if on_bad == "row" else []


def release_records(items: Iterable[tuple[Any, object]], select: set[str] | None,
                    report: ReadReport, on_bad: str, label: str,
                    parse: Callable[[Any, object], list[Mention]]) -> Iterator[Mention]:
    """The mentions of a release's records, the loop every release reader shares.

    ``items`` yields (key, record): the list index or the dict key, which is also the record's id
    when it names none. Records whose id is not in ``select`` are passed over; ``parse(key,
    record)`` turns one record into mentions, its DataError handled by :func:`guarded`.
    """
    for key, rec in items:
        rid = rec.get("id") if isinstance(rec, dict) else None
        rid = str(key) if rid is None else str(rid)
        if select is not None and rid not in select:
            continue
        report.records += 1
        yield from guarded(lambda: parse(key, rec), report, on_bad, f"{label} {key}", rid)
