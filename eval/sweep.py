"""Experiments as data: a YAML grid of Linker settings -> table, plots, configs, environment.

    gemel sweep eval/benchmarks/wikidiverse_fewshot.yaml     # prompt settings, one model
    gemel sweep eval/benchmarks/scaling.yaml                 # the model ladder

The YAML names the data, the KB, the base Linker settings and the values to sweep; every cell is a
LinkerConfig (unknown keys are an error). Cells that share a backend (``backend``, ``model``,
``device``, ``dtype``) run together: each model is loaded once, measured (parameters, load time,
peak RSS) and freed before the next, and the trie follows the tokenizer. Tries and retrieval
indexes are cached; each cell's predictions are a resumable run, so an interrupted sweep picks up
where it stopped (a model whose cells are all done is not even loaded).

An optional ``fusion:`` block fuses every cell: fit the fused ranking on dev mentions (``split``
of the data, first ``limit``), link the test mentions with it, and refit the same fusion without
the LLM's features on the same dev pools (no LLM pass) to rerank the same test pools, so that the
table shows what the LLM adds, with a paired bootstrap interval. Pure generation's ranking comes
from the same run (``generated``).

Output folder: ``cells/<cell>.jsonl`` predictions (+ ``.dev.jsonl`` pools, ``.fusion*.json``
models, ``.timing.json`` measurements), ``results.csv`` (every number), ``results.md`` (the table
with 95% bootstrap intervals and the environment), ``results.png`` (H@1/H@5 per cell),
``scaling.png`` (H@1 and s/mention against parameters, log axis; when cells differ in
parameters), ``cells.json`` (each cell's exact config, model measurements and environment).
"""
from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from gemel.config import from_dict, load_yaml
from gemel.errors import DataError

BACKEND_KEYS = ("backend", "model", "device", "dtype")  # cells differing here load another model


@dataclass
class FusionSpec:
    """The ``fusion:`` block: fit per cell on dev, test fused, and the no-LLM refit beside it."""

    split: str | None = "val"  # dev mentions: this split of the sweep's data ...
    data: str | None = None  # ... or this file
    limit: int | None = 500  # the first N dev mentions
    l2: list = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])  # chosen by 5-fold CV
    ablate: list | None = None  # features the no-LLM refit drops; None: every llm_* feature


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
    fusion: dict | None = None  # a FusionSpec: every cell also fused (see the module docstring)


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


def cell_configs(sweep: SweepConfig, source: str) -> list[tuple[str, object]]:
    """(name, LinkerConfig) per cell, grouped so that cells sharing a backend are adjacent (in
    the order each backend first appears): one model load per backend."""
    from gemel.linker import linker_config
    from gemel.sources import default_template

    configs = []
    for cell in expand(sweep):
        values = {k: v for k, v in {**sweep.linker, **cell}.items() if not (k == "retriever" and v == "-")}
        config = linker_config(values, source=f"{source}: cell {cell_name(cell)}")
        # the template the Linker would pick, named here so that the trie key and cells.json say it
        config = dataclasses.replace(config, template=config.template or default_template(config.model))
        configs.append((cell_name(cell), config))
    order = list(dict.fromkeys(backend_key(c) for _, c in configs))
    return sorted(configs, key=lambda nc: order.index(backend_key(nc[1])))


def backend_key(config) -> tuple:
    return tuple(getattr(config, k) for k in BACKEND_KEYS)


