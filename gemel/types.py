"""The typed records that flow through gemel (see docs/architecture.md, "Contracts")."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Entity:
    """One knowledge-base entry, one line of the KB JSONL."""

    id: str
    title: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    image: str | None = None


@dataclass(frozen=True)
class Mention:
    """One mention to link, one line of the mentions JSONL.

    ``mention`` is None (or "") when only a visual prompt (``bbox``/``polygon``) marks it.
    ``image`` is an absolute path once read (readers resolve it against the file's folder).
    ``bbox`` is [x0, y0, x1, y1] in pixels; ``polygon`` is [[x, y], ...] in pixels.
    """

    id: str
    text: str
    mention: str | None = None
    image: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    polygon: tuple[tuple[float, float], ...] | None = None
    entity_id: str | None = None
    entity: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["bbox"] = list(self.bbox) if self.bbox is not None else None
        d["polygon"] = [list(p) for p in self.polygon] if self.polygon is not None else None
        return d


@dataclass(frozen=True)
class BadMention(Mention):
    """A record of the mentions to link that could not be read (``error`` says why and where).

    Readers yield it in the record's place under ``on_bad="row"``, so that the run writes an
    error row for it and goes on; it is never linked.
    """

    error: str = ""


@dataclass(frozen=True)
class Candidate:
    entity_id: str | None  # None only for the reserved NIL answer
    title: str
    score: float  # sequence log-probability (natural log), or the fused score

    def to_json(self) -> dict:
        return {"entity_id": self.entity_id, "title": self.title, "score": self.score}


@dataclass(frozen=True)
class LinkResult:
    mention_id: str
    candidates: tuple[Candidate, ...] = ()
    gold_id: str | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        d = {"id": self.mention_id, "candidates": [c.to_json() for c in self.candidates],
             "gold_id": self.gold_id, "error": self.error}
        d.update(self.extra)
        return d
