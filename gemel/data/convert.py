"""convert: a public release -> our mentions JSONL (+ a KB JSONL), with a summary of counts."""
from __future__ import annotations

import os
from pathlib import Path

from gemel.data.kbsources import build_kb, kb_from_mimic, kb_from_names, load_descriptions
from gemel.data.native import write_mentions
from gemel.data.read import read_release
from gemel.errors import DataError
from gemel.kb import KnowledgeBase


def convert(src: str | os.PathLike, out_mentions: str | os.PathLike,
            out_kb: str | os.PathLike | None = None, fmt: str = "auto", split: str | None = None,
            splits_path: str | os.PathLike | None = None,
            images_dir: str | os.PathLike | None = None, kb_from: str = "gold",
            qid2ne: str | os.PathLike | None = None, qid2abs: str | os.PathLike | None = None,
            kb_entity: str | os.PathLike | None = None, qid2id: str | os.PathLike | None = None,
            limit: int | None = None, nil: str = "keep", on_bad: str = "raise") -> dict:
    """Write the selected mentions of ``src`` as our JSONL, and a KB JSONL when ``out_kb`` is given.

    The KB is built from *every* record of ``src``, whatever ``split``/``limit`` select: a KB made
    from the test split's answers alone would hand the model the answer set.
    ``kb_from``: "gold" (the gold QIDs and titles), "names" (``qid2ne``, or for MIMIC-shaped files
    ``kb_entity`` + ``qid2id``, found beside ``src`` when not given) or "both".
    ``qid2abs`` gives descriptions. ``on_bad``: "raise" or "skip" (bad records left out and
    counted as ``bad_records``). Returns the counts (mentions, NIL, images, KB size ...).
    """
    src = Path(src)
    if on_bad not in ("raise", "skip"):
        raise DataError(f"on_bad must be 'raise' or 'skip' here, not {on_bad!r}", field="on_bad")
    mentions, report = read_release(src, fmt, split, splits_path, images_dir, limit, nil,
                                    on_bad=on_bad)
    n = write_mentions(mentions, out_mentions)
    summary = {"source": str(src), "format": report.format, "split": split,
               "records": report.records, "mentions": n, "nil": report.nil,
               "image_records": report.image_records, "images_found": report.images_found, "images_missing": report.images_missing,
               "images_dir": report.images_dir,
               "split_ids": report.split_ids, "split_ids_absent": report.split_ids_absent,
               "dropped_overlap": report.dropped_overlap, "empty_records": report.empty_records,
               "bad_records": report.bad.to_json(),
               "out_mentions": str(out_mentions)}
    if out_kb is None:
        return summary

    if split is None and limit is None and nil == "keep":
        every = mentions
    else:
        every, _ = read_release(src, report.format, find_images=False, on_bad=on_bad)
    names = None
    if qid2ne is not None:
        names = kb_from_names(qid2ne, qid2abs)
    elif report.format in ("mimic", "vpwiki"):
        kb_entity = kb_entity or _beside(src, "kb_entity.json")
        qid2id = qid2id or _beside(src, "qid2id.json")
        if kb_entity is not None:
            names = kb_from_mimic(kb_entity, qid2id)
    if kb_from != "gold" and names is None:
        raise DataError(f"kb_from={kb_from!r} needs the KB's names", path=src, field="kb_from",
                        fix="pass qid2ne= (CLI --qid2ne), or use kb_from='gold'")
    descriptions = load_descriptions(qid2abs) if qid2abs is not None else None
    entities, counts = build_kb(every, kb_from, names, descriptions)
    kb = KnowledgeBase.from_entities(entities)
    kb.write_jsonl(out_kb)
    summary.update({f"kb_{k}" if not k.startswith("kb_") else k: v for k, v in counts.items()})
    summary["kb_fingerprint"] = kb.fingerprint
    summary["out_kb"] = str(out_kb)
    return summary


def _beside(src: Path, name: str) -> Path | None:
    p = src.parent / name
    return p if p.is_file() else None
