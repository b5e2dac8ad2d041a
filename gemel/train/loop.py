"""The training run, top to bottom: :func:`train` calls the named steps of the other modules of
:mod:`gemel.train` (their docstring lists them); :func:`optimisation_step` is one micro-batch."""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from accelerate import Accelerator
from torch import nn

from gemel.files import write_atomic
from gemel.kb import KnowledgeBase
from gemel.train.batches import build_batch, target_loss
from gemel.train.checkpoint import (Progress, check_train_out, open_out_folder, resume,
                                    save_checkpoints, weights_sha256)
from gemel.train.config import TrainConfig
from gemel.train.data import DemosFor, Item, TrainingData, load_data, no_demonstrations
from gemel.train.evaluate import evaluate
from gemel.train.launch import start_accelerator
from gemel.train.log import TrainLog
from gemel.train.parts import (FrozenParts, TrainableParts, build_trainable_parts,
                               load_frozen_parts)
from gemel.types import Mention
from gemel.vision import VisionEncoder


@dataclass
class Run:
    """Everything one training run holds; the steps take it whole."""

    config: TrainConfig
    out: Path
    accelerator: Accelerator
    frozen: FrozenParts
    data: TrainingData
    parts: TrainableParts
    progress: Progress
    log: TrainLog
    demonstrations_for: DemosFor


def train(config: TrainConfig, *, llm: nn.Module | None = None, tokenizer=None,
          vision: VisionEncoder | None = None, kb: KnowledgeBase | None = None,
          train_mentions: Sequence[Mention] | None = None,
          dev_mentions: Sequence[Mention] | None = None,
          demonstrations_for: DemosFor | None = None,
          on_batch: Callable[[list[Mention]], None] | None = None) -> dict:
    """Train the mapper; return a summary (best dev H@1, steps, seconds per step ...).

    ``llm``/``tokenizer``/``vision`` (a :class:`gemel.vision.VisionEncoder`)/``kb``/mentions given
    as objects replace what the config names. ``demonstrations_for(mention)`` gives a training
    item's demonstrations, least similar first (default none); the item itself is always removed
    from them. ``on_batch(mentions)`` is called with each micro-batch this process trains on.
    """
    out = Path(config.out)
    check_train_out(out, bool(config.resume))
    accelerator, tracker = start_accelerator(config, out)
    open_out_folder(out, accelerator)
    frozen = load_frozen_parts(config, accelerator.device, llm, tokenizer, vision)
    config = dataclasses.replace(config, layout=frozen.vision.layout)  # recorded as used
    data = load_data(config, kb, train_mentions, dev_mentions)
    parts = build_trainable_parts(config, frozen, data, accelerator)
    progress = resume(config, out, frozen, parts, accelerator)
    run = Run(config, out, accelerator, frozen, data, parts, progress,
              TrainLog(out, accelerator, tracker, config, progress.resumed_from),
              demonstrations_for or no_demonstrations)

    parts.mapper.train()
    while progress.epoch < config.epochs and not progress.finished(config):
        train_epoch(run, on_batch)
        if (not config.eval_every and not progress.finished(config)
                and progress.last_eval_step != progress.step):
            evaluate_and_checkpoint(run)  # after every epoch
    final = None
    # the last step not evaluated yet, or a resumed run with nothing left to train: evaluate it
    if progress.last_eval_step != progress.step or progress.resumed_from == progress.step:
        final = evaluate_and_checkpoint(run)
    run.log.close()
    return write_summary(run, final)


def train_epoch(run: Run, on_batch: Callable[[list[Mention]], None] | None) -> None:
    """Train on the rest of the current epoch (or up to ``max_steps``), evaluating and saving a
    checkpoint every ``eval_every`` optimizer steps."""
    config, progress = run.config, run.progress
    with epoch_batches(run) as batches:
        for batch_items in batches:
            if on_batch is not None:
                on_batch([item.mention for item in batch_items])
            if not optimisation_step(run, batch_items):
                continue  # gradients accumulate over grad_accum batches
            run.log.optimizer_step(progress.step, progress.epoch,
                                   run.parts.scheduler.get_last_lr()[0])
            finished = progress.finished(config)
            if config.eval_every and progress.step % config.eval_every == 0 and not finished:
                evaluate_and_checkpoint(run)
            if finished or progress.done_in_epoch == 0:
                # leave the loop at an epoch boundary too: epoch/done_in_epoch already moved on
                break
            run.log.restart_clock()


@contextmanager
def epoch_batches(run: Run) -> Iterator[Iterator[list[Item]]]:
    """The batches of the current epoch not yet trained on, in the order fixed by (seed, epoch)."""
    parts, progress = run.parts, run.progress
    parts.order.use_epoch(progress.epoch)
    loader = (run.accelerator.skip_first_batches(parts.loader, progress.done_in_epoch)
              if progress.done_in_epoch else parts.loader)
    run.log.restart_clock()
    try:
        yield ([run.data.items[i] for i in indices.tolist()] for indices in loader)
    finally:
        if hasattr(loader, "end"):
            loader.end()  # a loop left early stays registered in accelerate's GradientState


def optimisation_step(run: Run, batch_items: list[Item]) -> bool:
    """Forward and backward on one micro-batch; at the end of a gradient-accumulation cycle also
    the optimizer and schedule step. Returns whether the optimizer stepped."""
    config, parts, accelerator, progress = run.config, run.parts, run.accelerator, run.progress
    with accelerator.accumulate(*parts.prepared), accelerator.autocast():
        batch = build_batch(batch_items, parts.builder, parts.train_model, parts.trie,
                            parts.mapper.tokens_per_slot, run.demonstrations_for)
        loss = target_loss(parts.lm, batch, parts.keep_kwarg)
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm:
            accelerator.clip_grad_norm_(parts.trainable, config.max_grad_norm)
        parts.optimizer.step()
        parts.optimizer.zero_grad()
    run.log.micro_batch(loss)
    progress.done_in_epoch += 1
    if not accelerator.sync_gradients:
        return False
    if not parts.optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped the step
        parts.scheduler.step()
    progress.step += 1
    if progress.done_in_epoch >= parts.batches_per_epoch:
        progress.epoch, progress.done_in_epoch = progress.epoch + 1, 0
    return True


def evaluate_and_checkpoint(run: Run) -> dict | None:
    """Dev evaluation (when there are dev mentions), logged; then the checkpoints."""
    evaluated = run.log.evaluation(evaluate(run), run.progress.step) if run.data.dev_mentions else None
    save_checkpoints(run, evaluated)
    run.progress.last_eval_step = run.progress.step
    return evaluated


def write_summary(run: Run, final: dict | None) -> dict:
    """What train() returns, also written to ``out/summary.json`` by the main process."""
    progress, accelerator = run.progress, run.accelerator
    summary = {"steps": progress.step, "epochs_done": progress.epoch,
               "total_steps": run.parts.total_steps,
               "best_dev_h1": progress.best["h1"], "best_step": progress.best["step"],
               "final_dev_h1": final["H@1"] if final else None,
               "seconds_per_step": run.log.seconds_per_step,
               "train_items": len(run.data.items), "skipped": run.data.skipped,
               "dev_mentions": len(run.data.dev_mentions),
               "resumed_from_step": progress.resumed_from,
               "num_processes": accelerator.num_processes,
               "process_index": accelerator.process_index,
               "mixed_precision": accelerator.mixed_precision,
               "mapper_sha256": weights_sha256(run.parts.mapper.state_dict()), "out": str(run.out)}
    if accelerator.is_main_process:
        write_atomic(run.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["train", "Run", "optimisation_step"]
