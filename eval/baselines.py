"""Non-LLM baselines measured on the same mentions as gemel, so that numbers sit side by side."""
from __future__ import annotations

from typing import Sequence

from gemel.kb import KnowledgeBase
from gemel.types import Candidate, LinkResult, Mention


def exact_match(kb: KnowledgeBase, mentions: Sequence[Mention]) -> list[LinkResult]:
    """Candidates = the entities whose title or alias equals the mention string (case-insensitive)."""
    out = []
    for m in mentions:
        ids = kb.lookup(m.mention or "", casefold=True, aliases=True) if m.mention else []
        out.append(LinkResult(m.id, tuple(Candidate(i, kb[i].title, 0.0) for i in ids),
                              gold_id=m.entity_id))
    return out


def combo_baseline(kb: KnowledgeBase, train: Sequence[Mention], mentions: Sequence[Mention],
                   candidate_retriever=None, k: int = 5) -> list[LinkResult]:
    """The strongest non-LLM baseline we know: the train prior for the exact mention string, else
    a case-insensitive exact title/alias match, else the MiniLM-nearest title; the ranking continues
    with the nearest titles so that H@k is defined too."""
    from gemel.candidates import CandidateRetriever
    from gemel.fusion import MentionPrior

    prior = MentionPrior(train)
    retriever = candidate_retriever or CandidateRetriever(kb)
    rows, _ = retriever.top(mentions, k)
    out = []
    for m, r in zip(mentions, rows):
        ranked: list[str] = []
        best = prior.best(m.mention)
        if best is not None and best in kb:
            ranked.append(best)
        if m.mention:
            ranked += kb.lookup(m.mention, casefold=True, aliases=True)
        ranked += [e for i in r.tolist() for e in kb.ids_for_title_index(i)]
        ranked = list(dict.fromkeys(ranked))[:k]
        out.append(LinkResult(m.id, tuple(Candidate(e, kb[e].title, 0.0) for e in ranked),
                              gold_id=m.entity_id))
    return out
