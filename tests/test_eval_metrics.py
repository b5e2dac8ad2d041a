"""Metrics with known answers and bootstrap intervals that cover the truth at about the stated rate."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gemel.errors import GemelError
from gemel.eval.metrics import bootstrap_interval, paired_bootstrap, top1_agreement


def test_bootstrap_interval_covers_true_mean_at_about_the_stated_rate():
    rng = np.random.default_rng(123)
    p_true, n, reps = 0.7, 200, 300
    covered = 0
    for rep in range(reps):
        hits = rng.random(n) < p_true
        lo, hi = bootstrap_interval(hits, n_resamples=400, seed=rep)
        covered += lo <= 100 * p_true <= hi
    # 95% nominal; percentile intervals run slightly narrow at n=200 and the band allows ~3 sd of
    # the 300-repetition estimate
    assert 0.90 <= covered / reps <= 0.985


def test_bootstrap_interval_is_in_percent_ordered_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.random(100) < 0.5, rng.random(10_000) < 0.5
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert 0 <= lo_s < 100 * small.mean() < hi_s <= 100
    assert lo_l < 100 * large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # width ~ 1/sqrt(n): 10x for 100x the mentions
    # reproducible for a seed, a constant sample has a zero-width interval
    assert bootstrap_interval(small, seed=3) == bootstrap_interval(small, seed=3)
    assert bootstrap_interval([1, 1, 1]) == (100.0, 100.0)
    # reciprocal ranks are fine too
    lo, hi = bootstrap_interval([1.0, 0.5, 1 / 3, 0.0])
    assert 0 <= lo <= 100 * np.mean([1.0, 0.5, 1 / 3, 0.0]) <= hi <= 100


def test_paired_bootstrap_detects_a_planted_difference():
    rng = np.random.default_rng(7)
    n = 2000
    a = (rng.random(n) < 0.6).astype(float)
    b = a.copy()
    flip = rng.choice(np.flatnonzero(a == 0), size=200, replace=False)  # +10 points planted
    b[flip] = 1
    out = paired_bootstrap(a, b)
    assert set(out) == {"diff", "lo", "hi", "p"}
    assert out["diff"] == pytest.approx(10.0)
    assert 0 < out["lo"] < 10 < out["hi"]
    assert out["p"] < 0.01
    # the sign follows the order: diff = mean(b) - mean(a)
    back = paired_bootstrap(b, a)
    assert back["diff"] == pytest.approx(-10.0) and back["hi"] < 0 and back["p"] < 0.01
    # no difference at all: p is 1, interval is zero
    same = paired_bootstrap(a, a)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0}


def test_paired_bootstrap_false_positive_rate_near_nominal():
    rng = np.random.default_rng(11)
    reps, n = 200, 300
    rejections = 0
    for rep in range(reps):
        a, b = rng.random(n) < 0.5, rng.random(n) < 0.5  # same system quality, no real gain
        rejections += paired_bootstrap(a, b, n_resamples=400, seed=rep)["p"] < 0.05
    assert 0.01 <= rejections / reps <= 0.11


def test_interval_inputs_are_checked():
    with pytest.raises(GemelError, match="empty"):
        bootstrap_interval([])
    with pytest.raises(GemelError, match="aligned"):
        paired_bootstrap([1, 0], [1, 0, 1])
    with pytest.raises(GemelError, match="confidence"):
        bootstrap_interval([1, 0], confidence=95)


# ---- the evaluation summary on hand-made rows with known answers -----------------------------------

from gemel.data.nil import NIL  # noqa: E402
from gemel.errors import DataError  # noqa: E402
from gemel.eval.summary import evaluate_files, format_summary, read_predictions  # noqa: E402
from gemel.kb import KnowledgeBase  # noqa: E402
from gemel.types import Entity, Mention  # noqa: E402

SMALL_KB = KnowledgeBase.from_entities([Entity("Q1", "Paris"), Entity("Q2", "Paris Hilton"),
                                        Entity("Q3", "Jordan River"), Entity("Q4", "Michael Jordan")])
MENTIONS = [Mention("a", "Paris is big.", "paris", entity_id="Q1", entity="Paris"),
            Mention("b", "Hilton sang.", "Hilton", entity_id="Q2", entity="Paris Hilton"),
            Mention("c", "The Jordan flows.", "Jordan", entity_id="Q3", entity="Jordan River"),
            Mention("d", "MJ dunked.", "MJ", entity_id="Q4", entity="Michael Jordan"),
            Mention("e", "No gold here.", "here")]  # unlabelled: never counted
TRAIN = [Mention("t1", "Paris again.", "Paris", entity_id="Q1", entity="Paris"),
         Mention("t2", "MJ again.", "MJ", entity_id="Q4", entity="Michael Jordan")]


def cands(*ids):
    return [{"entity_id": i, "title": str(i), "score": 0.0} for i in ids]


ROWS = [{"id": "a", "candidates": cands("Q1", "Q2"), "gold_id": "Q1", "error": None},      # rank 1
        {"id": "b", "candidates": cands("Q1", "Q3", "Q2"), "gold_id": "Q2", "error": None},  # rank 3
        {"id": "c", "candidates": cands("Q4"), "gold_id": "Q3", "error": None},             # absent
        {"id": "d", "candidates": [], "gold_id": "Q4", "error": "ValueError: boom"},        # failed
        {"id": "e", "candidates": cands("Q1"), "gold_id": None, "error": None}]


def test_summary_known_answers():
    result = evaluate_files([("run", ROWS)], MENTIONS, train=TRAIN, kb=SMALL_KB, n_resamples=200)
    e = result["files"][0]
    assert (e["n"], e["errors"], e["rows"], e["max_candidates"]) == (4, 1, 5, 3)
    assert (e["H@1"], e["H@3"], e["H@5"], e["H@10"]) == (25.0, 50.0, 50.0, 50.0)
    assert e["MRR"] == pytest.approx(round(100 * (1 + 1 / 3) / 4, 2))
    lo, hi = e["ci95"]["H@1"]
    assert 0.0 <= lo <= 25.0 <= hi <= 100.0
    # seen: gold of a training mention (a: Q1 hit, d: Q4 failed); unseen: b (rank 3), c (absent)
    assert (e["seen"]["n"], e["seen"]["H@1"], e["seen"]["errors"]) == (2, 50.0, 1)
    assert (e["unseen"]["n"], e["unseen"]["H@1"], e["unseen"]["H@3"]) == (2, 0.0, 50.0)
    # mention = gold title, case-insensitive: only "paris"
    assert (e["title_match"]["n"], e["title_match"]["H@1"]) == (1, 100.0)
    assert (e["title_mismatch"]["n"], e["title_mismatch"]["MRR"]) == (3, round(100 / 9, 2))
    assert "nil" not in e and "generation" not in e and "candidate_recall" not in e
    assert result["paired"] == []
    text = format_summary(result)
    assert "seen gold" in text and "mention = title" in text


def test_summary_without_train_has_no_seen_split_and_uses_data_titles():
    e = evaluate_files([("run", ROWS)], MENTIONS, n_resamples=50)["files"][0]
    assert "seen" not in e and "unseen" not in e
    assert e["title_match"]["n"] == 1  # from the data's "entity" field


def test_summary_nil_mode_precision_recall():
    ms = [Mention("n1", "x", "Zorg", entity=NIL), Mention("n2", "y", "Blip", entity=NIL),
          Mention("k1", "z", "Paris", entity_id="Q1", entity="Paris")]
    nil = [{"entity_id": None, "title": NIL, "score": 0.0}]
    rows = [{"id": "n1", "candidates": nil + cands("Q1"), "gold_id": None, "gold_nil": True, "error": None},
            {"id": "n2", "candidates": cands("Q2") + nil, "gold_id": None, "gold_nil": True, "error": None},
            {"id": "k1", "candidates": nil + cands("Q1"), "gold_id": "Q1", "error": None}]
    e = evaluate_files([("nil", rows)], ms, n_resamples=50)["files"][0]
    # hit = the NIL answer for a NIL gold: n1 at rank 1, n2 at rank 2; k1's gold at rank 2
    assert e["n"] == 3 and e["H@1"] == round(100 / 3, 2) and e["H@3"] == 100.0
    assert (e["nil"]["gold"], e["nil"]["predicted"]) == (2, 2)
    assert e["nil"]["precision"]["value"] == 50.0 and e["nil"]["recall"]["value"] == 50.0
    # without NIL mode (no gold_nil, never a NIL answer) the NIL mentions are left out
    plain = [{**r, "candidates": cands("Q1")} for r in rows]
    for r in plain:
        r.pop("gold_nil", None)
    e = evaluate_files([("plain", plain)], ms, n_resamples=50)["files"][0]
    assert e["n"] == 1 and e["H@1"] == 100.0 and "nil" not in e


def test_summary_generation_candidates_and_pairs():
    fused = [{**r, "generated": ["Q2", "Q1"] if r["id"] == "a" else [c["entity_id"] for c in r["candidates"]],
              "in_candidates": r["id"] != "c"} for r in ROWS]
    result = evaluate_files([("fused", fused), ("base", ROWS)], MENTIONS, n_resamples=100)
    e = result["files"][0]
    assert e["generation"]["H@1"] == 0.0 and e["H@1"] == 25.0  # fusion moved a's gold up
    assert e["candidate_recall"]["value"] == 75.0 and e["candidate_recall"]["n"] == 4
    within, across = result["paired"]
    assert (within["a"], within["b"], within["diff"], within["n"]) == ("fused (generation)", "fused", 25.0, 4)
    assert (across["a"], across["b"], across["diff"], across["p"]) == ("fused", "base", 0.0, 1.0)


def test_read_predictions_and_bad_rows(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"id": "c", "cand')
    assert [r["id"] for r in read_predictions(path)] == ["a", "b"]  # torn last line skipped
    path.write_text('{"id": "a"}\n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match="line 1"):
        read_predictions(path)
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[0]) + "\n")
    with pytest.raises(DataError, match="twice"):
        read_predictions(path)
    with pytest.raises(DataError, match="not in the mentions"):
        evaluate_files([("x", [{"id": "zz", "candidates": []}])], MENTIONS)
    with pytest.raises(DataError, match="gold"):
        evaluate_files([("x", [{"id": "a", "candidates": [], "gold_id": "Q3"}])], MENTIONS)


def test_top1_agreement_known_answers():
    """Two runs (e.g. hf vs vllm): top-1 equal on 2 of 4 mentions (an empty run never agrees),
    score gaps measured only where the top-1 is the same."""
    def row(eid, score):
        return {"candidates": [{"entity_id": eid, "title": eid, "score": score}] if eid else []}

    a = [row("Q1", -1.0), row("Q2", -2.0), row("Q3", -0.5), row(None, 0)]
    b = [row("Q1", -1.25), row("Q9", -2.0), row("Q3", -0.5), row(None, 0)]
    got = top1_agreement(a, b)
    assert got == {"mentions": 4, "top1_agree": 2, "top1_agree_pct": 50.0,
                   "max_score_gap": 0.25, "mean_score_gap": 0.125}
    assert top1_agreement([row(None, 0)], [row("Q1", -1.0)])["max_score_gap"] is None
