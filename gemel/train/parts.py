"""The models of a run: the frozen LLM and vision encoder, and what trains — the mapper (and LoRA
adapters), with its optimizer, data loader and schedule, prepared by accelerate.

``lora_r > 0`` wraps the LLM with peft LoRA adapters (dropout 0; the attention and MLP projections
peft knows for the architecture, else every linear layer): the adapters are injected into the
LLM object given, and only they are saved (``lora/``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from torch import nn

from gemel.errors import GemelError
from gemel.feature_cache import open_feature_cache
from gemel.image_tokens import ImageTokens
from gemel.mapper import LinearMapper, llm_identity
from gemel.model import GemelModel
from gemel.prompting import PromptBuilder, Template, load_template
from gemel.train.batches import accepts_logits_to_keep
from gemel.train.config import TrainConfig, resolve_layout
from gemel.train.data import EpochOrder, TrainingData, collate_indices
from gemel.train.launch import wait_for_everyone
from gemel.vision import VisionEncoder
from gemel.visual_prompt import VisualPrompt

log = logging.getLogger(__name__)

# a fresh mapper first sits on a plateau (train loss flat for ~10-20 steps) before it reads the
# image: on the two-emblem task (benchmarks/visual_prompts.py, 60 items) 60 optimizer steps left
# a third of the overlay seeds there (H@1 50 or 0), 80 and 150 steps none (95-100)
FEW_STEPS = 80


@dataclass
class FrozenParts:
    llm: nn.Module  # the causal LM, eval mode, no gradients (LoRA adapters may be injected later)
    tokenizer: object
    vision: VisionEncoder
    llm_identity: dict  # gemel.mapper.llm_identity: what the mapper is checked against on loading


def load_frozen_parts(config: TrainConfig, device: torch.device, llm: nn.Module | None = None,
                      tokenizer=None, vision: VisionEncoder | None = None) -> FrozenParts:
    """The LLM (through the hf backend's loader) and the vision encoder the config names, or the
    objects given, on ``device`` with every weight frozen."""
    llm_name = config.model
    if llm is None or tokenizer is None:
        from gemel.backends.hf import HFBackend

        backend = HFBackend.from_name(config.model, device=device.type, dtype=config.dtype)
        llm, tokenizer = backend.model, backend.tokenizer
    else:  # an object: its own path names it where it has one
        llm_name = getattr(getattr(llm, "config", None), "_name_or_path", "") or config.model
    llm.to(device).eval()
    for p in llm.parameters():
        p.requires_grad_(False)
    if vision is None:
        vision = VisionEncoder.from_name(config.vision, feature=config.feature, device=device,
                                         layout=resolve_layout(config))
    else:
        vision.model.to(device)
        if config.layout != "auto" and config.layout != vision.layout:
            raise GemelError(f"layout {config.layout!r} asked for, but the vision encoder given "
                             f"has layout {vision.layout!r}; build it with layout="
                             f"{config.layout!r}")
    return FrozenParts(llm, tokenizer, vision, llm_identity(llm, name=llm_name))


@dataclass
class TrainableParts:
    """The mapper (and LoRA adapters) being trained, and everything that feeds and steps them."""

    mapper: LinearMapper  # the plain module: what is saved, resumed and evaluated
    lora_model: nn.Module | None  # the peft model around the LLM when lora_r > 0
    prepared: tuple[nn.Module, ...]  # the models behind accelerate (DDP all-reduces their grads)
    lm: nn.Module  # what the training forward runs through: the prepared LoRA model, or the LLM
    keep_kwarg: bool  # lm's forward takes logits_to_keep
    trainable: list[nn.Parameter]  # mapper first, then LoRA: the order of the saved optimizer state
    optimizer: torch.optim.Optimizer  # accelerate's wrapper (skips steps on fp16 overflow)
    raw_optimizer: torch.optim.Optimizer  # the AdamW inside: what is saved and resumed
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: object | None  # the fp16 loss scaler, if any
    order: EpochOrder
    loader: torch.utils.data.DataLoader  # batches of item indices
    batches_per_epoch: int
    total_steps: int  # optimizer steps of the whole run
    builder: PromptBuilder  # with image slots
    trie: object  # gemel.trie.EntityTrie of the KB titles
    embedder: ImageTokens  # slots -> soft tokens through the plain mapper (evaluation)
    train_model: GemelModel  # slots -> soft tokens through the prepared mapper (training)


def build_trainable_parts(config: TrainConfig, frozen: FrozenParts, data: TrainingData,
                          accelerator: Accelerator) -> TrainableParts:
    """A fresh mapper (and LoRA adapters), AdamW, the data loader and the warmup + linear-decay
    schedule, prepared by ``accelerator``."""
    template = load_template(config.template)
    prompt = VisualPrompt(config.vp_mode)
    mapper = new_mapper(config, frozen, template, prompt)
    builder = PromptBuilder(template, frozen.tokenizer, use_images=True,
                            image_tokens=mapper.tokens_per_slot)
    if not builder.use_images:
        raise GemelError(f"template {template.name!r} has no {{image}} placeholder: the mapper "
                         f"would never be used; choose an image template (gemel, gemel_vp)")
    lora_model = add_lora(frozen.llm, config.lora_r, config.lora_alpha) if config.lora_r > 0 else None
    lm = lora_model if lora_model is not None else frozen.llm
    lm.eval()
    keep_kwarg = accepts_logits_to_keep(lm)
    trie = shared_trie(data, frozen.tokenizer, builder, accelerator)

    trainable = list(mapper.parameters())
    if lora_model is not None:
        trainable += [p for p in lora_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    order = EpochOrder(len(data.items), config.seed)
    loader = torch.utils.data.DataLoader(list(range(len(data.items))), batch_size=config.batch_size,
                                         sampler=order, collate_fn=collate_indices)
    if lora_model is not None:
        mapper_p, lm, optimizer, loader = accelerator.prepare(mapper, lora_model, optimizer, loader)
        prepared = (mapper_p, lm)
    else:
        mapper_p, optimizer, loader = accelerator.prepare(mapper, optimizer, loader)
        prepared = (mapper_p,)
    # without accelerate's autocast wrapper around forward (it stays on by default): evaluation
    # must map features as `gemel link` does, in fp32; training steps run under autocast anyway
    mapper = accelerator.unwrap_model(mapper_p, keep_fp32_wrapper=False)
    embedder = ImageTokens(frozen.vision, mapper, prompt, cache=open_feature_cache(config.feature_cache))
    device = accelerator.device
    # the training path goes through the prepared (DDP) mapper so that gradients are all-reduced
    train_model = GemelModel(frozen.tokenizer, frozen.llm.get_input_embeddings(),
                             image_embedder=lambda slots: mapper_p(
                                 embedder.features([s.mention for s in slots]).to(device)))
    raw_optimizer = getattr(optimizer, "optimizer", optimizer)
    batches_per_epoch = len(loader)
    total_steps = math.ceil(batches_per_epoch / config.grad_accum) * config.epochs
    warn_if_few_steps(config, len(data.items), total_steps)
    return TrainableParts(mapper, lora_model, prepared, lm, keep_kwarg, trainable, optimizer,
                          raw_optimizer, linear_schedule(raw_optimizer, config.warmup, total_steps),
                          getattr(accelerator, "scaler", None), order, loader, batches_per_epoch,
                          total_steps, builder, trie, embedder, train_model)


def warn_if_few_steps(config: TrainConfig, n_items: int, total_steps: int) -> None:
    """Say so when the run has fewer optimizer steps than a fresh mapper needed in our benchmark
    (a small training set at the default epochs): it may end before the mapper reads the image."""
    steps = min(total_steps, config.max_steps or total_steps)
    if steps >= FEW_STEPS or config.resume:
        return
    if steps < total_steps:  # --max-steps cuts the run short
        fix = f"raise --max-steps to >= {FEW_STEPS}"
    else:
        per_epoch = max(1, total_steps // config.epochs)
        fix = f"raise --epochs to >= {math.ceil(FEW_STEPS / per_epoch)}"
    log.warning("only %d optimizer steps in all (%d training items, batch %d x grad_accum %d, "
                "%d epochs): a fresh mapper needed >= %d on a small task before it read the image "
                "(benchmarks/visual_prompts.py) — %s", steps, n_items, config.batch_size,
                config.grad_accum, config.epochs, FEW_STEPS, fix)


def new_mapper(config: TrainConfig, frozen: FrozenParts, template: Template,
               prompt: VisualPrompt) -> LinearMapper:
    """An untrained mapper from the vision feature to the LLM's hidden size, carrying what it is
    trained with (encoder, LLM, layout, visual prompt, template, the whole config) in its meta."""
    vision = frozen.vision
    meta = {"vision": vision.identity, "feature": vision.feature, "layout": vision.layout,
            "llm": frozen.llm_identity,
            "vp_mode": config.vp_mode, "template": template.name,
            "template_block": template.block, "template_chat": template.chat,
            "template_forms": template.forms,
            "train": asdict(config)}
    return LinearMapper(vision.feature_dim, frozen.llm_identity["hidden_size"],
                        config.n_visual_tokens, images_per_mention=prompt.n_images, meta=meta,
                        out_dtype=frozen.llm.get_input_embeddings().weight.dtype)


def shared_trie(data: TrainingData, tokenizer, builder: PromptBuilder, accelerator: Accelerator):
    """The KB's entity trie: the main process builds and caches it first, the others load it."""
    from gemel.trie_store import load_or_build_trie

    if not accelerator.is_main_process:
        wait_for_everyone(accelerator)
    trie = load_or_build_trie(data.kb, tokenizer, builder.answer_prefix, builder.terminator_text)
    if accelerator.is_main_process:
        wait_for_everyone(accelerator)
    return trie


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: float, total_steps: int):
    """Linear warmup, then linear decay to 0 at ``total_steps``; ``warmup`` < 1 is a fraction of
    the steps, >= 1 a number of steps."""
    from transformers import get_linear_schedule_with_warmup

    steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    return get_linear_schedule_with_warmup(optimizer, steps, total_steps)


def add_lora(llm: nn.Module, r: int, alpha: int | None) -> nn.Module:
    """``llm`` wrapped by peft with LoRA adapters of rank ``r`` (injected into ``llm`` itself)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as KNOWN

    model_type = getattr(llm.config, "model_type", "")
    # dropout 0: the frozen LLM stays in eval mode, and a resumed run needs no RNG state
    lora_config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                             target_modules=None if model_type in KNOWN else "all-linear")
    return get_peft_model(llm, lora_config)


__all__ = ["FrozenParts", "load_frozen_parts", "TrainableParts", "build_trainable_parts",
           "add_lora", "warn_if_few_steps", "FEW_STEPS"]
