"""The one evaluation summary: what `gemel eval` prints and writes, and `gemel link` prints at the end.

For each predictions file (docs/architecture.md "Predictions JSONL"), over the mentions that
have a gold entity (and, in NIL mode, the NIL ones):

* n, errors (failed rows, counted as misses), H@1/3/5/10 and MRR in percent, each with a 95%
  percentile-bootstrap interval (``ci95``). MRR is over the listed candidates: 0 when the gold
  is not among them.
* ``seen`` / ``unseen``: the gold entity is / is not the gold of some training mention (needs the
  training mentions; NIL golds are in neither).
* ``title_match`` / ``title_mismatch``: the mention string equals the gold title, case-insensitive
  (the KB's title when a KB is given, else the data's ``entity`` field).
* ``candidate_recall``: runs with ``--candidates C`` flag each row ``in_candidates``: the share of
  mentions whose gold was among the C retrieved titles (an upper bound of H@1).
* ``nil``: NIL mode only: precision and recall of the NIL answer at rank 1.
* ``generation``: fused runs keep pure generation's ranking under ``generated``; the same metrics
  for it, and a paired bootstrap of the fused ranking against it.

With two or more files, ``paired`` holds a paired bootstrap of H@1 for every pair (b - a, over
the mentions both files scored). The dict returned by :func:`evaluate_files` is the stable JSON
contract of ``gemel eval --json`` (README, "gemel eval").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np

from gemel.data.nil import is_nil
from gemel.errors import DataError
from gemel.eval.metrics import bootstrap_interval, generation_rows, paired_bootstrap
from gemel.kb import KnowledgeBase
from gemel.types import Mention

KS = (1, 3, 5, 10)
METRICS = tuple(f"H@{k}" for k in KS) + ("MRR",)
SUBSETS = ("seen", "unseen", "title_match", "title_mismatch")


@dataclass
class Scores:
    """Per scored mention, aligned arrays of length n (the mentions with a gold)."""

    ids: list[str]
    rank: np.ndarray  # int [n]: 1-based rank of the gold among the candidates, 0 when absent
    error: np.ndarray  # bool [n]: the row failed
    gold_nil: np.ndarray  # bool [n]: the gold is NIL (NIL mode)
    top_nil: np.ndarray  # bool [n]: the first candidate is the NIL answer

    def values(self, metric: str) -> np.ndarray:
        """Per-mention values in [0, 1] of ``metric`` ("H@k" or "MRR"), shape [n]."""
        if metric == "MRR":
            return np.where(self.rank > 0, 1.0 / np.maximum(self.rank, 1), 0.0)
        k = int(metric[2:])
        return ((self.rank > 0) & (self.rank <= k)).astype(float)

    def subset(self, mask: np.ndarray) -> "Scores":
        return Scores([i for i, keep in zip(self.ids, mask) if keep], self.rank[mask],
                      self.error[mask], self.gold_nil[mask], self.top_nil[mask])


def read_predictions(path: str | Path) -> list[dict]:
    """Prediction rows of a JSONL file; a torn last line (a run killed while writing) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such predictions file", path=path, fix="check the path")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if n == len(lines):
                continue  # torn last line of a run in progress
            raise DataError(f"not JSON ({err.msg})", path=path, record=f"line {n}",
                            fix="each line must be one prediction object") from err
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("candidates"), list):
            raise DataError("a prediction needs an 'id' and a 'candidates' list", path=path,
                            record=f"line {n}", field="candidates",
                            fix="pass a file written by `gemel link` or `gemel baseline`")
        rid = str(row["id"])
        if rid in seen:
            raise DataError(f"mention id {rid!r} appears twice", path=path, record=f"line {n}",
                            field="id", fix="one line per mention (merge shards without repeats)")
        seen.add(rid)
        rows.append(row)
    return rows


def nil_mode(rows: Sequence[dict]) -> bool:
    """A run made with ``--nil``: it marks NIL golds (``gold_nil``) or answers NIL somewhere."""
    return any(r.get("gold_nil") or any(c.get("entity_id") is None for c in r["candidates"])
               for r in rows)


