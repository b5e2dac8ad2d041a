"""Few-shot prompt experiments as data: a YAML grid of Linker settings -> table, plot, configs.

    gemel sweep eval/benchmarks/wikidiverse_fewshot.yaml

The YAML names the data, the KB, the base Linker settings and the values to sweep; every cell is a
LinkerConfig (unknown keys are an error). The model is loaded once, tries and retrieval indexes are
cached, and each cell's predictions are a resumable run, so an interrupted sweep picks up where it
stopped. Output folder: ``cells/<cell>.jsonl`` predictions, ``results.csv``, ``results.md``,
``results.png`` (H@1 and H@5 per cell) and ``cells.json`` (the exact config of every cell).
"""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from gemel.config import from_dict, load_yaml
from gemel.errors import DataError


@dataclass
class SweepConfig:
    data: str
    out: str
    kb: str = "gold"  # a KB JSONL, or "gold": every gold entity of the release file
    format: str = "auto"
    splits: str | None = None
    split: str | None = None
    train_split: str | None = None  # demonstrations come from this split of the same file
    train: str | None = None  # ... or from this file
    images: str | None = None
    limit: int | None = None
    linker: dict = field(default_factory=dict)  # base LinkerConfig values
    grid: dict = field(default_factory=dict)  # LinkerConfig field -> list of values
    cells: list = field(default_factory=list)  # extra cells: dicts of LinkerConfig overrides
    baseline: bool = True  # add the non-LLM combo baseline row (needs the train split)


def cell_name(values: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items()) or "base"


