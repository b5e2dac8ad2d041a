"""Knowledge bases built from a release: its gold entities, its name files, or MIMIC's KB files.

* gold: every distinct gold QID of the mentions, titled by the mentions' ``entity`` field. A QID
  seen with several titles keeps the first as its title and the others as aliases (counted:
  WikiDiverse has 7 such QIDs, e.g. "New York (state)" / "New York").
* names: ``qid2ne.json`` (QID -> name, the KB titles) with ``qid2abs.json`` (QID -> short text) as
  descriptions; or, for MIMIC-shaped releases, ``kb_entity.json`` + ``qid2id.json``.
* both: the names KB, then the gold QIDs it lacks. On a title conflict the names file wins (it is
  the KB), and the gold title becomes an alias.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence
from urllib.parse import unquote

from gemel.data.shape import load_json
from gemel.errors import DataError
from gemel.types import Entity, Mention


class _Builder:
    """Entities keyed by QID in insertion order, with conflict counting."""

    def __init__(self) -> None:
        self.title: dict[str, str] = {}
        self.aliases: dict[str, list[str]] = {}
        self.description: dict[str, str] = {}
        self.image: dict[str, str] = {}
        self.conflicts = 0  # QIDs seen with more than one title

    def add(self, qid: str, title: str) -> None:
        have = self.title.setdefault(qid, title)
        if have != title:
            aliases = self.aliases.setdefault(qid, [])
            if title not in aliases:
                if not aliases:
                    self.conflicts += 1
                aliases.append(title)

    def entities(self) -> list[Entity]:
        return [Entity(q, t, tuple(self.aliases.get(q, ())), self.description.get(q, ""),
                       self.image.get(q)) for q, t in self.title.items()]


def _str_map(path: Path, what: str) -> dict[str, str]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object of QID -> {what}", path=path)
    for qid, value in data.items():
        if not isinstance(value, str):
            raise DataError(f"expected a string {what}, got {type(value).__name__}", path=path,
                            record=qid, field=what)
    return data


def kb_from_names(qid2ne: str | Path, qid2abs: str | Path | None = None) -> list[Entity]:
    """Entities from ``qid2ne.json`` (titles) and optionally ``qid2abs.json`` (descriptions)."""
    names = _str_map(Path(qid2ne), "name")
    abstracts = _str_map(Path(qid2abs), "abstract") if qid2abs is not None else {}
    for qid, name in names.items():
        if not name.strip():
            raise DataError("empty entity name", path=qid2ne, record=qid, field="name",
                            fix="give every QID the title the model should generate")
    return [Entity(q, n, (), abstracts.get(q, "")) for q, n in names.items()]


def kb_from_mimic(kb_entity: str | Path, qid2id: str | Path | None = None) -> list[Entity]:
    """Entities from MIMIC's ``kb_entity.json`` (a list of ``{"id", "entity_name", "attr",
    "image_list", ...}``), QIDs from a ``qid`` field or through ``qid2id.json`` (QID -> id)."""
    kb_entity = Path(kb_entity)
    data = load_json(kb_entity)
    if not isinstance(data, list):
        raise DataError("expected a JSON list of entities", path=kb_entity)
    id2qid: dict[str, str] = {}
    if qid2id is not None:
        raw = load_json(Path(qid2id))
        if not isinstance(raw, dict):
            raise DataError("expected a JSON object of QID -> entity id", path=qid2id)
        id2qid = {str(v): k for k, v in raw.items()}
    out = []
    for index, rec in enumerate(data):
        where = f"index {index}"
        if not isinstance(rec, dict):
            raise DataError(f"expected an object, got {type(rec).__name__}", path=kb_entity,
                            record=where)
        qid = rec.get("qid") or rec.get("QID")
        raw_id = rec.get("id")
        if qid is None and raw_id is not None:
            qid = id2qid.get(str(raw_id))
            if qid is None and isinstance(raw_id, str) and raw_id[:1] == "Q":
                qid = raw_id
        if not isinstance(qid, str) or not qid:
            raise DataError(f"cannot tell the entity's QID (id {raw_id!r})", path=kb_entity,
                            record=where, field="id",
                            fix="pass the release's qid2id.json (QID -> id) beside kb_entity.json")
        name = rec.get("entity_name")
        if not isinstance(name, str) or not name.strip():
            raise DataError("expected a non-empty string", path=kb_entity,
                            record=f"{where} ({qid})", field="entity_name")
        attr = rec.get("attr") or rec.get("desc") or ""
        images = rec.get("image_list") or []
        out.append(Entity(qid, unquote(name), (), attr if isinstance(attr, str) else "",
                          images[0] if images and isinstance(images[0], str) else None))
    return out


def build_kb(mentions: Sequence[Mention], kb_from: str = "gold", names: list[Entity] | None = None,
             descriptions: dict[str, str] | None = None) -> tuple[list[Entity], dict]:
    """The KB entities for ``kb_from`` ("gold" | "names" | "both") and counts about them.

    ``names``: entities from a names source (qid2ne or kb_entity); required for "names"/"both";
    with "gold" it only titles gold QIDs whose mentions carry no title.
    ``descriptions``: QID -> description applied to gold entities (from qid2abs).
    """
    if kb_from not in ("gold", "names", "both"):
        raise DataError(f"unknown kb_from {kb_from!r}", field="kb_from",
                        fix='use "gold", "names" or "both"')
    if kb_from != "gold" and names is None:
        raise DataError(f"kb_from={kb_from!r} needs a names source", field="kb_from",
                        fix="pass qid2ne= (qid2ne.json), or kb_entity= for MIMIC-shaped releases")
    b = _Builder()
    counts = {"kb_from": kb_from, "gold_without_title": 0, "gold_not_in_names": 0}
    if kb_from in ("names", "both"):
        for e in names or ():
            if e.id in b.title:
                raise DataError(f"QID {e.id} listed twice in the names source", record=e.id,
                                fix="ids must be unique in the KB")
            b.title[e.id] = e.title
            b.description[e.id] = e.description
            if e.image:
                b.image[e.id] = e.image
    named = set(b.title)
    fallback = {e.id: e for e in names} if kb_from == "gold" and names else {}
    gold_qids: dict[str, None] = {}  # distinct gold QIDs in order of first mention
    for m in mentions:
        if m.entity_id is None:
            continue
        gold_qids.setdefault(m.entity_id)
        if kb_from == "names":
            continue
        if m.entity:
            b.add(m.entity_id, m.entity)
        elif m.entity_id not in b.title and m.entity_id in fallback:
            # A record without the gold title (some MIMIC files): the names source titles it.
            e = fallback[m.entity_id]
            b.add(e.id, e.title)
            b.description.setdefault(e.id, e.description)
    counts["gold_entities"] = len(gold_qids)
    if names is not None:
        counts["gold_not_in_names"] = sum(q not in named for q in gold_qids)
    if kb_from != "names":
        # Gold QIDs with no title anywhere cannot be generated: left out, counted.
        counts["gold_without_title"] = sum(q not in b.title for q in gold_qids)
    for qid, text in (descriptions or {}).items():
        if qid in b.title and not b.description.get(qid):
            b.description[qid] = text
    entities = b.entities()
    counts["title_conflicts"] = b.conflicts
    counts["entities"] = len(entities)
    counts["unique_titles"] = len({e.title for e in entities})
    return entities, counts


def load_descriptions(qid2abs: str | Path) -> dict[str, str]:
    """QID -> description from ``qid2abs.json``."""
    return _str_map(Path(qid2abs), "abstract")


__all__ = ["build_kb", "kb_from_names", "kb_from_mimic", "load_descriptions"]
