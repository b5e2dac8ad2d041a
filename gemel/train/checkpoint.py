"""A run's checkpoints and its progress: ``best/`` and ``last/`` written atomically (safetensors +
JSON, no pickle), and a resumed run restored from ``last/``.

A checkpoint folder is written beside its final name and swapped in (the old one renamed to
``.old`` first, removed last), so a kill at any moment leaves a complete checkpoint:
:func:`recover_folder` puts ``.old`` back when the swap was cut short.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torch import nn

from gemel.errors import DataError, GemelError, MismatchError
from gemel.mapper import LORA, LinearMapper
from gemel.train.config import RESUME_FIXED, TrainConfig
from gemel.train.launch import wait_for_everyone

if TYPE_CHECKING:
    from gemel.train.loop import Run
    from gemel.train.parts import FrozenParts, TrainableParts

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LOG_FILE = "train_log.jsonl"
OUR_FILES = ("last", "best", LOG_FILE, "summary.json")


@dataclass
class Progress:
    """Where a run stands; ``trainer_state.json`` saves all but ``last_eval_step``."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    done_in_epoch: int = 0  # batches of the current epoch already trained on (this process)
    best: dict = field(default_factory=lambda: {"h1": None, "step": None})  # best dev H@1
    resumed_from: int | None = None  # the step a resumed run started at
    last_eval_step: int | None = None  # the step of the latest evaluation in this process

    def finished(self, config: TrainConfig) -> bool:
        return config.max_steps is not None and self.step >= config.max_steps

    def improves(self, evaluated: dict | None) -> bool:
        """Record ``evaluated`` (an evaluation's metrics) as the best when its H@1 beats it."""
        if evaluated is None or evaluated["H@1"] is None or (
                self.best["h1"] is not None and evaluated["H@1"] <= self.best["h1"]):
            return False
        self.best = {"h1": evaluated["H@1"], "step": self.step}
        return True


# ---- the output folder ------------------------------------------------------------------------
def check_train_out(out: Path, resume: bool) -> None:
    """``--out`` holding a training run is continued with ``--resume``, never overwritten."""
    if out.exists() and not out.is_dir():
        raise GemelError(f"--out {out} is a file; training writes a folder (best/, last/ ...)")
    ours = [n for n in OUR_FILES if (out / n).exists() or (out / f"{n}.old").exists()]
    if ours and not resume:
        raise GemelError(f"--out {out} already holds a training run ({', '.join(ours)}): add "
                         "--resume to continue it, or choose another --out (or move it away)")


def open_out_folder(out: Path, accelerator: Accelerator) -> None:
    """Create ``out`` and restore a checkpoint whose replacement a kill cut short (main process),
    then let every process go on."""
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("last", "best"):
            recover_folder(out / name)
    wait_for_everyone(accelerator)


def recover_folder(final: Path) -> None:
    """Undo a checkpoint swap that a kill interrupted (``final`` renamed to ``.old``, the new one
    not yet in place): the previous, complete checkpoint comes back."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.is_dir():
        log.warning("%s was being replaced when a run stopped: restoring the previous one", final)
        old.rename(final)


# ---- saving -----------------------------------------------------------------------------------
def save_checkpoints(run: Run, evaluated: dict | None) -> None:
    """``last/`` always (with optimizer and trainer state), ``best/`` when ``evaluated`` improves
    on the best dev H@1; written by the main process while the others wait."""
    improved = run.progress.improves(evaluated)
    accelerator, parts, out = run.accelerator, run.parts, run.out
    if accelerator.is_main_process:
        lora = accelerator.unwrap_model(parts.lm) if parts.lora_model is not None else None
        if improved:
            save_checkpoint(out / "best", parts.mapper, lora)
        save_checkpoint(out / "last", parts.mapper, lora, parts.raw_optimizer, trainer_state(run))
    wait_for_everyone(accelerator)


def trainer_state(run: Run) -> dict:
    """What ``last/trainer_state.json`` holds besides the optimizer's layout."""
    progress, parts = run.progress, run.parts
    return {"step": progress.step, "epoch": progress.epoch,
            "batches_done_in_epoch": progress.done_in_epoch, "total_steps": parts.total_steps,
            "scheduler": parts.scheduler.state_dict(), "best": progress.best,
            "num_processes": run.accelerator.num_processes,
            # fp16 loss scale (plain numbers): a resumed run does not start it over
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "config": dataclasses.asdict(run.config)}


