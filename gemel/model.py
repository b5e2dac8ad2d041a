"""Segments -> ``inputs_embeds``: text through the LLM's embedding table, images through the mapper.

GemelModel owns no weights of its own: the frozen LLM lives in the backend, the optional
``image_embedder`` (vision encoder + trained mapper) turns image slots into soft tokens.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from gemel.prompting import ImageSlot, Prompt

# images -> soft tokens: list of ImageSlot -> [n_slots, n_visual_tokens, hidden]
ImageEmbedder = Callable[[Sequence[ImageSlot]], torch.Tensor]


class GemelModel:
    def __init__(self, tokenizer, embedding: torch.nn.Module, image_embedder: ImageEmbedder | None = None):
        self.tokenizer, self.embedding, self.image_embedder = tokenizer, embedding, image_embedder
        # Some tokenizers (LLaMA, OPT) put a BOS token first; it goes before everything, images too.
        probe = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos_ids = [bos] if bos is not None and probe and probe[0] == bos else []

    def token_ids(self, prompt: Prompt) -> list[list[int] | ImageSlot]:
        """The prompt's pieces: token-id lists for text, ImageSlots for images."""
        pieces: list = [list(self.bos_ids)] if self.bos_ids else []
        for seg in prompt.segments:
            if isinstance(seg, ImageSlot):
                pieces.append(seg)
            else:
                pieces.append(self.tokenizer(seg, add_special_tokens=False)["input_ids"])
        return pieces

    def embed_pieces(self, batch: Sequence[Sequence[list[int] | ImageSlot]]) -> list[torch.Tensor]:
        """Embed each prompt's pieces into one [seq_i, hidden] tensor (images embedded in one batch)."""
        slots = [p for pieces in batch for p in pieces if isinstance(p, ImageSlot)]
        if slots and self.image_embedder is None:
            raise ValueError("prompt has image slots but the model has no image embedder (mapper)")
        image_tokens = iter(self.image_embedder(slots)) if slots else iter(())
        weight = self.embedding.weight
        out = []
        for pieces in batch:
            parts = []
            for p in pieces:
                if isinstance(p, ImageSlot):
                    parts.append(next(image_tokens).to(weight.dtype))
                elif p:
                    parts.append(self.embedding(torch.tensor(p, device=weight.device)))
            out.append(torch.cat(parts) if parts else weight.new_zeros(0, weight.shape[1]))
        return out

    def embed(self, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded batch for generation: ([n, seq, hidden], attention mask [n, seq])."""
        seqs = self.embed_pieces([self.token_ids(p) for p in prompts])
        return pad(seqs, left=True)


def pad(seqs: Sequence[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [len_i, hidden] tensors into [n, max_len, hidden] with zeros, and the 0/1 mask [n, max_len]."""
    longest = max(s.shape[0] for s in seqs)
    ref = seqs[0]
    embeds = ref.new_zeros(len(seqs), longest, ref.shape[1])
    mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=ref.device)
    for i, s in enumerate(seqs):
        n = s.shape[0]
        if left:
            embeds[i, longest - n:], mask[i, longest - n:] = s, 1
        else:
            embeds[i, :n], mask[i, :n] = s, 1
    return embeds, mask