def run_sweep(path: str | Path, progress: bool = True, finished_only: bool = False) -> list[dict]:
    """Run every cell of the grid at ``path`` (resuming what earlier runs left), write the
    outputs; returns the table's rows. ``finished_only``: link nothing, table the finished cells
    and say how far each unfinished one got (a long grid sharded across sessions)."""
    from gemel.backends.base import get_backend
    from gemel.eval.baselines import combo_baseline
    from gemel.eval.measure import environment, parameter_counts, peak_rss_gib, reset_peak_rss
    from gemel.eval.sweep_report import metric_row, write_outputs
    from gemel.runs import input_identity, path_sha256
    from gemel.sources import resolve

    sweep = from_dict(SweepConfig, load_yaml(path), source=str(path))
    fusion = (from_dict(FusionSpec, dict(sweep.fusion), source=f"{path}: fusion")
              if sweep.fusion is not None else None)
    out = Path(sweep.out)
    command = f"gemel sweep {path}" + (" --finished-only" if finished_only else "")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    read = dict(fmt=sweep.format, splits_path=sweep.splits, images_dir=sweep.images)
    mentions, train, dev = read_inputs(sweep, fusion, read, path)
    kb = kb_for(sweep, read)
    # what every cell's predictions file records, so that a rerun resumes only its own rows
    fixed = {"input": input_identity(sweep.data, sweep.format, sweep.split, sweep.splits),
             "dev": (None if fusion is None else input_identity(fusion.data) if fusion.data else
                     input_identity(sweep.data, sweep.format, fusion.split, sweep.splits)),
             "kb": path_sha256(sweep.kb) if sweep.kb != "gold" else "gold",
             "train": (path_sha256(sweep.train) if sweep.train else
                       f"split {sweep.train_split}" if sweep.train_split else None)}
    by_id = {m.id: m for m in mentions}  # the gold every cell is scored against
    env = environment()
    shared: dict = {"retrievers": {}, "tries": {}, "candidate_retriever": None}
    rows, cells = [], {}
    configs = cell_configs(sweep, str(path))
    for _, group in itertools.groupby(configs, key=lambda nc: backend_key(nc[1])):
        group = list(group)
        done = [cell_done(out, name, mentions, dev) for name, _ in group]
        if all(done) or finished_only:
            for (name, config), finished in zip(group, done):  # measured before: no model load
                if not finished:
                    rows.append({"cell": name, "status": unfinished(out, name, mentions, dev)})
                    continue
                measured = read_measure(out, name)
                rows.append(metric_row(name, config, cell_rows(out, name, mentions), by_id,
                                       measured, no_llm=no_llm_model(out, name, fusion)))
                cells[name] = cell_record(config, measured, fusion, out, name)
            write_outputs(out, rows, cells, env, command)
            continue
        base = group[0][1]
        t0 = time.perf_counter()
        resolve(base.model, "llm")  # once per machine: assemble / dequantise into the cache
        prepared = time.perf_counter() - t0
        reset_peak_rss()  # the peak below is this model's, not an earlier, larger one's
        t0 = time.perf_counter()
        backend = get_backend(base.backend, base.model, device=base.device, dtype=base.dtype)
        model_facts = {"load_seconds": round(time.perf_counter() - t0, 2),
                       "prepare_seconds": round(prepared, 2),
                       "dtype": str(backend.dtype).replace("torch.", ""),
                       **parameter_counts(base.model, backend.model)}
        for name, config in group:
            measured, linked = run_cell(out, name, config, backend, kb, train, mentions, dev,
                                        fusion, shared, progress, source=sweep.data, fixed=fixed)
            if linked or "load_seconds" not in measured:  # a resumed, finished cell keeps its own
                measured.update(model_facts, peak_rss_gib=peak_rss_gib(), environment=env)
            write_measure(out, name, measured)
            rows.append(metric_row(name, config, cell_rows(out, name, mentions), by_id, measured,
                                   no_llm=no_llm_model(out, name, fusion)))
            cells[name] = cell_record(config, measured, fusion, out, name)
            write_outputs(out, rows, cells, env, command)
        del backend  # free this model before the next one loads (the cells hold no reference)
        gc.collect()
    if sweep.baseline and train:
        preds = [r.to_json() for r in combo_baseline(kb, train, mentions,
                                                     shared["candidate_retriever"])]
        rows.append(metric_row("baseline: prior > exact title > MiniLM", None, preds, by_id, {}))
        write_outputs(out, rows, cells, env, command)
    return rows


