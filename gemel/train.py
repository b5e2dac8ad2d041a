"""Mapper training with accelerate: the LLM and the vision encoder stay frozen, only the
:class:`~gemel.mapper.LinearMapper` (and optionally LoRA adapters of the LLM) learns.

One training item is a mention with an image and a gold entity in the KB. Its prompt is the
template's query block (``{image}`` -> the mapper's soft tokens), followed by the gold title's
trie sequence (``trie.sequence(title_index)``: the natural tokenization of ``answer_prefix + title +
terminator text`` after the prefix, up to the token that starts the terminator text, which may hold
the title's last characters too, e.g. Qwen's ``")\n"``). The loss is the token-mean cross-entropy
on those target tokens only (labels -100 elsewhere), over a right-padded batch.

Evaluation on the dev split runs the real linker — trie-constrained beam search through
:class:`gemel.linker.Linker` with the mapper as image embedder — and keeps the best checkpoint by
dev H@1. Checkpoints (no pickle anywhere)::

    CKPT_DIR/best/   mapper.safetensors + config.json (+ lora/): load with LinearMapper.load
    CKPT_DIR/last/   the same, plus optimizer.safetensors (AdamW moments, flattened) and
                     trainer_state.json (step, epoch, batches done, scheduler, best, config)
    CKPT_DIR/train_log.jsonl   one JSON line per logged step and per evaluation
    CKPT_DIR/summary.json      what train() returns

(Without dev mentions there is no ``best/``: only ``last/``.)

(``accelerator.save_state`` is not used: it writes the optimizer and RNG states with pickle-based
``torch.save``.) Resuming (``resume=True``) continues the step counter, the optimizer moments,
the schedule and the data order exactly where ``last`` left them: the order of epoch e is a
permutation seeded by (seed, e), and the batches already done in that epoch are skipped.

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
The warmup + linear-decay schedule counts optimizer steps of one process; it is stepped by hand,
not through ``accelerator.prepare`` (which steps a prepared scheduler once per process).

``lora_r > 0`` wraps the LLM with peft LoRA adapters (dropout 0; the attention and MLP projections
peft knows for the architecture, else every linear layer): the adapters are injected into the
LLM object given, and only they are saved (``lora/``).

Python API: ``train(TrainConfig(...), llm=..., tokenizer=..., vision=..., kb=..., train_mentions=...,
dev_mentions=...)``: objects given replace what the config names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import click

from gemel import options
from gemel.config import check_values
from gemel.errors import DataError, GemelError, MismatchError
from gemel.files import append_lines, write_atomic
from gemel.types import Mention

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gemel.mapper import LinearMapper

# torch, transformers and the model modules are imported inside the functions, so that
# registering this command does not slow down `gemel --help` or the data tools

log = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# settings that must not change when a run is resumed (they change the model, data order or schedule)
RESUME_FIXED = ("model", "vision", "feature", "layout", "n_visual_tokens", "vp_mode", "template",
                "epochs",
                "batch_size", "grad_accum", "warmup", "seed", "lora_r")


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the checkpoint's config.json."""

    out: str = "checkpoints"
    kb: str | None = None
    data: str | None = None  # training mentions
    dev: str | None = None  # dev mentions (default: --data, when dev_split is given)
    format: str = "auto"
    split: str | None = None
    dev_split: str | None = None
    splits: str | None = None
    images: str | None = None
    limit: int | None = None
    dev_limit: int | None = None
    strict: bool = False  # a bad KB or mention record is an error (default: skipped, reported)
    model: str = "smollm2-135m-instruct"
    vision: str = "dinov2-small"
    feature: str = "pooled"  # pooled | cls | mean | layers:4,10,11,12
    layout: str = "auto"  # global | grid:N | region | region:L; auto: DEFAULT_LAYOUT of the vp_mode
    n_visual_tokens: int = 4
    vp_mode: str = "none"  # none | overlay | crop | overlay+crop
    template: str = "gemel"
    epochs: int = 5
    lr: float = 1e-3  # GEMEL used 1e-6 (far too low for a fresh linear layer); tune it on dev
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    warmup: float = 0.03  # < 1: fraction of the optimizer steps; >= 1: number of steps
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule is unchanged)
    eval_every: int = 0  # optimizer steps between dev evaluations; 0: after every epoch
    eval_batch_size: int = 4  # gemel link's default batch size: the link run pads the same batches
    num_beams: int = 5
    max_new_tokens: int = 32
    seed: int = 0
    resume: bool | str = False  # True: CKPT_DIR/last; a path: that checkpoint
    lora_r: int = 0  # > 0: also train LoRA adapters of rank r on the LLM
    lora_alpha: int | None = None  # default 2 * r
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    dtype: str = "auto"  # the frozen LLM's weights: auto | fp32 | bf16 | fp16
    cpu: bool = False
    feature_cache: str | None = "auto"  # auto: <gemel cache>/features; none: in memory only
    log_with: str | None = None  # tensorboard (optional); the JSONL log is always written
    log_every: int = 10

    def __post_init__(self) -> None:
        check_values(self, minimum={"epochs": 1, "lr": 0.0, "weight_decay": 0.0, "batch_size": 1,
                                    "grad_accum": 1, "warmup": 0.0, "max_grad_norm": 0.0,
                                    "max_steps": 1, "eval_every": 0, "eval_batch_size": 1,
                                    "num_beams": 1, "max_new_tokens": 1, "n_visual_tokens": 1,
                                    "lora_r": 0, "log_every": 1, "limit": 1, "dev_limit": 1},
                     choices={"vp_mode": VP_MODES, "mixed_precision": MIXED_PRECISIONS,
                              "dtype": tuple(options.DTYPES)})


