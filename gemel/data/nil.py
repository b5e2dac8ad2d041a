"""NIL mentions: gold answer "not in the KB".

The releases mark them with ``answer: "nil"``. They are kept (a NIL mode needs them, and dropping
them silently changes every count) and marked as ``entity_id=None, entity=NIL``: the same
convention as :class:`gemel.types.Candidate`, whose ``entity_id`` is None only for the reserved NIL
answer. Metrics skip mentions without a gold id, so NIL mentions never count as misses; pass
``nil="drop"`` to the readers to leave them out. A mention with ``entity_id=None, entity=None`` is
plain unlabelled input.
"""
from __future__ import annotations

from gemel.types import Mention

NIL = "NIL"


def is_nil(mention: Mention) -> bool:
    """True for a mention whose gold answer is NIL (not in the KB)."""
    return mention.entity_id is None and mention.entity == NIL
