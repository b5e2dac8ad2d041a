"""Trie-constrained beam search, independent of the model runtime.

The search drives a :class:`Stepper` — "give me next-token log-probabilities for these rows" — so
the same search serves every backend (HF with a KV cache today; a vLLM stepper fits the same
protocol). It only ever looks at the tokens the trie allows, so a step costs
O(rows x allowed tokens), never O(vocabulary) in Python.

Scores are sums of natural-log token probabilities over the title tokens *and* the terminator
(the sequence log-probability). With ``length_penalty > 0`` hypotheses are ranked by
``logprob / n_tokens ** length_penalty``; the default 0 keeps raw log-probability, which makes
the search exact whenever ``num_beams`` >= the number of titles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch

from gemel.trie import EntityTrie


class Stepper(Protocol):
    def start(self) -> torch.Tensor:
        """Log-probabilities of the first answer token, one row per prompt: [n_prompts, vocab]."""

    def advance(self, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Continue row ``parents[i]`` with ``tokens[i]``; return the next log-probs [len(parents), vocab].

        Rows not named in ``parents`` are dropped (their cache is freed)."""


@dataclass(frozen=True)
class Hypothesis:
    title_index: int
    score: float  # ranking score (raw log-probability unless length_penalty > 0)
    logprob: float  # raw sequence log-probability
    n_tokens: int


def beam_search(stepper: Stepper, tries: EntityTrie | Sequence[EntityTrie], n_prompts: int, *,
                num_beams: int = 5, top_k: int = 5, max_new_tokens: int = 32,
                length_penalty: float = 0.0) -> list[list[Hypothesis]]:
    """Return, per prompt, finished hypotheses best first (at most ``max(num_beams, top_k)``).

    ``tries`` is one trie for all prompts, or one per prompt (candidate-restricted decoding).
    """
    per_prompt = [tries] * n_prompts if isinstance(tries, EntityTrie) else list(tries)
    if len(per_prompt) != n_prompts:
        raise ValueError(f"{len(per_prompt)} tries for {n_prompts} prompts")
    keep = max(num_beams, top_k)
    finished: list[list[Hypothesis]] = [[] for _ in range(n_prompts)]
    # Live rows, grouped by prompt in increasing prompt order (the stepper's row order).
    row_prompt = np.arange(n_prompts)
    row_node = np.array([t.root for t in per_prompt], dtype=np.int64)
    row_score = np.zeros(n_prompts)
    logprobs = stepper.start()
    for step in range(max_new_tokens):
        n_tokens = step + 1
        # Gather every allowed continuation of every live row: O(sum of allowed), in numpy.
        toks, kids, owners = [], [], []
        for r in range(len(row_node)):
            t, k = per_prompt[row_prompt[r]].children(int(row_node[r]))
            toks.append(t)
            kids.append(k)
            owners.append(np.full(len(t), r, dtype=np.int64))
        tok = np.concatenate(toks).astype(np.int64)
        kid = np.concatenate(kids).astype(np.int64)
        owner = np.concatenate(owners)
        rows_t, toks_t = (torch.from_numpy(a).to(logprobs.device) for a in (owner, tok))
        lp = logprobs[rows_t, toks_t].double().cpu().numpy()  # [n_candidates], one device sync
        cand = row_score[owner] + lp
        cand_prompt = row_prompt[owner]
        order = np.lexsort((-cand, cand_prompt))  # by prompt, then best first
        next_parent, next_tok, next_node, next_score, next_prompt = [], [], [], [], []
        bounds = np.searchsorted(cand_prompt[order], np.arange(n_prompts + 1))
        for p in range(n_prompts):
            lo, hi = bounds[p], bounds[p + 1]
            if lo == hi:
                continue
            trie, done, live = per_prompt[p], finished[p], 0
            for i in order[lo:hi]:
                s = cand[i]
                if not np.isfinite(s):
                    break  # the rest is -inf too (sorted)
                title = trie.value(int(kid[i])) if tok[i] == trie.terminator else -1
                if title >= 0:  # the terminator closed a title (inside a title it is a plain token)
                    rank = s / n_tokens ** length_penalty if length_penalty else s
                    done.append(Hypothesis(title, float(rank), float(s), n_tokens))
                else:
                    next_parent.append(owner[i])
                    next_tok.append(tok[i])
                    next_node.append(kid[i])
                    next_score.append(s)
                    next_prompt.append(p)
                    live += 1
                    if live == num_beams:
                        break
            done.sort(key=lambda h: -h.score)
            del done[keep:]
            if live and len(done) >= top_k and _cannot_improve(
                    done[top_k - 1].score, max(next_score[-live:]), n_tokens, length_penalty):
                for lst in (next_parent, next_tok, next_node, next_score, next_prompt):
                    del lst[-live:]
        if not next_parent:
            break
        row_prompt = np.array(next_prompt, dtype=np.int64)
        row_node = np.array(next_node, dtype=np.int64)
        row_score = np.array(next_score)
        logprobs = stepper.advance(torch.tensor(next_parent), torch.tensor(next_tok))
    return finished


def _cannot_improve(kth_best: float, best_live_logprob: float, n_tokens: int,
                    length_penalty: float) -> bool:
    """True when no live beam can still beat the k-th finished hypothesis.

    Log-probabilities only fall as tokens are added, so with raw scores this is exact. With a
    length penalty it is the usual heuristic (the live beam scored at its current length)."""
    if length_penalty:
        return kth_best >= best_live_logprob / (n_tokens + 1) ** length_penalty
    return kth_best >= best_live_logprob
