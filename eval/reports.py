"""Real-data baseline reports: ``eval/results/baselines-<dataset>.md`` and ``.json``, made by code.

    python -m gemel.eval.reports wikidiverse --data ../shared/data --out eval/results
    python -m gemel.eval.reports wikimel --data ../shared/data --out eval/results \\
        [--pred "gemel fused=runs/wm_fused.jsonl" ...] [--limit N]   # -> gemel-wikimel[-firstN].md

For one dataset: converts the release (test mentions, train mentions, KB) into ``--work``, runs
the six baselines of :mod:`gemel.eval.baselines` on the test split (the same functions as
``gemel baseline``), times each, and evaluates them, with any ``--pred LABEL=PATH`` prediction
files made on the same test mentions (e.g. `gemel link` runs), by :func:`evaluate_files` (the
same summary as ``gemel eval``). The Markdown states the command that made it; never edit it by
hand, rerun the command.

KBs: WikiDiverse's is every gold entity of the release (all splits), titles only (the release has
no descriptions). WikiMEL gets two: every gold title (no descriptions: dense embeds bare titles),
and the release's name list ``qid2ne.json`` (18,880 entities) with ``qid2abs.json`` attribute
texts as descriptions (dense embeds "title: description").
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gemel.eval.baselines import FIELD, KINDS, run_baseline
from gemel.eval.measure import CPU_FLAGS
from gemel.eval.summary import METRICS, evaluate_files, format_p, read_predictions, write_json

#: figures the team measured before these reports (issue 12): KB = all gold titles, test split
REFERENCE = {"wikidiverse": {"combo": {"H@1": 87.9, "H@5": 94.2}, "dense": {"H@1": 83.5, "H@5": 91.3},
                             "exact": {"H@1": 49.4}},
             "wikimel": {"combo": {"H@1": 83.4, "H@5": 94.6}, "dense": {"H@1": 80.8}}}


@dataclass
class KBSpec:
    name: str
    note: str
    convert: dict = field(default_factory=dict)  # extra arguments of gemel.data.convert


@dataclass
class Dataset:
    folder: str
    release: str
    train_split: str
    kbs: list[KBSpec]


def _datasets(data: Path) -> dict[str, Dataset]:
    wm = data / "wikimel"
    return {
        "wikidiverse": Dataset("wikidiverse", "WikiDiverse.json", "train", [
            KBSpec("gold", "every gold entity of the release (all splits), titles only: the "
                   "release has no descriptions, so dense embeds bare titles")]),
        "wikimel": Dataset("wikimel", "WikiMEL.json", "train", [
            KBSpec("gold", "every gold entity of the release (all splits), titles only (no "
                   "descriptions): dense embeds bare titles"),
            KBSpec("names", "qid2ne.json names (18,880 entities) with qid2abs.json attribute "
                   "texts as descriptions: dense embeds \"title: description\"",
                   {"kb_from": "names", "qid2ne": wm / "qid2ne.json", "qid2abs": wm / "qid2abs.json"})]),
    }


def cpu_flags() -> str:
    from gemel.eval.measure import cpu

    return " ".join(cpu()["flags"]) or f"none of {', '.join(CPU_FLAGS)}"


def build(dataset: str, data: Path, work: Path, limit: int | None, preds: list[str],
          sentence_model: str, k: int, kbs: list[str] | None = None, reuse: bool = False) -> dict:
    """Run every baseline on the dataset's test split; returns the report dict (also the JSON)."""
    from gemel.data import convert, read_mentions
    from gemel.kb import KnowledgeBase

    spec = _datasets(data)[dataset]
    src = data / spec.folder / spec.release
    splits = data / spec.folder / "splits.json"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    test = read_mentions(src, split="test", splits_path=splits, limit=limit)
    train = read_mentions(src, split=spec.train_split, splits_path=splits)
    files: list[tuple[str, list[dict]]] = []
    runs: list[dict] = []
    kb_notes: list[dict] = []
    first_kb = None
    from gemel.eval.baselines import MemoEncoder
    from gemel.retrieval.encoder import SentenceEncoder

    encoder = MemoEncoder(SentenceEncoder(sentence_model))  # query texts embedded once for all
    chosen = [b for b in spec.kbs if kbs is None or b.name in kbs]
    if not chosen:
        raise SystemExit(f"--kbs {kbs}: {dataset} has the KBs {[b.name for b in spec.kbs]}")
    for kb_spec in chosen:
        kb_path = work / f"kb-{kb_spec.name}.jsonl"
        convert(src, work / "all.jsonl", kb_path, **kb_spec.convert)
        kb = KnowledgeBase.from_jsonl(kb_path)
        first_kb = kb if first_kb is None else first_kb
        kb_notes.append({"name": kb_spec.name, "entities": len(kb),
                         "with_description": sum(bool(e.description) for e in kb),
                         "note": kb_spec.note, "path": str(kb_path)})
        retrievers: dict = {}  # one KB index per KB, shared by the dense-backed kinds
        for kind in KINDS:
            label = kind if len(chosen) == 1 else f"{kind} (KB {kb_spec.name})"
            path = work / f"{kind}-{kb_spec.name}.jsonl"
            seconds = None
            rows = _reusable(path, test, k) if reuse else None
            if rows is None:
                t0 = time.perf_counter()
                rows = [r.to_json() for r in run_baseline(kind, kb, test, train, k,
                                                          sentence_model, retrievers, encoder)]
                seconds = round(time.perf_counter() - t0, 1)
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                encoding="utf-8")
            files.append((label, rows))
            runs.append({"label": label, "kind": kind, "kb": kb_spec.name,
                         "seconds": seconds,
                         "query": _query(kind, kb_notes[-1]["with_description"] > 0),
                         "predictions": str(path)})
    for item in preds:
        label, _, path = item.rpartition("=")
        files.append((label or path, read_predictions(path)))
        side, timing = _sidecar(path), _run_timing(path)
        runs.append({"label": label or path, "kind": "predictions", "predictions": path,
                     "seconds": timing and round(timing["seconds"], 1),
                     "about": side.get("about", {}),
                     "settings": side.get("identity", {}).get("settings", {})})
    # seen/unseen and mention = title against the first KB's titles (the gold titles)
    result = evaluate_files(files, test, train=train, kb=first_kb)
    baselines = [e for e, r in zip(result["files"], runs) if r["kind"] in KINDS]
    best = max(baselines, key=lambda e: (e["H@1"], e["MRR"]))
    return {"dataset": dataset, "split": "test", "limit": limit, "mentions": len(test),
            "train_mentions": len(train), "kbs": kb_notes, "runs": runs,
            "strongest_baseline": best["path"], "reference": REFERENCE.get(dataset, {}),
            "sentence_model": sentence_model, "dtype": "fp32", "top_k": k,
            "cpu_flags": cpu_flags(), "machine": platform.machine(),
            "seconds_total": round(time.perf_counter() - t_start, 1), **result}


