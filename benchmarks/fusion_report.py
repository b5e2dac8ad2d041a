"""Fused ranking vs pure generation vs the non-LLM baseline, on exactly the mentions linked so far.

    python benchmarks/fusion_report.py --kb runs/wd_kb.jsonl --train runs/wd_train.jsonl \
        --mentions runs/wd_test.jsonl --pred runs/fused_p1.jsonl runs/fused_p2.jsonl --first 300

Reads prediction files of ``gemel link --fusion`` (each row keeps pure generation's ranking under
``generated``), takes the mentions they cover (a run may still be going), and scores the
baseline (train prior > exact title/alias > MiniLM nearest title) on the same mentions, so that
the three numbers always sit on one set. ``--first N`` also reports the first N mentions of
``--mentions`` on their own. ``--refit F.json`` ranks the kept candidate pools again with another
fusion model (e.g. one fitted on more dev mentions) instead of the run's own: no LLM pass.
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kb", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--mentions", required=True, help="all mentions, in order (for --first)")
    ap.add_argument("--pred", nargs="+", required=True)
    ap.add_argument("--first", type=int, default=None)
    ap.add_argument("--refit", default=None, help="a fusion model to rerank the kept pools with")
    args = ap.parse_args()

    from gemel.data import read_mentions
    from gemel.eval.baselines import combo_baseline
    from gemel.eval.metrics import generation_rows, hits_at_k
    from gemel.kb import KnowledgeBase
    from gemel.runs import read_done
    from pathlib import Path

    kb = KnowledgeBase.from_jsonl(args.kb)
    train = read_mentions(args.train)
    mentions = read_mentions(args.mentions)
    done: dict[str, dict] = {}
    for path in args.pred:
        done.update(read_done(Path(path)))
    if args.refit:
        from gemel.fusion import rerank
        from gemel.rerank import FusionModel

        model = FusionModel.load(args.refit)
        done = {i: rerank(r, model, k=max(len(r["candidates"]), 5), where=args.refit)
                for i, r in done.items()}
        print(f"fused = the kept pools reranked by {args.refit}")
    sets = {"all linked": [m for m in mentions if m.id in done]}
    if args.first:
        first = mentions[:args.first]
        if all(m.id in done for m in first):
            sets[f"first {args.first}"] = first
    baseline = {r.mention_id: r.to_json() for r in combo_baseline(kb, train, sets["all linked"])}
    print(f"{'mentions':<14} {'n':>5} | {'fused H@1':>9} {'H@5':>6} | {'generation H@1':>14} {'H@5':>6} | "
          f"{'baseline H@1':>12} {'H@5':>6}")
    for name, ms in sets.items():
        rows = [done[m.id] for m in ms]
        fused, gen = hits_at_k(rows, (1, 5)), hits_at_k(generation_rows(rows), (1, 5))
        base = hits_at_k([baseline[m.id] for m in ms], (1, 5))
        print(f"{name:<14} {fused['n']:>5} | {fused['H@1']:>9.2f} {fused['H@5']:>6.2f} | "
              f"{gen['H@1']:>14.2f} {gen['H@5']:>6.2f} | {base['H@1']:>12.2f} {base['H@5']:>6.2f}")
    print(f"covered {len(sets['all linked'])} of {len(mentions)} mentions; "
          f"errors {sum(r.get('error') is not None for r in done.values())}")


if __name__ == "__main__":
    main()