def score_rows(rows: Sequence[dict], mentions: dict[str, Mention], path: str | Path = "<rows>",
               nil: bool | None = None) -> Scores:
    """Rank of the gold in every row whose mention has a gold (NIL golds only in NIL mode).

    ``mentions``: id -> Mention, the data the predictions were made from; its gold is the truth.
    """
    nil = nil_mode(rows) if nil is None else nil
    ids, rank, error, gold_nil, top_nil = [], [], [], [], []
    for row in rows:
        rid = str(row["id"])
        m = mentions.get(rid)
        if m is None:
            raise DataError(f"prediction for mention {rid!r}, which is not in the mentions",
                            path=path, record=rid, field="id",
                            fix="pass the --data (and --split) the predictions were made from")
        if row.get("gold_id") is not None and row["gold_id"] != m.entity_id:
            raise DataError(f"gold {row['gold_id']!r} in the predictions, {m.entity_id!r} in the "
                            "mentions", path=path, record=rid, field="gold_id",
                            fix="pass the --data the predictions were made from")
        is_gold_nil = nil and is_nil(m)
        if m.entity_id is None and not is_gold_nil:
            continue
        cands = [c.get("entity_id") for c in row["candidates"]]
        ids.append(rid)
        rank.append(cands.index(m.entity_id) + 1 if m.entity_id in cands else 0)
        error.append(row.get("error") is not None)
        gold_nil.append(is_gold_nil)
        top_nil.append(bool(cands) and cands[0] is None)
    return Scores(ids, np.asarray(rank, dtype=np.int64), np.asarray(error, dtype=bool),
                  np.asarray(gold_nil, dtype=bool), np.asarray(top_nil, dtype=bool))


def metrics_block(scores: Scores, n_resamples: int = 1000, seed: int = 0) -> dict:
    """{"n", "errors", "H@1", ..., "MRR", "ci95": {metric: [lo, hi]}}, percent, 2 decimals."""
    n = len(scores.ids)
    out: dict = {"n": n, "errors": int(scores.error.sum())}
    ci: dict = {}
    for metric in METRICS:
        values = scores.values(metric)
        out[metric] = round(100.0 * float(values.mean()), 2) if n else None
        ci[metric] = ([round(x, 2) for x in bootstrap_interval(values, n_resamples=n_resamples,
                                                                seed=seed)] if n else None)
    out["ci95"] = ci
    return out


def _rate(hits: np.ndarray, n_resamples: int, seed: int) -> dict:
    if not len(hits):
        return {"n": 0, "value": None, "ci95": None}
    lo, hi = bootstrap_interval(hits.astype(float), n_resamples=n_resamples, seed=seed)
    return {"n": int(len(hits)), "value": round(100.0 * float(hits.mean()), 2),
            "ci95": [round(lo, 2), round(hi, 2)]}


