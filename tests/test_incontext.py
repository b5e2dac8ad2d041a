"""Demonstrations, candidate-restricted decoding and score fusion through the Linker (tiny LLM)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gemel.backends.hf import HFBackend
from gemel.data.nil import NIL, is_nil
from gemel.errors import DataError, GemelError, MismatchError
from gemel.eval.metrics import hits_at_k
from gemel.fusion import fit, fit_report, rerank, rows_lists
from gemel.kb import KnowledgeBase
from gemel.linker import Linker, LinkerConfig
from gemel.prior import MentionPrior
from gemel.rerank import FEATURES, POOL_FEATURES, FusionModel, with_list_features
from gemel.types import Entity, Mention
from tests.conftest import TITLES

KB = KnowledgeBase.from_entities(Entity(f"Q{i}", t) for i, t in enumerate(TITLES))
TRAIN = [Mention(f"t{i}", f"Sentence {i} mentions {t.split()[0]}.", t.split()[0], entity_id=f"Q{i}",
                 entity=t) for i, t in enumerate(TITLES)]


def needs_minilm() -> None:
    """Skip unless the offline MiniLM (candidate retrieval) is installed."""
    pytest.importorskip("sentence_transformers")
    from gemel.sources import offline_file
    try:
        offline_file("minilm-l6-v2")
    except Exception as err:  # the offline MiniLM wheel is not installed
        pytest.skip(str(err))


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
    needs_minilm()
    model, tok = llama_pair
    cfg = LinkerConfig(model="tiny", num_candidates=3, num_beams=4, top_k=4)
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
    # popularity counts an entity's training mentions whatever their string (a visual-prompt
    # mention without one included)
    q1 = sum(m.entity_id == "Q1" for m in TRAIN) + 2
    prior = MentionPrior(TRAIN + [Mention("x", "t", "paris", entity_id="Q1"),
                                  Mention("y", "t", None, entity_id="Q1", bbox=(0, 0, 2, 2))])
    assert prior.popularity(["Q1"]) == pytest.approx(np.log1p(q1))
    assert prior.popularity(["Q1", "Q404"]) == prior.popularity(["Q1"]) and prior.popularity([]) == 0


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
    # cross-validation: held-out folds are ranked as well as the training ones here, and the
    # report names the L2 it chose among those given
    chosen, report = fit_report(lists, l2s=(1e-3, 10.0))
    assert report["dev_H@1_fused_5fold"] == 100.0 and report["l2"] in (1e-3, 10.0)
    assert set(report["l2_out_of_fold"]) == {"0.001", "10.0"} and report["dev_mentions"] == 60


def test_list_features_follow_the_pool():
    stored = np.zeros((3, len(POOL_FEATURES)))
    stored[:, POOL_FEATURES.index("llm_logprob")] = [-1.0, -3.0, -1.0]  # a tie at the top
    stored[:, POOL_FEATURES.index("backoff_top1")] = [0.0, 0.0, 1.0]
    full = with_list_features(stored)
    assert full.shape == (3, len(FEATURES)) and np.array_equal(full[:, :len(POOL_FEATURES)], stored)
    col = {n: full[:, FEATURES.index(n)] for n in ("llm_top1", "llm_backoff_agree", "llm_prob")}
    assert col["llm_top1"].tolist() == [1.0, 0.0, 1.0]
    assert col["llm_backoff_agree"].tolist() == [0.0, 0.0, 1.0]
    assert col["llm_prob"].sum() == pytest.approx(1.0) and col["llm_prob"][0] == col["llm_prob"][2]
    assert with_list_features(np.zeros((0, len(POOL_FEATURES)))).shape == (0, len(FEATURES))


def test_kept_pools_are_checked_before_reranking():
    row = {"id": "m1", "gold_id": "Q1", "error": None, "candidates": []}
    with pytest.raises(DataError, match="pool"):
        rerank(row, FusionModel(dict.fromkeys(FEATURES, 1.0), {}), k=3, where="run.jsonl")
    old = {**row, "pool": {"features": ["llm_logprob"], "titles": ["Paris"], "ids": [["Q1"]],
                           "values": [[0.0]]}}
    with pytest.raises(MismatchError, match="run.jsonl.*m1"):
        rows_lists([old], "run.jsonl")
    # a gold outside the pool is a list with position -1: counted, never fitted
    kept = {**row, "gold_id": "Q9", "pool": {"features": list(POOL_FEATURES), "titles": ["A", "B"],
                                             "ids": [["Q1"], ["Q2", "Q3"]],
                                             "values": [[0.0] * len(POOL_FEATURES)] * 2}}
    assert rows_lists([kept])[0][1] == -1
    assert rows_lists([{**kept, "gold_id": "Q3"}])[0][1] == 1
    assert rows_lists([{**kept, "gold_id": None}]) == []  # unlabelled rows carry no signal
    # reranking a dev row keeps its generated ranking beside the fused one
    gen = {**kept, "candidates": [{"entity_id": "Q2", "title": "B", "score": -1.0}]}
    weights = dict.fromkeys(FEATURES, 0.0)
    again = rerank(gen, FusionModel(weights, {}), k=5)
    assert again["generated"] == ["Q2"] and [c["entity_id"] for c in again["candidates"]] == [
        "Q1", "Q2", "Q3"]


# -- NIL mode --------------------------------------------------------------------------------------
NIL_TRAIN = TRAIN + [Mention(f"n{i}", f"Sentence {i} names someone unknown.", f"Nobody{i}",
                             entity=NIL) for i in range(3)]


def test_nil_mode_offers_the_nil_answer_with_a_null_id(llama_pair):
    model, tok = llama_pair
    everything = len(TITLES) + 1  # beams >= titles: the search is exhaustive, NIL included
    cfg = LinkerConfig(model="tiny", nil=True, num_beams=everything, top_k=everything)
    linker = Linker(cfg, KB, HFBackend(model, tok), train=NIL_TRAIN)
    query = Mention("q", "Sentence 9 names someone unknown.", "Nobody9", entity=NIL)
    result = linker.link([query])[0]
    nil = [c for c in result.candidates if c.title == NIL]
    assert len(nil) == 1 and nil[0].entity_id is None
    assert {c.title for c in result.candidates} == set(TITLES) | {NIL}
    row = result.to_json()
    assert row["gold_nil"] is True and row["gold_id"] is None
    # metrics: a NIL gold counts in NIL mode; its hit is the NIL answer
    at = [c["entity_id"] for c in row["candidates"]].index(None) + 1
    assert hits_at_k([row], (at,))[f"H@{at}"] == 100.0
    if at > 1:
        assert hits_at_k([row], (at - 1,))[f"H@{at - 1}"] == 0.0
    # without NIL mode the same mention is linked to a KB title and left out of the metrics
    plain = Linker(LinkerConfig(model="tiny", num_beams=4, top_k=4), KB, HFBackend(model, tok),
                   train=NIL_TRAIN, trie=None).link([query])[0]
    assert all(c.entity_id is not None for c in plain.candidates)
    assert hits_at_k([plain.to_json()], (1,))["n"] == 0


def test_nil_demonstrations_only_in_nil_mode(llama_pair):
    model, tok = llama_pair
    query = Mention("q", "Who is this?", "Someone")
    for nil in (False, True):
        cfg = LinkerConfig(model="tiny", nil=nil, demos=len(NIL_TRAIN), retriever="random",
                           num_beams=2, top_k=2)
        linker = Linker(cfg, KB, HFBackend(model, tok), train=NIL_TRAIN)
        demos = linker.demonstrations([query])[0]
        nil_demos = [d for d in demos if is_nil(d)]
        assert len(nil_demos) == (3 if nil else 0) and len(demos) == len(TRAIN) + (3 if nil else 0)
        prompt = "".join(linker.builder.build(query, demos).segments)
        assert ("[Answer]" + NIL in prompt.replace(" ", "")) == nil


def test_nil_mode_refuses_a_kb_title_nil(llama_pair):
    model, tok = llama_pair
    kb = KnowledgeBase.from_entities([Entity("Q1", "Paris"), Entity("Q2", NIL)])
    with pytest.raises(GemelError, match="reserves the answer 'NIL'.*Q2"):
        Linker(LinkerConfig(model="tiny", nil=True), kb, HFBackend(model, tok))


def test_fit_fusion_on_dev_then_link_with_it(llama_pair, tmp_path):
    needs_minilm()
    from gemel.fusion import fit_on_mentions

    model, tok = llama_pair
    backend = HFBackend(model, tok)
    # fitting ranks pools, not beams: top_k <= beams keeps this linker a valid plain linker too
    cfg = LinkerConfig(model="tiny", num_beams=2, top_k=2, fusion_pool=4, batch_size=3)
    linker = Linker(cfg, KB, backend, train=TRAIN)
    dev = TRAIN[:7]
    dev_rows = tmp_path / "dev.jsonl"
    fusion, report = fit_on_mentions(linker, dev, dev_rows, progress=False)
    # the kept rows refit without the LLM (features rounded to 6 decimals in JSON)
    kept = [json.loads(line) for line in dev_rows.read_text().splitlines()]
    assert [r["id"] for r in kept] == [m.id for m in dev]
    refit, _ = fit_report(rows_lists(kept))
    assert refit.weights == pytest.approx(fusion.weights, rel=1e-3, abs=1e-6)
    assert report["dev_mentions"] == 7 and set(fusion.weights) == set(FEATURES)
    assert all(r["pool"]["titles"] and set(r["pool"]["titles"]) <= set(TITLES) for r in kept)
    sim, ctx = POOL_FEATURES.index("similarity"), POOL_FEATURES.index("context_similarity")
    values = [v for r in kept for v in r["pool"]["values"]]
    assert any(abs(v[sim] - v[ctx]) > 1e-3 for v in values)  # the sentence changes the query
    # every dev mention's own string was seen in train with its gold: the prior must carry weight
    assert fusion.weights["prior"] > 0 and report["dev_H@1_fused"] >= report["dev_H@1_generation"]
    fusion.save(tmp_path / "fusion.json")
    fused = Linker(LinkerConfig(model="tiny", num_beams=2, top_k=3, fusion_pool=4,
                                fusion=str(tmp_path / "fusion.json")), KB, backend, train=TRAIN,
                   trie=linker.trie)
    results = fused.link(dev)
    for r in results:
        assert len(r.extra["generated"]) >= 1 and all(c.title in TITLES for c in r.candidates)
        scores = [c.score for c in r.candidates]
        assert scores == sorted(scores, reverse=True)
    assert hits_at_k([r.to_json() for r in results], (1,))["H@1"] == report["dev_H@1_fused"]
    # a fused run keeps its pools: reranking them with the same model gives the same ranking
    for r in results:
        row = r.to_json()
        again = rerank(row, fusion, k=3)
        assert [c["entity_id"] for c in again["candidates"]] == [c.entity_id for c in r.candidates]
