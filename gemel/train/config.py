"""What a training run depends on: :class:`TrainConfig`, a plain dataclass.

It is built from flags and a YAML file (``gemel train --config``), checked on construction, and
saved whole in every checkpoint (``config.json``'s ``train`` and ``trainer_state.json``'s
``config``), so a checkpoint tells how it was made and a resumed run can refuse other settings.
Light on purpose (no torch): the ``gemel`` command imports it to build its options.
"""
from __future__ import annotations

from dataclasses import dataclass

from gemel.config import check_values
from gemel.options import DTYPES, MIXED_PRECISIONS
from gemel.visual_prompt import MODES as VP_MODES

# settings that must not change when a run is resumed (they change the model, data order or schedule)
RESUME_FIXED = ("model", "vision", "feature", "layout", "n_visual_tokens", "vp_mode", "template",
                "epochs", "batch_size", "grad_accum", "warmup", "seed", "lora_r")

# the feature layout `--layout auto` takes per visual-prompt mode: a drawn box is lost in one pooled
# vector of the whole image (two-emblem task, 150 steps: H@1 45 with the pooled feature, 20 with a
# 2x2 grid); the last layer's patch tokens under it get 85, those of hidden state -4, layer-normed,
# 95-100 over seeds 0-4 (benchmarks/visual_prompts.py); a crop is the region already
DEFAULT_LAYOUT = {"none": "global", "crop": "global", "overlay": "region:-4",
                  "overlay+crop": "region:-4"}


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
                     choices={"vp_mode": VP_MODES, "mixed_precision": tuple(MIXED_PRECISIONS),
                              "dtype": tuple(DTYPES)})


def resolve_layout(config: TrainConfig) -> str:
    """The feature layout a run uses: the config's, or the default for its vp_mode."""
    return DEFAULT_LAYOUT[config.vp_mode] if config.layout == "auto" else config.layout


__all__ = ["TrainConfig", "RESUME_FIXED", "DEFAULT_LAYOUT", "VP_MODES", "resolve_layout"]