def save_checkpoint(folder: Path, mapper: LinearMapper, lora_model: nn.Module | None,
                    optimizer: torch.optim.Optimizer | None = None, state: dict | None = None) -> None:
    """Write a mapper folder (plus optimizer and trainer state when given) atomically."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    mapper.save(tmp, lora_model=lora_model)
    if optimizer is not None:
        tensors, meta = optimizer_to_safetensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "gemel-optimizer"})
        state = dict(state or {}, optimizer=meta)
    if state is not None:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=str) + "\n",
                                      encoding="utf-8")
    _replace_folder(tmp, folder)


def _replace_folder(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place (the old one is removed only afterwards)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and fp32 bytes of a state dict (equal exactly when the weights are)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict: tensors ``state.<param>.<key>`` (0-d ones as [1]) and JSON
    for the rest (param groups, non-tensor state values, which tensors were scalars)."""
    state_dict = optimizer.state_dict()
    tensors, other, scalars = {}, {}, []
    for param_id, state in state_dict["state"].items():
        for key, value in state.items():
            name = f"state.{param_id}.{key}"
            if isinstance(value, torch.Tensor):
                if value.ndim == 0:
                    scalars.append(name)
                    value = value.reshape(1)
                tensors[name] = value.detach().cpu().contiguous()
            else:
                other[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "values": other,
                     "scalars": scalars}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_to_safetensors`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    scalars = set(meta.get("scalars", []))
    for name, value in list(tensors.items()) + list(meta.get("values", {}).items()):
        _, param_id, key = name.split(".", 2)
        if name in scalars:
            value = value.reshape(())
        state.setdefault(int(param_id), {})[key] = value
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# ---- resuming ---------------------------------------------------------------------------------
def resume(config: TrainConfig, out: Path, frozen: FrozenParts, parts: TrainableParts,
           accelerator: Accelerator) -> Progress:
    """The progress of the checkpoint ``config.resume`` names (True: ``out/last``), with the
    mapper, LoRA adapters, optimizer, schedule and loss scale restored into ``parts``; a fresh
    start when not resuming (or, with ``resume=True``, when there is no checkpoint yet)."""
    if not config.resume:
        return Progress()
    folder = out / "last" if config.resume is True else Path(config.resume)
    if config.resume is True and not (folder / STATE_FILE).exists():
        log.warning("no checkpoint at %s: training from scratch", folder)
        return Progress()
    state = read_trainer_state(folder)
    check_resume_settings(folder, state, config, accelerator.num_processes)
    restore_weights(folder, state, frozen, parts)
    progress = Progress(step=state["step"], epoch=state["epoch"],
                        done_in_epoch=state["batches_done_in_epoch"], resumed_from=state["step"])
    progress.best = state.get("best", progress.best)
    log.info("resumed from %s at step %d (epoch %d, %d batches done)", folder, progress.step,
             progress.epoch, progress.done_in_epoch)
    return progress


def read_trainer_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file() or not (folder / OPTIMIZER_FILE).is_file():
        raise DataError(f"cannot resume: {folder} is not a training checkpoint (needs "
                        f"{STATE_FILE} and {OPTIMIZER_FILE})", path=folder,
                        fix="resume from CKPT_DIR/last, or train from scratch without --resume")
    return json.loads(path.read_text(encoding="utf-8"))


def check_resume_settings(folder: Path, state: dict, config: TrainConfig,
                          num_processes: int) -> None:
    """A resumed run keeps the settings that shape the model, data order and schedule."""
    saved = state.get("config", {})
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != getattr(config, k)]
    if state.get("num_processes", 1) != num_processes:
        changed.append(f"num_processes ({state.get('num_processes')} -> {num_processes})")
    if changed:
        raise MismatchError(f"{folder}: cannot resume with other settings than the "
                            f"checkpoint's: {changed}; restore them or start a new --out")


def restore_weights(folder: Path, state: dict, frozen: FrozenParts, parts: TrainableParts) -> None:
    """Mapper, LoRA adapters, optimizer moments, schedule and fp16 loss scale from ``folder``."""
    from safetensors.torch import load_file

    loaded = LinearMapper.load(folder, expect_llm=frozen.llm_identity, expect_vision=frozen.vision)
    parts.mapper.load_state_dict(loaded.state_dict())
    if parts.lora_model is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(parts.lora_model, load_file(
            str(folder / LORA / "adapter_model.safetensors")))
    parts.raw_optimizer.load_state_dict(optimizer_from_safetensors(
        load_file(str(folder / OPTIMIZER_FILE)), state["optimizer"]))
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.scaler is not None and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])


__all__ = ["Progress", "check_train_out", "open_out_folder", "save_checkpoints", "save_checkpoint",
           "recover_folder", "weights_sha256", "optimizer_to_safetensors",
           "optimizer_from_safetensors", "resume", "read_trainer_state", "STATE_FILE",
           "OPTIMIZER_FILE", "LOG_FILE"]