VP_MODES = ("none", "overlay", "crop", "overlay+crop")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


DemosFor = Callable[[Mention], Sequence[Mention]]

# the feature layout `--layout auto` takes per visual-prompt mode: a drawn box is lost in one pooled
# vector of the whole image (two-emblem task: H@1 65 with the pooled feature); the last layer's
# patch tokens under it get 75, those of hidden state -4, layer-normed, 95
# (benchmarks/visual_prompts.py); a crop is the region already
DEFAULT_LAYOUT = {"none": "global", "crop": "global", "overlay": "region:-4",
                  "overlay+crop": "region:-4"}


def resolve_layout(config: TrainConfig) -> str:
    """The feature layout a run uses: the config's, or the default for its vp_mode."""
    return DEFAULT_LAYOUT[config.vp_mode] if config.layout == "auto" else config.layout


def no_demonstrations(mention: Mention) -> list[Mention]:
    return []


# ---------------------------------------------------------------------------------------------
# data order
class EpochOrder:
    """Indices 0..n-1 in an order fixed by (seed, epoch): a resumed run replays the same order.

    The epoch is set with :meth:`use_epoch` (deliberately not ``set_epoch``, which accelerate calls
    with its own counter of dataloader passes)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def _collate(indices: list[int]) -> "torch.Tensor":
    import torch

    return torch.tensor(indices, dtype=torch.long)


@dataclass(frozen=True)
class Item:
    mention: Mention
    title_index: int


def training_items(mentions: Sequence[Mention], kb, source: object = None
                   ) -> tuple[list[Item], dict[str, int]]:
    """Mentions with an image and a gold entity in the KB, with the gold title's index.

    The rest is counted by reason: ``no_gold`` (NIL or unlabelled), ``not_in_kb``, ``no_image``
    (nothing for the mapper to learn from)."""
    items, skipped = [], {"no_gold": 0, "not_in_kb": 0, "no_image": 0}
    for m in mentions:
        if m.entity_id is not None:
            if m.entity_id not in kb:
                skipped["not_in_kb"] += 1
                continue
            title = kb[m.entity_id].title
        elif m.entity and m.entity != "NIL":
            title = m.entity
        else:
            skipped["no_gold"] += 1
            continue
        index = kb.title_index(title)
        if index < 0:
            skipped["not_in_kb"] += 1
            continue
        if not m.image:
            skipped["no_image"] += 1
            continue
        items.append(Item(m, index))
    if skipped["not_in_kb"]:
        log.warning("%s: %d training mention(s) have a gold entity that is not in the KB; skipped",
                    source or "training data", skipped["not_in_kb"])
    return items, skipped


# ---------------------------------------------------------------------------------------------
# batches
@dataclass
class Batch:
    """One right-padded training batch.

    inputs_embeds [n, seq, hidden]; attention_mask [n, seq]; labels [n, seq] (-100 except the
    target title's natural path: its tokens and the terminator, or a token merged with it)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_targets: int


def build_batch(items: Sequence[Item], builder, model, trie, tokens_per_slot: int,
                demonstrations_for: DemosFor) -> Batch:
    """Prompt (with its image slots) + gold title sequence, embedded through ``model``
    (a :class:`gemel.model.GemelModel` whose image embedder is the trainable mapper)."""
    import torch

    from gemel.model import pad
    from gemel.prompting import ImageSlot

    batch_pieces, labels = [], []
    for item in items:
        m = item.mention
        demos = [d for d in demonstrations_for(m) if d.id != m.id]  # never its own demonstration
        pieces = model.token_ids(builder.build(m, demos))
        n_prompt = sum(tokens_per_slot if isinstance(p, ImageSlot) else len(p) for p in pieces)
        target = trie.sequence(item.title_index)
        batch_pieces.append(pieces + [target])
        labels.append([-100] * n_prompt + target)
    seqs = model.embed_pieces(batch_pieces)
    for s, lab in zip(seqs, labels):
        if s.shape[0] != len(lab):
            raise GemelError(f"embedded prompt has {s.shape[0]} positions but labels count "
                             f"{len(lab)}: the image embedder must give {tokens_per_slot} tokens "
                             f"per slot")
    embeds, mask = pad(seqs, left=False)
    lab = torch.full(mask.shape, -100, dtype=torch.long, device=mask.device)
    for i, row in enumerate(labels):
        lab[i, :len(row)] = torch.tensor(row, device=mask.device)
    return Batch(embeds, mask, lab, sum(len(trie.sequence(it.title_index)) for it in items))


def target_loss(lm: nn.Module, batch: Batch, keep_kwarg: bool) -> torch.Tensor:
    """Token-mean cross-entropy of the labelled tokens; logits only where a target can be."""
    from torch import nn

    labels = batch.labels
    n, seq = labels.shape
    has = (labels != -100).any(0).nonzero()
    first = int(has.min()) if len(has) else seq - 1
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


def _accepts_logits_to_keep(lm: nn.Module) -> bool:
    import inspect

    target = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return "logits_to_keep" in inspect.signature(target.forward).parameters


# ---------------------------------------------------------------------------------------------
# checkpoints
def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and fp32 bytes of a state dict (equal exactly when the weights are)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer state dict: tensors ``state.<param>.<key>`` (0-d ones as [1]) and JSON
    for the rest (param groups, non-tensor state values, which tensors were scalars)."""
    import torch

    sd = optimizer.state_dict()
    tensors, other, scalars = {}, {}, []
    for pid, state in sd["state"].items():
        for key, value in state.items():
            name = f"state.{pid}.{key}"
            if isinstance(value, torch.Tensor):
                if value.ndim == 0:
                    scalars.append(name)
                    value = value.reshape(1)
                tensors[name] = value.detach().cpu().contiguous()
            else:
                other[name] = value
    return tensors, {"param_groups": sd["param_groups"], "values": other, "scalars": scalars}


def optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`optimizer_to_safetensors`: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    scalars = set(meta.get("scalars", []))
    for name, value in list(tensors.items()) + list(meta.get("values", {}).items()):
        _, pid, key = name.split(".", 2)
        if name in scalars:
            value = value.reshape(())
        state.setdefault(int(pid), {})[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


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


def recover_folder(final: Path) -> None:
    """Undo a checkpoint swap that a kill interrupted (``final`` renamed to ``.old``, the new one
    not yet in place): the previous, complete checkpoint comes back."""
    old = final.with_name(final.name + ".old")
    if not final.exists() and old.is_dir():
        log.warning("%s was being replaced when a run stopped: restoring the previous one", final)
        old.rename(final)


OUR_FILES = ("last", "best", LOG_FILE, "summary.json")


def check_train_out(out: Path, resume: bool) -> None:
    """``--out`` holding a training run is continued with ``--resume``, never overwritten."""
    if out.exists() and not out.is_dir():
        raise GemelError(f"--out {out} is a file; training writes a folder (best/, last/ ...)")
    ours = [n for n in OUR_FILES if (out / n).exists() or (out / f"{n}.old").exists()]
    if ours and not resume:
        raise GemelError(f"--out {out} already holds a training run ({', '.join(ours)}): add "
                         "--resume to continue it, or choose another --out (or move it away)")


def read_trainer_state(folder: Path) -> dict:
    path = folder / STATE_FILE
    if not path.is_file() or not (folder / OPTIMIZER_FILE).is_file():
        raise DataError(f"cannot resume: {folder} is not a training checkpoint (needs "
                        f"{STATE_FILE} and {OPTIMIZER_FILE})", path=folder,
                        fix="resume from CKPT_DIR/last, or train from scratch without --resume")
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# loading what the config names
def _wait_for_everyone(accelerator) -> None:
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


def _mixed_precision(requested: str, device: str) -> str:
    import torch

    if requested != "auto":
        return requested
    from gemel.backends.hf import cpu_has_fast_bf16

    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # bf16 is emulated (~100x slower) on CPUs without AMX / AVX512-BF16
    return "bf16" if cpu_has_fast_bf16() else "no"


def _load_llm(config: TrainConfig, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gemel.backends.hf import pick_dtype
    from gemel.sources import loading, resolve

    path = resolve(config.model, "llm")
    with loading(config.model, "llm"):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(device, config.dtype))
    return model, tokenizer


def _read(path, config: TrainConfig, split, limit) -> list[Mention]:
    """Training or dev mentions: bad records skipped and reported (``config.strict``: an error)."""
    from gemel.data.inputs import load_mentions

    return load_mentions(path, config.format, split, config.splits if split else None,
                         config.images, limit, role="pool", strict=config.strict)


def _feature_cache(config: TrainConfig):
    from gemel.sources import cache_dir
    from gemel.vision import FeatureCache

    if config.feature_cache in (None, "", "none"):
        return None
    folder = cache_dir() / "features" if config.feature_cache == "auto" else Path(config.feature_cache)
    return FeatureCache(folder)


def _fresh_accelerate_state(mixed_precision: str) -> None:
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


def _add_lora(llm: nn.Module, r: int, alpha: int | None) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as KNOWN

    model_type = getattr(llm.config, "model_type", "")
    # dropout 0: the frozen LLM stays in eval mode, and a resumed run needs no RNG state
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=None if model_type in KNOWN else "all-linear")
    return get_peft_model(llm, cfg)


class _JsonlLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

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
        write_atomic(self.path, "".join(x + "\n" for x in kept))


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}


# ---------------------------------------------------------------------------------------------
def train(config: TrainConfig, *, llm: nn.Module | None = None, tokenizer=None, vision=None,
          kb=None, train_mentions: Sequence[Mention] | None = None,
          dev_mentions: Sequence[Mention] | None = None,
          demonstrations_for: DemosFor | None = None,
          on_batch: Callable[[list[Mention]], None] | None = None) -> dict:
    """Train the mapper; return a summary (best dev H@1, steps, seconds per step ...).

    ``llm``/``tokenizer``/``vision`` (a :class:`gemel.vision.VisionEncoder`)/``kb``/mentions given
    as objects replace what the config names. ``demonstrations_for(mention)`` gives a training
    item's demonstrations, least similar first (default none); the item itself is always removed
    from them. ``on_batch(mentions)`` is called with each micro-batch this process trains on.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    from gemel.image_tokens import ImageTokens
    from gemel.data.inputs import load_kb
    from gemel.mapper import LORA, LinearMapper, llm_identity
    from gemel.linker import load_or_build_trie
    from gemel.model import GemelModel
    from gemel.prompting import PromptBuilder, load_template
    from gemel.visual_prompt import VisualPrompt

    demonstrations_for = demonstrations_for or no_demonstrations
    out = Path(config.out)
    check_train_out(out, bool(config.resume))
    want_cuda = torch.cuda.is_available() and not config.cpu
    mp = _mixed_precision(config.mixed_precision, "cuda" if want_cuda else "cpu")
    trackers = None
    if config.log_with:
        import importlib.util

        if importlib.util.find_spec(config.log_with) is None and config.log_with == "tensorboard":
            log.warning("tensorboard is not installed: logging to %s only", LOG_FILE)
        else:
            trackers = config.log_with
    _fresh_accelerate_state(mp)
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=config.grad_accum,
                              cpu=config.cpu, log_with=trackers, project_dir=str(out))
    device = accelerator.device
    set_seed(config.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for name in ("last", "best"):
            recover_folder(out / name)
    _wait_for_everyone(accelerator)

    # -- models (frozen) -----------------------------------------------------------------------
    llm_name = config.model
    if llm is None or tokenizer is None:
        llm, tokenizer = _load_llm(config, device.type)
    else:  # an object: its own path names it where it has one
        llm_name = getattr(getattr(llm, "config", None), "_name_or_path", "") or config.model
    llm.to(device).eval()
    for p in llm.parameters():
        p.requires_grad_(False)
    if vision is None:
        from gemel.vision import VisionEncoder

        vision = VisionEncoder.from_name(config.vision, feature=config.feature, device=device,
                                         layout=resolve_layout(config))
    else:
        vision.model.to(device)
        if config.layout != "auto" and config.layout != vision.layout:
            raise GemelError(f"layout {config.layout!r} asked for, but the vision encoder given "
                             f"has layout {vision.layout!r}; build it with layout="
                             f"{config.layout!r}")
    config = dataclasses.replace(config, layout=vision.layout)  # recorded as used
    base_identity = llm_identity(llm, name=llm_name)
    prompt = VisualPrompt(config.vp_mode)
    template = load_template(config.template)

    # -- data ----------------------------------------------------------------------------------
    if kb is None:
        if not config.kb:
            raise GemelError("training needs a KB (--kb FILE)")
        kb = load_kb(config.kb, config.strict)
    if train_mentions is None:
        if not config.data:
            raise GemelError("training needs training mentions (--data FILE)")
        train_mentions = _read(config.data, config, config.split, config.limit)
    if dev_mentions is None and (config.dev or config.dev_split):
        dev_path = config.dev or config.data
        dev_mentions = _read(dev_path, config, config.dev_split, config.dev_limit)
    dev_mentions = [m for m in (dev_mentions or []) if m.entity_id is not None]
    items, skipped = training_items(train_mentions, kb, source=config.data)
    if not items:
        raise DataError(f"no training item: every mention lacks an image or a gold entity in the KB "
                        f"({skipped})", path=config.data,
                        fix="check --images (the image folder) and that the KB holds the gold ids")

    # -- trainable parts -----------------------------------------------------------------------
    n_tokens = config.n_visual_tokens
    emb_dtype = llm.get_input_embeddings().weight.dtype
    meta = {"vision": vision.identity, "feature": vision.feature, "layout": vision.layout,
            "llm": base_identity,
            "vp_mode": config.vp_mode, "template": template.name,
            "template_block": template.block, "template_chat": template.chat,
            "template_forms": template.forms,
            "train": dataclasses.asdict(config)}
    mapper = LinearMapper(vision.feature_dim, base_identity["hidden_size"], n_tokens,
                          images_per_mention=prompt.n_images, meta=meta, out_dtype=emb_dtype)
    builder = PromptBuilder(template, tokenizer, use_images=True,
                            image_tokens=mapper.tokens_per_slot)
    if not builder.use_images:
        raise GemelError(f"template {template.name!r} has no {{image}} placeholder: the mapper "
                         f"would never be used; choose an image template (gemel, gemel_vp)")
    lora_model = _add_lora(llm, config.lora_r, config.lora_alpha) if config.lora_r > 0 else None
    lm = lora_model if lora_model is not None else llm
    lm.eval()
    if not accelerator.is_main_process:
        _wait_for_everyone(accelerator)  # the main process builds and caches the trie first
    trie = load_or_build_trie(kb, tokenizer, builder.answer_prefix, builder.terminator_text)
    if accelerator.is_main_process:
        _wait_for_everyone(accelerator)

    params = list(mapper.parameters())
    if lora_model is not None:
        params += [p for p in lora_model.parameters() if p.requires_grad]
    trainable = params  # mapper first, then LoRA: the order of the saved optimizer state
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sampler = EpochOrder(len(items), config.seed)
    loader = torch.utils.data.DataLoader(list(range(len(items))), batch_size=config.batch_size,
                                         sampler=sampler, collate_fn=_collate)
    if lora_model is not None:
        mapper_p, lm_p, optimizer, loader = accelerator.prepare(mapper, lora_model, optimizer, loader)
    else:
        mapper_p, optimizer, loader = accelerator.prepare(mapper, optimizer, loader)
        lm_p = llm
    # without accelerate's autocast wrapper around forward (it stays on by default): evaluation
    # must map features as `gemel link` does, in fp32; training steps run under autocast anyway
    raw_mapper: LinearMapper = accelerator.unwrap_model(mapper_p, keep_fp32_wrapper=False)
    cache = _feature_cache(config)
    embedder = ImageTokens(vision, raw_mapper, prompt, cache=cache)
    # the training path goes through the prepared (DDP) mapper so that gradients are all-reduced
    train_model = GemelModel(tokenizer, llm.get_input_embeddings(),
                             image_embedder=lambda slots: mapper_p(
                                 embedder.features([s.mention for s in slots]).to(device)))
    keep_kwarg = _accepts_logits_to_keep(lm)

    batches_per_epoch = len(loader)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup * total_steps)) if config.warmup < 1 else int(config.warmup)
    raw_optimizer = getattr(optimizer, "optimizer", optimizer)
    scheduler = get_linear_schedule_with_warmup(raw_optimizer, warmup, total_steps)

    scaler = getattr(accelerator, "scaler", None)

    # -- resume --------------------------------------------------------------------------------
    step, epoch, done_in_epoch = 0, 0, 0
    best = {"h1": None, "step": None}
    resumed_from = None
    if config.resume:
        folder = out / "last" if config.resume is True else Path(config.resume)
        if config.resume is True and not (folder / STATE_FILE).exists():
            log.warning("no checkpoint at %s: training from scratch", folder)
        else:
            st = read_trainer_state(folder)
            saved_cfg = st.get("config", {})
            changed = [k for k in RESUME_FIXED if k in saved_cfg
                       and saved_cfg[k] != getattr(config, k)]
            if st.get("num_processes", 1) != accelerator.num_processes:
                changed.append(f"num_processes ({st.get('num_processes')} -> "
                               f"{accelerator.num_processes})")
            if changed:
                raise MismatchError(f"{folder}: cannot resume with other settings than the "
                                    f"checkpoint's: {changed}; restore them or start a new --out")
            from safetensors.torch import load_file

            loaded = LinearMapper.load(folder, expect_llm=base_identity, expect_vision=vision)
            raw_mapper.load_state_dict(loaded.state_dict())
            if lora_model is not None:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(lora_model, load_file(
                    str(folder / LORA / "adapter_model.safetensors")))
            raw_optimizer.load_state_dict(optimizer_from_safetensors(
                load_file(str(folder / OPTIMIZER_FILE)), st["optimizer"]))
            scheduler.load_state_dict(st["scheduler"])
            if scaler is not None and st.get("scaler"):
                scaler.load_state_dict(st["scaler"])
            step, epoch, done_in_epoch = st["step"], st["epoch"], st["batches_done_in_epoch"]
            best = st.get("best", best)
            resumed_from = step
            log.info("resumed from %s at step %d (epoch %d, %d batches done)", folder, step,
                     epoch, done_in_epoch)

    jlog = _JsonlLog(out / LOG_FILE, accelerator.is_main_process)
    if config.resume and accelerator.is_main_process:
        jlog.forget_after(resumed_from or 0)  # steps a killed run logged past its checkpoint
    if trackers:
        accelerator.init_trackers("gemel-train", config=_scalars(dataclasses.asdict(config)))

    def trainer_state() -> dict:
        return {"step": step, "epoch": epoch, "batches_done_in_epoch": done_in_epoch,
                "total_steps": total_steps, "scheduler": scheduler.state_dict(), "best": best,
                "num_processes": accelerator.num_processes,
                # fp16 loss scale (plain numbers): a resumed run does not start it over
                "scaler": scaler.state_dict() if scaler is not None else None,
                "config": dataclasses.asdict(config)}

    def evaluate() -> dict:
        """Dev H@1 with constrained decoding, each process on its share of the dev mentions."""
        from gemel.backends.hf import HFBackend
        from gemel.linker import Linker, LinkerConfig

        raw_mapper.eval()
        trainable_flags = [p.requires_grad for p in trainable]
        base = lora_model.get_base_model() if lora_model is not None else llm
        backend = HFBackend(base, tokenizer, device=str(device))  # freezes every parameter
        linker = Linker(LinkerConfig(model=config.model, template=config.template,
                                     num_beams=config.num_beams, top_k=max(config.num_beams, 1),
                                     max_new_tokens=config.max_new_tokens,
                                     batch_size=config.eval_batch_size),
                        kb, backend, trie=trie,
                        model=GemelModel(tokenizer, base.get_input_embeddings(), embedder))
        linker.builder = builder  # the Linker's own builder leaves image slots out
        mine = dev_mentions[accelerator.process_index::accelerator.num_processes]
        rows = []
        # no autocast: the link run (`gemel link --mapper`) computes in the LLM's own dtype, and
        # autocast against it changed close calls (train dev H@1 75 vs link 65 on one checkpoint)
        with torch.no_grad():
            for i in range(0, len(mine), config.eval_batch_size):
                chunk = mine[i:i + config.eval_batch_size]
                demos = [[d for d in demonstrations_for(m) if d.id != m.id] for m in chunk]
                rows += [r.to_json() for r in linker.link_batch(chunk, demonstrations=demos)]
        for p, flag in zip(trainable, trainable_flags):
            p.requires_grad_(flag)
        raw_mapper.train()
        ks = sorted({1, config.num_beams})
        # counts, not percentages, are summed over processes
        counts = [0] * (len(ks) + 1)
        for r in rows:
            ids = [c["entity_id"] for c in r["candidates"]]
            counts[0] += 1
            for j, k in enumerate(ks):
                counts[j + 1] += r["gold_id"] in ids[:k]
        total = accelerator.reduce(torch.tensor(counts, dtype=torch.float64, device=device),
                                   reduction="sum").tolist()
        n = int(total[0])
        # each mention's top-1 [entity id, score], so that a link run with the saved checkpoint
        # can be compared answer by answer, score by score
        top1 = {r["id"]: ([r["candidates"][0]["entity_id"], r["candidates"][0]["score"]]
                          if r["candidates"] else [None, None]) for r in rows}
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            top1 = {k: v for part in gather_object([top1]) for k, v in part.items()}
        return {"n": n, **{f"H@{k}": round(100.0 * total[j + 1] / n, 2) if n else None
                           for j, k in enumerate(ks)}, "top1": top1}

    def checkpoint(evaluated: dict | None) -> None:
        nonlocal best
        improved = False
        if evaluated is not None and evaluated["H@1"] is not None and (
                best["h1"] is None or evaluated["H@1"] > best["h1"]):
            best = {"h1": evaluated["H@1"], "step": step}
            improved = True
        if accelerator.is_main_process:
            lora = accelerator.unwrap_model(lm_p) if lora_model is not None else None
            if improved:
                save_checkpoint(out / "best", raw_mapper, lora)
            save_checkpoint(out / "last", raw_mapper, lora, raw_optimizer, trainer_state())
        _wait_for_everyone(accelerator)

    # -- the loop --------------------------------------------------------------------------------
    raw_mapper.train()
    seconds, timed_steps, last_eval_step = 0.0, 0, None
    loss_sum, loss_n = torch.zeros((), device=device), 0
    finished = config.max_steps is not None and step >= config.max_steps
    while epoch < config.epochs and not finished:
        sampler.use_epoch(epoch)
        epoch_loader = (accelerator.skip_first_batches(loader, done_in_epoch) if done_in_epoch
                        else loader)
        t0 = time.perf_counter()
        for idx in epoch_loader:
            batch_items = [items[i] for i in idx.tolist()]
            if on_batch is not None:
                on_batch([it.mention for it in batch_items])
            models = (mapper_p, lm_p) if lora_model is not None else (mapper_p,)
            with accelerator.accumulate(*models), accelerator.autocast():
                batch = build_batch(batch_items, builder, train_model, trie,
                                    mapper.tokens_per_slot, demonstrations_for)
                loss = target_loss(lm_p, batch, keep_kwarg)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            loss_sum += loss.detach()
            loss_n += 1
            done_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            if not optimizer.step_was_skipped:  # fp16 overflow: the scaler skipped the step
                scheduler.step()
            step += 1
            seconds += time.perf_counter() - t0
            timed_steps += 1
            if done_in_epoch >= batches_per_epoch:
                epoch, done_in_epoch = epoch + 1, 0
            if step % max(config.log_every, 1) == 0 or step == 1:
                mean_loss = float(accelerator.reduce(loss_sum / max(loss_n, 1), reduction="mean"))
                record = {"event": "step", "step": step, "epoch": epoch, "loss": round(mean_loss, 5),
                          "lr": scheduler.get_last_lr()[0],
                          "seconds_per_step": round(seconds / max(timed_steps, 1), 4)}
                jlog.write(record)
                if trackers:
                    accelerator.log({"train/loss": mean_loss, "train/lr": record["lr"]}, step=step)
                loss_sum, loss_n = torch.zeros((), device=device), 0  # mean over the log window
            finished = config.max_steps is not None and step >= config.max_steps
            if config.eval_every and step % config.eval_every == 0 and not finished:
                checkpoint(_log_eval(evaluate(), step, jlog, accelerator, trackers)
                           if dev_mentions else None)
                last_eval_step = step
            if finished or done_in_epoch == 0:
                # leave the loop at an epoch boundary too: epoch/done_in_epoch already moved on
                break
            t0 = time.perf_counter()
        if hasattr(epoch_loader, "end"):
            epoch_loader.end()  # a loop left early stays registered in accelerate's GradientState
        if not config.eval_every and not finished and last_eval_step != step:
            checkpoint(_log_eval(evaluate(), step, jlog, accelerator, trackers)
                       if dev_mentions else None)
            last_eval_step = step
    final = None
    if last_eval_step != step or resumed_from == step:
        final = _log_eval(evaluate(), step, jlog, accelerator, trackers) if dev_mentions else None
        checkpoint(final)
    if trackers:
        accelerator.end_training()
    summary = {"steps": step, "epochs_done": epoch, "total_steps": total_steps,
               "best_dev_h1": best["h1"], "best_step": best["step"],
               "final_dev_h1": final["H@1"] if final else None,
               "seconds_per_step": round(seconds / timed_steps, 4) if timed_steps else None,
               "train_items": len(items), "skipped": skipped, "dev_mentions": len(dev_mentions),
               "resumed_from_step": resumed_from, "num_processes": accelerator.num_processes,
               "process_index": accelerator.process_index, "mixed_precision": mp,
               "mapper_sha256": weights_sha256(raw_mapper.state_dict()), "out": str(out)}
    if accelerator.is_main_process:
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _log_eval(metrics: dict, step: int, jlog: _JsonlLog, accelerator, trackers) -> dict:
    jlog.write({"event": "eval", "step": step, "dev": metrics})
    if trackers and metrics["H@1"] is not None:
        accelerator.log({"dev/H@1": metrics["H@1"]}, step=step)
    log.info("step %d: dev H@1 %s (n=%d)", step, metrics["H@1"], metrics["n"])
    return metrics


