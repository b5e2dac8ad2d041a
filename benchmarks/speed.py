"""Linking speed: seconds per mention, achieved prefill GFLOP/s against a matmul peak measured in
the same run, and where the time goes — per model, per number of demonstrations, pure generation
and fused.

    python benchmarks/speed.py                                  # SmolLM2 + Qwen 1.5B, 0/4/16 demos
    python benchmarks/speed.py --models smollm2-135m-instruct --demos 16 --limit 20
    python benchmarks/speed.py --dtype fp32 --limit 50 --demos 4 --save-reference ref.jsonl
    python benchmarks/speed.py --dtype fp32 --limit 50 --demos 4 --check ref.jsonl

Data: the first ``--limit`` WikiDiverse test mentions, demonstrations retrieved (simcse) from the
train split, KB = every gold title (``gemel convert --data WikiDiverse.json --out wd_all.jsonl
--kb-out wd_kb.jsonl``). Each cell is timed ``--repeats`` times after a warm-up batch; the table
shows the repeat with the median total, and its phases:

  retrieval  demonstrations (simcse) + KB candidates and similarities (fusion)
  prompt     building the prompt text, tokenizing and embedding it
  prefill    the prompts' forward pass (one per batch)
  decode     the beam search's model steps
  search     the beam search's own work (trie, top-k) outside the model
  scoring    fusion's teacher-forced scoring of the titles the beams did not reach
  other      the rest (fusion features, results)

Prefill GFLOP/s counts the useful work only: 2 x non-embedding parameters per real prompt token,
plus causal attention (2 x L^2 x attention width per layer) and one LM-head row per prompt;
padding is waste, not work. The machine is shared: every figure is an upper bound on the time an
idle machine needs (the load average is printed beside it).

``--save-reference`` writes, per mention, the pure-generation candidates and the fused pool's LLM
scores; ``--check`` compares a run with such a file: same top-1 (generation and fused) and every
score within ``--tolerance`` (1e-4; meaningful in fp32). Both use the largest ``--demos`` value.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikidiverse"
DEFAULT_MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct"]  # or a .gguf path
PHASES = ("retrieval", "prompt", "prefill", "decode", "search", "scoring", "other")
# The targets (for a 2-core AMX machine, bf16)
TARGET_PREFILL_SHARE = 0.5
TARGET_S_PER_MENTION = {("smollm2", 16): 0.25, ("qwen2.5-coder-1.5b", 4): 1.0}
TARGET_FUSED_RATIO = 1.3


# -- machine ---------------------------------------------------------------------------------------
def cpu_flags() -> list[str]:
    from gemel.eval.measure import cpu

    return cpu()["flags"]


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 7) -> float:
    """Median GFLOP/s of an n x n x n matmul in ``dtype`` on this CPU, now."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- where the time goes ----------------------------------------------------------------------------
class PhaseClock:
    """Exclusive time per phase: a wrapped call's time minus the wrapped calls inside it."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.stack: list[float] = []  # child time accumulated by each open call
        self.prefill_tokens = 0  # real prompt tokens prefilled
        self.padded_tokens = 0  # prompt positions computed, padding included
        self.prefill_lengths: list[int] = []

    def reset(self) -> None:
        self.__init__()

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            self.stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total = time.perf_counter() - t
                children = self.stack.pop()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + total - children
                if self.stack:
                    self.stack[-1] += total
        return timed


@contextmanager
def instrumented(linker, clock: PhaseClock):
    """Time the linker's phases (patches instance methods and the HF stepper; undone on exit)."""
    from gemel.backends import hf

    patched = []

    def patch(obj, name, phase):
        if obj is None or not hasattr(obj, name):
            return
        original = getattr(obj, name)
        patched.append((obj, name, original, name in vars(obj)))
        setattr(obj, name, clock.wrap(phase, original))

    start = hf.HFStepper.start

    def counted_start(stepper):
        mask = stepper.mask
        clock.prefill_tokens += int(mask.sum())
        clock.padded_tokens += mask.numel()
        clock.prefill_lengths.extend(mask.sum(-1).tolist())
        return start(stepper)

    hf.HFStepper.start = clock.wrap("prefill", counted_start)
    patch(hf.HFStepper, "advance", "decode")
    patch(hf.HFStepper, "score", "scoring")
    patch(linker.backend, "run", "search")  # the backend's one call; its scoring is timed apart
    patch(linker.builder, "build", "prompt")
    patch(linker.model, "embed", "prompt")
    patch(linker.retriever, "query_batch", "retrieval")
    patch(linker.candidate_retriever, "retrieve", "retrieval")
    try:
        yield clock
    finally:
        hf.HFStepper.start = start
        for obj, name, original, own in reversed(patched):
            if own or isinstance(obj, type):
                setattr(obj, name, original)
            else:
                delattr(obj, name)


