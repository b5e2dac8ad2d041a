"""The transformers backend: any HF causal LM, trie-constrained beam search with a KV cache.

Why not ``generate(num_beams=B, prefix_allowed_tokens_fn=...)``: it copies the prompt B times
before the prefill and masks the full vocabulary per beam per step. Here the prompt is prefilled
once per mention (batched across mentions), the cache is expanded to the beams afterwards, and the
search only gathers the trie's allowed tokens (gemel.beam). ``tests/test_backend_hf.py`` checks the
result against ``generate`` with ``prefix_allowed_tokens_fn`` on a tiny model.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Sequence

import torch

from gemel.backends.base import Backend
from gemel.beam import Hypothesis, beam_search


def _cache_kwarg(model) -> str:
    """transformers 5.x names the cache argument ``cache``; older releases ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


class HFStepper:
    """Prefill once, then decode rows chosen by the beam search.

    inputs_embeds: [n_prompts, seq, hidden], left-padded; attention_mask: [n_prompts, seq] (1 = token).
    """

    def __init__(self, model, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
        self.model, self.embeds, self.mask = model, inputs_embeds, attention_mask.long()
        self.kw = _cache_kwarg(model)
        self.cache = None
        self.next_pos: torch.Tensor | None = None

    @torch.inference_mode()
    def start(self) -> torch.Tensor:
        # Positions count real tokens only, so left padding does not shift them.
        pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=self.embeds, attention_mask=self.mask, position_ids=pos,
                         use_cache=True, logits_to_keep=1)
        self.cache = _cache_of(out)
        self.next_pos = self.mask.sum(-1)
        # fp32 log-softmax: fp16 logits can overflow and leave every allowed token at -inf.
        return out.logits[:, -1, :].float().log_softmax(-1)

    @torch.inference_mode()
    def advance(self, parents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        device = self.mask.device
        parents, tokens = parents.to(device), tokens.to(device)
        self.cache.reorder_cache(parents)  # index_select on the batch dim: rows may grow or shrink
        self.mask = torch.cat([self.mask[parents], self.mask.new_ones(len(parents), 1)], dim=1)
        pos = self.next_pos[parents]
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask,
                         position_ids=pos[:, None], use_cache=True, **{self.kw: self.cache})
        self.cache = _cache_of(out)
        self.next_pos = pos + 1
        return out.logits[:, -1, :].float().log_softmax(-1)

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[Sequence[int]]]) -> list[list[float]]:
        """Teacher-forced log-probability of given token sequences, per prompt.

        sequences[p] = list of token sequences (title tokens + terminator) to score after prompt p.
        """
        first = self.start()  # [n_prompts, vocab]
        rows = [(p, seq) for p, seqs in enumerate(sequences) for seq in seqs]
        if not rows:
            return [[] for _ in sequences]
        device = self.mask.device
        parents = torch.tensor([p for p, _ in rows], device=device)
        longest = max(len(s) for _, s in rows)
        ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        seq_mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
        for i, (_, s) in enumerate(rows):  # right-padded continuation
            ids[i, :len(s)] = torch.tensor(s)
            seq_mask[i, :len(s)] = 1
        self.cache.reorder_cache(parents)
        mask = torch.cat([self.mask[parents], seq_mask], dim=1)
        pos = self.next_pos[parents][:, None] + torch.arange(longest, device=device)[None]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self.kw: self.cache})
        lp = out.logits.float().log_softmax(-1)  # [rows, longest, vocab]: predicts token t+1
        scores: list[list[float]] = [[] for _ in sequences]
        for i, (p, s) in enumerate(rows):
            total = first[p, s[0]].item()
            if len(s) > 1:
                total += lp[i, torch.arange(len(s) - 1), torch.tensor(s[1:])].sum().item()
            scores[p].append(total)
        return scores


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmul several times faster than fp32. Without them (AVX2 only)
    PyTorch emulates bf16 and it is ~100x *slower* than fp32 (measured on an AVX2 host)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """bf16 where the device has fast bf16 (CUDA with bf16 support, CPU with AMX/AVX512-BF16), else
    fp16 on older GPUs, else fp32."""
    if requested != "auto":
        return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model, tokenizer, device: str = "cpu"):
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, device
        for p in self.model.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_name(cls, name: str, device: str = "auto", dtype: str = "auto") -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gemel.sources import resolve

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve(name, "llm")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(device, dtype))
        return cls(model.to(device), tokenizer, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    def search(self, inputs_embeds, attention_mask, tries, *, num_beams=5, top_k=5,
               max_new_tokens=32, length_penalty=0.0) -> list[list[Hypothesis]]:
        stepper = HFStepper(self.model, inputs_embeds.to(self.device), attention_mask.to(self.device))
        return beam_search(stepper, tries, inputs_embeds.shape[0], num_beams=num_beams, top_k=top_k,
                           max_new_tokens=max_new_tokens, length_penalty=length_penalty)

    def score(self, inputs_embeds, attention_mask, sequences) -> list[list[float]]:
        stepper = HFStepper(self.model, inputs_embeds.to(self.device), attention_mask.to(self.device))
        return stepper.score(sequences)

