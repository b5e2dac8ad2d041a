"""End to end through the `gemel` command, with a tiny random model saved to a folder."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from gemel.cli import cli
from tests.conftest import REPO, needs_data


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, llama_pair):
    model, tokenizer = llama_pair
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_link_example_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "pred.jsonl"
    args = ["link", "--kb", str(REPO / "examples/kb.jsonl"), "--data",
            str(REPO / "examples/mentions.jsonl"), "--out", str(out), "--model", str(tiny_model_dir),
            "--beams", "3", "--top-k", "3", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    titles = {json.loads(x)["title"] for x in (REPO / "examples/kb.jsonl").read_text().splitlines()}
    mentions = [json.loads(x) for x in (REPO / "examples/mentions.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [m["id"] for m in mentions]
    assert all(1 <= len(r["candidates"]) <= 3 for r in rows)
    assert all(c["title"] in titles for r in rows for c in r["candidates"])
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["gemel"]["n"] == len(mentions) and "H@1" in metrics["exact_match"]
    assert "gemel" in result.output and "exact-match baseline" in result.output
    # a rerun resumes: nothing left to link, same file
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and [json.loads(x) for x in out.read_text().splitlines()] == rows


def test_build_trie_then_reuse(tmp_path, tiny_model_dir):
    trie_dir = tmp_path / "trie"
    kb = str(REPO / "examples/kb.jsonl")
    r = CliRunner().invoke(cli, ["build-trie", "--kb", kb, "--out", str(trie_dir), "--model",
                                 str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    info = json.loads((trie_dir / "trie.json").read_text())
    merged = len(info["terminator_merged"])
    assert merged > 0  # this tokenizer merges e.g. "Kingdom" with "\n"
    assert f"{merged} title(s) merge their last characters with the terminator" in r.output
    link = ["link", "--kb", kb, "--data", str(REPO / "examples/mentions.jsonl"),
            "--out", str(tmp_path / "p.jsonl"), "--model", str(tiny_model_dir),
            "--trie", str(trie_dir), "--limit", "2", "--no-progress"]
    r = CliRunner().invoke(cli, link)
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "p.metrics.json").read_text())
    assert metrics["trie_terminator_merged"] == merged
    info["version"] = 2  # a trie saved by an older gemel is refused, with the fix
    (trie_dir / "trie.json").write_text(json.dumps(info))
    r = CliRunner().invoke(cli, link[:5] + ["--out", str(tmp_path / "q.jsonl")] + link[7:])
    assert r.exit_code == 2 and "gemel build-trie" in r.output  # an input error, with its fix


def test_bad_kb_line_is_named(tmp_path, tiny_model_dir):
    kb = tmp_path / "kb.jsonl"
    kb.write_text('{"id": "Q1", "title": "Paris"}\n{"id": "Q2"}\n')
    args = ["link", "--kb", str(kb), "--data", str(REPO / "examples/mentions.jsonl"),
            "--out", str(tmp_path / "p.jsonl"), "--model", str(tiny_model_dir), "--limit", "2",
            "--no-progress"]
    # by default the bad record is skipped and reported; --strict makes it an error (exit 2)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "1 bad KB records skipped" in r.output and "line 2, field 'title'" in r.output
    r = CliRunner().invoke(cli, args + ["--strict"])
    assert r.exit_code == 2
    assert "kb.jsonl, record line 2, field 'title'" in r.output


def test_link_release_shape_with_split(tmp_path, tiny_model_dir):
    """WikiDiverse straight from the public release: a KB of every gold title, 3 test mentions."""
    data = needs_data("wikidiverse", "WikiDiverse.json")
    splits = data.parent / "splits.json"
    kb = tmp_path / "kb.jsonl"
    r = CliRunner().invoke(cli, ["convert", "--data", str(data), "--out", str(tmp_path / "all.jsonl"),
                                 "--kb-out", str(kb)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "p.jsonl"
    r = CliRunner().invoke(cli, ["link", "--kb", str(kb), "--data", str(data), "--splits", str(splits),
                                 "--split", "test", "--limit", "3", "--out", str(out), "--model",
                                 str(tiny_model_dir), "--beams", "2", "--top-k", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    titles = {json.loads(x)["title"] for x in kb.read_text().splitlines()}
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all(c["title"] in titles for r in rows for c in r["candidates"])


def test_sweep_grid_writes_table_plot_and_configs(tmp_path, tiny_model_dir):
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
data: {REPO / 'examples/mentions.jsonl'}
train: {REPO / 'examples/mentions.jsonl'}
kb: {REPO / 'examples/kb.jsonl'}
out: {tmp_path / 'sweep'}
limit: 4
baseline: false
linker: {{model: "{tiny_model_dir}", num_beams: 2, top_k: 2}}
grid:
  demos: [0, 2]
  retriever: [random, bm25]
""")
    r = CliRunner().invoke(cli, ["sweep", str(config), "--no-progress"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "sweep"
    lines = (out / "results.csv").read_text().splitlines()
    # demos=0 ignores the retriever: 1 + 2 cells, not 4
    assert len(lines) == 1 + 3 and lines[1].startswith('"demos=0,retriever=-"')
    configs = json.loads((out / "cells.json").read_text())
    assert configs["demos=2,retriever=bm25"]["config"]["retriever"] == "bm25"
    assert (out / "results.png").stat().st_size > 1000 and (out / "results.md").exists()
    first = {row["cell"]: row for row in csv.DictReader(open(out / "results.csv"))}
    assert all(float(row["s_per_mention"]) > 0 for row in first.values())
    # a rerun resumes every cell: nothing is linked again, and the timing of the first run stays
    r = CliRunner().invoke(cli, ["sweep", str(config), "--no-progress"])
    assert r.exit_code == 0, r.output
    again = {row["cell"]: row for row in csv.DictReader(open(out / "results.csv"))}
    assert again == first


def test_sweep_of_extra_cells_only(tmp_path, tiny_model_dir):
    """No grid: exactly the listed cells (not a base cell besides them)."""
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
data: {REPO / 'examples/mentions.jsonl'}
train: {REPO / 'examples/mentions.jsonl'}
kb: {REPO / 'examples/kb.jsonl'}
out: {tmp_path / 'sweep'}
limit: 3
baseline: false
linker: {{model: "{tiny_model_dir}", num_beams: 2, top_k: 2}}
cells:
  - {{demos: 1, retriever: random}}
""")
    r = CliRunner().invoke(cli, ["sweep", str(config), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert [p.name for p in sorted((tmp_path / "sweep" / "cells").glob("*.jsonl"))] == [
        "demos=1,retriever=random.jsonl"]


def test_link_nil_mode_from_a_release_with_nil_answers(tmp_path, tiny_model_dir):
    """answer "nil" in a release: no crash; with --nil the NIL gold counts and NIL is an answer."""
    release = {"1": {"id": "1", "sentence": "Paris in spring", "mentions": "Paris",
                     "entities": "Paris", "answer": "Q90"},
               "2": {"id": "2", "sentence": "An unknown man", "mentions": "man", "entities": "",
                     "answer": "nil"}}
    data = tmp_path / "WikiMEL.json"
    data.write_text(json.dumps(release))
    kb = tmp_path / "kb.jsonl"
    kb.write_text('{"id": "Q90", "title": "Paris"}\n{"id": "Q64", "title": "Berlin"}\n')
    for nil in (False, True):
        out = tmp_path / f"pred{nil}.jsonl"
        r = CliRunner().invoke(cli, ["link", "--kb", str(kb), "--data", str(data), "--out", str(out),
                                     "--model", str(tiny_model_dir), "--beams", "3", "--top-k", "3",
                                     "--no-progress"] + (["--nil"] if nil else []))
        assert r.exit_code == 0, r.output
        rows = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
        titles = {c["title"] for row in rows.values() for c in row["candidates"]}
        assert ("NIL" in titles) == nil
        metrics = json.loads(out.with_suffix(".metrics.json").read_text())
        assert metrics["gemel"]["n"] == (2 if nil else 1)
        assert rows["2"].get("gold_nil", False) == nil


def test_sweep_gold_kb_spans_every_split(tmp_path):
    """kb: gold takes the gold entities of the whole release, whichever split is evaluated."""
    from gemel.data import read_mentions
    from gemel.eval.sweep import SweepConfig, kb_for

    data = needs_data("wikidiverse", "WikiDiverse.json")
    splits = needs_data("wikidiverse", "splits.json")
    sweep = SweepConfig(data=str(data), out=str(tmp_path), format="wikidiverse", splits=str(splits),
                        split="test")
    kb = kb_for(sweep, {"fmt": "wikidiverse", "splits_path": str(splits), "images_dir": None})
    gold = {m.entity_id for m in read_mentions(data, fmt="wikidiverse") if m.entity_id}
    test = {m.entity_id for m in read_mentions(data, fmt="wikidiverse", split="test",
                                               splits_path=splits) if m.entity_id}
    assert len(kb) == len(gold) > len(test) and all(e in kb for e in test)


def test_fit_fusion_refits_from_kept_rows_of_several_shards(tmp_path):
    from gemel.rerank import POOL_FEATURES, FusionModel, pool_json

    prior = POOL_FEATURES.index("prior")
    shards = []
    for shard in range(2):  # the gold is the candidate with the highest prior; the rest is noise
        rows = []
        for i in range(12):
            values = [[(j * 7 + i) % 5 / 10.0] * len(POOL_FEATURES) for j in range(4)]
            gold = (i + shard) % 4
            for j in range(4):
                values[j][prior] = 0.9 if j == gold else 0.1
            rows.append({"id": f"{shard}-{i}", "candidates": [], "gold_id": f"Q{gold}",
                         "error": None, "pool": pool_json([f"T{j}" for j in range(4)],
                                                          [[f"Q{j}"] for j in range(4)], values)})
        path = tmp_path / f"dev{shard}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        shards.append(str(path))
    out = tmp_path / "fusion.json"
    result = CliRunner().invoke(cli, ["fit-fusion", "--rows", shards[0], "--rows", shards[1],
                                      "--out", str(out), "--l2", "0.001"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[:result.output.rindex("}") + 1])
    assert report["dev_mentions"] == 24 and report["dev_H@1_fused"] == 100.0
    assert FusionModel.load(out).weights["prior"] > 0
    # an ablation keeps the dropped feature at weight 0, and the informative one carries it
    ablated = CliRunner().invoke(cli, ["fit-fusion", "--rows", shards[0], "--out", str(out),
                                       "--drop", "llm_logprob", "--drop", "similarity"])
    assert ablated.exit_code == 0, ablated.output
    weights = FusionModel.load(out).weights
    assert weights["llm_logprob"] == 0 and weights["similarity"] == 0 and weights["prior"] > 0
    unknown = CliRunner().invoke(cli, ["fit-fusion", "--rows", shards[0], "--out", str(out),
                                       "--drop", "llm_magic"])
    assert unknown.exit_code == 2 and "llm_magic" in unknown.output
    # neither rows nor dev mentions: a usage error, not a traceback
    bad = CliRunner().invoke(cli, ["fit-fusion", "--out", str(out)])
    assert bad.exit_code != 0 and "--rows" in bad.output
