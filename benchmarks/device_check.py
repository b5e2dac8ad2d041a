"""GPU check: the same linking run in fp32 and bf16 on an accelerator, against a CPU reference,
plus linking throughput for larger model shapes.

    python benchmarks/device_check.py --kb runs/wd_kb.jsonl --train runs/wd_train.jsonl \
        --mentions runs/wd_test_p1.jsonl --model smollm2-135m-instruct \
        --reference runs/cpu_bm25_4.jsonl --out runs/device_check

1. Links ``--mentions`` with ``--model`` (real weights) on ``--device`` in fp32 and in bf16 (4 bm25
   demonstrations, GEMEL template, 5 beams): H@1 / H@5, seconds per mention, every candidate a
   KB title, and the share of mentions whose top-1 agrees between the two dtypes and with a
   reference predictions file (e.g. the same settings on the CPU in fp32).
2. ``--shapes``: builds randomly initialised LLaMA-shaped models of the given sizes (SmolLM2's
   tokenizer, bf16, on the device) and links ``--shape-limit`` mentions with each: **timing
   only** — random weights give meaningless answers, but the work per mention (prompt length,
   beams, trie-constrained steps up to the terminator or ``max_new_tokens``) is that of a real run.
Prints one JSON object and writes it to ``<out>/device_check.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# LLaMA-style shapes (hidden, intermediate, layers, heads, kv heads): SmolLM2-1.7B and Llama-2-7B
# ("tiny": a smoke test of this script on a CPU)
SHAPES = {"tiny": (64, 128, 2, 4, 2), "1.7b": (2048, 8192, 24, 32, 32), "7b": (4096, 11008, 32, 32, 32)}


def top1(rows) -> dict:
    return {r["id"]: (r["candidates"][0]["entity_id"] if r["candidates"] else None) for r in rows}


def agreement(a: dict, b: dict) -> float:
    shared = [k for k in a if k in b]
    return round(100.0 * sum(a[k] == b[k] for k in shared) / max(len(shared), 1), 2)


def link_timed(linker, mentions, out_path: Path) -> tuple[list[dict], float]:
    import torch

    linker.link(mentions[:linker.config.batch_size])  # warm-up: kernels, allocator, caches
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    rows = [r.to_json() for r in linker.link(mentions)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows, seconds


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kb", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--mentions", required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--demos", type=int, default=4)
    ap.add_argument("--retriever", default="bm25")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--reference", default=None, help="predictions JSONL to compare top-1 with")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--shapes", nargs="*", default=[], choices=sorted(SHAPES))
    ap.add_argument("--shape-limit", type=int, default=64)
    ap.add_argument("--out", default="runs/device_check")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    from gemel.data import read_mentions
    from gemel.kb import KnowledgeBase

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kb = KnowledgeBase.from_jsonl(args.kb)
    train = read_mentions(args.train)
    mentions = read_mentions(args.mentions, limit=args.limit)
    report = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device,
              "torch": torch.__version__, "mentions": len(mentions), "model": args.model,
              "demos": args.demos, "retriever": args.retriever, "batch_size": args.batch_size}
    settings = dict(model=args.model, device=args.device, demos=args.demos,
                    retriever=args.retriever, batch_size=args.batch_size, num_beams=5, top_k=5)
    report.update(check_dtypes(args, kb, train, mentions, settings, out))
    for name in args.shapes:
        report[f"shape_{name}"] = time_shape(name, args, kb, train, mentions[:args.shape_limit],
                                             settings, out)
    (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


def check_dtypes(args: argparse.Namespace, kb, train, mentions, settings: dict, out: Path) -> dict:
    """Link with the real model in each dtype: H@k, seconds per mention, every candidate a KB
    title; top-1 agreement between the dtypes and with the reference file."""
    import torch

    from gemel.eval.metrics import hits_at_k
    from gemel.linker import Linker
    from gemel.runs import read_done

    titles = set(kb.titles)
    report, firsts = {}, {}
    for dtype in args.dtypes:
        linker = Linker.from_config(kb=kb, train=train, dtype=dtype, **settings)
        rows, seconds = link_timed(linker, mentions, out / f"pred_{dtype}.jsonl")
        firsts[dtype] = top1(rows)
        report[dtype] = {**hits_at_k(rows, (1, 5)), "s_per_mention": round(seconds / len(rows), 4),
                         "all_candidates_kb_titles": all(c["title"] in titles for r in rows
                                                         for c in r["candidates"])}
        print(dtype, json.dumps(report[dtype]), flush=True)
        del linker
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if len(firsts) == 2:
        a, b = firsts.values()
        report["top1_agreement_between_dtypes"] = agreement(a, b)
    if args.reference:
        ref = top1(read_done(Path(args.reference)).values())
        report["top1_agreement_with_reference"] = {d: agreement(f, ref) for d, f in firsts.items()}
    return report


def time_shape(name: str, args: argparse.Namespace, kb, train, shaped, settings: dict,
               out: Path) -> dict:
    """Linking time of a randomly initialised LLaMA of the shape ``name`` (bf16, on the device)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gemel.backends.hf import HFBackend
    from gemel.linker import Linker, LinkerConfig
    from gemel.sources import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    config = LinkerConfig(**{**settings, "model": "random-shape", "dtype": "bf16"})
    hidden, inter, layers, heads, kv = SHAPES[name]
    llama_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                               intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv,
                               max_position_embeddings=8192, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(llama_config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    linker = Linker(config, kb, HFBackend(model, tokenizer, args.device), train=train)
    rows, seconds = link_timed(linker, shaped, out / f"shape_{name}.jsonl")
    figures = {"parameters_b": round(params / 1e9, 2), "mentions": len(rows),
               "s_per_mention": round(seconds / len(rows), 4),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
               if torch.cuda.is_available() else None}
    print(name, json.dumps(figures), flush=True)
    del linker, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return figures


if __name__ == "__main__":
    main()
