"""What a run reports while it trains: ``train_log.jsonl`` (one JSON line per logged step and per
evaluation, written by the main process) and an optional accelerate tracker (tensorboard).

The logged loss is the mean over the micro-batches since the previous logged step (all processes);
``seconds_per_step`` the mean wall time of an optimizer step, evaluations left out.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from gemel.files import append_lines, write_atomic
from gemel.train.checkpoint import LOG_FILE
from gemel.train.config import TrainConfig

log = logging.getLogger(__name__)


class TrainLog:
    def __init__(self, out: Path, accelerator: Accelerator, tracker: str | None,
                 config: TrainConfig, resumed_from: int | None):
        self.path, self.accelerator, self.tracker = out / LOG_FILE, accelerator, tracker
        self.enabled = accelerator.is_main_process
        self.log_every = max(config.log_every, 1)
        if config.resume and self.enabled:
            self.forget_after(resumed_from or 0)  # steps a killed run logged past its checkpoint
        if tracker:
            accelerator.init_trackers("gemel-train", config=_scalars(dataclasses.asdict(config)))
        self.loss_sum, self.loss_n = torch.zeros((), device=accelerator.device), 0
        self.seconds, self.timed_steps = 0.0, 0
        self.clock = time.perf_counter()

    # ---- steps --------------------------------------------------------------------------------
    def restart_clock(self) -> None:
        """Time the next optimizer step from now (an epoch starts, or an evaluation ended)."""
        self.clock = time.perf_counter()

    def micro_batch(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.loss_n += 1

    def optimizer_step(self, step: int, epoch: int, lr: float) -> None:
        """Count the step's time; every ``log_every`` steps (and at step 1) write the mean loss
        over the window (a collective: every process calls this)."""
        self.seconds += time.perf_counter() - self.clock
        self.timed_steps += 1
        if step % self.log_every != 0 and step != 1:
            return
        mean_loss = float(self.accelerator.reduce(self.loss_sum / max(self.loss_n, 1),
                                                  reduction="mean"))
        self.write({"event": "step", "step": step, "epoch": epoch, "loss": round(mean_loss, 5),
                    "lr": lr, "seconds_per_step": round(self.seconds / max(self.timed_steps, 1), 4)})
        if self.tracker:
            self.accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=step)
        self.loss_sum, self.loss_n = torch.zeros((), device=self.accelerator.device), 0

    @property
    def seconds_per_step(self) -> float | None:
        return round(self.seconds / self.timed_steps, 4) if self.timed_steps else None

    def evaluation(self, metrics: dict, step: int) -> dict:
        """Log a dev evaluation; return its metrics."""
        self.write({"event": "eval", "step": step, "dev": metrics})
        if self.tracker and metrics["H@1"] is not None:
            self.accelerator.log({"dev/H@1": metrics["H@1"]}, step=step)
        log.info("step %d: dev H@1 %s (n=%d)", step, metrics["H@1"], metrics["n"])
        return metrics

    def close(self) -> None:
        if self.tracker:
            self.accelerator.end_training()

    # ---- the file -----------------------------------------------------------------------------
    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                append_lines(f, [json.dumps(record)])

    def forget_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (and a torn last line): a resumed run logs
        them again, and each step should be in the log once."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        write_atomic(self.path, "".join(line + "\n" for line in kept))


def _scalars(values: dict) -> dict:
    """The entries a tracker's hparams take: plain numbers, strings and booleans."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}


__all__ = ["TrainLog"]
