"""NIL mentions: gold answer "not in the KB".

The releases mark them with ``answer: "nil"``. They are kept (a NIL mode needs them, and dropping
them silently changes every count) and marked as ``entity_id=None, entity=NIL``: the same
convention as :class:`gemel.types.Candidate`, whose ``entity_id`` is None only for the reserved NIL
answer. Metrics skip mentions without a gold id, so NIL mentions never count as misses; pass
``nil="drop"`` to the readers to leave them out. A mention with ``entity_id=None, entity=None`` is
plain unlabelled input.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from gemel.types import Mention

if TYPE_CHECKING:
    from gemel.kb import KnowledgeBase

NIL = "NIL"


def is_nil(mention: Mention) -> bool:
    """True for a mention whose gold answer is NIL (not in the KB)."""
    return mention.entity_id is None and mention.entity == NIL


def answer_ids(kb: "KnowledgeBase", title_index: int,
               nil_index: int | None = None) -> list[str | None]:
    """The entity ids behind an answer's title index; ``[None]`` for the NIL answer (title index
    ``nil_index``, past the KB's titles, in NIL mode)."""
    if title_index == nil_index:
        return [None]
    return kb.ids_for_title_index(title_index)
