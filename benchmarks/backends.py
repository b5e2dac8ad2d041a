"""Throughput of the ``hf`` and ``vllm`` backends on the same WikiDiverse test mentions, pure
generation and fused, in one run (run it in the vLLM virtual environment; see README).

    python benchmarks/backends.py --limit 300 --models smollm2-135m-instruct \
        [/work/models/qwen2.5-coder-1.5b-instruct.gguf] --out runs/backends

Per model: both backends load the same weights in the same dtype (``--dtype``, default auto),
share one trie and one bm25 demonstration retriever (``--demos`` 4), and link the first
``--limit`` test mentions (KB = every gold title of the release) after a one-batch warm-up, once
for pure generation and once fused (a fusion model fitted with the HF backend on the first
``--fit-val`` val mentions, or ``--fusion F.json``). Each backend runs at its own batch size
(``--hf-batch-size``, ``--vllm-batch-size``: vLLM gains from large batches, HF pads). Printed:
mentions/s, H@1/H@5, the speed-up, and how far the two agree (top-1 equal, |score difference|
where it is), with the CPU flags and dtype; written to ``<out>/backends.json`` and ``.md``.
Timings on a shared machine are upper bounds.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return platform.processor()
    return " ".join(sorted(set(re.findall(r"\b(avx2|avx512f|avx512_bf16|amx_bf16)\b", text))))


def timed_link(linker, mentions) -> tuple[list, float]:
    linker.link(mentions[:linker.config.batch_size])  # warm-up: kernels, caches, allocator
    t0 = time.perf_counter()
    results = linker.link(mentions)
    return results, time.perf_counter() - t0


def agreement(a: list, b: list) -> dict:
    """Top-1 agreement of two runs over the same mentions, and the top-1 score gaps where equal."""
    same = [(x, y) for x, y in zip(a, b) if x.candidates and y.candidates
            and x.candidates[0].entity_id == y.candidates[0].entity_id]
    gaps = [abs(x.candidates[0].score - y.candidates[0].score) for x, y in same]
    return {"top1_agree_pct": round(100.0 * len(same) / max(len(a), 1), 2),
            "max_score_gap": round(max(gaps), 4) if gaps else None,
            "mean_score_gap": round(sum(gaps) / len(gaps), 4) if gaps else None}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/wikidiverse/WikiDiverse.json")
    ap.add_argument("--splits", default="../shared/data/wikidiverse/splits.json")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--demos", type=int, default=4)
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
    from gemel.retrieval import get_retriever

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    every = read_mentions(args.data, fmt="wikidiverse")
    kb = KnowledgeBase.from_entities(build_kb(every, "gold")[0])
    split = dict(fmt="wikidiverse", splits_path=args.splits)
    test = read_mentions(args.data, split="test", limit=args.limit, **split)
    val = read_mentions(args.data, split="val", limit=args.fit_val, **split)
    train = [m for m in read_mentions(args.data, split="train", **split) if m.entity_id]
    retriever = get_retriever("bm25").fit(train)
    report = {"cpu_flags": cpu_flags(), "mentions": len(test), "kb_titles": len(kb.titles),
              "demos": args.demos, "beams": args.beams, "models": {}}
    rows_md = []
    for model in args.models:
        report["models"][model] = compare_model(model, args, kb, test, val, train, retriever,
                                                out, rows_md)
    table = ("| model | dtype | mode | hf mentions/s | vllm mentions/s | speed-up | H@1 hf / vllm "
             "| top-1 agree % |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows_md))
    note = (f"\nCPU flags: {report['cpu_flags']}; {len(test)} WikiDiverse test mentions, "
            f"{args.demos} bm25 demonstrations, {args.beams} beams; batch hf {args.hf_batch_size}"
            f", vllm {args.vllm_batch_size}; timings on a shared machine are upper bounds.\n")
    (out / "backends.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "backends.md").write_text(table + "\n" + note, encoding="utf-8")
    print(table + "\n" + note)


def compare_model(model: str, args: argparse.Namespace, kb, test, val, train, retriever,
                  out: Path, rows_md: list[str]) -> dict:
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
    base = LinkerConfig(model=model, demos=args.demos, retriever="bm25", num_beams=args.beams)
    hf_linker = Linker(base, kb, backends["hf"], train=train, retriever=retriever)
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
                                  retriever, test, fusion)
        entry["modes"][mode] = mode_entry
        rows_md.append(f"| {model} | {dtype} | {mode} | {mode_entry['hf']['mentions_per_s']} "
                       f"| {mode_entry['vllm']['mentions_per_s']} | {mode_entry['speedup']}x "
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

    from gemel.eval.metrics import hits_at_k
    from gemel.linker import Linker

    results = {}
    for name in ("hf", "vllm"):
        config = dataclasses.replace(
            base, batch_size=args.hf_batch_size if name == "hf" else args.vllm_batch_size,
            fusion=fusion if mode == "fused" else None)
        linker = Linker(config, kb, backends[name], trie=trie, train=train, retriever=retriever)
        got, seconds = timed_link(linker, test)
        hits = hits_at_k([r.to_json() for r in got], (1, 5))
        results[name] = (got, {"mentions_per_s": round(len(test) / seconds, 3),
                               "seconds": round(seconds, 1), "batch_size": config.batch_size,
                               "H@1": hits["H@1"], "H@5": hits["H@5"]})
        if name == "vllm":
            results[name][1]["engine_requests"] = backends[name].requests
    mode_entry = {name: figures for name, (_, figures) in results.items()}
    mode_entry["speedup"] = round(mode_entry["vllm"]["mentions_per_s"]
                                  / mode_entry["hf"]["mentions_per_s"], 2)
    mode_entry["agreement"] = agreement(results["vllm"][0], results["hf"][0])
    return mode_entry


if __name__ == "__main__":
    main()
