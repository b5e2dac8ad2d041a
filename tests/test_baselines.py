"""The six baseline kinds on a small KB, and `gemel baseline` -> `gemel eval --json` end to end."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gemel.cli import cli
from gemel.errors import GemelError
from gemel.eval.baselines import KINDS, run_baseline
from gemel.kb import KnowledgeBase
from gemel.types import Entity, Mention
from tests.conftest import TITLES
from tests.test_incontext import needs_minilm

KB = KnowledgeBase.from_entities(
    [Entity(f"Q{i}", t, aliases=("MJ",) if t == "Michael Jordan" else ()) for i, t in enumerate(TITLES)])
ID = {t: f"Q{i}" for i, t in enumerate(TITLES)}
TRAIN = [Mention("t1", "Jordan scored 40 points.", "Jordan", entity_id=ID["Michael Jordan"]),
         Mention("t2", "Jordan dunked again.", "Jordan", entity_id=ID["Michael Jordan"]),
         Mention("t3", "They crossed the Jordan.", "Jordan", entity_id=ID["Jordan River"]),
         Mention("t4", "Mercury sang.", "Mercury", entity_id=ID["Freddie Mercury"])]
TEST = [Mention("m1", "Jordan retired in 2003.", "Jordan", entity_id=ID["Michael Jordan"]),
        Mention("m2", "We flew to paris.", "paris", entity_id=ID["Paris"]),
        Mention("m3", "MJ was there.", "MJ", entity_id=ID["Michael Jordan"]),
        Mention("m4", "The Amazon river basin is vast.", "the Amazon river basin",
                entity_id=ID["Amazon River"])]


def ranked(results):
    return {r.mention_id: [c.entity_id for c in r.candidates] for r in results}


def test_exact_and_prior_need_no_model():
    exact = ranked(run_baseline("exact", KB, TEST, k=5))
    assert exact == {"m1": [ID["Jordan"]], "m2": [ID["Paris"]], "m3": [ID["Michael Jordan"]],
                     "m4": []}  # case-insensitive titles and aliases, nothing else
    prior = run_baseline("prior", KB, TEST, TRAIN, k=5)
    assert ranked(prior)["m1"] == [ID["Michael Jordan"], ID["Jordan River"]]  # 2:1 in train
    assert [round(c.score, 3) for c in prior[0].candidates] == [0.667, 0.333]
    assert ranked(prior)["m2"] == [] and prior[0].gold_id == ID["Michael Jordan"]
    with pytest.raises(GemelError, match="--train"):
        run_baseline("prior", KB, TEST, None)
    with pytest.raises(GemelError, match="unknown baseline"):
        run_baseline("oracle", KB, TEST, TRAIN)


def test_dense_and_combo_kinds():
    needs_minilm()
    retrievers: dict = {}
    out = {kind: run_baseline(kind, KB, TEST, TRAIN, k=4, retrievers=retrievers) for kind in KINDS}
    assert set(retrievers) == {"mention", "mention+sentence"}  # one retriever per field, reused
    for kind, results in out.items():
        assert [r.mention_id for r in results] == [m.id for m in TEST]
        assert all(c.entity_id in KB and c.title == KB[c.entity_id].title
                   for r in results for c in r.candidates), kind
        assert all(len(r.candidates) <= 4 for r in results)
        assert all(len({c.entity_id for c in r.candidates}) == len(r.candidates) for r in results)
    dense = out["dense"]
    assert all(len(r.candidates) == 4 for r in dense)
    # the mention string equal to a title is its own nearest neighbour (cosine 1)
    assert dense[1].candidates[0].entity_id == ID["Paris"]
    assert dense[1].candidates[0].score == pytest.approx(1.0, abs=1e-4)
    assert all(a.score >= b.score for r in dense for a, b in zip(r.candidates, r.candidates[1:]))
    # dense-context queries "mention. sentence": another query, so other similarities
    assert [c.score for c in out["dense-context"][0].candidates] != [c.score for c in dense[0].candidates]
    combo = ranked(out["combo"])
    # prior first (Michael Jordan 2:1, then Jordan River), then the exact title, then dense
    assert combo["m1"][:3] == [ID["Michael Jordan"], ID["Jordan River"], ID["Jordan"]]
    assert combo["m2"][0] == ID["Paris"]  # unseen string: exact match
    assert combo["m3"][0] == ID["Michael Jordan"]  # alias
    assert combo["m4"] == ranked(dense)["m4"]  # no prior, no exact match: the dense ranking
    assert ranked(out["combo-context"])["m4"] == ranked(out["dense-context"])["m4"]
    assert ranked(out["combo-context"])["m1"][:3] == combo["m1"][:3]


def test_baseline_then_eval_json(tmp_path):
    kb, data, train = tmp_path / "kb.jsonl", tmp_path / "test.jsonl", tmp_path / "train.jsonl"
    KB.write_jsonl(kb)
    for path, ms in ((data, TEST), (train, TRAIN)):
        path.write_text("".join(json.dumps(m.to_json()) + "\n" for m in ms))
    runner = CliRunner()
    for kind in ("exact", "prior"):
        r = runner.invoke(cli, ["baseline", "--kind", kind, "--kb", str(kb), "--data", str(data),
                                "--train", str(train), "--out", str(tmp_path / f"{kind}.jsonl"),
                                "--no-progress"])
        assert r.exit_code == 0, r.output
        assert "H@1" in r.output
    # another kind into the same --out is refused (it would mix two runs), the file is kept
    before = (tmp_path / "prior.jsonl").read_text()
    r = runner.invoke(cli, ["baseline", "--kind", "exact", "--kb", str(kb), "--data", str(data),
                            "--out", str(tmp_path / "prior.jsonl"), "--no-progress"])
    assert r.exit_code != 0 and (tmp_path / "prior.jsonl").read_text() == before
    rows = [json.loads(x) for x in (tmp_path / "exact.jsonl").read_text().splitlines()]
    assert [x["id"] for x in rows] == [m.id for m in TEST] and rows[0]["gold_id"] == ID["Michael Jordan"]
    out = tmp_path / "eval.json"
    r = runner.invoke(cli, ["eval", str(tmp_path / "exact.jsonl"), str(tmp_path / "prior.jsonl"),
                            "--data", str(data), "--train", str(train), "--kb", str(kb),
                            "--json", str(out), "--resamples", "100"])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    exact, prior = result["files"]
    assert exact["path"].endswith("exact.jsonl") and exact["n"] == 4 and exact["errors"] == 0
    # exact: m2 (paris), m3 (alias MJ); prior: m1 only (Jordan -> Michael Jordan in train)
    assert exact["H@1"] == 50.0 and prior["H@1"] == 25.0
    assert set(exact["ci95"]) == {"H@1", "H@3", "H@5", "H@10", "MRR"}
    assert exact["seen"]["n"] == 2 and exact["unseen"]["n"] == 2
    (pair,) = result["paired"]
    assert (pair["a"], pair["b"], pair["metric"], pair["diff"]) == (exact["path"], prior["path"],
                                                                    "H@1", -25.0)
    # a baseline that needs the prior fails before any work without --train
    r = runner.invoke(cli, ["baseline", "--kind", "combo", "--kb", str(kb), "--data", str(data),
                            "--out", str(tmp_path / "c.jsonl")])
    assert r.exit_code == 2 and "--train" in r.output  # a GemelError: its message, exit code 2
    assert not (tmp_path / "c.jsonl").exists()


def test_report_markdown_names_the_strongest_and_the_command():
    from gemel.eval.reports import markdown
    from gemel.eval.summary import evaluate_files

    rows = {kind: [r.to_json() for r in run_baseline(kind, KB, TEST, TRAIN, k=3)]
            for kind in ("exact", "prior")}
    result = evaluate_files(list(rows.items()), TEST, train=TRAIN, kb=KB, n_resamples=50)
    report = {"dataset": "toy", "split": "test", "limit": None, "mentions": len(TEST),
              "train_mentions": len(TRAIN), "runs": [{"label": k, "kind": k, "seconds": 0.1}
                                                      for k in rows],
              "kbs": [{"name": "toy", "entities": len(KB), "with_description": 0, "note": "toy"}],
              "strongest_baseline": "exact", "reference": {"exact": {"H@1": 40.0}},
              "sentence_model": "minilm-l6-v2", "dtype": "fp32", "top_k": 3, "cpu_flags": "x",
              "seconds_total": 1.0, **result}
    text = markdown(report, "python -m gemel.eval.reports toy")
    assert "python -m gemel.eval.reports toy" in text and "strongest baseline: exact" in text
    assert "| **exact** |" in text and "| prior |" in text
    assert "| exact | H@1 | 40.0 | 50.00 | +10.00 |" in text  # against the earlier figure
    assert "| prior | -25.00 |" in text  # paired, other - strongest


def test_report_shows_a_fused_run_beside_its_pure_generation_with_its_time(tmp_path):
    """A `gemel link --fusion` file as a --pred row: its `generated` ranking is a row of its own,
    the paired fused - generation difference is reported, and its sidecar's linking time shown."""
    from gemel.eval.reports import _run_timing, markdown
    from gemel.eval.summary import evaluate_files
    from gemel.runs import run

    exact = [r.to_json() for r in run_baseline("exact", KB, TEST, TRAIN, k=3)]
    prior = {r["id"]: r for r in (x.to_json() for x in run_baseline("prior", KB, TEST, TRAIN, k=3))}
    # fused = exact's ranking; generation = prior's ranking (ids only, as a fused run keeps them)
    fused = [{**r, "generated": [c["entity_id"] for c in prior[r["id"]]["candidates"]]} for r in exact]
    path = tmp_path / "fused.jsonl"
    by_id = {r["id"]: r for r in fused}
    from gemel.types import Candidate, LinkResult

    def link(batch):
        return [LinkResult(m.id, tuple(Candidate(c["entity_id"], c["title"], c["score"])
                                       for c in by_id[m.id]["candidates"]), m.entity_id)
                for m in batch]

    run(link, TEST, path, batch_size=2, progress=False)
    assert _run_timing(str(path))["linked"] == len(TEST)
    result = evaluate_files([("exact", exact), ("gemel fused", fused)], TEST, train=TRAIN, kb=KB,
                            n_resamples=50)
    report = {"dataset": "toy", "split": "test", "limit": None, "mentions": len(TEST),
              "train_mentions": len(TRAIN),
              "runs": [{"label": "exact", "kind": "exact", "seconds": 0.1},
                       {"label": "gemel fused", "kind": "predictions", "predictions": str(path),
                        "seconds": 12.0, "about": {"model": "m", "dtype": "bfloat16"},
                        "settings": {"demos": 4}}],
              "kbs": [{"name": "toy", "entities": len(KB), "with_description": 0, "note": "toy"}],
              "strongest_baseline": "exact", "reference": {},
              "sentence_model": "minilm-l6-v2", "dtype": "fp32", "top_k": 3, "cpu_flags": "x",
              "seconds_total": 1.0, **result}
    text = markdown(report, "python -m gemel.eval.reports toy --pred x")
    assert text.startswith("# gemel and the baselines on toy test")
    assert "| gemel fused: pure generation | the fused run's `generated` | 4 | 25.0 [" in text
    assert "| gemel fused | +25.00 |" in text  # fused (50) - its generation (25), paired
    assert "model=m, dtype=bfloat16, demos=4; linking took 12 s" in text
