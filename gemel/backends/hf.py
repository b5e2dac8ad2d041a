"""The transformers backend: any HF causal LM, trie-constrained beam search with a KV cache.

Why not ``generate(num_beams=B, prefix_allowed_tokens_fn=...)``: it copies the prompt B times
before the prefill and masks the full vocabulary per beam per step. Here the prompt is prefilled
once per mention (batched across mentions), the cache is expanded to the beams afterwards, and the
search only gathers the trie's allowed tokens (gemel.beam). ``tests/test_backend_hf.py`` checks the
result against ``generate`` with ``prefix_allowed_tokens_fn`` on a tiny model.
"""
from __future__ import annotations

import copy
import inspect
import time
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

from gemel.backends import score_tree
from gemel.backends.base import Backend
from gemel.backends.prefix_attention import NAME, PrefixState, supports_prefix_attention
from gemel.backends.prefix_attention import register as register_prefix_attention
from gemel.machine import pick_dtype


def _cache_kwarg(model) -> str:
    """transformers 5.x names the cache argument ``cache``; older releases ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


class HFStepper:
    """Prefill once, then decode rows chosen by the beam search.

    inputs_embeds: [n_prompts, seq, hidden], left-padded; attention_mask: [n_prompts, seq] (1 = token).

    Where the model allows it (full attention, see gemel.backends.prefix_attention) the prompts'
    cache is never copied: rows attend to their prompt's cached prefix, and only their own tokens
    are cached per row. Otherwise the prefill cache is expanded to the rows and reordered per step.
    """

    def __init__(self, model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 keep_prefill: bool = False, stats: dict | None = None):
        self.model, self.embeds, self.mask = model, inputs_embeds, attention_mask.long()
        self.keep = keep_prefill
        self.stats = stats  # the backend's running prefill counters (HFBackend.stats), if given
        self.cache_kwarg = _cache_kwarg(model)
        self.cache = None
        self.next_pos: torch.Tensor | None = None
        self.first: torch.Tensor | None = None  # [n_prompts, vocab] log-probs of the first token
        self.prefill = None
        self.shared = supports_prefix_attention(model)
        self.prefix: PrefixState | None = None  # the prompts' cache, shared by every row
        self.row_prompt: torch.Tensor | None = None  # [rows] prompt of each live row

    @torch.inference_mode()
    def start(self) -> torch.Tensor:
        # Positions count real tokens only, so left padding does not shift them.
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        began = time.perf_counter()
        out, logits = _last_logits(self.model, inputs_embeds=self.embeds, attention_mask=self.mask,
                                   position_ids=pos, use_cache=True)
        if self.stats is not None:  # real prompt tokens only: padding is waste, not throughput
            self.stats["prefill_tokens"] += int(self.mask.sum())
            self.stats["prefill_seconds"] += time.perf_counter() - began
        self.cache = _cache_of(out)
        self.next_pos = self.mask.sum(-1)
        # fp32 log-softmax: fp16 logits can overflow and leave every allowed token at -inf.
        self.first = logits.float().log_softmax(-1)
        if self.shared:
            layers = self.cache.layers
            self.prefix = PrefixState([c.keys for c in layers], [c.values for c in layers],
                                      self.mask.bool(), torch.arange(len(self.mask),
                                                                     device=self.mask.device))
            self.cache = None  # from here on: the rows' own tokens only
            self.row_prompt = self.prefix.row_prompt
        if self.keep:
            self.keep_prefill()
        return self.first

    @torch.inference_mode()
    def advance(self, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        device = self.mask.device
        parents, tokens = parents.to(device), tokens.to(device)
        pos = self.next_pos[parents]
        if self.shared:
            self.row_prompt = self.row_prompt[parents]
            if self.cache is not None:
                self.cache.reorder_cache(parents)  # the rows' own tokens only: small
            with _attention(self.model, NAME):
                out = self.model(input_ids=tokens[:, None], position_ids=pos[:, None],
                                 use_cache=True, gemel_prefix=self.prefix.for_rows(self.row_prompt),
                                 **({self.cache_kwarg: self.cache} if self.cache is not None
                                    else {}))
        else:
            self.cache.reorder_cache(parents)  # index_select on the batch dim: rows may grow or shrink
            self.mask = torch.cat([self.mask[parents], self.mask.new_ones(len(parents), 1)], dim=1)
            out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                             position_ids=pos[:, None], use_cache=True,
                             **{self.cache_kwarg: self.cache})
        self.cache = _cache_of(out)
        self.next_pos = pos + 1
        return out.logits[:, -1, :].float().log_softmax(-1)

    def keep_prefill(self) -> None:
        """Snapshot the prefill (cache, first log-probs, mask, positions) so that :meth:`score` can
        run after a beam search without a second prefill. With a shared prefix nothing is copied
        (the search never writes to it); otherwise the cache is copied (the search reorders it)."""
        cache = self.prefix if self.shared else copy.deepcopy(self.cache)
        self.prefill = (cache, self.first, self.mask.clone(), self.next_pos.clone())

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[Sequence[int]]], rows_per_pass: int = 64,
              nodes_per_row: int = 256, tokens_per_pass: int = 1024) -> list[list[float]]:
        """Teacher-forced log-probability of given token sequences, per prompt.

        sequences[p] = list of token sequences (title tokens + terminator) to score after prompt p.
        With a shared prompt prefix, a prompt's sequences run as prefix trees (each distinct
        prefix once, gemel.backends.score_tree; rows of at most ``nodes_per_row`` tokens, model
        calls of at most ``tokens_per_pass`` positions); otherwise as padded rows, one per
        sequence, ``rows_per_pass`` at a time, sorted by length. Either way logits are computed
        only where a next token is scored, a few rows of the vocabulary-wide head at a time
        (exact log-softmax normalisation).
        """
        if getattr(self, "prefill", None) is None:
            self.start()
            self.keep_prefill()
        if self.shared:
            found = self._score_trees(sequences, nodes_per_row, tokens_per_pass)
        else:
            found = self._score_rows(sequences, rows_per_pass)
        self.prefill = None  # the last pass consumed the snapshot's cache
        return [[found[(p, tuple(seq))] for seq in seqs] for p, seqs in enumerate(sequences)]

    def _score_trees(self, sequences, nodes_per_row: int,
                     tokens_per_pass: int) -> dict[tuple[int, tuple[int, ...]], float]:
        """Scores by prefix trees over the kept, shared prompt prefix (no cache is written)."""
        prefix, first, mask0, pos0 = self.prefill
        device = mask0.device
        todo = score_tree.plan(sequences, nodes_per_row)
        pair_lp = torch.zeros(len(todo.pairs), dtype=torch.float32, device=device)
        # [pairs, 3] (row, node, next token), sent once; each pass picks its rows' pairs
        pair_row, pair_node, pair_token = torch.tensor(
            todo.pairs, dtype=torch.long, device=device).reshape(-1, 3).unbind(-1)
        for chunk in score_tree.passes(todo.rows, tokens_per_pass):
            rows = [todo.rows[r] for r in chunk]
            width = max(len(r.tokens) for r in rows)
            # right-padded trees, built on the host and sent once
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            depth = torch.zeros(len(rows), width, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r.tokens)] = torch.tensor(r.tokens)
                depth[i, :len(r.depth)] = torch.tensor(r.depth)
            allowed = torch.from_numpy(np.stack([r.ancestry(width) for r in rows])).to(device)
            prompts = torch.tensor([r.prompt for r in rows], device=device)
            pos = pos0[prompts][:, None] + depth.to(device)
            with _attention(self.model, NAME):
                hidden, head = _hidden_and_head(
                    self.model, input_ids=ids.to(device), position_ids=pos, use_cache=False,
                    gemel_prefix=prefix.for_rows(prompts, suffix_mask=allowed))
            # the pairs of this pass's rows, as positions in hidden flattened to [rows x width]
            local = torch.full((len(todo.rows),), -1, dtype=torch.long, device=device)
            local[torch.tensor(chunk, device=device)] = torch.arange(len(chunk), device=device)
            mine = (local[pair_row] >= 0).nonzero().squeeze(-1)
            node, target = pair_node[mine], pair_token[mine]
            pair_lp[mine] = _target_logprobs(hidden.reshape(-1, hidden.shape[-1]), target, head,
                                             rows=local[pair_row[mine]] * width + node)
        keys = list(todo.sequence_pairs)
        starts = torch.tensor([[p, seq[0]] for p, seq in keys], dtype=torch.long, device=device)
        firsts = first[starts[:, 0], starts[:, 1]].tolist()
        lp = pair_lp.tolist()  # one device sync for every pair
        return {key: start + sum(lp[k] for k in todo.sequence_pairs[key])
                for key, start in zip(keys, firsts)}

    def _score_rows(self, sequences, rows_per_pass: int) -> dict[tuple[int, tuple[int, ...]], float]:
        """Scores by padded rows over copies of the kept prompt cache."""
        cache0, first, mask0, pos0 = self.prefill
        rows = sorted(((p, seq) for p, seqs in enumerate(sequences) for seq in seqs),
                      key=lambda r: len(r[1]))
        found: dict[tuple[int, tuple[int, ...]], float] = {}
        device = mask0.device
        for start in range(0, len(rows), rows_per_pass):
            chunk = rows[start:start + rows_per_pass]
            parents = torch.tensor([p for p, _ in chunk], device=device)
            longest = len(chunk[-1][1])
            # right-padded continuations, built on the host and sent once
            ids = torch.zeros(len(chunk), longest, dtype=torch.long)
            seq_mask = torch.zeros(len(chunk), longest, dtype=torch.long)
            for i, (_, seq) in enumerate(chunk):
                ids[i, :len(seq)] = torch.tensor(seq)
                seq_mask[i, :len(seq)] = 1
            ids, seq_mask = ids.to(device), seq_mask.to(device)
            pos = pos0[parents][:, None] + torch.arange(longest, device=device)[None]
            cache = copy.deepcopy(cache0) if start + rows_per_pass < len(rows) else cache0
            cache.reorder_cache(parents)
            mask = torch.cat([mask0[parents], seq_mask], dim=1)
            hidden, head = _hidden_and_head(self.model, cache=cache, input_ids=ids,
                                            attention_mask=mask, position_ids=pos, use_cache=True)
            # log p(token t+1 | ..., token t), only where token t+1 is a real token
            following = torch.zeros(len(chunk), longest - 1, device=device)
            scored = seq_mask[:, 1:].bool()
            following[scored] = _target_logprobs(hidden[:, :-1][scored], ids[:, 1:][scored], head)
            totals = first[parents, ids[:, 0]] + following.sum(1)  # [rows]
            for (p, seq), total in zip(chunk, totals.tolist()):  # one device sync per pass
                found[(p, tuple(seq))] = total
        return found


@contextmanager
def _attention(model, name: str):
    """Run the model with attention implementation ``name`` for the duration of the block."""
    register_prefix_attention()
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    for c in configs.values():
        c._attn_implementation = name
    try:
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


def _plain_head(model):
    """The output embedding when the model's logits are just ``lm_head(hidden)``; None for models
    that soft-cap or scale them."""
    text = getattr(model.config, "text_config", None) or model.config
    if any(getattr(text, a, None) for a in ("final_logit_softcapping", "logit_scale",
                                            "logits_scaling")):
        return None
    return model.get_output_embeddings()


def _last_logits(model, **kwargs):
    """(model output, logits [n, vocab] at the last position) for a left-padded batch.

    Not ``model(..., logits_to_keep=1)``: it applies the head to the slice ``hidden[:, -1:]``, a
    non-contiguous [n, 1, hidden] view, which ``matmul`` does not fold into one matrix product; it
    runs a batched product over the weight expanded (copied) n times instead: Qwen 1.5B's
    151936 x 1536 head, 4 prompts, 1.9 GB copied in bf16 per prefill, most of a short prompt's
    prefill time."""
    head = _plain_head(model)
    if head is None:
        out = model(logits_to_keep=1, **kwargs)
        return out, out.logits[:, -1, :]
    out = model.get_decoder()(**kwargs)
    return out, head(out[0][:, -1, :])  # [n, hidden] @ [hidden, vocab]: one matrix product


def _hidden_and_head(model, cache=None, **kwargs):
    """The last hidden states [rows, seq, hidden] and the head mapping [n, hidden] -> [n, vocab]
    logits; for models whose logits are more than ``lm_head(hidden)`` (soft-capping, scaling):
    the logits themselves and the identity."""
    head = _plain_head(model)
    if head is not None:
        decoder = model.get_decoder()
        if cache is not None:
            kwargs[_cache_kwarg(decoder)] = cache
        return decoder(**kwargs)[0], head
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    return model(**kwargs).logits, (lambda x: x)


def _target_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head,
                     rows: torch.Tensor | None = None, max_elements: int = 1 << 24) -> torch.Tensor:
    """log-softmax(head(hidden[rows[i]]))[targets[i]] -> [n] (fp32), for hidden [m, h], targets
    [n], rows [n] (default: row i for target i). The vocabulary-wide logits are computed once per
    distinct row, a block of rows at a time (at most ``max_elements`` floats)."""
    if rows is None:
        nodes, which = hidden, torch.arange(len(targets), device=hidden.device)
    else:
        used, which = torch.unique(rows, return_inverse=True)
        nodes = hidden[used]
    vocab = head.weight.shape[0] if hasattr(head, "weight") else hidden.shape[-1]
    step = max(1, max_elements // vocab)
    out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for lo in range(0, len(nodes), step):
        block = head(nodes[lo:lo + step]).float()  # [b, vocab]
        here = ((which >= lo) & (which < lo + step)).nonzero().squeeze(-1)
        at = which[here] - lo
        out[here] = block[at, targets[here]] - block.logsumexp(-1)[at]
    return out


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model, tokenizer, device: str = "cpu"):
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device
        for p in self.model.parameters():
            p.requires_grad_(False)
        # running totals over this backend's life; the sweep reads them for its prefill tok/s
        self.stats = {"prefill_tokens": 0, "prefill_seconds": 0.0}

    @classmethod
    def from_name(cls, name: str, device: str = "auto", dtype: str = "auto") -> "HFBackend":
        from transformers import AutoModelForCausalLM

        from gemel.sources import load_tokenizer, loading, resolve

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve(name, "llm")
        tokenizer = load_tokenizer(name)
        with loading(name, "llm"):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(device, dtype))
        return cls(model.to(device), tokenizer, device)

    @property
    def max_context(self) -> int | None:
        value = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(value) if isinstance(value, int) else None

    def input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def stepper(self, inputs_embeds, attention_mask, keep_prefill=False) -> HFStepper:
        # keep_prefill: the scoring after the search reuses the prefill (see HFStepper.keep_prefill)
        return HFStepper(self.model, inputs_embeds.to(self.device), attention_mask.to(self.device),
                         keep_prefill=keep_prefill, stats=self.stats)
