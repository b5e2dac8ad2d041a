"""The accelerate side of a run: one :class:`~accelerate.Accelerator` per run, its mixed
precision, barriers that also work on CPU, and the optional tracker.

The warmup + linear-decay schedule counts optimizer steps of one process; it is stepped by hand
(``gemel.train.loop``), not through ``accelerator.prepare`` (which steps a prepared scheduler once
per process). ``accelerator.save_state`` is not used: it writes the optimizer and RNG states with
pickle-based ``torch.save`` (``gemel.train.checkpoint`` writes safetensors and JSON instead).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from gemel.train.config import TrainConfig

log = logging.getLogger(__name__)


def start_accelerator(config: TrainConfig, out: Path) -> tuple[Accelerator, str | None]:
    """The run's Accelerator (seeded), and the tracker it logs to (None: the JSONL log only)."""
    want_cuda = torch.cuda.is_available() and not config.cpu
    precision = mixed_precision(config.mixed_precision, "cuda" if want_cuda else "cpu")
    tracker = available_tracker(config.log_with)
    fresh_accelerate_state(precision)
    accelerator = Accelerator(mixed_precision=precision,
                              gradient_accumulation_steps=config.grad_accum, cpu=config.cpu,
                              log_with=tracker, project_dir=str(out))
    set_seed(config.seed)
    return accelerator, tracker


def mixed_precision(requested: str, device: str) -> str:
    """accelerate's name of the autocast precision: ``auto`` follows the backend's choice of
    dtype for the device (:func:`gemel.machine.pick_dtype`: bf16 where it is fast, fp16 on
    GPUs without bf16, else none — bf16 is emulated, ~100x slower, on CPUs without AMX / AVX512-BF16)."""
    if requested != "auto":
        return requested
    from gemel.machine import pick_dtype

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(pick_dtype(device), "no")


def available_tracker(log_with: str | None) -> str | None:
    """``log_with`` when its package is installed; a missing tensorboard is a warning only."""
    if log_with == "tensorboard" and importlib.util.find_spec(log_with) is None:
        log.warning("tensorboard is not installed: logging to train_log.jsonl only")
        return None
    return log_with or None


def fresh_accelerate_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    mixed precision ("restart your runtime"). In a single process (a notebook, a sweep calling
    train() several times) start from a clean state instead; under torchrun the state belongs to
    the launched process and is left alone."""
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not AcceleratorState._shared_state:
        return
    if AcceleratorState._shared_state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def wait_for_everyone(accelerator: Accelerator) -> None:
    """A barrier across processes. accelerate's passes ``device_ids=[local rank]``, which in a CPU
    (gloo) run on a host with fewer GPUs than processes names a GPU that does not exist ("invalid
    device ordinal": seen with torch 2.11 + accelerate 1.15, 2 CPU processes on a 1-GPU host)."""
    if accelerator.num_processes == 1:
        return
    if accelerator.device.type == "cpu":
        import torch.distributed as dist

        dist.barrier()
    else:
        accelerator.wait_for_everyone()


__all__ = ["start_accelerator", "mixed_precision", "wait_for_everyone", "fresh_accelerate_state"]
