"""Non-LLM baselines measured on the same mentions as gemel, so that numbers sit side by side.

Six kinds (``gemel baseline --kind``), each a ranked list of KB entities per mention:

  exact          entities whose title or alias equals the mention string (case-insensitive)
  prior          the train mentions' gold entities for the same string, most frequent first
  dense          nearest KB titles by MiniLM cosine similarity of the mention to "title: description"
                 (the candidate retriever of candidate-aware decoding and fusion)
  dense-context  the same, the query being "mention. sentence"
  combo          prior's best, else the exact matches, else the dense ranking (the back-off that
                 the fused ranking gets as a feature: :func:`gemel.prior.backoff_ranking`)
  combo-context  the same back-off, falling back to dense-context
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gemel.errors import GemelError
from gemel.kb import KnowledgeBase
from gemel.prior import MentionPrior, backoff_ranking
from gemel.types import Candidate, LinkResult, Mention

KINDS = ("exact", "prior", "dense", "dense-context", "combo", "combo-context")
#: the retriever field of each dense-backed kind (see gemel.retrieval.base.field_text)
FIELD = {"dense": "mention", "dense-context": "mention+sentence", "combo": "mention",
         "combo-context": "mention+sentence"}
NEEDS_TRAIN = ("prior", "combo", "combo-context")


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
    """:func:`gemel.prior.backoff_ranking` for every mention, the nearest titles by MiniLM
    similarity of the mention (the retriever's field) to "title: description"; the ranking
    continues with them so that H@k is defined. Score: 1 / rank."""
    from gemel.candidates import CandidateRetriever

    prior = MentionPrior(train)
    retriever = candidate_retriever or CandidateRetriever(kb)
    rows, _ = retriever.top(mentions, k)
    return [LinkResult(m.id, _ranked(kb, backoff_ranking(kb, prior, m, r.tolist(), k)),
                       gold_id=m.entity_id)
            for m, r in zip(mentions, rows)]


def prior_baseline(kb: KnowledgeBase, train: Sequence[Mention], mentions: Sequence[Mention],
                   k: int = 5) -> list[LinkResult]:
    """The train gold entities of each mention string (casefolded), most frequent first; score =
    P(entity | string) in train. Strings never seen in train get no candidate."""
    prior = MentionPrior(train)
    out = []
    for m in mentions:
        ids = [e for e in prior.entities(m.mention) if e is not None and e in kb][:k]
        out.append(LinkResult(m.id, tuple(Candidate(e, kb[e].title, prior.prob(m.mention, e))
                                          for e in ids), gold_id=m.entity_id))
    return out


def dense_baseline(kb: KnowledgeBase, mentions: Sequence[Mention], candidate_retriever,
                   k: int = 5) -> list[LinkResult]:
    """The retriever's nearest titles (all entities of a shared title, in KB order), score =
    cosine similarity."""
    rows, sims = candidate_retriever.top(mentions, k)
    out = []
    for m, r, s in zip(mentions, rows, sims):
        cands = [Candidate(e, kb[e].title, float(sim))
                 for i, sim in zip(r.tolist(), s.tolist()) for e in kb.ids_for_title_index(int(i))]
        out.append(LinkResult(m.id, tuple(cands[:k]), gold_id=m.entity_id))
    return out


def run_baseline(kind: str, kb: KnowledgeBase, mentions: Sequence[Mention],
                 train: Sequence[Mention] | None = None, k: int = 5,
                 sentence_model: str = "minilm-l6-v2", retrievers: dict | None = None,
                 encoder=None) -> list[LinkResult]:
    """Predictions of baseline ``kind`` (one of :data:`KINDS`), top ``k`` per mention.

    ``retrievers``: optional dict field -> CandidateRetriever for this KB, filled and reused
    across calls so that the KB is embedded once for several kinds. ``encoder``: a sentence
    encoder to use (e.g. a :class:`MemoEncoder` shared by several KBs and kinds).
    """
    check_baseline(kind, train, k)
    if kind == "exact":
        return [LinkResult(r.mention_id, _ranked(kb, [c.entity_id for c in r.candidates][:k]),
                           gold_id=r.gold_id) for r in exact_match(kb, mentions)]
    if kind == "prior":
        return prior_baseline(kb, train, mentions, k)
    retriever = _retriever(kb, FIELD[kind], sentence_model, retrievers, encoder)
    if kind.startswith("dense"):
        return dense_baseline(kb, mentions, retriever, k)
    return combo_baseline(kb, train, mentions, retriever, k)


def check_baseline(kind: str, train: Sequence[Mention] | None, k: int) -> None:
    """Raise before any work when ``kind``, ``train`` or ``k`` cannot make a baseline."""
    if kind not in KINDS:
        raise GemelError(f"unknown baseline kind {kind!r}; choose one of {list(KINDS)}")
    if kind in NEEDS_TRAIN and train is None:
        raise GemelError(f"baseline {kind!r} needs the training mentions (its prior): "
                         "pass --train TRAIN (or --train-split train with --splits)")
    if k < 1:
        raise GemelError(f"k={k}: need at least one candidate per mention")


def _retriever(kb: KnowledgeBase, field: str, sentence_model: str, cache: dict | None, encoder):
    from gemel.candidates import CandidateRetriever

    if cache is not None and field in cache:
        return cache[field]
    # the KB index is the same for both fields (and cached on disk): one encoder, loaded once
    other = next(iter(cache.values()), None) if cache else None
    retriever = CandidateRetriever(kb, sentence_model, field=field,
                                   encoder=encoder or (other.encoder if other is not None else None))
    if cache is not None:
        cache[field] = retriever
    return retriever


class MemoEncoder:
    """A sentence encoder that embeds each distinct text once: dense and combo (and both KBs of a
    report) query with the same mention texts. ``embed(texts) -> (len(texts), d)`` float32."""

    def __init__(self, encoder):
        self.encoder, self.memo = encoder, {}

    def identity(self) -> dict:
        return self.encoder.identity()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        new = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if new:
            self.memo.update(zip(new, self.encoder.embed(new)))
        if not texts:
            return self.encoder.embed([])
        return np.stack([self.memo[t] for t in texts])


def _ranked(kb: KnowledgeBase, ids: Sequence[str]) -> tuple[Candidate, ...]:
    """Candidates in the given order, score 1 / rank (the kinds without a score of their own)."""
    return tuple(Candidate(e, kb[e].title, 1.0 / (i + 1)) for i, e in enumerate(ids))
