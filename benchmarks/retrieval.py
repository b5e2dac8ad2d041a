"""Benchmark: demonstration index build and query time on the WikiDiverse train mentions.

    python benchmarks/retrieval.py                     # simcse (offline MiniLM) and bm25
    python benchmarks/retrieval.py --model princeton-nlp/sup-simcse-roberta-large --device cuda

Reads ``<data>/wikidiverse/WikiDiverse.json`` and ``splits.json`` with plain ``json`` (one
demonstration per mention: sentence + mention + entity), keeps the train sentences that are in
no val/test split, and times for each retriever:
  * build, cold: ``fit`` with an empty cache (for simcse this includes loading the model);
  * build, warm: a fresh retriever's ``fit`` finding the cached index (simcse only; a hybrid
    run after simcse finds simcse's cache too, so its "cold" build is not cold);
  * query, train: ``query_batch`` over every train mention, k demonstrations each (what mapper
    training needs; simcse reuses the indexed vectors of these texts);
  * query, test: ``query_batch`` over the test mentions (simcse embeds these texts).
Prints one JSON object; ``--out`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from gemel.retrieval import get_retriever
from gemel.types import Mention

REPO = Path(__file__).resolve().parents[1]


def load_wikidiverse(folder: Path) -> dict[str, list[Mention]]:
    """Mentions per split; train without the sentences that also sit in val or test."""
    records = json.loads((folder / "WikiDiverse.json").read_text())
    splits = json.loads((folder / "splits.json").read_text())
    by_id = {int(r["id"]): r for r in records}
    held_out = {int(i) for name in ("val", "test") for i in splits[name]}
    out: dict[str, list[Mention]] = {}
    for name in ("train", "val", "test"):
        ids = [int(i) for i in splits[name]]
        if name == "train":
            ids = [i for i in ids if i not in held_out]
        mentions = []
        for sid in ids:
            r = by_id[sid]
            for j, (words, title, qid) in enumerate(zip(r["mention"], r["entity"], r["answer"])):
                mentions.append(Mention(id=f"{sid}-{j}", text=r["sentence"], mention=words,
                                        entity=title, entity_id=qid))
        out[name] = mentions
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench(name: str, options: dict, train, test, k: int) -> dict:
    row: dict = {"retriever": name, "options": {o: str(v) for o, v in options.items()}}
    retriever, row["build_cold_s"] = timed(lambda: get_retriever(name, **options).fit(train))
    if name == "simcse":
        again, row["build_warm_s"] = timed(lambda: get_retriever(name, **options).fit(train))
        if not again.index.loaded_from_cache:
            raise RuntimeError("the warm build did not find the cached index")
        row["unique_texts"] = len(again.index.vectors)
    retriever.query_batch([Mention(id="warm-up", text="warm-up", mention="warm-up")], k)
    # (keeps a lazy model load out of the query times below)
    demos, seconds = timed(lambda: retriever.query_batch(train, k))
    row["query_train_total_s"] = seconds
    row["query_train_ms_per_mention"] = 1000 * seconds / len(train)
    test_demos, seconds = timed(lambda: retriever.query_batch(test, k))
    row["query_test_total_s"] = seconds
    row["query_test_ms_per_mention"] = 1000 * seconds / len(test)
    # the rule holds on real data: nobody is their own demonstration
    assert all(d.mention.id != m.id and (d.mention.mention, d.mention.text) != (m.mention, m.text)
               for m, ds in zip(train, demos) for d in ds)
    row["example"] = {"query": f"{train[0].mention} | {train[0].text}",
                      "top3": [f"{d.mention.mention} -> {d.mention.entity} ({d.similarity:.3f})"
                               for d in demos[0][:3]]}
    # a rough quality indication: how often a demonstration already carries the gold entity
    row["test_gold_entity_in_top1"] = sum(bool(ds) and ds[0].mention.entity_id == m.entity_id
                                          for m, ds in zip(test, test_demos)) / len(test)
    row[f"test_gold_entity_in_top{k}"] = sum(any(d.mention.entity_id == m.entity_id for d in ds)
                                             for m, ds in zip(test, test_demos)) / len(test)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("GEMEL_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--retrievers", default="simcse,bm25",
                        help="comma-separated: simcse, bm25, random, hybrid")
    parser.add_argument("--model", default="minilm-l6-v2")
    parser.add_argument("--field", default="mention", help="what simcse and bm25 index")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    folder = args.data / "wikidiverse"
    if not (folder / "WikiDiverse.json").is_file():
        print(f"WikiDiverse not found under {folder} (set GEMEL_DATA or --data)", file=sys.stderr)
        raise SystemExit(2)
    splits = load_wikidiverse(folder)
    train, test = splits["train"], splits["test"]
    import torch

    report = {"data": {"train_mentions": len(train), "test_mentions": len(test),
                       "train_sentences": len({m.text for m in train})},
              "k": args.k, "machine": {"cpu_count": os.cpu_count(), "torch_threads":
                                       torch.get_num_threads(), "python": platform.python_version(),
                                       "cuda": torch.cuda.is_available(),
                                       "load_average_at_start": os.getloadavg()},
              "results": []}
    with tempfile.TemporaryDirectory() as tmp:  # cold means cold: a fresh cache every run
        for name in args.retrievers.split(","):
            simcse = {"model": args.model, "field": args.field, "cache_dir": Path(tmp),
                      "batch_size": args.batch_size, "device": args.device}
            options = {"simcse": simcse, "bm25": {"field": args.field},
                       "hybrid": {"options": {"simcse": simcse, "bm25": {"field": args.field}}},
                       }.get(name, {})
            report["results"].append(bench(name, options, train, test, args.k))
    report["machine"]["load_average_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