def expand(sweep: SweepConfig) -> list[dict]:
    """The cells: the grid's product, then the extra cells; demonstrations-free cells ignore the
    retriever, so they collapse into one (``retriever`` shown as "-")."""
    keys = list(sweep.grid)
    cells, seen = [], set()
    if keys or not sweep.cells:  # no grid and no cells: one cell of the base settings
        cells = [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.grid[k] for k in keys))]
    cells.extend(dict(c) for c in sweep.cells)
    out = []
    for c in cells:
        merged = {**sweep.linker, **c}
        if merged.get("demos", 0) == 0 and "retriever" in c:
            c = {**c, "retriever": "-"}
        key = cell_name(c)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def run_sweep(path: str | Path, progress: bool = True) -> list[dict]:
    from gemel.backends.base import get_backend
    from gemel.data import read_mentions
    from gemel.eval.baselines import combo_baseline
    from gemel.linker import Linker, fit_retriever, linker_config
    from gemel.runs import input_identity, path_sha256, read_done, run, settings_identity

    sweep = from_dict(SweepConfig, load_yaml(path), source=str(path))
    out = Path(sweep.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    read = dict(fmt=sweep.format, splits_path=sweep.splits, images_dir=sweep.images)
    mentions = read_mentions(sweep.data, split=sweep.split, limit=sweep.limit, **read)
    train = (read_mentions(sweep.train, fmt="auto") if sweep.train else
             read_mentions(sweep.data, split=sweep.train_split, **read) if sweep.train_split else [])
    kb = kb_for(sweep, read)
    base = linker_config(dict(sweep.linker), source=f"{path}: linker")
    # what every cell's predictions file records, so that a rerun resumes only its own rows
    fixed = {"input": input_identity(sweep.data, sweep.format, sweep.split, sweep.splits),
             "kb": path_sha256(sweep.kb) if sweep.kb != "gold" else "gold",
             "train": (path_sha256(sweep.train) if sweep.train else
                       f"split {sweep.train_split}" if sweep.train_split else None)}
    backend = get_backend(base.backend, base.model, device=base.device, dtype=base.dtype)
    retrievers, shared = {}, {}
    rows, configs = [], {}
    for cell in expand(sweep):
        values = {k: v for k, v in {**sweep.linker, **cell}.items() if not (k == "retriever" and v == "-")}
        config = linker_config(values, source=f"{path}: cell {cell_name(cell)}")
        pool = (config.retriever, config.nil)  # NIL mode changes the demonstration pool
        if config.demos > 0 and pool not in retrievers:
            retrievers[pool] = fit_retriever(config, train)
        trie_key = ("trie", config.template, config.terminator, config.nil)
        linker = Linker(config, kb, backend, trie=shared.get(trie_key),
                        train=train, retriever=retrievers.get(pool),
                        candidate_retriever=shared.get("candidates"))
        shared[trie_key] = linker.trie
        if linker.candidate_retriever is not None:
            shared["candidates"] = linker.candidate_retriever
        name = cell_name(cell)
        path = out / "cells" / f"{safe(name)}.jsonl"
        wanted = {m.id for m in mentions}
        before = len(wanted & set(read_done(path)))
        t0 = time.perf_counter()
        preds = run(linker.link_batch, mentions, path, batch_size=config.batch_size,
                    progress=progress, source=sweep.data,
                    identity={"input": fixed["input"], "settings": settings_identity(
                        config, kb=fixed["kb"], train=fixed["train"])})
        timing = add_timing(path, time.perf_counter() - t0, len(mentions) - before)
        rows.append(result_row(name, cell, preds, timing))
        configs[name] = dataclasses.asdict(config)
        write_outputs(out, rows, configs)
    if sweep.baseline and train:
        preds = [r.to_json() for r in combo_baseline(kb, train, mentions, shared.get("candidates"))]
        rows.append(result_row("baseline: prior > exact title > MiniLM", {}, preds, None))
        write_outputs(out, rows, configs)
    return rows


def kb_for(sweep: SweepConfig, read: dict):
    from gemel.data import read_mentions
    from gemel.kb import KnowledgeBase
    from gemel.types import Entity

    if sweep.kb != "gold":
        return KnowledgeBase.from_jsonl(sweep.kb)
    # every split of the release: the gold KB must not depend on which split is evaluated
    everything = read_mentions(sweep.data, **{**read, "splits_path": None})
    seen: dict[str, str] = {}
    for m in everything:
        if m.entity_id is not None and m.entity and m.entity_id not in seen:
            seen[m.entity_id] = m.entity
    if not seen:
        raise DataError("kb: gold found no gold entities in the data", path=sweep.data, field="kb")
    return KnowledgeBase.from_entities(Entity(i, t) for i, t in seen.items())


def safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=,.-_" else "_" for ch in name)


def add_timing(cell_path: Path, seconds: float, linked: int) -> dict:
    """Accumulate a cell's linking time across resumed runs in ``<cell>.timing.json``, so that
    seconds per mention stay true when a sweep is interrupted and picked up again."""
    path = cell_path.with_suffix(".timing.json")
    total = {"seconds": 0.0, "linked": 0}
    if path.exists():
        total.update(json.loads(path.read_text(encoding="utf-8")))
    if linked > 0:
        total = {"seconds": total["seconds"] + seconds, "linked": total["linked"] + linked}
        path.write_text(json.dumps(total) + "\n", encoding="utf-8")
    return total


def result_row(name, cell, preds, timing: dict | None) -> dict:
    from gemel.eval.metrics import generation_rows, hits_at_k

    m = hits_at_k(preds, (1, 5))
    per = round(timing["seconds"] / timing["linked"], 3) if timing and timing["linked"] else None
    row = {"cell": name, "H@1": m["H@1"], "H@5": m["H@5"], "n": m["n"], "errors": m["errors"],
           "s_per_mention": per}
    flags = [p["in_candidates"] for p in preds if "in_candidates" in p]
    row["recall@C"] = round(100.0 * sum(flags) / len(flags), 1) if flags else None
    if any("generated" in p for p in preds):
        row["H@1 generation"] = hits_at_k(generation_rows(preds), (1,))["H@1"]
    return row


def write_outputs(out: Path, rows: list[dict], configs: dict) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |"
              for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "cells.json").write_text(json.dumps(configs, indent=2) + "\n", encoding="utf-8")
    plot(out / "results.png", rows)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["cell"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    ax.bar([i - 0.2 for i in x], [r["H@1"] or 0 for r in rows], width=0.4, label="H@1")
    ax.bar([i + 0.2 for i in x], [r["H@5"] or 0 for r in rows], width=0.4, label="H@5")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(f"gemel sweep (n={rows[0]['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
