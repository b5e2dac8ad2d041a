"""Mapper training with accelerate: the LLM and the vision encoder stay frozen, only the
:class:`~gemel.mapper.LinearMapper` (and optionally LoRA adapters of the LLM) learns.

One training item is a mention with an image and a gold entity in the KB. Its prompt is the
template's query block (``{image}`` -> the mapper's soft tokens), followed by the gold title's
trie sequence (``trie.sequence(title_index)``: the natural tokenization of ``answer_prefix + title +
terminator text`` after the prefix, up to the token that starts the terminator text, which may hold
the title's last characters too, e.g. Qwen's ``")\\n"``). The loss is the token-mean cross-entropy
on those target tokens only (labels -100 elsewhere), over a right-padded batch.

Evaluation on the dev split runs the real linker — trie-constrained beam search through
:class:`gemel.linker.Linker` with the mapper as image embedder, scored by
:func:`gemel.eval.metrics.hits_at_k` — and keeps the best checkpoint by dev H@1. Checkpoints (no
pickle anywhere)::

    CKPT_DIR/best/   mapper.safetensors + config.json (+ lora/): load with LinearMapper.load
    CKPT_DIR/last/   the same, plus optimizer.safetensors (AdamW moments, flattened) and
                     trainer_state.json (step, epoch, batches done, scheduler, best, config)
    CKPT_DIR/train_log.jsonl   one JSON line per logged step and per evaluation
    CKPT_DIR/summary.json      what train() returns

(Without dev mentions there is no ``best/``: only ``last/``.)

Resuming (``resume=True``) continues the step counter, the optimizer moments, the schedule and the
data order exactly where ``last`` left them: the order of epoch e is a permutation seeded by
(seed, e), and the batches already done in that epoch are skipped.

Running it::

    gemel train --kb kb.jsonl --data train.jsonl --dev dev.jsonl --out ckpt --vp-mode overlay
    # several processes on CPU (gloo), e.g. to check data parallelism (--standalone picks a
    # free port; with --master_port 0 the workers waited forever at the rendezvous):
    torchrun --standalone --nproc_per_node 2 -m gemel.cli train ...
    # several GPUs:
    accelerate launch --multi_gpu -m gemel.cli train ...

(``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.15 unless MPI
is set up: use torchrun on CPU.) In several processes each sees its own shard of every epoch
(``accelerator.prepare`` on the DataLoader; the effective batch is batch_size x processes x
grad_accum), DDP all-reduces the mapper's gradients, and only the main process writes files.

Python API: ``train(TrainConfig(...), llm=..., tokenizer=..., vision=..., kb=..., train_mentions=...,
dev_mentions=...)``: objects given replace what the config names.

The modules, in the order a run meets them (``loop.train`` reads top to bottom through them):

=================  =========================================================================
``config``         :class:`TrainConfig`, a plain dataclass saved in every checkpoint
``launch``         the Accelerator: processes, mixed precision, barriers, trackers
``parts``          the frozen LLM and vision encoder; the trainable mapper (+ LoRA), optimizer,
                   data loader and schedule
``data``           training items (mentions with an image and a gold title), the epoch order
``batches``        prompt + gold title -> a right-padded batch; the target-token loss
``evaluate``       dev H@k through the Linker and ``gemel.eval``'s ``hits_at_k``
``checkpoint``     ``best/`` and ``last/`` (safetensors + JSON), the run's progress, resuming
``log``            ``train_log.jsonl`` (and a tracker), loss window and step timing
``loop``           :func:`train` and one optimisation step
=================  =========================================================================

Where training sits among the modules (above the linker, beside ``gemel.eval``):
docs/architecture.md.
"""
from __future__ import annotations

import importlib

from gemel.train.config import DEFAULT_LAYOUT, TrainConfig, resolve_layout

# torch, transformers and the model modules load on first use of these names, so that
# `gemel --help` and the data tools do not pay for them
_LAZY = {"train": "loop", "training_items": "data", "Item": "data", "EpochOrder": "data",
         "build_batch": "batches", "target_loss": "batches", "weights_sha256": "checkpoint"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"gemel.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'gemel.train' has no attribute {name!r}")


__all__ = ["TrainConfig", "DEFAULT_LAYOUT", "resolve_layout", *_LAZY]
