"""Fitting the fused ranking (beyond GEMEL): the weights of :class:`gemel.rerank.FusionModel`.

The rerank stage (:mod:`gemel.rerank`) gives every candidate of a mention's pool named features
(the LLM's log-probability, retriever similarities, the training prior, exact matches, the
non-LLM back-off's answer ...) and ranks the pool by ``w . features``. Here ``w`` is fitted on a
dev split by maximising the softmax likelihood of the gold candidate within each mention's pool
(listwise, a few weights, L2-regularised), from pools linked now (:func:`fit_on_mentions`) or kept
in prediction rows (:func:`rows_lists`: a refit needs no LLM pass). So a fitted model can
reproduce the non-LLM baseline and move away from it where the LLM knows better.

This is training: it may use :mod:`gemel.runs` and ``gemel.eval`` (the linker never imports it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gemel.errors import DataError, GemelError
from gemel.rerank import FEATURES, FusionModel, pool_values
from gemel.types import Mention


def _padded(lists: Sequence[tuple[np.ndarray, int]]):
    """Lists of different lengths -> features [N, L, F], mask [N, L] (True = a candidate), gold [N]."""
    size = max(len(f) for f, _ in lists)
    feats = torch.zeros(len(lists), size, len(FEATURES), dtype=torch.float64)
    mask = torch.zeros(len(lists), size, dtype=torch.bool)
    for i, (f, _) in enumerate(lists):
        feats[i, :len(f)] = torch.as_tensor(np.asarray(f, dtype=np.float64))
        mask[i, :len(f)] = True
    return feats, mask, torch.tensor([g for _, g in lists])


def fit(lists: Sequence[tuple[np.ndarray, int]], l2: float = 1e-3, steps: int = 200,
        drop: Sequence[str] = ()) -> FusionModel:
    """Fit the weights on (features [n_i, F], gold position in the list or -1) per mention.

    Mentions whose gold is not among their candidates carry no signal and are skipped. Features
    named in ``drop`` keep weight 0 (ablations: what does the LLM add?).
    """
    unknown = sorted(set(drop) - set(FEATURES))
    if unknown:
        raise DataError(f"unknown fusion feature(s) {unknown}; the features are {list(FEATURES)}",
                        field="drop", fix="name features from that list")
    usable = [(f, g) for f, g in lists if g >= 0 and len(f) > 1]
    if not usable:
        raise DataError("no dev mention has its gold entity among its candidates: nothing to fit",
                        field="gold", fix="use a dev split with gold entities, or more candidates")
    feats, mask, gold = _padded(usable)  # [N, L, F], [N, L], [N]
    # Standardise features so one learning problem fits all scales; fold the scaling back after.
    mu, sd = feats[mask].mean(0), feats[mask].std(0).clamp(min=1e-6)
    z = (feats - mu) / sd * torch.tensor([f not in drop for f in FEATURES], dtype=torch.float64)
    w = torch.zeros(len(FEATURES), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = (z @ w).masked_fill(~mask, float("-inf"))  # [N, L]
        loss = -torch.log_softmax(logits, 1).gather(1, gold[:, None]).mean() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    final = opt.step(closure)
    raw = (w.detach() / sd).tolist()  # the mean shift is constant within a list: it drops out
    return FusionModel(dict(zip(FEATURES, raw)), {"n_fitted": len(usable), "n_lists": len(lists),
                                                  "l2": l2, "dropped": list(drop),
                                                  "loss": float(final.detach())})


def hits_at_1(model: FusionModel, lists: Sequence[tuple[np.ndarray, int]]) -> float:
    """H@1 (percent) of the fused ranking over all lists; a gold outside its list is a miss."""
    hits = sum(g >= 0 and int(np.argmax(model.score(f))) == g for f, g in lists)
    return round(100.0 * hits / max(len(lists), 1), 2)


def cross_validate(lists: Sequence[tuple[np.ndarray, int]], l2: float, folds: int = 5,
                   seed: int = 0, drop: Sequence[str] = ()) -> float:
    """Out-of-fold H@1 (percent): each fold ranked by a model fitted on the others. An honest
    estimate of what the fitted model does on unseen mentions (in-sample H@1 flatters it)."""
    order = np.random.default_rng(seed).permutation(len(lists))
    hits = 0.0
    for k in range(folds):
        held = set(order[k::folds].tolist())
        model = fit([x for i, x in enumerate(lists) if i not in held], l2=l2, drop=drop)
        held_lists = [lists[i] for i in sorted(held)]
        hits += hits_at_1(model, held_lists) * len(held_lists) / 100.0
    return round(100.0 * hits / max(len(lists), 1), 2)


# ---- pools kept in prediction rows: fit, refit and rerank without another LLM pass ----------

def fit_list(row: dict, where: str = "<row>") -> tuple[np.ndarray, int] | None:
    """A prediction row with a pool as one fit list: (features [n, len(FEATURES)], the gold's
    position in the pool or -1); None when the row has no gold (unlabelled, or NIL outside NIL
    mode)."""
    gold = row.get("gold_id")
    if gold is None and not row.get("gold_nil"):
        return None
    values = pool_values(row, where)  # checks the pool first
    position = [j for j, ids in enumerate(row["pool"]["ids"]) if gold in ids]
    return values, position[0] if position else -1


def rows_lists(rows: Sequence[dict], where: str = "<rows>") -> list[tuple[np.ndarray, int]]:
    """Every labelled row with a pool -> its (features, gold position); failed rows are skipped."""
    out = []
    for row in rows:
        if row.get("error") is None:
            labelled = fit_list(row, where)
            if labelled is not None:
                out.append(labelled)
    return out


def rerank(row: dict, model: FusionModel, k: int, where: str = "<row>") -> dict:
    """A prediction row ranked again from its kept pool by ``model`` (e.g. a refit); pure
    generation's ranking stays under "generated" (a fit-fusion dev row's own candidates)."""
    if row.get("error") is not None:
        return row
    fused = model.score(pool_values(row, where))  # [n_candidates]
    pool = row["pool"]
    candidates = [{"entity_id": e, "title": pool["titles"][i], "score": round(float(fused[i]), 6)}
                  for i in np.argsort(-fused, kind="stable") for e in pool["ids"][i]]
    generated = row.get("generated", [c["entity_id"] for c in row.get("candidates", [])])
    return {**row, "candidates": candidates[:k], "generated": generated}


def fit_report(lists: Sequence[tuple[np.ndarray, int]], l2s: Sequence[float] = (1e-3,),
               folds: int = 5, drop: Sequence[str] = ()) -> tuple[FusionModel, dict]:
    """Fit on dev lists, choosing L2 by out-of-fold H@1 when several are given. The report puts
    the in-sample and out-of-fold fused H@1 beside the non-LLM back-off answer's on the same lists."""
    oof = ({l2: cross_validate(lists, l2, folds, drop=drop) for l2 in l2s}
           if len(lists) >= 2 * folds else {})
    best = max(oof, key=oof.get) if oof else l2s[0]
    model = fit(lists, l2=best, drop=drop)
    backoff = FEATURES.index("backoff_top1")
    report = {"dev_mentions": len(lists), "gold_in_pool": sum(g >= 0 for _, g in lists),
              "dev_H@1_backoff": round(100.0 * sum(g >= 0 and f[g, backoff] > 0 for f, g in lists)
                                       / max(len(lists), 1), 2),
              "dev_H@1_fused": hits_at_1(model, lists),
              f"dev_H@1_fused_{folds}fold": oof.get(best), "l2": best,
              "l2_out_of_fold": {str(k): v for k, v in oof.items()}, "weights": model.weights}
    model.meta.update({k: v for k, v in report.items() if k != "weights"})
    return model, report


