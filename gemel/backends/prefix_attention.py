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
  * suffix: the usual causal attention over the rows' own tokens.

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
    (False = left padding); row_prompt: [rows] prompt index of each row.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    row_prompt: torch.Tensor

    def for_rows(self, row_prompt: torch.Tensor) -> "PrefixState":
        return PrefixState(self.keys, self.values, self.mask, row_prompt)

    def layout(self) -> tuple[torch.Tensor, int]:
        """Each row's slot among its prompt's rows, and the most rows any prompt has."""
        rp = self.row_prompt
        counts = torch.bincount(rp, minlength=self.mask.shape[0])
        starts = torch.cumsum(counts, 0) - counts
        order = torch.argsort(rp, stable=True)
        slot = torch.empty_like(rp)
        slot[order] = torch.arange(len(rp), device=rp.device) - starts[rp[order]]
        return slot, int(counts.max()) if len(rp) else 0


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
    layer = module.layer_idx
    pk, pv = st.keys[layer], st.values[layer]  # [n_prompts, kv, P, d]
    rows, heads, q_len, d = query.shape
    kv = key.shape[1]
    groups = heads // kv
    n_prompts, _, plen, _ = pk.shape
    scale = scaling if scaling is not None else d ** -0.5
    dtype = torch.float32
    slot, width = st.layout()
    # prefix scores: the rows of prompt p as query positions of p, grouped by kv head
    qg = query.new_zeros(n_prompts, width, heads, q_len, d)
    qg[st.row_prompt, slot] = query
    qg = (qg.view(n_prompts, width, kv, groups, q_len, d).permute(0, 2, 3, 1, 4, 5)
          .reshape(n_prompts, kv, groups * width * q_len, d))
    s_pre = torch.matmul(qg.to(dtype), pk.to(dtype).transpose(-1, -2)) * scale  # [n_p, kv, g*w*q, P]
    s_pre = s_pre.masked_fill(~st.mask[:, None, None, :], float("-inf"))
    s_pre = (s_pre.view(n_prompts, kv, groups, width, q_len, plen).permute(0, 3, 1, 2, 4, 5)
             [st.row_prompt, slot].reshape(rows, heads, q_len, plen))
    # suffix scores: causal over the rows' own tokens (this call's q tokens are the last ones)
    slen = key.shape[2]
    qs = query.reshape(rows, kv, groups * q_len, d).to(dtype)
    s_suf = (torch.matmul(qs, key.to(dtype).transpose(-1, -2)) * scale).view(rows, heads, q_len, slen)
    past = slen - q_len
    causal = (torch.arange(slen, device=query.device)[None, :]
              <= past + torch.arange(q_len, device=query.device)[:, None])  # [q, s]
    s_suf = s_suf.masked_fill(~causal, float("-inf"))
    probs = torch.cat([s_pre, s_suf], dim=-1).softmax(-1)  # [rows, heads, q, P + s]
    p_pre, p_suf = probs[..., :plen], probs[..., plen:]
    # back to the prompt layout for the prefix values: [n_p, kv, g*w*q, P] @ [n_p, kv, P, d]
    pg = p_pre.new_zeros(n_prompts, width, kv, groups, q_len, plen)
    pg[st.row_prompt, slot] = p_pre.view(rows, kv, groups, q_len, plen)
    pg = pg.permute(0, 2, 3, 1, 4, 5).reshape(n_prompts, kv, groups * width * q_len, plen)
    o_pre = torch.matmul(pg, pv.to(dtype))  # [n_p, kv, g*w*q, d]
    o_pre = (o_pre.view(n_prompts, kv, groups, width, q_len, d).permute(0, 3, 1, 2, 4, 5)
             [st.row_prompt, slot].reshape(rows, heads, q_len, d))
    o_suf = torch.matmul(p_suf.reshape(rows, kv, groups * q_len, slen), value.to(dtype))
    out = o_pre + o_suf.view(rows, heads, q_len, d)
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
