"""Demonstrations, candidate-restricted decoding and score fusion through the Linker (tiny LLM)."""
from __future__ import annotations

import numpy as np
import pytest

from gemel.backends.hf import HFBackend
from gemel.fusion import FEATURES, FusionModel, MentionPrior, fit
from gemel.kb import KnowledgeBase
from gemel.linker import Linker, LinkerConfig
from gemel.types import Entity, Mention
from tests.conftest import TITLES

KB = KnowledgeBase.from_entities(Entity(f"Q{i}", t) for i, t in enumerate(TITLES))
TRAIN = [Mention(f"t{i}", f"Sentence {i} mentions {t.split()[0]}.", t.split()[0], entity_id=f"Q{i}",
                 entity=t) for i, t in enumerate(TITLES)]


def test_demonstrations_in_prompt_never_the_query(llama_pair):
    model, tok = llama_pair
    cfg = LinkerConfig(model="tiny", demos=3, retriever="random", num_beams=2, top_k=2)
    linker = Linker(cfg, KB, HFBackend(model, tok), train=TRAIN)
    queries = TRAIN[:4]
    demos = linker.demonstrations(queries)
    assert all(len(d) == 3 for d in demos)
    assert all(q.id not in {m.id for m in d} for q, d in zip(queries, demos))
    prompt = "".join(linker.builder.build(queries[0], demos[0]).segments)
    assert prompt.count("[Answer]") == 4 and all(m.entity in prompt for m in demos[0])
    results = linker.link(queries)
    assert all(c.title in TITLES for r in results for c in r.candidates)


def test_candidate_restriction_keeps_answers_inside_the_subtrie(llama_pair):
    pytest.importorskip("sentence_transformers")
    from gemel.sources import offline_file
    try:
        offline_file("minilm-l6-v2")
    except Exception as err:  # the offline MiniLM wheel is not installed
        pytest.skip(str(err))
    model, tok = llama_pair
    cfg = LinkerConfig(model="tiny", candidates=3, num_beams=4, top_k=4)
    linker = Linker(cfg, KB, HFBackend(model, tok))
    ms = [Mention("a", "He swam in the Amazon River.", "Amazon River", entity_id="Q13")]
    rows, _ = linker.candidate_retriever.top(ms, 3)
    allowed = {TITLES[i] for i in rows[0].tolist()}
    result = linker.link(ms)[0]
    assert result.candidates and {c.title for c in result.candidates} <= allowed
    assert result.extra["in_candidates"] == ("Amazon River" in allowed)


def test_prior_counts_mention_strings():
    prior = MentionPrior(TRAIN + [Mention("x", "t", "paris", entity_id="Q1")])
    assert prior.best("Paris") in {"Q0", "Q1"} and prior.prob("PARIS", "Q1") > 0
    assert not prior.seen("Zanzibar") and prior.prob("Zanzibar", "Q1") == 0.0


def test_fusion_learns_the_informative_feature(tmp_path):
    rng = np.random.default_rng(0)
    lists = []
    for _ in range(60):  # the gold candidate has the highest "prior"; other features are noise
        f = rng.normal(size=(6, len(FEATURES)))
        gold = int(rng.integers(6))
        f[:, FEATURES.index("prior")] = rng.uniform(0, 0.4, size=6)
        f[gold, FEATURES.index("prior")] = 0.9
        lists.append((f, gold))
    model = fit(lists)
    assert model.weights["prior"] > 0
    assert all(int(np.argmax(model.score(f))) == g for f, g in lists)
    model.save(tmp_path / "fusion.json")
    assert FusionModel.load(tmp_path / "fusion.json").weights == pytest.approx(model.weights)
