"""Trie-constrained beam search, independent of the model runtime.

The search drives a :class:`Stepper` — "give me next-token log-probabilities for these rows" — so
the same search serves every backend (HF with a KV cache, vLLM through single-step requests). It
only ever looks at the tokens the trie allows, so a step costs
O(rows x allowed tokens), never O(vocabulary) in Python. A backend's one call per batch
(:meth:`gemel.backends.base.Backend.run`, see docs/architecture.md) is this search plus
:func:`title_logprobs` over the same stepper.

Scores are sums of natural-log token probabilities over the title tokens *and* the terminator
(the sequence log-probability). A title may have several token paths (its last characters merged
with the terminator, ``")\n"``, or not, ``")" + "\n"``): a beam finishes when it reaches a title's
end (a leaf of the trie), and a title's score is the best over its paths; results never hold a
title twice. With ``length_penalty > 0`` hypotheses are ranked by
``logprob / n_tokens ** length_penalty``; the default 0 keeps raw log-probability, which makes
the search exact whenever ``num_beams`` >= the number of live prefixes, e.g. >= the number of
titles when a title's paths differ only in their last tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from gemel.trie import EntityTrie


class Stepper(Protocol):
    def start(self) -> torch.Tensor:
        """Log-probabilities of the first answer token, one row per prompt: [n_prompts, vocab]."""

    def advance(self, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Continue row ``parents[i]`` with ``tokens[i]``; return the next log-probs [len(parents), vocab].

        Rows not named in ``parents`` are dropped (their cache is freed)."""

    def score(self, sequences: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        """Teacher-forced log-probability of token sequences after each prompt (``sequences[p]``:
        prompt p's), under the same prefill where the stepper kept it."""


@dataclass(frozen=True)
class Hypothesis:
    title_index: int
    score: float  # ranking score (raw log-probability unless length_penalty > 0)
    logprob: float  # raw sequence log-probability
    n_tokens: int


@dataclass
class Searched:
    """What a backend's one call (:meth:`gemel.backends.base.Backend.run`) returns for a batch."""

    hypotheses: list[list[Hypothesis]]  # per prompt, best first
    # per prompt, the log-probability of each title asked for (the beam's where a beam found it,
    # else teacher-forced: the best of its paths); None when no titles were asked for
    logprobs: list[list[float]] | None = None
    score_seconds: float = 0.0  # of the call's time, what the teacher-forced scoring took


def beam_search(stepper: Stepper, tries: EntityTrie | Sequence[EntityTrie], n_prompts: int, *,
                num_beams: int = 5, top_k: int = 5, max_new_tokens: int = 32,
                length_penalty: float = 0.0) -> list[list[Hypothesis]]:
    """Return, per prompt, finished hypotheses best first (at most ``max(num_beams, top_k)``
    distinct titles, each at the best of its paths).

    ``tries`` is one trie for all prompts, or one per prompt (candidate-restricted decoding).
    """
    per_prompt = [tries] * n_prompts if isinstance(tries, EntityTrie) else list(tries)
    if len(per_prompt) != n_prompts:
        raise ValueError(f"{len(per_prompt)} tries for {n_prompts} prompts")
    keep = max(num_beams, top_k)
    finished: list[dict[int, Hypothesis]] = [{} for _ in range(n_prompts)]  # title -> best
    # Live rows, grouped by prompt in increasing prompt order (the stepper's row order).
    row_prompt = np.arange(n_prompts)
    row_node = np.array([t.root for t in per_prompt], dtype=np.int64)
    row_score = np.zeros(n_prompts)
    logprobs = stepper.start()
    for step in range(max_new_tokens):
        n_tokens = step + 1
        # Gather every allowed continuation of every live row: O(sum of allowed), in numpy.
        # Candidate i: live row cand_row[i] extended by tok[i], reaching trie node cand_node[i].
        toks, nodes, rows, leaves = [], [], [], []
        for r in range(len(row_node)):
            trie = per_prompt[row_prompt[r]]
            child_tokens, child_nodes = trie.children(int(row_node[r]))
            toks.append(child_tokens)
            nodes.append(child_nodes)
            rows.append(np.full(len(child_tokens), r, dtype=np.int64))
            leaves.append(trie.leaf_mask(child_nodes))
        tok = np.concatenate(toks).astype(np.int64)
        cand_node = np.concatenate(nodes).astype(np.int64)
        cand_row = np.concatenate(rows)
        ends = np.concatenate(leaves)  # the candidate closes a title
        rows_t, toks_t = (torch.from_numpy(a).to(logprobs.device) for a in (cand_row, tok))
        lp = logprobs[rows_t, toks_t].double().cpu().numpy()  # [n_candidates], one device sync
        cand = row_score[cand_row] + lp
        cand_prompt = row_prompt[cand_row]
        order = np.lexsort((-cand, cand_prompt))  # by prompt, then best first
        next_parent, next_tok, next_node, next_score, next_prompt = [], [], [], [], []
        bounds = np.searchsorted(cand_prompt[order], np.arange(n_prompts + 1))
        for p in range(n_prompts):
            lo, hi = bounds[p], bounds[p + 1]
            if lo == hi:
                continue
            trie, done = per_prompt[p], finished[p]
            mine = order[lo:hi]
            mine = mine[np.isfinite(cand[mine])]
            # every candidate that closes a title is a finished hypothesis (its terminator, or a
            # token merged with it), whatever its rank among the live ones: a title's other path
            # may only finish later and lower
            for i in mine[ends[mine]].tolist():
                s, title = cand[i], trie.value(int(cand_node[i]))
                rank = s / n_tokens ** length_penalty if length_penalty else s
                if title not in done or rank > done[title].score:  # the best of its paths
                    done[title] = Hypothesis(title, float(rank), float(s), n_tokens)
            going = mine[~ends[mine]][:num_beams].tolist()  # best first
            live = len(going)
            for i in going:
                next_parent.append(cand_row[i])
                next_tok.append(tok[i])
                next_node.append(cand_node[i])
                next_score.append(cand[i])
                next_prompt.append(p)
            if len(done) > keep:
                for h in sorted(done.values(), key=lambda h: -h.score)[keep:]:
                    del done[h.title_index]
            if live and len(done) >= top_k and _cannot_improve(
                    sorted(h.score for h in done.values())[-top_k], max(next_score[-live:]),
                    n_tokens, length_penalty):
                for column in (next_parent, next_tok, next_node, next_score, next_prompt):
                    del column[-live:]
        if not next_parent:
            break
        row_prompt = np.array(next_prompt, dtype=np.int64)
        row_node = np.array(next_node, dtype=np.int64)
        row_score = np.array(next_score)
        logprobs = stepper.advance(torch.tensor(next_parent), torch.tensor(next_tok))
    return [sorted(done.values(), key=lambda h: -h.score) for done in finished]


def _cannot_improve(kth_best: float, best_live_logprob: float, n_tokens: int,
                    length_penalty: float) -> bool:
    """True when no live beam can still beat the k-th finished hypothesis.

    Log-probabilities only fall as tokens are added, so with raw scores this is exact. With a
    length penalty it is the usual heuristic (the live beam scored at its current length)."""
    if length_penalty:
        return kth_best >= best_live_logprob / (n_tokens + 1) ** length_penalty
    return kth_best >= best_live_logprob


def score_titles(backend, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 trie: EntityTrie, titles: Sequence[Sequence[int]]) -> list[list[float]]:
    """Teacher-forced log-probability of titles after each prompt, each the best over its token
    paths (natural, or its own tokens + the terminator): the score the beam search gives a title,
    so that scored and searched titles compare. ``titles[p]``: title indices for prompt ``p``;
    ``backend``: a :class:`gemel.backends.base.Backend`. Returns floats shaped like ``titles``."""
    return best_of_paths(lambda seqs: backend.score(inputs_embeds, attention_mask, seqs), trie,
                         titles)


Score = Callable[[Sequence[Sequence[Sequence[int]]]], list[list[float]]]


def best_of_paths(score: Score, trie: EntityTrie,
                  titles: Sequence[Sequence[int]]) -> list[list[float]]:
    """:func:`score_titles` with ``score`` (token sequences per prompt -> their log-probabilities,
    e.g. a :class:`Stepper`'s) in place of a backend."""
    paths = [[trie.paths(t) for t in row] for row in titles]
    flat = score([[seq for ps in row for seq in ps] for row in paths])
    out = []
    for row, scores in zip(paths, flat):
        it = iter(scores)
        out.append([max(next(it) for _ in ps) for ps in row])
    return out


def title_logprobs(hypotheses: Sequence[Sequence[Hypothesis]], titles: Sequence[Sequence[int]],
                   trie: EntityTrie, score: Score) -> list[list[float]]:
    """Per prompt, the log-probability of each of ``titles[p]``: the beam's where the search
    found the title (``hypotheses[p]``), else teacher-forced (:func:`best_of_paths` over
    ``trie``'s paths; only those titles are scored, in one ``score`` call)."""
    beams = [{h.title_index: h.logprob for h in hs} for hs in hypotheses]
    missing = [[t for t in ts if t not in beam] for ts, beam in zip(titles, beams)]
    forced = [dict(zip(miss, lps)) for miss, lps in zip(missing, best_of_paths(score, trie,
                                                                              missing))]
    return [[beam[t] if t in beam else found[t] for t in ts]
            for ts, beam, found in zip(titles, beams, forced)]