# ---------------------------------------------------------------------------------------------
# the `gemel train` command (registered in gemel.cli)
@click.command("train")
@click.option("--kb", "kb", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Knowledge base JSONL.")
@click.option("--data", "data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training mentions: our JSONL or a public release file.")
@click.option("--dev", "dev", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Dev mentions (default: --data with --dev-split).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder (best/, last/, train_log.jsonl); an existing run in it is "
              "continued with --resume, never overwritten.")
@options.config_option("TrainConfig")
@options.model_option
@click.option("--vision", default=None, help="Vision encoder [dinov2-small].")
@click.option("--feature", default=None, help="pooled | cls | mean | layers:4,10,11,12 [pooled].")
@click.option("--layout", default=None,
              help="Feature layout: global | grid:N | region | region:L (patch tokens of hidden "
                   "state L) [auto: region:-4 for overlay modes, else global].")
@click.option("--n-visual-tokens", type=options.AT_LEAST_1, default=None,
              help="Soft tokens per image [4].")
@click.option("--vp-mode", type=click.Choice(VP_MODES), default=None, help="Visual prompt [none].")
@options.template_option
@click.option("--epochs", type=options.AT_LEAST_1, default=None)
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Peak learning rate [1e-3].")
@options.batch_size_option
@click.option("--grad-accum", type=options.AT_LEAST_1, default=None)
@click.option("--warmup", type=click.FloatRange(min=0.0), default=None,
              help="Fraction (<1) or number of steps.")
@click.option("--eval-every", type=options.AT_LEAST_0, default=None,
              help="Optimizer steps; 0: every epoch.")
@click.option("--max-steps", type=options.AT_LEAST_1, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--resume", is_flag=True, default=False, help="Continue from OUT/last.")
@click.option("--lora-r", type=options.AT_LEAST_0, default=None,
              help="Also train LoRA adapters of this rank.")
@click.option("--mixed-precision", type=click.Choice(MIXED_PRECISIONS), default=None)
@options.dtype_option
@options.beams_option
@options.feature_cache_option
@click.option("--cpu", is_flag=True, default=False, help="Train on CPU even with a GPU.")
@click.option("--log-with", type=click.Choice(["tensorboard"]), default=None)
@options.format_option
@options.strict_option
@options.split_option
@click.option("--dev-split", default=None, help="Dev split, with --splits.")
@options.splits_option
@options.images_option
@options.limit_option
@click.option("--dev-limit", type=options.AT_LEAST_1, default=None)
def train_command(config_path, resume, cpu, fmt, splits_path, images_dir, **flags):
    """Train the linear mapper (frozen LLM and vision encoder) and keep the best by dev H@1."""
    from gemel.config import from_dict, load_yaml

    values = load_yaml(config_path) if config_path else {}
    values.update({k: v for k, v in dict(flags, format=fmt, splits=splits_path, images=images_dir,
                                         resume=resume or None, cpu=cpu or None).items()
                   if v is not None})
    config = from_dict(TrainConfig, values, source=config_path or "<flags>")
    summary = train(config)
    if summary["process_index"] == 0:
        click.echo(json.dumps(summary, indent=2))


__all__ = ["TrainConfig", "train", "train_command", "training_items", "build_batch",
           "target_loss", "weights_sha256", "EpochOrder"]
