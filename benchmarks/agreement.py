"""How far two prediction files of the same mentions agree (e.g. ``--backend hf`` vs ``vllm``):
top-1 equal, the top-1 score gap where it is, and whether every candidate is a KB title.

    python benchmarks/agreement.py runs/wd_hf.jsonl runs/wd_vllm.jsonl --kb runs/wd_kb.jsonl

Prints one JSON object; exits 1 when the files hold different mentions (by id, in order).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemel.eval.metrics import top1_agreement


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="predictions JSONL (the reference, e.g. --backend hf)")
    ap.add_argument("b", help="predictions JSONL of the same mentions (e.g. --backend vllm)")
    ap.add_argument("--kb", help="KB JSONL: count candidates whose title is not a KB title")
    args = ap.parse_args()
    a, b = read_rows(args.a), read_rows(args.b)
    if [r["id"] for r in a] != [r["id"] for r in b]:
        sys.exit(f"{args.a} and {args.b} do not hold the same mentions in the same order")
    report = top1_agreement(a, b)
    report["errors"] = [sum(1 for r in rows if r.get("error")) for rows in (a, b)]
    if args.kb:
        titles = {json.loads(line)["title"] for line in
                  Path(args.kb).read_text(encoding="utf-8").splitlines() if line.strip()}
        report["candidates_not_in_kb"] = [sum(c["title"] not in titles for r in rows
                                              for c in r["candidates"]) for rows in (a, b)]
        report["mentions_without_candidates"] = [sum(not r["candidates"] for r in rows)
                                                 for rows in (a, b)]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