def prefill_flops(config, lengths: list[int], n_params_body: int) -> float:
    """Useful FLOPs of prefilling prompts of these real lengths (see the module docstring)."""
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    width = heads * head_dim
    lm_head = 2 * text.hidden_size * text.vocab_size
    return sum(2 * n_params_body * n + 2 * layers * n * n * width + lm_head for n in lengths)


def body_parameters(model) -> int:
    """Parameters that every token passes through: all but the input embeddings and the LM head."""
    skip = {id(model.get_input_embeddings().weight)}
    out = model.get_output_embeddings()
    if out is not None:
        skip.add(id(out.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# -- one cell ----------------------------------------------------------------------------------------
def time_cell(linker, mentions, repeats: int, warmup: bool = True) -> dict:
    clock = PhaseClock()
    runs = []
    with instrumented(linker, clock):
        if warmup:  # kernels, allocator, caches
            linker.link(mentions[:linker.config.batch_size])
        for _ in range(repeats):
            clock.reset()
            t = time.perf_counter()
            results = linker.link(mentions)
            total = time.perf_counter() - t
            phases = {p: clock.seconds.get(p, 0.0) for p in PHASES if p != "other"}
            phases["other"] = max(total - sum(phases.values()), 0.0)
            runs.append({"total": total, "phases": phases, "tokens": clock.prefill_tokens,
                         "padded": clock.padded_tokens, "lengths": list(clock.prefill_lengths),
                         "results": results})
    runs.sort(key=lambda r: r["total"])
    median = runs[len(runs) // 2]
    median["all_totals"] = [r["total"] for r in runs]
    return median


def make_linker(base, backend, config, kb, train, trie, fused: bool):
    from gemel.rerank import FEATURES, FusionModel
    from gemel.linker import Linker

    linker = Linker(config, kb, backend, trie=trie, train=train, retriever=base.retriever,
                    candidate_retriever=base.candidate_retriever)
    if fused:  # weights do not change the work; a fitted model would rank differently, as fast
        linker.fusion = FusionModel({f: float(f == "llm_logprob") for f in FEATURES},
                                    {"note": "speed benchmark: timing only"})
        linker.keep_pool = True
    return linker


def reference_rows(pure, fused) -> list[dict]:
    out = []
    for p, f in zip(pure, fused):
        pool = f.extra["pool"]
        out.append({"id": p.mention_id,
                    "generated": [[c.title, c.score] for c in p.candidates],
                    "fused_top1": f.candidates[0].title if f.candidates else None,
                    "pool": [[t, v[0]] for t, v in zip(pool["titles"], pool["values"])]})
    return out


def compare(rows: list[dict], reference: list[dict], tolerance: float) -> dict:
    """Top-1 agreement and the largest score difference against a reference file."""
    ref = {r["id"]: r for r in reference}
    top1 = fused_top1 = n = 0
    worst = 0.0
    missing = 0
    for r in rows:
        if r["id"] not in ref:
            missing += 1
            continue
        e, n = ref[r["id"]], n + 1
        top1 += bool(r["generated"]) and bool(e["generated"]) and \
            r["generated"][0][0] == e["generated"][0][0]
        fused_top1 += r["fused_top1"] == e["fused_top1"]
        ours = dict(map(tuple, r["generated"]))
        for title, score in e["generated"]:
            worst = max(worst, abs(ours.get(title, float("inf")) - score))
        ours = dict(map(tuple, r["pool"]))
        for title, score in e["pool"]:
            worst = max(worst, abs(ours.get(title, float("inf")) - score))
    ok = n > 0 and not missing and top1 == n and fused_top1 == n and worst <= tolerance
    return {"mentions": n, "missing": missing, "same_top1": top1, "same_fused_top1": fused_top1,
            "max_abs_score_diff": worst, "tolerance": tolerance, "identical": ok}


# -- report --------------------------------------------------------------------------------------------
def target_key(model: str) -> str:
    name = Path(model).name.lower()
    return "smollm2" if "smollm2" in name else "qwen2.5-coder-1.5b" if "1.5b" in name else name


def verdict(value: float, floor: float, lower_is_better: bool = True) -> str:
    ok = value <= floor if lower_is_better else value >= floor
    return f"{'PASS' if ok else 'FAIL'} ({value:.3g} vs {floor:g}: {value / floor:.2f}x)"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help="comma-separated model names or GGUF paths")
    ap.add_argument("--demos", default="0,4,16", help="comma-separated demonstration counts")
    ap.add_argument("--limit", type=int, default=20, help="first N WikiDiverse test mentions")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up batch per cell")
    ap.add_argument("--dtype", default="auto", help="auto | fp32 | bf16")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the LinkerConfig's")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    ap.add_argument("--no-fused", action="store_true", help="time pure generation only")
    ap.add_argument("--data", default=str(DATA / "WikiDiverse.json"))
    ap.add_argument("--splits", default=str(DATA / "splits.json"))
    ap.add_argument("--kb", default="/tmp/speed/wd_kb.jsonl",
                    help="gemel convert --data WikiDiverse.json --out X --kb-out THIS")
    ap.add_argument("--save-reference", default=None)
    ap.add_argument("--check", default=None)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    demos = [int(x) for x in args.demos.split(",")]
    kb, mentions, train = load_inputs(args)
    machine, peaks = describe_machine(args)
    peak = peaks["bf16" if machine["dtype"] == "bfloat16" else "fp32"]
    print(f"{len(mentions)} WikiDiverse test mentions, KB {len(kb.titles)} titles, "
          f"{len(train)} training mentions\n")

    cells, report = [], {"machine": machine, "matmul_gflops": peaks}
    base_linker = None
    for model_name in args.models.split(","):
        model_cells, base_linker = time_model(model_name, args, demos, kb, mentions, train,
                                              base_linker, peak)
        cells += model_cells
    report["cells"] = cells
    print()
    print_table(cells, peak, machine)
    report["targets"] = targets(cells, peak)
    for line in report["targets"]:
        print(line)
    print(f"load average at the end: {load_average()} (a shared machine: figures are upper bounds)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


def load_inputs(args: argparse.Namespace) -> tuple:
    """The KB, the first --limit WikiDiverse test mentions, and the training mentions (those of
    sentences that are not also test sentences)."""
    from gemel.data import read_mentions
    from gemel.kb import KnowledgeBase

    kb = KnowledgeBase.from_jsonl(args.kb)
    mentions = read_mentions(args.data, split="test", splits_path=args.splits, limit=args.limit)
    test_sentences = {m.id.split("-")[0] for m in read_mentions(args.data, split="test",
                                                                 splits_path=args.splits)}
    # sentences listed in both train and test stay out of train (see the data README)
    train = [m for m in read_mentions(args.data, split="train", splits_path=args.splits)
             if m.id.split("-")[0] not in test_sentences]
    return kb, mentions, train


def describe_machine(args: argparse.Namespace) -> tuple[dict, dict]:
    """The machine (CPU flags, dtype, threads, load) and its measured matmul peaks, printed."""
    from gemel.machine import pick_dtype

    dtype = pick_dtype("cpu", args.dtype)
    flags = cpu_flags()
    machine = {"cpu_flags": flags, "dtype": str(dtype).replace("torch.", ""),
               "dtype_requested": args.dtype, "torch_threads": torch.get_num_threads(),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
               "python": platform.python_version(), "load_average_start": load_average()}
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"CPU flags: {' '.join(flags)} | dtype {machine['dtype']} (--dtype {args.dtype}) | "
          f"torch threads {machine['torch_threads']} | OMP_NUM_THREADS "
          f"{machine['OMP_NUM_THREADS']} | load average {machine['load_average_start']}")
    print(f"matmul peak (2048^3, median of 7): fp32 {peaks['fp32']:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.1f} GFLOP/s; --dtype auto picks "
          f"{pick_dtype('cpu').__repr__().replace('torch.', '')} "
          "(bf16 when the CPU has AMX or AVX512-BF16, else fp32)")
    return machine, peaks


def time_model(model_name: str, args: argparse.Namespace, demos: list[int], kb, mentions, train,
               base_linker, peak: float) -> tuple[list[dict], object]:
    """One row per demonstration count for one model (printed); the first model's linker is
    returned as ``base_linker``, whose fitted retrievers every later model reuses."""
    from gemel.backends.hf import HFBackend
    from gemel.linker import Linker, LinkerConfig

    started = time.perf_counter()
    backend = HFBackend.from_name(model_name, device="cpu", dtype=args.dtype)
    load_s = time.perf_counter() - started
    body = body_parameters(backend.model)
    overrides = {"demos": max(demos), "model": model_name}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    config = replace(LinkerConfig(), **overrides)
    # one fitted retriever pair for every model (sentence embeddings do not depend on the LLM)
    if base_linker is None:
        base_linker = Linker(config, kb, backend, train=train)
        base_linker.get_candidate_retriever()
    trie = Linker(config, kb, backend, train=train, retriever=base_linker.retriever,
                  candidate_retriever=base_linker.candidate_retriever).trie
    cells = []
    for n_demos in demos:
        cell_config = replace(config, demos=n_demos)
        row = {"model": model_name, "demos": n_demos, "load_s": round(load_s, 1),
               "body_params": body, "batch_size": cell_config.batch_size}
        modes = [("pure", False)] + ([] if args.no_fused else [("fused", True)])
        results = {}
        for mode, fused in modes:
            linker = make_linker(base_linker, backend, cell_config, kb, train, trie, fused)
            timed = time_cell(linker, mentions, args.repeats, not args.no_warmup)
            results[mode] = timed["results"]
            row[mode] = cell_figures(timed, backend, body, len(mentions), peak)
        row["load_average"] = load_average()
        cells.append(row)
        print_row(row)
        if n_demos == max(demos) and (args.save_reference or args.check) and "fused" in results:
            row_check = save_or_check_reference(args, reference_rows(results["pure"],
                                                                     results["fused"]))
            if row_check is not None:
                row["check"] = row_check
    return cells, base_linker


def cell_figures(timed: dict, backend, body: int, n: int, peak: float) -> dict:
    """Seconds per mention, phases, prompt tokens, padding and prefill throughput of one cell."""
    flops = prefill_flops(backend.model.config, timed["lengths"], body)
    figures = {"s_per_mention": timed["total"] / n,
               "totals": [round(x, 3) for x in timed["all_totals"]],
               "phases_s_per_mention": {p: v / n for p, v in timed["phases"].items()},
               "prompt_tokens_mean": timed["tokens"] / max(len(timed["lengths"]), 1),
               "padding_share": 1 - timed["tokens"] / max(timed["padded"], 1),
               "prefill_gflops": flops / max(timed["phases"]["prefill"], 1e-9) / 1e9}
    figures["prefill_share_of_peak"] = figures["prefill_gflops"] / peak
    return figures


def save_or_check_reference(args: argparse.Namespace, rows: list[dict]) -> dict | None:
    """Write the reference rows (--save-reference) and/or compare them with one (--check)."""
    if args.save_reference:
        Path(args.save_reference).write_text("".join(json.dumps(r) + "\n" for r in rows),
                                             encoding="utf-8")
        print(f"  reference written: {args.save_reference}")
    if not args.check:
        return None
    ref = [json.loads(x) for x in Path(args.check).read_text().splitlines() if x]
    check = compare(rows, ref, args.tolerance)
    print(f"  check against {args.check}: {check}")
    return check


def print_row(row: dict) -> None:
    for mode in ("pure", "fused"):
        if mode not in row:
            continue
        r = row[mode]
        phases = " ".join(f"{p} {v:.3f}" for p, v in r["phases_s_per_mention"].items())
        print(f"{Path(row['model']).name} demos={row['demos']} {mode}: {r['s_per_mention']:.3f} "
              f"s/mention (repeats {r['totals']} s) | {r['prompt_tokens_mean']:.0f} prompt tokens, "
              f"padding {100 * r['padding_share']:.0f}% | prefill {r['prefill_gflops']:.1f} GFLOP/s | "
              f"{phases} | load {row['load_average']}", flush=True)


def print_table(cells: list[dict], peak: float, machine: dict) -> None:
    head = ("| model | demos | mode | s/mention | prompt tok | pad % | prefill GFLOP/s | % peak | "
            + " | ".join(PHASES) + " |")
    print(f"dtype {machine['dtype']}, CPU flags {' '.join(machine['cpu_flags'])}, torch threads "
          f"{machine['torch_threads']}; phases in s/mention; median of repeats")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in cells:
        for mode in ("pure", "fused"):
            if mode not in row:
                continue
            r = row[mode]
            print(f"| {Path(row['model']).name} | {row['demos']} | {mode} | "
                  f"{r['s_per_mention']:.3f} | {r['prompt_tokens_mean']:.0f} | "
                  f"{100 * r['padding_share']:.0f} | {r['prefill_gflops']:.1f} | "
                  f"{100 * r['prefill_share_of_peak']:.0f} | "
                  + " | ".join(f"{r['phases_s_per_mention'][p]:.3f}" for p in PHASES) + " |")


def targets(cells: list[dict], peak: float) -> list[str]:
    out = []
    for row in cells:
        key = (target_key(row["model"]), row["demos"])
        name = f"{Path(row['model']).name} {row['demos']}-shot"
        pure = row["pure"]
        out.append(f"target prefill >= {TARGET_PREFILL_SHARE:.0%} of peak, {name}: "
                   + verdict(pure["prefill_share_of_peak"], TARGET_PREFILL_SHARE, False))
        if key in TARGET_S_PER_MENTION:
            out.append(f"target s/mention, {name}: "
                       + verdict(pure["s_per_mention"], TARGET_S_PER_MENTION[key]))
        if "fused" in row:
            out.append(f"target fused <= {TARGET_FUSED_RATIO}x pure, {name}: "
                       + verdict(row["fused"]["s_per_mention"] / pure["s_per_mention"],
                                 TARGET_FUSED_RATIO))
    return out


if __name__ == "__main__":
    main()
