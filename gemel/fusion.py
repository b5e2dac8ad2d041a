"""Score fusion (beyond GEMEL): rerank a mention's candidates with a tiny listwise model.

A small LLM reads the context well but lacks priors; a retriever and the training data have them.
For each candidate (the beams plus the top-C retrieved titles) we compute a handful of features and
rank by ``w . features``; ``w`` is fitted on a dev split by maximising the softmax likelihood of the
gold candidate within each mention's list (listwise, a few weights, L2-regularised).

Features (per candidate title t of mention m):
  llm_logprob         sequence log-probability of t under the prompt (teacher-forced when t was
                      no beam)
  llm_beam            1 if t was found by the beam search
  similarity          cosine similarity of the mention to "title: description" (KB retriever)
  prior               P(t | mention string) in the training mentions (0 for unseen strings)
  prior_best          1 if t is the most frequent gold of the mention string in training
  exact_match         1 if the mention string equals t's title or an alias (case-insensitive)
  top_retrieved       1 if t is the KB retriever's nearest title
  backoff_top1        1 if t is the non-LLM baseline's answer (prior > exact match > nearest:
                      gemel.eval.baselines.backoff_ranking) — the back-off is not linear in the
                      three features above, so the model gets it whole and learns when to leave it
  llm_logprob_unseen  llm_logprob when the mention string never occurs in training, else 0: lets
                      the model trust the LLM more where no prior exists
So a fitted model can reproduce the non-LLM baseline and move away from it where the LLM knows
better.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gemel.errors import DataError, MismatchError
from gemel.types import Mention

FEATURES = ("llm_logprob", "llm_beam", "similarity", "prior", "prior_best", "exact_match",
            "top_retrieved", "backoff_top1", "llm_logprob_unseen")


def mention_key(text: str | None) -> str:
    return (text or "").strip().casefold()


class MentionPrior:
    """P(entity | mention string) counted over training mentions (casefolded strings).

    NIL training mentions count under ``entity_id=None`` (so ``prob(m, None)`` is the NIL rate).
    """

    def __init__(self, train: Sequence[Mention]):
        from gemel.data.nil import is_nil

        self.counts: dict[str, Counter] = defaultdict(Counter)
        for m in train:
            if (m.entity_id is not None or is_nil(m)) and m.mention:
                self.counts[mention_key(m.mention)][m.entity_id] += 1

    def prob(self, mention: str | None, entity_id: str | None) -> float:
        c = self.counts.get(mention_key(mention))
        return c[entity_id] / sum(c.values()) if c else 0.0

    def entities(self, mention: str | None) -> list[str | None]:
        """The gold entities seen for this string in training, most frequent first."""
        c = self.counts.get(mention_key(mention))
        return [e for e, _ in c.most_common()] if c else []

    def seen(self, mention: str | None) -> bool:
        return mention_key(mention) in self.counts

    def best(self, mention: str | None) -> str | None:
        """The most frequent KB entity for this string in training (ties: first seen; NIL never)."""
        c = self.counts.get(mention_key(mention))
        ranked = [e for e, _ in c.most_common() if e is not None] if c else []
        return ranked[0] if ranked else None


@dataclass
class FusionModel:
    weights: dict[str, float]
    meta: dict

    def score(self, features: np.ndarray) -> np.ndarray:
        """features [n_candidates, len(FEATURES)] -> fused scores [n_candidates]."""
        return features @ np.array([self.weights[f] for f in FEATURES])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"features": list(FEATURES), "weights": self.weights,
                                          "meta": self.meta}, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "FusionModel":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read fusion model: {err}", path=path,
                            fix="fit one with `gemel fit-fusion`") from err
        if sorted(data.get("weights", {})) != sorted(FEATURES):
            raise MismatchError(f"{path}: fusion features {sorted(data.get('weights', {}))} differ "
                                f"from this gemel's {sorted(FEATURES)}; refit with gemel fit-fusion")
        return cls(data["weights"], data.get("meta", {}))


def fit(lists: Sequence[tuple[np.ndarray, int]], l2: float = 1e-3, steps: int = 200) -> FusionModel:
    """Fit the weights on (features [n_i, F], gold position in the list or -1) per mention.

    Mentions whose gold is not among their candidates carry no signal and are skipped.
    """
    usable = [(torch.tensor(f, dtype=torch.float64), g) for f, g in lists if g >= 0 and len(f) > 1]
    if not usable:
        raise DataError("no dev mention has its gold entity among its candidates: nothing to fit",
                        field="gold", fix="use a dev split with gold entities, or more candidates")
    # Standardise features so one learning problem fits all scales; fold the scaling back after.
    allf = torch.cat([f for f, _ in usable])
    mu, sd = allf.mean(0), allf.std(0).clamp(min=1e-6)
    w = torch.zeros(len(FEATURES), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(-torch.log_softmax(((f - mu) / sd) @ w, 0)[g] for f, g in usable) / len(usable)
        loss = loss + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    final = opt.step(closure)
    raw = (w.detach() / sd).tolist()  # the mean shift is constant within a list: it drops out
    return FusionModel(dict(zip(FEATURES, raw)),
                       {"n_fitted": len(usable), "n_lists": len(lists), "loss": float(final.detach())})


def save_lists(path: str | Path, lists: Sequence[tuple[np.ndarray, int]]) -> None:
    """The dev candidate lists (features, gold position) as .npz, so that refitting (another
    regularisation, a feature subset) needs no LLM pass. Arrays only: loads without pickle."""
    feats = [np.asarray(f, dtype=np.float64).reshape(-1, len(FEATURES)) for f, _ in lists]
    np.savez(path, features=np.concatenate(feats) if feats else np.zeros((0, len(FEATURES))),
             offsets=np.cumsum([0] + [len(f) for f in feats]).astype(np.int64),
             gold=np.array([g for _, g in lists], dtype=np.int64),
             names=np.array(FEATURES))


def load_lists(path: str | Path) -> list[tuple[np.ndarray, int]]:
    with np.load(path, allow_pickle=False) as data:
        if tuple(data["names"].tolist()) != FEATURES:
            raise MismatchError(f"{path}: saved with features {data['names'].tolist()}, this "
                                f"gemel has {list(FEATURES)}; run gemel fit-fusion again")
        off, feats = data["offsets"], data["features"]
        return [(feats[off[i]:off[i + 1]], int(g)) for i, g in enumerate(data["gold"])]


def fit_on_mentions(linker, mentions: Sequence[Mention], progress: bool = True,
                    lists_path: str | Path | None = None) -> tuple[FusionModel, dict]:
    """Run ``linker`` (prompts, beams, retrieved pool) over dev mentions and fit the fusion weights.

    Returns the model and a report: dev H@1 of pure generation and of the fused ranking (in-sample).
    ``lists_path``: also keep the candidate lists there (:func:`save_lists`).
    """
    from tqdm.auto import tqdm

    from gemel.data.nil import is_nil

    lists, gen_hits, n = [], 0, 0
    bs = linker.config.batch_size
    linker.fitting_fusion = True  # the beam search keeps its prefill for the scoring pass
    for i in tqdm(range(0, len(mentions), bs), disable=not progress, unit="batch"):
        batch = mentions[i:i + bs]
        hyps, embeds, mask, _ = linker.generate(batch, linker.config.top_k)
        for m, h, (titles, feats) in zip(batch, hyps, linker.fusion_lists(batch, hyps, embeds, mask)):
            if m.entity_id is None and not (linker.config.nil and is_nil(m)):
                continue  # unlabelled, or NIL outside NIL mode: nothing to learn from
            n += 1  # the gold's id; None is the NIL answer (linker.ids_for gives [None] for it)
            gold = [j for j, t in enumerate(titles) if m.entity_id in linker.ids_for(t)]
            lists.append((feats, gold[0] if gold else -1))
            gen_hits += bool(h) and m.entity_id in linker.ids_for(h[0].title_index)
    if lists_path is not None:
        save_lists(lists_path, lists)
    model = fit(lists)
    fused_hits = sum(g >= 0 and int(np.argmax(model.score(f))) == g for f, g in lists)
    report = {"dev_mentions": n, "gold_in_pool": sum(g >= 0 for _, g in lists),
              "dev_H@1_generation": round(100.0 * gen_hits / max(n, 1), 2),
              "dev_H@1_fused": round(100.0 * fused_hits / max(n, 1), 2), "weights": model.weights}
    model.meta.update({k: v for k, v in report.items() if k != "weights"})
    return model, report
