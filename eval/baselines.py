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


def backoff_ranking(kb: KnowledgeBase, prior, mention: Mention, nearest: Sequence[int],
                    k: int | None = None) -> list[str]:
    """The back-off order of the strongest non-LLM baseline we know, as entity ids: the train
    prior's most frequent entity for the exact mention string, then case-insensitive exact
    title/alias matches, then the entities of ``nearest`` (title indices, nearest first)."""
    ranked: list[str] = []
    best = prior.best(mention.mention)
    if best is not None and best in kb:
        ranked.append(best)
    if mention.mention:
        ranked += kb.lookup(mention.mention, casefold=True, aliases=True)
    ranked += [e for i in nearest for e in kb.ids_for_title_index(int(i))]
    ranked = list(dict.fromkeys(ranked))
    return ranked[:k] if k is not None else ranked


def combo_baseline(kb: KnowledgeBase, train: Sequence[Mention], mentions: Sequence[Mention],
                   candidate_retriever=None, k: int = 5) -> list[LinkResult]:
    """:func:`backoff_ranking` for every mention, the nearest titles by MiniLM similarity of the
    mention to "title: description"; the ranking continues with them so that H@k is defined."""
    from gemel.candidates import CandidateRetriever
    from gemel.fusion import MentionPrior

    prior = MentionPrior(train)
    retriever = candidate_retriever or CandidateRetriever(kb)
    rows, _ = retriever.top(mentions, k)
    return [LinkResult(m.id, tuple(Candidate(e, kb[e].title, 0.0)
                                   for e in backoff_ranking(kb, prior, m, r.tolist(), k)),
                       gold_id=m.entity_id)
            for m, r in zip(mentions, rows)]
