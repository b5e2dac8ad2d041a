"""Throughput of the ``hf`` and ``vllm`` backends on the same WikiDiverse test mentions, pure
generation and fused, in one run (run it in the vLLM virtual environment; see README).

    python benchmarks/backends.py --limit 300 --models smollm2-135m-instruct \
        [/work/models/qwen2.5-coder-1.5b-instruct.gguf] --out runs/backends

Per model: both backends load the same weights in the same dtype (``--dtype``, default auto),
share one trie and one demonstration retriever (``--retriever`` simcse, ``--demos`` 4), and
link the first ``--limit`` test mentions (KB = every gold title of the release) after a one-batch
warm-up, once for pure generation and once fused (a fusion model fitted with the HF backend on the first
``--fit-val`` val mentions, or ``--fusion F.json``). Each backend runs at its own batch size
(``--hf-batch-size``, ``--vllm-batch-size``: vLLM gains from large batches, HF pads). Printed:
mentions per wall second and per CPU second (this process and its children: vLLM's engine;
on a shared machine the fairer figure), H@1/H@5, the speed-ups, each backend's ``stats`` (HF:
prompt tokens prefilled and seconds; vLLM: requests, ``generate`` calls and seconds inside them,
prompt tokens computed and found in the prefix cache), and how far
the two agree (top-1 equal, |score difference| where it is), with the CPU flags and dtype;
written to ``<out>/backends.json`` and ``.md``. Timings on a shared machine are upper bounds.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def cpu_flags() -> str:
    from gemel.eval.measure import cpu

    return " ".join(cpu()["flags"]) or cpu()["model"]


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and all its descendants that are
    alive (vLLM's engine processes): on a shared machine wall time depends on the other jobs,
    CPU time much less."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:  # a helper that ended meanwhile
            continue
        total += t.user + t.system
    return total


def timed_link(linker, mentions) -> tuple[list, float, float]:
    """Link ``mentions`` after a one-batch warm-up (kernels, caches, allocator) -> (results,
    wall seconds, CPU seconds)."""
    linker.link(mentions[:linker.config.batch_size])
    stats = getattr(linker.backend, "stats", None)
    if stats is not None:
        stats.update(dict.fromkeys(stats, 0))  # count the timed run only
    t0, c0 = time.perf_counter(), cpu_seconds()
    results = linker.link(mentions)
    return results, time.perf_counter() - t0, cpu_seconds() - c0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/wikidiverse/WikiDiverse.json")
    ap.add_argument("--splits", default="../shared/data/wikidiverse/splits.json")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--demos", type=int, default=4)
    ap.add_argument("--retriever", default="simcse", help="demonstration retriever [simcse]")
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--hf-batch-size", type=int, default=4)
    ap.add_argument("--vllm-batch-size", type=int, default=32)
    ap.add_argument("--fusion", default=None, help="a fusion model JSON (default: fit one)")
    ap.add_argument("--fit-val", type=int, default=100, help="val mentions to fit fusion on")
    ap.add_argument("--modes", nargs="+", default=["generation", "fused"])
    ap.add_argument("--out", default="runs/backends")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    from gemel.data import read_mentions
    from gemel.data.kbsources import build_kb
    from gemel.kb import KnowledgeBase

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    every = read_mentions(args.data, fmt="wikidiverse")
    kb = KnowledgeBase.from_entities(build_kb(every, "gold")[0])
    split = dict(fmt="wikidiverse", splits_path=args.splits)
    test = read_mentions(args.data, split="test", limit=args.limit, **split)
    val = read_mentions(args.data, split="val", limit=args.fit_val, **split)
    train = [m for m in read_mentions(args.data, split="train", **split) if m.entity_id]
    report = {"cpu_flags": cpu_flags(), "mentions": len(test), "kb_titles": len(kb.titles),
              "demos": args.demos, "beams": args.beams, "models": {}}
    rows_md = []
    for model in args.models:
        report["models"][model] = compare_model(model, args, kb, test, val, train, out, rows_md)
    table = ("| model | dtype | mode | hf mentions/s | vllm mentions/s | speed-up "
             "| hf mentions/CPU-s | vllm mentions/CPU-s | CPU speed-up | H@1 hf / vllm "
             "| top-1 agree % |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
             + "\n".join(rows_md))
    note = (f"\nCPU flags: {report['cpu_flags']}; {len(test)} WikiDiverse test mentions, "
            f"{args.demos} {args.retriever} demonstrations, {args.beams} beams; "
            f"batch hf {args.hf_batch_size}"
            f", vllm {args.vllm_batch_size}; timings on a shared machine are upper bounds.\n")
    (out / "backends.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "backends.md").write_text(table + "\n" + note, encoding="utf-8")
    print(table + "\n" + note)


def compare_model(model: str, args: argparse.Namespace, kb, test, val, train, out: Path,
                  rows_md: list[str]) -> dict:
    """Load ``model`` in both backends and compare them in each mode (a markdown row each,
    appended to ``rows_md``); fit a fusion model on ``val`` first when one is needed."""
    from gemel.backends.base import get_backend
    from gemel.fusion import fit_on_mentions
    from gemel.linker import Linker, LinkerConfig

    backends, load = {}, {}
    for name in ("hf", "vllm"):
        started = time.perf_counter()
        backends[name] = get_backend(name, model, device="auto", dtype=args.dtype)
        load[name] = round(time.perf_counter() - started, 1)
    dtype = str(backends["hf"].dtype).replace("torch.", "")
    base = LinkerConfig(model=model, demos=args.demos, retriever=args.retriever,
                        num_beams=args.beams)
    hf_linker = Linker(base, kb, backends["hf"], train=train)  # fits the shared retriever
    fusion = args.fusion
    if "fused" in args.modes and fusion is None:
        fusion = str(out / f"fusion-{Path(model).stem}.json")
        if not Path(fusion).exists():
            fitted, _ = fit_on_mentions(hf_linker, val,
                                        out / f"fusion-{Path(model).stem}.dev.jsonl",
                                        progress=False)
            fitted.save(fusion)
    entry = {"dtype": dtype, "load_seconds": load, "modes": {}}
    for mode in args.modes:
        mode_entry = compare_mode(mode, args, base, kb, backends, hf_linker.trie, train,
                                  hf_linker.retriever, test, fusion)
        entry["modes"][mode] = mode_entry
        rows_md.append(f"| {model} | {dtype} | {mode} | {mode_entry['hf']['mentions_per_s']} "
                       f"| {mode_entry['vllm']['mentions_per_s']} | {mode_entry['speedup']}x "
                       f"| {mode_entry['hf']['mentions_per_cpu_s']} "
                       f"| {mode_entry['vllm']['mentions_per_cpu_s']} "
                       f"| {mode_entry['cpu_speedup']}x "
                       f"| {mode_entry['hf']['H@1']} / {mode_entry['vllm']['H@1']} "
                       f"| {mode_entry['agreement']['top1_agree_pct']} |")
        print(json.dumps({model: {mode: mode_entry}}), flush=True)
    backends.clear()
    return entry


def compare_mode(mode: str, args: argparse.Namespace, base, kb, backends: dict, trie, train,
                 retriever, test, fusion: str | None) -> dict:
    """Link ``test`` with each backend in one mode (``generation`` or ``fused``): speed, H@k,
    the speed-up of vllm over hf and their top-1 agreement."""
    import dataclasses

    from gemel.eval.metrics import hits_at_k, top1_agreement
    from gemel.linker import Linker

    results = {}
    for name in ("hf", "vllm"):
        config = dataclasses.replace(
            base, batch_size=args.hf_batch_size if name == "hf" else args.vllm_batch_size,
            fusion=fusion if mode == "fused" else None)
        linker = Linker(config, kb, backends[name], trie=trie, train=train, retriever=retriever)
        got, seconds, cpu = timed_link(linker, test)
        hits = hits_at_k([r.to_json() for r in got], (1, 5))
        results[name] = (got, {"mentions_per_s": round(len(test) / seconds, 3),
                               "seconds": round(seconds, 1),
                               "mentions_per_cpu_s": round(len(test) / cpu, 3),
                               "cpu_seconds": round(cpu, 1), "batch_size": config.batch_size,
                               "H@1": hits["H@1"], "H@5": hits["H@5"]})
        stats = getattr(backends[name], "stats", None)  # where the time goes
        if stats is not None:
            results[name][1]["stats"] = {k: round(v, 1) if isinstance(v, float) else v
                                         for k, v in stats.items()}
    mode_entry = {name: figures for name, (_, figures) in results.items()}
    mode_entry["speedup"] = round(mode_entry["vllm"]["mentions_per_s"]
                                  / mode_entry["hf"]["mentions_per_s"], 2)
    mode_entry["cpu_speedup"] = round(mode_entry["vllm"]["mentions_per_cpu_s"]
                                      / mode_entry["hf"]["mentions_per_cpu_s"], 2)
    mode_entry["agreement"] = top1_agreement([r.to_json() for r in results["hf"][0]],
                                             [r.to_json() for r in results["vllm"][0]])
    return mode_entry


if __name__ == "__main__":
    main()
