"""Attention over a shared prompt prefix, so that beams and scored titles never copy the prompt's cache.

Beam search and teacher-forced scoring run many rows per prompt (5 beams, ~15 scored titles). The
usual way — expand the prompt's KV cache to one copy per row and ``index_select`` it at every step
— copies the whole prompt cache (rows x layers x prompt length) twice per step (the reorder and
the cache's ``cat``); on a CPU that copying, not the matmuls, was the decode loop's main cost.

Here the prompt's keys/values stay as the prefill left them ([n_prompts, kv_heads, P, head_dim]),
and each row only names its prompt (``row_prompt``). A small cache holds the rows' own tokens
(the generated or scored suffix, <= 32 tokens). Attention is computed in two parts, softmaxed
together (fp32), so the result is the same attention, without the copies:

  * prefix: the rows of a prompt are laid out as extra query positions of that prompt
    ([n_prompts, kv_heads, groups x slots x q, head_dim] @ keys^T), masked by the prompt's padding;
  * suffix: the usual causal attention over the rows' own tokens (or, for teacher-forced
    scoring by prefix trees, gemel.backends.score_tree, over each token's ancestors).

It is registered as the transformers attention implementation ``gemel_prefix`` and is active only
for calls that pass ``gemel_prefix=PrefixState(...)``; any other call falls through to SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NAME = "gemel_prefix"


@dataclass
class PrefixState:
    """The prompts' cached keys/values and which prompt each row continues.

    keys[i], values[i]: layer i's [n_prompts, kv_heads, P, head_dim]; mask: [n_prompts, P] bool
    (False = left padding); row_prompt: [rows] prompt index of each row. The rows' layout among
    their prompts is worked out once per model call (every layer shares it), not per layer.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    row_prompt: torch.Tensor
    # [rows, q, q] bool, True = may attend: which of a call's own tokens each token sees, where
    # they are not one causal sequence (gemel.backends.score_tree's prefix trees); None: causal
    suffix_mask: torch.Tensor | None = None

    def __post_init__(self):
        rp, n_prompts = self.row_prompt, self.mask.shape[0]
        counts = torch.bincount(rp, minlength=n_prompts)
        self.width = int(counts.max()) if len(rp) else 0  # most rows any prompt has
        # regular: every prompt has `width` rows, in prompt order (the beam search's usual shape):
        # the rows are then a plain view of the [n_prompts, width] grid, no scatter or gather
        self.regular = bool(len(rp) == n_prompts * self.width
                            and torch.equal(rp, torch.arange(n_prompts, device=rp.device)
                                            .repeat_interleave(self.width)))
        if not self.regular:
            starts = torch.cumsum(counts, 0) - counts
            order = torch.argsort(rp, stable=True)
            self.slot = torch.empty_like(rp)  # each row's place among its prompt's rows
            self.slot[order] = torch.arange(len(rp), device=rp.device) - starts[rp[order]]
        self.bias = torch.zeros(self.mask.shape, dtype=torch.float32, device=self.mask.device
                                ).masked_fill(~self.mask, float("-inf"))[:, None, None, :]
        self.suffix_blocked = (None if self.suffix_mask is None
                               else ~self.suffix_mask[:, None, None])  # [rows, 1, 1, q, q]

    def for_rows(self, row_prompt: torch.Tensor,
                 suffix_mask: torch.Tensor | None = None) -> "PrefixState":
        return PrefixState(self.keys, self.values, self.mask, row_prompt, suffix_mask)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, ...] -> [n_prompts, width, ...] (zeros where a prompt has fewer rows)."""
        if self.regular:
            return x.reshape(self.mask.shape[0], self.width, *x.shape[1:])
        grid = x.new_zeros(self.mask.shape[0], self.width, *x.shape[1:])
        grid[self.row_prompt, self.slot] = x
        return grid

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[n_prompts, width, ...] -> [rows, ...]."""
        if self.regular:
            return grid.reshape(-1, *grid.shape[2:])
        return grid[self.row_prompt, self.slot]


def prefix_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0,
                     gemel_prefix: PrefixState | None = None, **kwargs):
    """query [rows, heads, q, d]; key/value: the rows' own tokens [rows, kv_heads, s, d] (the
    suffix cache, this call's tokens last). Returns ([rows, q, heads, d], None) like transformers'
    attention functions."""
    if gemel_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    if kwargs.get("sliding_window") is not None:
        raise ValueError("gemel_prefix attention does not support sliding-window layers")
    st = gemel_prefix
    pk, pv = st.keys[module.layer_idx], st.values[module.layer_idx]  # [n_prompts, kv, P, d]
    rows, heads, q_len, d = query.shape
    kv = key.shape[1]
    groups = heads // kv
    n_prompts, _, plen, _ = pk.shape
    width = st.width
    scale = scaling if scaling is not None else d ** -0.5
    f32 = torch.float32
    # prefix scores: the rows of prompt p as query positions of p, grouped by kv head
    qg = (st.to_grid(query.reshape(rows, kv, groups, q_len, d)).transpose(1, 2)
          .reshape(n_prompts, kv, width * groups * q_len, d))
    s_pre = torch.matmul(qg.to(f32), pk.to(f32).transpose(-1, -2)).mul_(scale).add_(st.bias)
    s_pre = st.from_grid(s_pre.view(n_prompts, kv, width, groups * q_len, plen).transpose(1, 2))
    # suffix scores: causal over the rows' own tokens (this call's q tokens are the last ones)
    slen = key.shape[2]
    s_suf = torch.matmul(query.reshape(rows, kv, groups * q_len, d).to(f32),
                         key.to(f32).transpose(-1, -2)).mul_(scale)  # [rows, kv, g*q, s]
    if st.suffix_blocked is not None:  # a tree: each token sees its ancestors and itself
        if slen != q_len:
            raise ValueError("a suffix mask needs the call's tokens only (no suffix cache)")
        s_suf = s_suf.reshape(rows, kv, groups, q_len, slen).masked_fill(st.suffix_blocked,
                                                                         float("-inf"))
    elif q_len > 1:
        past = slen - q_len
        future = (torch.arange(slen, device=query.device)[None, :]
                  > past + torch.arange(q_len, device=query.device)[:, None])  # [q, s]
        s_suf = s_suf.reshape(rows, kv, groups, q_len, slen).masked_fill(future, float("-inf"))
    probs = torch.cat([s_pre.reshape(rows, kv, groups * q_len, plen),
                       s_suf.reshape(rows, kv, groups * q_len, slen)], dim=-1).softmax(-1)
    # back to the prompt layout for the prefix values: [n_p, kv, w*g*q, P] @ [n_p, kv, P, d]
    pg = st.to_grid(probs[..., :plen]).transpose(1, 2).reshape(n_prompts, kv, -1, plen)
    o_pre = st.from_grid(torch.matmul(pg, pv.to(f32)).view(n_prompts, kv, width, -1, d)
                         .transpose(1, 2))  # [rows, kv, g*q, d]
    out = o_pre.add_(torch.matmul(probs[..., plen:], value.to(f32)))
    out = out.reshape(rows, heads, q_len, d)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def supports_prefix_attention(model) -> bool:
    """Full-attention models on SDPA or eager attention (sliding windows and soft-capped attention
    scores keep the plain cache path)."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", NAME):
        return False
    if any(t != "full_attention" for t in (getattr(text, "layer_types", None) or [])):
        return False
    if getattr(text, "attn_logit_softcapping", None) or getattr(text, "use_sliding_window", False):
        return False
    return True


def register() -> None:
    """Make ``gemel_prefix`` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, prefix_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
