"""Dev evaluation during training: the real linker (trie-constrained beam search through
:class:`gemel.linker.Linker`, the mapper as its image embedder), scored by the one H@k of
:func:`gemel.eval.metrics.hits_at_k` — what ``gemel link --mapper CKPT`` then ``gemel eval`` would
report for the checkpoint."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

from gemel.eval.metrics import hits_at_k

if TYPE_CHECKING:
    from gemel.linker import Linker
    from gemel.train.loop import Run


def evaluate(run: Run) -> dict:
    """Dev ``n``, ``errors``, ``H@1`` and ``H@<num_beams>`` (percent), and ``top1``: each
    mention's top-1 ``[entity id, score]``, so that a link run with the saved checkpoint can be
    compared answer by answer. Each process links its share of the dev mentions."""
    parts, config, accelerator = run.parts, run.config, run.accelerator
    parts.mapper.eval()
    trainable_flags = [p.requires_grad for p in parts.trainable]
    linker = dev_linker(run)  # its backend freezes every parameter, LoRA adapters included
    mine = run.data.dev_mentions[accelerator.process_index::accelerator.num_processes]
    rows = []
    # no autocast: the link run (`gemel link --mapper`) computes in the LLM's own dtype, and
    # autocast against it changed close calls (train dev H@1 75 vs link 65 on one checkpoint)
    with torch.no_grad():
        for start in range(0, len(mine), config.eval_batch_size):
            chunk = mine[start:start + config.eval_batch_size]
            demos = [[d for d in run.demonstrations_for(m) if d.id != m.id] for m in chunk]
            rows += [r.to_json() for r in linker.link_batch(chunk, demonstrations=demos)]
    for p, flag in zip(parts.trainable, trainable_flags):
        p.requires_grad_(flag)
    parts.mapper.train()
    rows = gather_rows(rows, accelerator)
    top1 = {r["id"]: ([r["candidates"][0]["entity_id"], r["candidates"][0]["score"]]
                      if r["candidates"] else [None, None]) for r in rows}
    return {**hits_at_k(rows, sorted({1, config.num_beams})), "top1": top1}


def dev_linker(run: Run) -> Linker:
    """A Linker over the frozen LLM (without LoRA's peft wrapper, its adapters still in it), the
    run's trie and prompt builder, and the mapper being trained."""
    from gemel.backends.hf import HFBackend
    from gemel.linker import Linker, LinkerConfig
    from gemel.model import GemelModel

    config, frozen, parts = run.config, run.frozen, run.parts
    base = parts.lora_model.get_base_model() if parts.lora_model is not None else frozen.llm
    backend = HFBackend(base, frozen.tokenizer, device=str(run.accelerator.device))
    linker = Linker(LinkerConfig(model=config.model, template=config.template,
                                 num_beams=config.num_beams, top_k=max(config.num_beams, 1),
                                 max_new_tokens=config.max_new_tokens,
                                 batch_size=config.eval_batch_size),
                    run.data.kb, backend, trie=parts.trie,
                    model=GemelModel(frozen.tokenizer, base.get_input_embeddings(), parts.embedder))
    linker.builder = parts.builder  # the Linker's own builder leaves image slots out
    return linker


def gather_rows(rows: list[dict], accelerator: Accelerator) -> list[dict]:
    """Every process's prediction rows, on every process (one process: ``rows`` as they are)."""
    if accelerator.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return [row for part in gather_object([rows]) for row in part]


__all__ = ["evaluate", "dev_linker", "gather_rows"]
