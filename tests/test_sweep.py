"""Sweeps across models: the `model` axis really loads another backend per cell, each tokenizer
gets its own trie, and the scaling outputs (table with intervals, CSV, plots, environment) appear.
Two tiny random LLMs of different sizes and vocabularies stand in for the ladder."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gemel.cli import cli
from tests.conftest import REPO


def _llama(vocab_size: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, sp_tokenizer, bpe_tokenizer):
    """A small model (SentencePiece-style tokenizer, hidden 32) and a larger one (byte-level BPE,
    hidden 64, 3 layers): folder -> (parameters, non-embedding) counted from the model."""
    out = {}
    for tag, tokenizer, hidden, layers in (("small", sp_tokenizer, 32, 2),
                                           ("large", bpe_tokenizer, 64, 3)):
        model = _llama(len(tokenizer), hidden, layers, seed=1)
        folder = tmp_path_factory.mktemp(f"tiny-{tag}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        total = sum(p.numel() for p in model.parameters())
        tables = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
        out[tag] = (str(folder), total, total - tables)
    return out


def _config(tmp_path, models: list[str], extra: str = "") -> str:
    path = tmp_path / "scaling.yaml"
    path.write_text(f"""
data: {REPO / 'examples/mentions.jsonl'}
train: {REPO / 'examples/mentions.jsonl'}
kb: {REPO / 'examples/kb.jsonl'}
out: {tmp_path / 'out'}
limit: 6
linker: {{num_beams: 3, top_k: 3, dtype: fp32, batch_size: 3}}
grid:
  model: {json.dumps(models)}
{extra}""")
    return str(path)


def test_model_axis_loads_each_model_and_writes_the_scaling_outputs(tmp_path, two_models):
    from gemel.data import read_mentions
    from gemel.eval.sweep import safe
    from gemel.kb import KnowledgeBase
    from gemel.linker import Linker

    small, large = two_models["small"], two_models["large"]
    r = CliRunner().invoke(cli, ["sweep", _config(tmp_path, [small[0], large[0]]), "--no-progress"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    rows = {row["cell"]: row for row in csv.DictReader(open(out / "results.csv"))}
    cell = {tag: rows[f"model={m[0]}"] for tag, m in two_models.items()}
    for tag, (_, total, non_embedding) in two_models.items():
        assert int(cell[tag]["parameters"]) == total and int(cell[tag]["non_embedding"]) == non_embedding
        assert cell[tag]["dtype"] == "float32" and float(cell[tag]["load_seconds"]) > 0
        assert float(cell[tag]["peak_rss_gib"]) > 0 and float(cell[tag]["s_per_mention"]) > 0
        lo, h1, hi = (float(cell[tag][k]) for k in ("H@1 lo", "H@1", "H@1 hi"))
        assert 0 <= lo <= h1 <= hi <= 100
        assert float(cell[tag]["prefill_tokens_per_s"]) > 0  # HFBackend.stats counts the prefill
    assert int(cell["large"]["parameters"]) > int(cell["small"]["parameters"])
    # each cell's predictions are its own model's: the same as linking with that model directly
    kb = KnowledgeBase.from_jsonl(REPO / "examples/kb.jsonl")
    mentions = read_mentions(REPO / "examples/mentions.jsonl", limit=6)
    for tag, (folder, _, _) in two_models.items():
        direct = Linker.from_config(kb=kb, model=folder, num_beams=3, top_k=3, dtype="fp32",
                                    batch_size=3).link(mentions)
        cell_file = out / "cells" / f"{safe(f'model={folder}')}.jsonl"
        swept = [json.loads(x) for x in cell_file.read_text().splitlines()]
        assert [[c["title"] for c in s["candidates"]] for s in swept] == \
               [[c.title for c in d.candidates] for d in direct]
    cells = json.loads((out / "cells.json").read_text())
    assert {c["config"]["model"] for c in cells.values()} == {small[0], large[0]}
    assert all(c["config"]["template"] == "gemel" for c in cells.values())
    env = cells[f"model={small[0]}"]["environment"]
    assert env["packages"]["torch"] == torch.__version__ and "flags" in env["cpu"]
    md = (out / "results.md").read_text()
    assert "## Environment" in md and "baseline: prior > exact title > MiniLM" in md
    assert (out / "scaling.png").stat().st_size > 10_000 and (out / "results.png").exists()


def test_one_trie_per_tokenizer_not_per_cell(tmp_path, two_models, monkeypatch):
    """Trie key = tokenizer identity: 2 models x 2 beam sizes build 2 tries, each model its own."""
    import gemel.linker

    built = []
    real = gemel.linker.load_or_build_trie
    monkeypatch.setattr(gemel.linker, "load_or_build_trie",
                        lambda *a, **k: built.append(a[1].name_or_path) or real(*a, **k))
    small, large = two_models["small"][0], two_models["large"][0]
    config = _config(tmp_path, [small, large], extra="  num_beams: [3, 4]\n")
    r = CliRunner().invoke(cli, ["sweep", config, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert sorted(built) == sorted([small, large])  # 4 cells, 2 tokenizers: 2 tries


def test_finished_only_tables_the_finished_cells_and_loads_no_model(tmp_path, two_models,
                                                                    monkeypatch):
    """A grid run over several sessions: --finished-only writes the table of what is finished
    and says how far each other cell got, without loading a model or linking anything."""
    import gemel.backends.base

    small, large = two_models["small"][0], two_models["large"][0]
    r = CliRunner().invoke(cli, ["sweep", _config(tmp_path, [small]), "--no-progress"])
    assert r.exit_code == 0, r.output
    loaded = []
    real = gemel.backends.base.get_backend
    monkeypatch.setattr(gemel.backends.base, "get_backend",
                        lambda *a, **k: loaded.append(a) or real(*a, **k))
    # an extra cell on the finished cell's model: that model's finished cell is still tabled
    extra = f"cells:\n  - {{model: {small}, num_beams: 2, top_k: 2}}\n"
    r = CliRunner().invoke(cli, ["sweep", _config(tmp_path, [small, large], extra),
                                 "--no-progress", "--finished-only"])
    assert r.exit_code == 0, r.output
    assert loaded == []
    rows = {row["cell"]: row for row in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert float(rows[f"model={small}"]["H@1"]) >= 0 and not rows[f"model={small}"]["status"]
    assert rows[f"model={large}"]["status"].startswith("not finished: test 0 of 6 linked")
    assert rows[f"model={small},num_beams=2,top_k=2"]["status"].startswith("not finished")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "not finished" in md and md.startswith("Generated by code") and "--finished-only`" in md


def test_fusion_block_fits_per_model_and_reports_what_the_llm_adds(tmp_path, two_models):
    small = two_models["small"][0]
    extra = "fusion: {data: " + str(REPO / "examples/mentions.jsonl") + ", limit: 16, l2: [0.01]}\n"
    r = CliRunner().invoke(cli, ["sweep", _config(tmp_path, [small], extra), "--no-progress"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    row = next(csv.DictReader(open(out / "results.csv")))
    for key in ("H@1", "H@1 generation", "H@1 fusion without LLM", "LLM adds H@1", "LLM adds p",
                "s_per_mention generation"):
        assert row[key] != "", key
    diff = float(row["LLM adds H@1"])
    assert diff == pytest.approx(float(row["H@1"]) - float(row["H@1 fusion without LLM"]), abs=0.01)
    assert float(row["LLM adds lo"]) <= diff <= float(row["LLM adds hi"])
    # the flips explain the difference, and the headroom is bounded by the pool
    n = int(row["n"])
    assert diff == pytest.approx(100.0 * (int(row["fixed"]) - int(row["broke"])) / n, abs=0.01)
    assert 0 <= int(row["LLM right there"]) <= int(row["headroom"]) <= n
    assert 0.0 <= float(row["gold in pool"]) <= 100.0
    cells = json.loads((out / "cells.json").read_text())
    fused = cells[f"model={small}"]
    assert fused["config"]["fusion"].endswith(".fusion.json")
    no_llm = json.loads(open(fused["fusion"]["model_without_llm"]).read())
    assert all(w == 0 for f, w in no_llm["weights"].items() if f.startswith("llm_"))
    assert any(w != 0 for f, w in no_llm["weights"].items() if not f.startswith("llm_"))
    assert "LLM adds" in (out / "results.md").read_text()


def test_headroom_counts_where_the_llm_could_help():
    """gold in pool, the no-LLM misses with the gold in the pool, the LLM's own pick there, and the
    fused ranking's flips, on three hand-made pools."""
    from gemel.eval.summary import Scores
    from gemel.eval.sweep_report import headroom

    def pred(rid, gold, ids, logprob):
        return {"id": rid, "gold_id": gold, "pool": {
            "features": ["similarity", "llm_logprob"], "ids": [[i] for i in ids],
            "values": [[0.0, lp] for lp in logprob]}}

    preds = [pred("a", "Q1", ["Q2", "Q1"], [-3.0, -1.0]),   # no-LLM wrong, LLM right, fused fixes
             pred("b", "Q1", ["Q1", "Q2"], [-5.0, -1.0]),   # no-LLM right, fused breaks
             pred("c", "Q9", ["Q1", "Q2"], [-1.0, -2.0])]   # gold not in the pool
    ids = ["a", "b", "c"]
    none = np.zeros(3, dtype=bool)
    plain = Scores(ids, np.array([2, 1, 0]), none, none, none)
    fused = Scores(ids, np.array([1, 2, 0]), none, none, none)
    out = headroom(preds, plain, fused)
    assert out == {"gold in pool": 66.7, "headroom": 1, "LLM right there": 1, "fixed": 1,
                   "broke": 1}