def _subset_masks(scores: Scores, mentions: dict[str, Mention], train: Sequence[Mention] | None,
                  kb: KnowledgeBase | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    ms = [mentions[i] for i in scores.ids]
    if train is not None:
        train_golds = {m.entity_id for m in train if m.entity_id is not None}
        seen = np.array([m.entity_id in train_golds for m in ms], dtype=bool)
        real = ~scores.gold_nil
        out["seen"], out["unseen"] = seen & real, ~seen & real

    def gold_title(m: Mention) -> str | None:
        if kb is not None and m.entity_id in kb:
            return kb[m.entity_id].title
        return m.entity

    match = np.array([bool(m.mention) and gold_title(m) is not None
                      and m.mention.strip().casefold() == gold_title(m).strip().casefold()
                      for m in ms], dtype=bool)
    real = ~scores.gold_nil
    out["title_match"], out["title_mismatch"] = match & real, ~match & real
    return out


def evaluate_rows(rows: Sequence[dict], mentions: dict[str, Mention], *, path: str = "<rows>",
                  train: Sequence[Mention] | None = None, kb: KnowledgeBase | None = None,
                  n_resamples: int = 1000, seed: int = 0) -> tuple[dict, Scores, Scores | None]:
    """One file's entry of the JSON contract, its Scores, and pure generation's (fused runs)."""
    nil = nil_mode(rows)
    scores = score_rows(rows, mentions, path, nil)
    entry = {"path": path, "rows": len(rows), **metrics_block(scores, n_resamples, seed),
             "max_candidates": max((len(r["candidates"]) for r in rows), default=0)}
    for name, mask in _subset_masks(scores, mentions, train, kb).items():
        entry[name] = metrics_block(scores.subset(mask), n_resamples, seed)
    flags = {str(r["id"]): bool(r["in_candidates"]) for r in rows if "in_candidates" in r}
    if flags:
        entry["candidate_recall"] = _rate(np.array([flags[i] for i in scores.ids if i in flags]),
                                          n_resamples, seed)
    if nil:
        predicted, gold = scores.top_nil, scores.gold_nil
        entry["nil"] = {"gold": int(gold.sum()), "predicted": int(predicted.sum()),
                        "precision": _rate(gold[predicted], n_resamples, seed),
                        "recall": _rate(predicted[gold], n_resamples, seed)}
    generation = None
    if any("generated" in r for r in rows):
        generation = score_rows(generation_rows(rows), mentions, path, nil)
        entry["generation"] = metrics_block(generation, n_resamples, seed)
    return entry, scores, generation


def paired_entry(a: Scores, b: Scores, name_a: str, name_b: str, n_resamples: int = 1000,
                 seed: int = 0, metric: str = "H@1") -> dict:
    """Paired bootstrap of ``metric`` (b - a, points) over the mentions both scored."""
    pos_b = {i: j for j, i in enumerate(b.ids)}
    common = [(j, pos_b[i]) for j, i in enumerate(a.ids) if i in pos_b]
    out = {"a": name_a, "b": name_b, "metric": metric, "n": len(common)}
    if not common:
        return {**out, "diff": None, "lo": None, "hi": None, "p": None}
    ia, ib = (np.array(x) for x in zip(*common))
    res = paired_bootstrap(a.values(metric)[ia], b.values(metric)[ib], n_resamples=n_resamples,
                           seed=seed)
    return {**out, **{k: round(v, 2) if k != "p" else round(v, 4) for k, v in res.items()}}


def evaluate_files(files: Sequence[tuple[str, Sequence[dict]]], mentions: Sequence[Mention], *,
                   train: Sequence[Mention] | None = None, kb: KnowledgeBase | None = None,
                   n_resamples: int = 1000, seed: int = 0) -> dict:
    """``{"files": [entry per (name, rows)], "paired": [...]}`` — the `gemel eval --json` contract."""
    by_id = {m.id: m for m in mentions}
    entries, scored, paired = [], [], []
    for name, rows in files:
        entry, scores, generation = evaluate_rows(rows, by_id, path=name, train=train, kb=kb,
                                                  n_resamples=n_resamples, seed=seed)
        entries.append(entry)
        scored.append((name, scores))
        if generation is not None:
            paired.append(paired_entry(generation, scores, f"{name} (generation)", name,
                                       n_resamples, seed))
    for (name_a, a), (name_b, b) in combinations(scored, 2):
        paired.append(paired_entry(a, b, name_a, name_b, n_resamples, seed))
    return {"mentions": len(mentions), "n_resamples": n_resamples, "files": entries,
            "paired": paired}


# ---- text ------------------------------------------------------------------------------------------

def _cell(block: dict, metric: str, with_ci: bool) -> str:
    v = block.get(metric)
    if v is None:
        return "-"
    ci = block["ci95"][metric]
    return f"{v:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if with_ci else f"{v:.1f}"


_LABELS = {"seen": "seen gold", "unseen": "unseen gold", "title_match": "mention = title",
           "title_mismatch": "mention != title", "generation": "pure generation"}
_CI = {"H@1": True, "H@3": False, "H@5": True, "H@10": False, "MRR": True}


def format_p(p: float, n_resamples: int) -> str:
    """"=0.0312", or "<0.002" at the smallest p that ``n_resamples`` resamples can give."""
    floor = 2.0 / (n_resamples + 1)
    # p is stored rounded to 4 decimals; the next possible value is twice the floor
    return f"<{floor:.2g}" if p <= floor + 5e-5 else f"={p:.4f}"


def format_summary(result: dict) -> str:
    """The plain-text summary of :func:`evaluate_files` (what `gemel eval` / `gemel link` print)."""
    widths = {m: 20 if _CI[m] else 6 for m in METRICS}
    head = f"{'':<20} {'n':>6} " + " ".join(
        f"{(m + ' [95% CI]') if _CI[m] else m:<{widths[m]}}" for m in METRICS)
    lines = []
    for e in result["files"]:
        lines.append(f"{e['path']}: {e['n']} mentions scored, {e['errors']} errors, "
                     f"up to {e['max_candidates']} candidates each")
        lines.append(head)
        for label, block in [("all", e)] + [(_LABELS[s], e[s]) for s in SUBSETS + ("generation",)
                                            if s in e]:
            lines.append(f"{label:<20} {block['n']:>6} " + " ".join(
                f"{_cell(block, m, _CI[m]):<{widths[m]}}" for m in METRICS))
        if "candidate_recall" in e:
            r = e["candidate_recall"]
            label = f"candidate recall@{e.get('num_candidates', 'C')}"
            lines.append(f"{label:<20} {r['n']:>6} {r['value']:.1f} "
                         f"[{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]")
        if "nil" in e:
            nil = e["nil"]
            p, r = nil["precision"]["value"], nil["recall"]["value"]
            lines.append(f"NIL: gold {nil['gold']}, predicted {nil['predicted']}, precision "
                         f"{'-' if p is None else f'{p:.1f}'}, recall {'-' if r is None else f'{r:.1f}'}")
    if result["paired"]:
        lines.append("paired bootstrap, H@1 difference b - a (points):")
        for p in result["paired"]:
            if p["diff"] is None:
                lines.append(f"  {p['b']} vs {p['a']}: no mention in common")
                continue
            lines.append(f"  {p['b']} vs {p['a']}: {p['diff']:+.2f} [{p['lo']:+.2f}, "
                         f"{p['hi']:+.2f}], p{format_p(p['p'], result['n_resamples'])} (n={p['n']})")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
