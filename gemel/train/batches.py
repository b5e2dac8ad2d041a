"""From training items to a loss: prompt + gold title embedded as one right-padded batch, and the
cross-entropy of the title's tokens only."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from gemel.errors import GemelError
from gemel.model import GemelModel, pad
from gemel.prompting import ImageSlot, PromptBuilder
from gemel.train.data import DemosFor, Item


@dataclass
class Batch:
    """One right-padded training batch.

    inputs_embeds [n, seq, hidden]; attention_mask [n, seq]; labels [n, seq] (-100 except the
    target title's natural path: its tokens and the terminator, or a token merged with it)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_targets: int


def build_batch(items: Sequence[Item], builder: PromptBuilder, model: GemelModel, trie,
                tokens_per_slot: int, demonstrations_for: DemosFor) -> Batch:
    """Prompt (with its image slots) + gold title sequence, embedded through ``model``
    (a :class:`gemel.model.GemelModel` whose image embedder is the trainable mapper)."""
    batch_pieces, labels = [], []
    for item in items:
        mention = item.mention
        # never its own demonstration
        demos = [d for d in demonstrations_for(mention) if d.id != mention.id]
        pieces = model.token_ids(builder.build(mention, demos))
        n_prompt = sum(tokens_per_slot if isinstance(p, ImageSlot) else len(p) for p in pieces)
        target = trie.sequence(item.title_index)
        batch_pieces.append(pieces + [target])
        labels.append([-100] * n_prompt + target)
    sequences = model.embed_pieces(batch_pieces)
    for sequence, row in zip(sequences, labels):
        if sequence.shape[0] != len(row):
            raise GemelError(f"embedded prompt has {sequence.shape[0]} positions but labels count "
                             f"{len(row)}: the image embedder must give {tokens_per_slot} tokens "
                             f"per slot")
    embeds, mask = pad(sequences, left=False)
    label_tensor = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
    for i, row in enumerate(labels):
        label_tensor[i, :len(row)] = torch.tensor(row, device=mask.device)
    return Batch(embeds, mask, label_tensor,
                 sum(len(trie.sequence(item.title_index)) for item in items))


def target_loss(lm: nn.Module, batch: Batch, keep_kwarg: bool) -> torch.Tensor:
    """Token-mean cross-entropy of the labelled tokens; logits only where a target can be.

    ``keep_kwarg``: the model's forward takes ``logits_to_keep`` (:func:`accepts_logits_to_keep`)."""
    labels = batch.labels
    n, seq = labels.shape
    labelled = (labels != -100).any(0).nonzero()
    first = int(labelled.min()) if len(labelled) else seq - 1
    # logits at position t predict token t + 1: keep positions first-1 .. seq-1 only
    keep = seq - max(first - 1, 0)
    kwargs = {"logits_to_keep": keep} if keep_kwarg else {}
    out = lm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
             use_cache=False, **kwargs)
    logits = out.logits[:, -keep:] if out.logits.shape[1] != keep else out.logits
    # fp32 log-softmax: bf16/fp16 logits lose the small differences the loss is about
    pred = logits[:, :-1].float()
    gold = labels[:, seq - keep + 1:]
    return nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), gold.reshape(-1),
                                       ignore_index=-100)


def accepts_logits_to_keep(lm: nn.Module) -> bool:
    """Whether the (base) model's forward computes logits for the last positions only on request."""
    target = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return "logits_to_keep" in inspect.signature(target.forward).parameters


__all__ = ["Batch", "build_batch", "target_loss", "accepts_logits_to_keep"]