def check_fusion_out(path: str | Path) -> None:
    """``fit-fusion --out`` is written only when absent, empty, or a fusion model already (a
    refit replaces it); anything else is refused before any work."""
    path = Path(path)
    if path.is_dir():
        raise GemelError(f"--out {path} is a folder; give a file name such as {path / 'fusion.json'}")
    if not path.exists() or path.stat().st_size == 0:
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not (isinstance(data, dict) and "weights" in data and "features" in data):
        raise GemelError(f"--out {path} exists and is not a fusion model: not touching it; "
                         "choose another --out, or move the file away")


def fit_on_mentions(linker, mentions: Sequence[Mention], rows_path: str | Path,
                    progress: bool = True, l2s: Sequence[float] = (1e-3,),
                    source: str = "<mentions>", drop: Sequence[str] = ()) -> tuple[FusionModel, dict]:
    """Link dev mentions keeping every candidate pool in ``rows_path`` (resumable: a rerun skips
    the mentions already there), then fit the fusion weights on them (:func:`fit_report`). The
    report adds pure generation's dev H@1."""
    from gemel.eval.metrics import hits_at_k
    from gemel.runs import run

    linker.keep_pool = True  # the beam search keeps its prefill for the scoring pass
    rows = run(linker.link_batch, mentions, rows_path, batch_size=linker.config.batch_size,
               progress=progress, source=source)
    model, report = fit_report(rows_lists(rows, str(getattr(rows_path, "path", rows_path))), l2s,
                               drop=drop)
    report["dev_H@1_generation"] = hits_at_k(rows, (1,))["H@1"]
    model.meta["dev_H@1_generation"] = report["dev_H@1_generation"]
    return model, report