def read_inputs(sweep: SweepConfig, fusion: FusionSpec | None, read: dict, path) -> tuple:
    """(test mentions, train mentions, dev mentions) a sweep names; dev only when it fuses."""
    from gemel.data import read_mentions

    mentions = read_mentions(sweep.data, split=sweep.split, limit=sweep.limit, **read)
    train = (read_mentions(sweep.train, fmt="auto") if sweep.train else
             read_mentions(sweep.data, split=sweep.train_split, **read) if sweep.train_split else [])
    dev = []
    if fusion is not None:
        if not train:
            raise DataError("fusion needs training mentions (the prior): give train or "
                            "train_split", path=path, field="fusion")
        dev = (read_mentions(fusion.data, fmt="auto", limit=fusion.limit) if fusion.data else
               read_mentions(sweep.data, split=fusion.split, limit=fusion.limit, **read))
    return mentions, train, dev


def run_cell(out: Path, name: str, config, backend, kb, train, mentions, dev, fusion, shared,
             progress: bool, source: str, fixed: dict) -> tuple[dict, int]:
    """Link one cell's mentions (fused: fit on dev first). Returns its measurements (timing
    accumulated over resumed runs) and how many mentions this call linked. ``fixed``: the input,
    dev, KB and train identities the predictions files record (gemel.runs)."""
    from gemel.fusion import fit_on_mentions
    from gemel.linker import Linker, fit_retriever
    from gemel.rerank import FEATURES
    from gemel.runs import open_output, read_done, run, settings_identity
    from gemel.title_tokens import tokenizer_identity

    def identity(data: dict, cfg) -> dict:
        return {"input": data, "settings": settings_identity(cfg, kb=fixed["kb"],
                                                             train=fixed["train"])}

    pool = (config.retriever, config.nil)  # NIL mode changes the demonstration pool
    if config.demos > 0 and pool not in shared["retrievers"]:
        shared["retrievers"][pool] = fit_retriever(config, train)
    # the trie follows the tokenizer (its identity: name, vocabulary size and hash), not the cell
    trie_key = (json.dumps(tokenizer_identity(backend.tokenizer), sort_keys=True),
                config.template, config.terminator, config.nil)

    def linker_for(cfg) -> Linker:
        linker = Linker(cfg, kb, backend, trie=shared["tries"].get(trie_key), train=train,
                        retriever=shared["retrievers"].get(pool),
                        candidate_retriever=shared["candidate_retriever"])
        shared["tries"][trie_key] = linker.trie
        shared["candidate_retriever"] = (linker.candidate_retriever
                                         or shared["candidate_retriever"])
        return linker

    stem = out / "cells" / safe(name)
    fit_seconds = 0.0
    if fusion is not None:
        fused_path, plain_path = fusion_paths(out, name)
        if not (fused_path.exists() and plain_path.exists()):
            t0 = time.perf_counter()
            dev_config = dataclasses.replace(config, fusion=None)
            dev_linker = linker_for(dev_config)
            ablate = fusion.ablate or [f for f in FEATURES if f.startswith("llm_")]
            with open_output(f"{stem}.dev.jsonl", identity(fixed["dev"], dev_config)) as held:
                for drop, target in (((), fused_path), (ablate, plain_path)):
                    # the second fit reads the dev pools back: no second LLM pass
                    model, _ = fit_on_mentions(dev_linker, dev, held, progress=progress,
                                               l2s=fusion.l2, source=source, drop=drop)
                    model.save(target)
            fit_seconds = time.perf_counter() - t0
        config = dataclasses.replace(config, fusion=str(fused_path))
    linker = linker_for(config)
    path = Path(f"{stem}.jsonl")
    before = len({m.id for m in mentions} & set(read_done(path)))
    prefill0 = prefill_counters(backend)
    t0 = time.perf_counter()
    run(linker.link_batch, mentions, path, batch_size=config.batch_size, progress=progress,
        source=source, identity=identity(fixed["input"], config))
    linked = len(mentions) - before
    measured = add_timing(read_measure(out, name), time.perf_counter() - t0, linked,
                          generate=linker.seconds["generate"],
                          prefill=[b - a for a, b in zip(prefill0, prefill_counters(backend))]
                          if prefill0 is not None else None)
    if fit_seconds:
        measured["fusion_fit_seconds"] = round(measured.get("fusion_fit_seconds", 0.0) + fit_seconds, 2)
    return measured, linked