def _sidecar(path: str) -> dict:
    from gemel.runs import sidecar_path

    try:
        return json.loads(sidecar_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _run_timing(path: str) -> dict | None:
    """The linking time a `gemel link` run recorded in its sidecar (over all its resumes)."""
    timing = _sidecar(path).get("timing")
    return timing if isinstance(timing, dict) and "seconds" in timing else None


def _reusable(path: Path, test, k: int) -> list[dict] | None:
    """With --reuse: the rows an earlier run of this command left in the work folder, when they
    cover exactly these test mentions in order with at most k candidates (else None: rerun)."""
    if not path.is_file():
        return None
    rows = read_predictions(path)
    if [r["id"] for r in rows] != [m.id for m in test] or any(len(r["candidates"]) > k
                                                               for r in rows):
        return None
    return rows


def _query(kind: str, described: bool) -> str:
    if kind == "exact":
        return "mention string vs titles and aliases (case-insensitive)"
    if kind == "prior":
        return "mention string (casefolded) vs train mentions"
    text = "mention" if FIELD[kind] == "mention" else "mention. sentence"
    target = '"title: description"' if described else "bare titles"
    return f'"{text}" vs {target} (MiniLM cosine)'


# ---- Markdown --------------------------------------------------------------------------------------

def _ci(block: dict, metric: str) -> str:
    v = block.get(metric)
    if v is None:
        return "-"
    lo, hi = block["ci95"][metric]
    return f"{v:.1f} [{lo:.1f}, {hi:.1f}]"


def markdown(report: dict, command: str) -> str:
    """The report as markdown: header, KBs, results, seen/unseen, paired tests, earlier figures."""
    files = {e["path"]: e for e in report["files"]}
    best = report["strongest_baseline"]
    lines = (_md_header(report, command, files, best) + _md_results(report, files, best)
             + _md_seen(report, files) + _md_paired(report, best) + _md_reference(report, files))
    return "\n".join(lines) + "\n"


def _md_header(report: dict, command: str, files: dict, best: str) -> list[str]:
    title = ("gemel and the baselines" if any(r["kind"] == "predictions" for r in report["runs"])
             else "Baselines")
    lines = [f"# {title} on {report['dataset']} {report['split']}",
             "", "Generated by code — do not edit; rerun:", "", "```bash", command, "```", "",
             f"- mentions scored: {files[best]['n']} of {report['mentions']} test mentions"
             + (f" (first {report['limit']} only)" if report["limit"] else " (the full test split)")
             + f"; train mentions (prior, seen/unseen): {report['train_mentions']}",
             f"- **strongest baseline: {best}** — H@1 {_ci(files[best], 'H@1')}, "
             f"H@5 {_ci(files[best], 'H@5')}",
             f"- sentence model: {report['sentence_model']} ({report['dtype']}, CPU; flags: "
             f"{report['cpu_flags']}); top {report['top_k']} candidates per mention",
             f"- time: {report['seconds_total']:.0f} s in all (upper bounds: a CPU shared with other "
             "jobs). Per run below: a KB's first dense kind embeds the KB (or reads it from the "
             "on-disk cache), and each query text is embedded once for all kinds and KBs, so "
             "later kinds reuse earlier embeddings"
             + ("; \"reused\": predictions an earlier run of this command left in its work "
                "folder (--reuse), not timed again" if any(
                    r.get("seconds") is None and "kb" in r for r in report["runs"]) else ""), ""]
    lines += ["## KBs", ""]
    for kb in report["kbs"]:
        lines.append(f"- `{kb['name']}`: {kb['entities']} entities, {kb['with_description']} with a "
                     f"description — {kb['note']}")
    return lines


def _md_results(report: dict, files: dict, best: str) -> list[str]:
    lines = ["", "## Results (95% bootstrap intervals, 1,000 resamples)", "",
             "| run | query | n | H@1 | H@3 | H@5 | H@10 | MRR | seconds |",
             "| --- | --- | ---: | --- | --- | --- | --- | --- | ---: |"]
    for run in report["runs"]:
        e = files[run["label"]]
        name = f"**{run['label']}**" if run["label"] == best else run["label"]
        seconds = run.get("seconds")
        lines.append(f"| {name} | {run.get('query', 'predictions file')} | {e['n']} | "
                     + " | ".join(_ci(e, m) for m in METRICS)
                     + f" | {'reused' if seconds is None and 'kb' in run else seconds or ''} |")
        if "generation" in e:  # a fused run: its pure generation ranking, same mentions
            lines.append(f"| {run['label']}: pure generation | the fused run's `generated` | "
                         f"{e['generation']['n']} | "
                         + " | ".join(_ci(e["generation"], m) for m in METRICS) + " | |")
    for run in (r for r in report["runs"] if r["kind"] == "predictions"):
        # what made it (model, dtype ... even at their defaults), then the non-default settings
        settings = ", ".join(f"{k}={json.dumps(v) if isinstance(v, dict) else v}"
                             for k, v in [*run.get("about", {}).items(),
                                          *sorted(run.get("settings", {}).items())])
        lines.append("")
        lines.append(f"`{run['label']}`: {run['predictions']}" + (f" — {settings}" if settings else "")
                     + (f"; linking took {run['seconds']:.0f} s" if run.get("seconds") else ""))
    return lines


def _md_seen(report: dict, files: dict) -> list[str]:
    lines = ["", "## Seen / unseen gold entity, mention = gold title (H@1)", "",
             "seen: the gold entity is the gold of some train mention. mention = title: the "
             "mention string equals the gold title, case-insensitive.", "",
             "| run | seen | unseen | mention = title | mention != title |",
             "| --- | --- | --- | --- | --- |"]
    for run in report["runs"]:
        e = files[run["label"]]
        cells = [f"{_ci(e[s], 'H@1')} (n={e[s]['n']})" if s in e else "-"
                 for s in ("seen", "unseen", "title_match", "title_mismatch")]
        lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    return lines


def _md_paired(report: dict, best: str) -> list[str]:
    """Paired bootstrap tables: each run against the strongest baseline; fused against its own
    pure generation."""
    lines = []
    pairs = [p for p in report["paired"] if best in (p["a"], p["b"]) and p["diff"] is not None]
    if pairs:
        lines += ["", f"## Paired bootstrap against the strongest ({best}), H@1", "",
                  "| other | other - strongest (points) | 95% interval | p |",
                  "| --- | ---: | --- | ---: |"]
        for p in pairs:
            other, sign = (p["a"], -1) if p["b"] == best else (p["b"], 1)
            lo, hi = sorted((sign * p["lo"], sign * p["hi"]))
            lines.append(f"| {other} | {sign * p['diff']:+.2f} | [{lo:+.2f}, {hi:+.2f}] | "
                         f"{format_p(p['p'], report['n_resamples']).lstrip('=')} |")
    own = [p for p in report["paired"] if p["a"].endswith(" (generation)") and p["diff"] is not None]
    if own:
        lines += ["", "## Fused ranking against its own pure generation, H@1 (paired bootstrap)", "",
                  "| run | fused - generation (points) | 95% interval | p |",
                  "| --- | ---: | --- | ---: |"]
        for p in own:
            lines.append(f"| {p['b']} | {p['diff']:+.2f} | [{p['lo']:+.2f}, {p['hi']:+.2f}] | "
                         f"{format_p(p['p'], report['n_resamples']).lstrip('=')} |")
    return lines


def _md_reference(report: dict, files: dict) -> list[str]:
    ref = report["reference"]
    if not ref:
        return []
    lines = ["", "## Against the team's earlier figures (KB = all gold titles)", "",
             "| kind | metric | earlier | here | difference |", "| --- | --- | ---: | ---: | ---: |"]
    first = report["kbs"][0]["name"]
    for kind, metrics in ref.items():
        label = kind if len(report["kbs"]) == 1 else f"{kind} (KB {first})"
        for metric, value in metrics.items():
            here = files[label][metric]
            lines.append(f"| {kind} | {metric} | {value:.1f} | {here:.2f} | {here - value:+.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:  # Markdown again from a report's JSON (no recomputation)
        for path in argv[1:]:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
            Path(path).with_suffix(".md").write_text(markdown(report, report["command"]),
                                                     encoding="utf-8")
            print(f"rendered {Path(path).with_suffix('.md')}")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="python -m gemel.eval.reports --render REPORT.json ...: "
                                 "write the Markdown again from a report's JSON")
    ap.add_argument("dataset", choices=["wikidiverse", "wikimel"])
    ap.add_argument("--data", default="../shared/data", help="folder of the public releases")
    ap.add_argument("--out", default="eval/results", help="where the .md and .json go")
    ap.add_argument("--work", default=None, help="converted data and predictions [runs/reports/DATASET]")
    ap.add_argument("--limit", type=int, default=None, help="only the first N test mentions")
    ap.add_argument("--pred", action="append", default=[],
                    help="LABEL=PATH: a predictions file on the same test mentions, as another row")
    ap.add_argument("--sentence-model", default="minilm-l6-v2")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--name", default=None,
                    help="file name stem [baselines-DATASET, or gemel-DATASET with --pred; "
                    "-firstN added with --limit]")
    ap.add_argument("--kbs", default=None, help="comma-separated KB names to run [all of the dataset's]")
    ap.add_argument("--reuse", action="store_true",
                    help="take a baseline's predictions from --work when an earlier run left them "
                    "complete (shown as 'reused', not timed)")
    args = ap.parse_args(argv)
    command = "python -m gemel.eval.reports " + " ".join(shlex.quote(a) for a in argv)
    work = Path(args.work or f"runs/reports/{args.dataset}")
    report = build(args.dataset, Path(args.data), work, args.limit, args.pred,
                   args.sentence_model, args.top_k,
                   kbs=args.kbs.split(",") if args.kbs else None, reuse=args.reuse)
    report["command"] = command
    out = Path(args.out)
    name = args.name or f"{'gemel' if args.pred else 'baselines'}-{args.dataset}"
    stem = out / (name + (f"-first{args.limit}" if args.limit and not args.name else ""))
    write_json(report, stem.with_suffix(".json"))
    stem.with_suffix(".md").write_text(markdown(report, command), encoding="utf-8")
    print(f"strongest baseline: {report['strongest_baseline']}; wrote {stem}.md and .json "
          f"in {report['seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
