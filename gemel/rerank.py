"""The rerank stage (beyond GEMEL): each mention's candidate pool, its features by name, and the
listwise model that ranks the pool.

A small LLM reads the context well but lacks priors; a retriever and the training data have them.
After generation, a mention's *pool* is the beams, the entities the training prior knows for the
mention string, the exact title/alias matches, then the top retrieved titles. Every candidate gets
the features below and a :class:`FusionModel` ranks the pool by ``w . features`` (``w`` fitted on
a dev split by :mod:`gemel.fusion`). The linker's one backend call returns the beams and the
log-probabilities of the pool's other titles; then :func:`candidate_pools` and :meth:`Pool.ranked`
(see docs/architecture.md).

Features are registered by name, in the order they are defined in this file, which is the column
order of every feature array, of fitted models and of the pools kept in prediction rows:

* ``@candidate_feature``: ``f(facts, title_index, entity_ids) -> float`` from what is known about
  one mention (:class:`MentionFacts`); kept in prediction rows under "pool" (so a refit,
  ``gemel fit-fusion --rows``, needs no LLM pass);
* ``@list_feature``: ``f(columns) -> [n]`` from the candidate features within one pool, computed
  when scoring (so a new one needs no LLM pass over kept rows either).

Adding a feature is one decorated function here (then refit the fusion model).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gemel.beam import Hypothesis
from gemel.data.nil import answer_ids
from gemel.errors import DataError, MismatchError
from gemel.kb import KnowledgeBase
from gemel.prior import MentionPrior, backoff_ranking
from gemel.types import Mention


@dataclass
class MentionFacts:
    """What the candidate features of one mention read, computed once per mention."""

    mention: Mention
    prior: MentionPrior
    beam: dict[int, float]  # title index -> log-probability, for the titles the beams found
    llm: dict[int, float]  # title index -> log-probability, every candidate (teacher-forced
    #                        where no beam found it)
    similarity: dict[int, float]  # cosine of the mention to "title: description"
    context_similarity: dict[int, float]  # the same for "mention. sentence"
    exact: set[int]  # titles whose title or an alias equals the mention string (casefolded)
    nearest: int  # the retriever's nearest title (-1: none)
    backoff: list[str]  # the back-off ranking's answer (at most one entity id)
    best: str | None  # the prior's most frequent KB entity for the string
    unseen: bool  # the mention string never occurs in training


CandidateFeature = Callable[[MentionFacts, int, Sequence[str | None]], float]
ListFeature = Callable[[dict[str, np.ndarray]], np.ndarray]
_CANDIDATE: dict[str, CandidateFeature] = {}
_LIST: dict[str, ListFeature] = {}


def candidate_feature(fn: CandidateFeature) -> CandidateFeature:
    """Register ``fn(facts, title_index, entity_ids) -> float`` as feature ``fn.__name__``."""
    _CANDIDATE[fn.__name__] = fn
    return fn


def list_feature(fn: ListFeature) -> ListFeature:
    """Register ``fn(columns) -> [n]`` (columns: every feature registered before it, by name, over
    one pool's n candidates) as feature ``fn.__name__``."""
    _LIST[fn.__name__] = fn
    return fn


# -- candidate features (kept in prediction rows) -------------------------------------------------
@candidate_feature
def llm_logprob(facts: MentionFacts, t: int, ids) -> float:
    """Sequence log-probability of the title under the prompt (teacher-forced when no beam)."""
    return facts.llm[t]


@candidate_feature
def llm_beam(facts: MentionFacts, t: int, ids) -> float:
    """1 if the beam search found the title."""
    return float(t in facts.beam)


@candidate_feature
def similarity(facts: MentionFacts, t: int, ids) -> float:
    """Cosine similarity of the mention to "title: description" (the candidate retriever's)."""
    return float(facts.similarity.get(t, 0.0))


@candidate_feature
def context_similarity(facts: MentionFacts, t: int, ids) -> float:
    """The same for "mention. sentence": the context disambiguates a bare name."""
    return float(facts.context_similarity.get(t, 0.0))


@candidate_feature
def prior(facts: MentionFacts, t: int, ids) -> float:
    """P(title's entities | mention string) in the training mentions (0 for unseen strings)."""
    return sum(facts.prior.prob(facts.mention.mention, e) for e in ids)


@candidate_feature
def prior_best(facts: MentionFacts, t: int, ids) -> float:
    """1 if the title's entity is the most frequent gold of the mention string in training."""
    return float(facts.best is not None and facts.best in ids)


@candidate_feature
def exact_match(facts: MentionFacts, t: int, ids) -> float:
    """1 if the mention string equals the title or an alias (case-insensitive)."""
    return float(t in facts.exact)


@candidate_feature
def top_retrieved(facts: MentionFacts, t: int, ids) -> float:
    """1 if the title is the candidate retriever's nearest."""
    return float(t == facts.nearest)


@candidate_feature
def backoff_top1(facts: MentionFacts, t: int, ids) -> float:
    """1 if the title is the non-LLM back-off's answer (prior > exact match > nearest:
    :func:`gemel.prior.backoff_ranking`). The back-off is not linear in the features above, so
    the model gets it whole and learns when to leave it."""
    return float(bool(facts.backoff) and facts.backoff[0] in ids)


@candidate_feature
def llm_logprob_unseen(facts: MentionFacts, t: int, ids) -> float:
    """llm_logprob when the mention string never occurs in training, else 0: lets the model
    trust the LLM more where no prior exists."""
    return facts.llm[t] if facts.unseen else 0.0


@candidate_feature
def popularity(facts: MentionFacts, t: int, ids) -> float:
    """log(1 + how often the title's entities are gold in training), whatever the string."""
    return facts.prior.popularity(ids)


# -- list features (computed from those within a pool when scoring) -------------------------------
@list_feature
def llm_top1(columns: dict[str, np.ndarray]) -> np.ndarray:
    """1 if the title has the pool's highest llm_logprob."""
    logprob = columns["llm_logprob"]
    return (logprob == logprob.max()).astype(np.float64)


@list_feature
def llm_backoff_agree(columns: dict[str, np.ndarray]) -> np.ndarray:
    """llm_top1 * backoff_top1: the LLM and the back-off pick the same title."""
    return columns["llm_top1"] * columns["backoff_top1"]


@list_feature
def llm_prob(columns: dict[str, np.ndarray]) -> np.ndarray:
    """Softmax of llm_logprob over the pool (bounded, unlike the log-probability)."""
    logprob = columns["llm_logprob"]
    prob = np.exp(logprob - logprob.max())
    return prob / prob.sum()


POOL_FEATURES = tuple(_CANDIDATE)  # computed per candidate; kept in prediction rows
LIST_FEATURES = tuple(_LIST)  # computed within a pool when scoring
FEATURES = POOL_FEATURES + LIST_FEATURES  # what a FusionModel weighs, in this order


def with_list_features(values: np.ndarray) -> np.ndarray:
    """One pool's candidate features [n, len(POOL_FEATURES)] -> all features [n, len(FEATURES)]."""
    values = np.asarray(values, dtype=np.float64).reshape(-1, len(POOL_FEATURES))
    if not len(values):
        return np.zeros((0, len(FEATURES)))
    columns = dict(zip(POOL_FEATURES, values.T))
    for name, fn in _LIST.items():
        columns[name] = fn(columns)
    return np.concatenate([values, np.stack([columns[n] for n in LIST_FEATURES], 1)], 1)


# -- the model ------------------------------------------------------------------------------------
@dataclass
class FusionModel:
    """One weight per feature (fitted by :func:`gemel.fusion.fit`), saved as JSON."""

    weights: dict[str, float]
    meta: dict

    def score(self, features: np.ndarray) -> np.ndarray:
        """features [n_candidates, len(FEATURES)] -> fused scores [n_candidates]."""
        return features @ np.array([self.weights[f] for f in FEATURES])

    def save(self, path: str | Path) -> None:
        from gemel.files import write_atomic

        write_atomic(path, json.dumps({"features": list(FEATURES), "weights": self.weights,
                                       "meta": self.meta}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "FusionModel":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read fusion model: {err}", path=path,
                            fix="fit one with `gemel fit-fusion`") from err
        if sorted(data.get("weights", {})) != sorted(FEATURES):
            raise MismatchError(f"{path}: fusion features {sorted(data.get('weights', {}))} "
                                f"differ from this gemel's {sorted(FEATURES)}; refit with "
                                "gemel fit-fusion")
        return cls(data["weights"], data.get("meta", {}))


# -- pools ----------------------------------------------------------------------------------------
@dataclass
class Pool:
    """One mention's candidates: title indices [n], the entity ids behind each, and their
    candidate features [n, len(POOL_FEATURES)]."""

    titles: list[int]
    ids: list[list[str | None]]
    values: np.ndarray

    def ranked(self, model: FusionModel) -> list[Hypothesis]:
        """The pool as hypotheses, highest fused score first (ties keep pool order)."""
        fused = model.score(with_list_features(self.values))  # [n_candidates]
        logprob = self.values[:, POOL_FEATURES.index("llm_logprob")]
        return [Hypothesis(self.titles[i], float(fused[i]), float(logprob[i]), 0)
                for i in np.argsort(-fused, kind="stable")]

    def to_json(self, names: Sequence[str]) -> dict:
        """The pool as kept in a prediction row under "pool" (``names``: title index -> title)."""
        return pool_json([names[t] for t in self.titles], self.ids, self.values)


# the query fields whose similarity to each candidate the pool reads (features similarity and
# context_similarity); the linker's one retrieval call embeds them
SIMILARITY_FIELDS = ("mention", "mention+sentence")


def candidate_pools(mentions: Sequence[Mention], hypotheses: Sequence[Sequence[Hypothesis]],
                    known: Sequence[Sequence[int]], logprobs: Sequence[Sequence[float]],
                    retrieved, *, kb: KnowledgeBase, prior: MentionPrior, size: int,
                    nil_index: int | None = None) -> list[Pool]:
    """Per mention, its candidate pool with every candidate feature: the beams, then the titles
    known without the LLM, each once.

    ``hypotheses[i]``: mention i's beams. ``known[i]``: its titles from
    :func:`gemel.prior.known_titles`, and ``logprobs[i]`` theirs, from the backend's same call
    (:meth:`gemel.backends.base.Backend.run`: the beam's, else teacher-forced). ``retrieved``:
    the batch's :class:`gemel.candidates.Retrieved` (nearest titles, similarities). ``size``: the
    nearest titles the pool took. ``nil_index``: the NIL answer's title index in NIL mode.
    """
    pools = []
    for i, (m, beams, others, lps) in enumerate(zip(mentions, hypotheses, known, logprobs)):
        beam = {x.title_index: x.logprob for x in beams}
        titles = list(dict.fromkeys([x.title_index for x in beams] + list(others)))
        # the NIL answer has no text to compare: similarity 0, never an exact match
        in_kb = [t for t in titles if t != nil_index]
        sim, context = (dict(zip(in_kb, retrieved.similarity(field, i, in_kb)))
                        for field in SIMILARITY_FIELDS)
        facts = mention_facts(m, kb, prior, retrieved.titles[i, :size].tolist(),
                              {**beam, **dict(zip(others, lps))}, beam, sim, context)
        ids = [answer_ids(kb, t, nil_index) for t in titles]
        values = np.array([[fn(facts, t, e) for fn in _CANDIDATE.values()]
                           for t, e in zip(titles, ids)])  # [n_candidates, len(POOL_FEATURES)]
        pools.append(Pool(titles, ids, values))
    return pools


def mention_facts(m: Mention, kb: KnowledgeBase, prior: MentionPrior, nearest: list[int],
                  llm: dict[int, float], beam: dict[int, float], similarity: dict[int, float],
                  context_similarity: dict[int, float]) -> MentionFacts:
    """The per-mention part of the features (``nearest``: retrieved title indices, best first)."""
    exact = {kb.title_index(kb[e].title) for e in (kb.lookup(m.mention) if m.mention else [])}
    return MentionFacts(m, prior, beam, llm, similarity, context_similarity, exact,
                        nearest[0] if nearest else -1,
                        backoff_ranking(kb, prior, m, nearest, k=1), prior.best(m.mention),
                        not prior.seen(m.mention))


# -- pools kept in prediction rows ----------------------------------------------------------------
def pool_json(titles: Sequence[str], ids: Sequence[Sequence[str | None]],
              values: np.ndarray) -> dict:
    """A mention's candidate pool as kept in its prediction row under "pool"."""
    return {"features": list(POOL_FEATURES), "titles": list(titles), "ids": [list(i) for i in ids],
            "values": np.round(np.asarray(values, dtype=np.float64), 6).tolist()}


def pool_values(row: dict, where: str = "<row>") -> np.ndarray:
    """The kept pool's features [n_candidates, len(FEATURES)] of a prediction row (checked;
    list features computed)."""
    pool = row.get("pool")
    if pool is None:
        raise DataError("the row keeps no candidate pool", path=where, record=row.get("id"),
                        field="pool", fix="use rows written by `gemel fit-fusion` or "
                        "`gemel link --fusion`")
    if pool.get("features") != list(POOL_FEATURES):
        raise MismatchError(f"{where}: row {row.get('id')!r} was written with fusion features "
                            f"{pool.get('features')}, this gemel keeps {list(POOL_FEATURES)}; "
                            "run it again")
    return with_list_features(np.asarray(pool["values"], dtype=np.float64))


__all__ = ["FEATURES", "FusionModel", "LIST_FEATURES", "MentionFacts", "POOL_FEATURES", "Pool",
           "SIMILARITY_FIELDS",
           "candidate_feature", "candidate_pools", "list_feature", "pool_json",
           "pool_values", "with_list_features"]