def prefill_counters(backend) -> tuple[float, float] | None:
    """(prompt tokens prefilled, seconds spent) so far, where the backend counts them in
    ``backend.stats`` (keys ``prefill_tokens`` and ``prefill_seconds``); None where it does not:
    the column stays empty rather than being estimated."""
    stats = getattr(backend, "stats", None)
    if not isinstance(stats, dict) or not {"prefill_tokens", "prefill_seconds"} <= set(stats):
        return None
    return float(stats["prefill_tokens"]), float(stats["prefill_seconds"])


def fusion_paths(out: Path, name: str) -> tuple[Path, Path]:
    """The cell's fitted fusion model and its refit without the LLM's features."""
    stem = out / "cells" / safe(name)
    return Path(f"{stem}.fusion.json"), Path(f"{stem}.fusion-no-llm.json")


def no_llm_model(out: Path, name: str, fusion: FusionSpec | None):
    """The cell's fusion refitted without the LLM's features (None when the sweep fuses not)."""
    from gemel.rerank import FusionModel

    return FusionModel.load(fusion_paths(out, name)[1]) if fusion is not None else None


def cell_rows(out: Path, name: str, mentions) -> list[dict]:
    from gemel.runs import read_done

    done = read_done(out / "cells" / f"{safe(name)}.jsonl")
    return [done[m.id] for m in mentions if m.id in done]


def unfinished(out: Path, name: str, mentions, dev) -> str:
    """How far an unfinished cell got, e.g. "not finished: dev 8 of 300, test 0 of 300"."""
    from gemel.runs import read_done

    stem = out / "cells" / safe(name)
    parts = []
    if dev:
        parts.append(f"dev {len(read_done(f'{stem}.dev.jsonl'))} of {len(dev)}")
    parts.append(f"test {len(cell_rows(out, name, mentions))} of {len(mentions)} linked")
    return "not finished: " + ", ".join(parts) + " (rerun without --finished-only to go on)"


def cell_done(out: Path, name: str, mentions, dev) -> bool:
    """Every mention linked and measured (and, fused, both fusion models fitted)."""
    if not (out / "cells" / f"{safe(name)}.timing.json").exists():
        return False
    if dev and not all(p.exists() for p in fusion_paths(out, name)):
        return False
    return len(cell_rows(out, name, mentions)) == len(mentions)


def cell_record(config, measured: dict, fusion: FusionSpec | None, out: Path, name: str) -> dict:
    """cells.json entry: the exact LinkerConfig, the fusion block, what was measured, where."""
    record = {"config": dataclasses.asdict(config),
              "measured": {k: v for k, v in measured.items() if k != "environment"},
              "environment": measured.get("environment")}
    if fusion is not None:
        fused, plain = fusion_paths(out, name)
        record["fusion"] = {**dataclasses.asdict(fusion), "model": str(fused),
                            "model_without_llm": str(plain)}
        record["config"]["fusion"] = str(fused)
    return record


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


def add_timing(total: dict, seconds: float, linked: int, generate: float = 0.0,
               prefill: list | None = None) -> dict:
    """Add one run's linking time to a cell's measurements (``<cell>.timing.json``), so that
    seconds per mention stay true when a sweep is interrupted and picked up again.

    ``seconds``: the whole run (prompts, beam search, fusion scoring); ``generate``: the part in
    prompts and beam search; ``prefill``: [tokens, seconds] counted by the backend, if it does.
    """
    total = dict(total)
    total.setdefault("seconds", 0.0)
    total.setdefault("linked", 0)
    if linked > 0:
        total["seconds"] += seconds
        total["linked"] += linked
        total["generate_seconds"] = total.get("generate_seconds", 0.0) + generate
        if prefill is not None:
            old = total.get("prefill") or [0.0, 0.0]
            total["prefill"] = [old[0] + prefill[0], old[1] + prefill[1]]
    return total


def read_measure(out: Path, name: str) -> dict:
    path = out / "cells" / f"{safe(name)}.timing.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_measure(out: Path, name: str, measured: dict) -> None:
    path = out / "cells" / f"{safe(name)}.timing.json"
    path.write_text(json.dumps(measured, indent=1) + "\n", encoding="utf-8")
