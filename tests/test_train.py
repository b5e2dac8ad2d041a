"""Mapper training: a tiny random CLIP + tiny random LLaMA learn a synthetic image -> title task.

Images are coloured shapes drawn with PIL; the text of every mention is the same, so only the
image (through the trained mapper) can tell the titles apart. Evaluation is the real linker:
trie-constrained beam search over all 30 KB titles.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from gemel.errors import DataError
from gemel.kb import KnowledgeBase
from gemel.mapper import LinearMapper
from gemel.train import TrainConfig, train, weights_sha256
from gemel.types import Entity, Mention
from tests.conftest import REPO, TITLES, needs_cuda, tiny_llama

EXTRA = ["London River", "Queen Jordan", "Amazon Tower", "Apple River", "Texas Bridge",
         "Jordan Tower", "Mercury River", "Paris Bridge", "Obama Tower", "London Apple"]
ALL_TITLES = TITLES + EXTRA  # 30 titles in the trie
# 8 gold titles, some sharing a first token with others (Paris / Paris Hilton, Jordan ...)
GOLD = ["Paris", "Paris Hilton", "Jordan River", "Queen (band)", "Amazon Tower", "London",
        "Tower Bridge", "Apple River"]
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 128, 0), (255, 255, 255)]
SHAPES = ["circle", "square", "triangle", "cross"] * 2


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine (shared cores)
    two spinning OpenMP threads made each training step ~20x slower (0.39 s vs 0.02 s measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def draw(cls: int, shift: int) -> Image.Image:
    """Shape ``cls`` (a distinct shape/colour pair) on black, moved by ``shift`` pixels."""
    im = Image.new("RGB", (32, 32))
    d, c, o = ImageDraw.Draw(im), COLOURS[cls], shift
    shape = SHAPES[cls]
    if shape == "circle":
        d.ellipse([6 + o, 6 + o, 24 + o, 24 + o], fill=c)
    elif shape == "square":
        d.rectangle([6 + o, 6 + o, 24 + o, 24 + o], fill=c)
    elif shape == "triangle":
        d.polygon([(16 + o, 4 + o), (4 + o, 26 + o), (28 + o, 26 + o)], fill=c)
    else:
        d.rectangle([13 + o, 4 + o, 19 + o, 28 + o], fill=c)
        d.rectangle([4 + o, 13 + o, 28 + o, 19 + o], fill=c)
    return im


def make_task(folder: Path, shifts=(0, 2)) -> tuple[KnowledgeBase, list[Mention]]:
    """KB of 30 titles; one mention per (gold class, shift), image files under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    kb = KnowledgeBase.from_entities(Entity(f"Q{i}", t) for i, t in enumerate(ALL_TITLES))
    mentions = []
    for cls, title in enumerate(GOLD):
        for shift in shifts:
            path = folder / f"c{cls}_s{shift}.png"
            draw(cls, shift).save(path)
            mentions.append(Mention(id=f"m{cls}_{shift}", text="A picture.", mention="it",
                                    image=str(path), entity_id=f"Q{ALL_TITLES.index(title)}",
                                    entity=title))
    return kb, mentions


def tiny_clip(seed: int = 0, initializer_factor: float = 5.0):
    """A random 2-layer CLIP vision tower. At the default init (factor 1) the pooled features of
    different images are nearly parallel (cosine > 0.9); factor 5 spreads them apart enough for a
    linear mapper to learn quickly."""
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from gemel.vision import VisionEncoder

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8,
                           initializer_factor=initializer_factor)
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = proc_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return VisionEncoder(CLIPVisionModel(cfg), proc, feature="pooled", name="tiny-clip")


def steerable_llama(vocab_size: int, seed: int = 0):
    """conftest's tiny LLaMA with its matrices scaled x10 (init std 0.2 instead of 0.02).

    At std 0.02 a 2-layer, 32-wide model can hardly move its output at all (logits stay within
    about +-0.6, and a prefix token reaches the answer position only through near-uniform
    attention): no mapper could steer it. Scaled, it is still random and frozen, but steerable."""
    llm = tiny_llama(vocab_size, seed)
    with torch.no_grad():
        for p in llm.parameters():
            if p.ndim == 2:
                p.mul_(10.0)
    return llm


def config(out: Path, **overrides) -> TrainConfig:
    base = dict(out=str(out), model="tiny-llama", vision="tiny-clip", n_visual_tokens=4,
                vp_mode="none", template="gemel", epochs=40, lr=1e-1, batch_size=8,
                warmup=0.0, eval_every=0, num_beams=4, seed=0, mixed_precision="no", cpu=True,
                feature_cache="none", log_every=5)
    base.update(overrides)
    return TrainConfig(**base)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def link_h1(llm, tokenizer, vision, kb, mentions, folder: Path) -> float:
    """Train H@1 of a saved mapper through the public path: load it, build a Linker, link."""
    from gemel.backends.hf import HFBackend
    from gemel.image_tokens import ImageTokens
    from gemel.linker import Linker, LinkerConfig
    from gemel.model import GemelModel
    from gemel.prompting import PromptBuilder

    mapper = LinearMapper.load(folder, expect_llm=llm, expect_vision=vision)
    embedder = ImageTokens(vision, mapper, mapper.meta["vp_mode"])
    linker = Linker(LinkerConfig(model="tiny-llama", num_beams=4, top_k=4), kb,
                    HFBackend(llm, tokenizer),
                    model=GemelModel(tokenizer, llm.get_input_embeddings(), embedder))
    linker.builder = PromptBuilder("gemel", tokenizer, use_images=True,
                                   image_tokens=embedder.tokens_per_slot)
    results = linker.link(mentions)
    return sum(r.candidates[0].entity_id == m.entity_id for r, m in zip(results, mentions)) / len(mentions)


def test_mapper_learns_images_to_titles_and_nothing_else_moves(tmp_path, sp_tokenizer):
    """DONE-WHEN: 100% train H@1 with constrained decoding, frozen weights bit-identical."""
    kb, mentions = make_task(tmp_path / "images")
    llm, vision = steerable_llama(len(sp_tokenizer)), tiny_clip()
    llm_before, vision_before = snapshot(llm), snapshot(vision.model)
    t0 = time.perf_counter()
    # 8 soft tokens (GEMEL uses 4): a 32-wide random LLM needs the extra room. Measured over 7
    # seeds (LLM, encoder and mapper init): every one reached 100% by step 150 with 8 tokens;
    # with 4, two of four seeds were still at 93.75% after 300 steps. Seed 0 gets there by step 50.
    summary = train(config(tmp_path / "ckpt", epochs=200, batch_size=16, lr=1e-1, eval_every=100,
                           n_visual_tokens=8),
                    llm=llm, tokenizer=sp_tokenizer,
                    vision=vision, kb=kb, train_mentions=mentions, dev_mentions=mentions)
    elapsed = time.perf_counter() - t0
    print(f"\ntrain: {summary['steps']} steps, {summary['seconds_per_step']} s/step, "
          f"{elapsed:.1f}s in all (incl. evaluations); best dev H@1 {summary['best_dev_h1']} "
          f"at step {summary['best_step']}")
    assert summary["best_dev_h1"] == 100.0, summary
    for name, value in snapshot(llm).items():
        assert torch.equal(value, llm_before[name]), f"LLM weight {name} changed"
    for name, value in snapshot(vision.model).items():
        assert torch.equal(value, vision_before[name]), f"vision weight {name} changed"
    assert all(not p.requires_grad for p in llm.parameters())
    # the saved best mapper, loaded back through the public API, links every mention right
    assert link_h1(llm, sp_tokenizer, vision, kb, mentions, tmp_path / "ckpt" / "best") == 1.0
    # and an untrained mapper does not (so the task needs the images)
    fresh = LinearMapper.load(tmp_path / "ckpt" / "best")
    torch.manual_seed(1)
    fresh.proj.reset_parameters()
    fresh.save(tmp_path / "untrained")
    assert link_h1(llm, sp_tokenizer, vision, kb, mentions, tmp_path / "untrained") < 0.5
    log = [json.loads(line) for line in (tmp_path / "ckpt" / "train_log.jsonl").open()]
    losses = [r["loss"] for r in log if r["event"] == "step"]
    assert losses[-1] < losses[0] / 2
    assert any(r["event"] == "eval" for r in log)


@needs_cuda
def test_mapper_trains_on_cuda_with_mixed_precision(tmp_path, sp_tokenizer):
    """GPU check: the same task on CUDA under bf16 (or fp16) autocast reaches 100% train H@1, and
    the frozen LLM and encoder are bit-identical afterwards."""
    kb, mentions = make_task(tmp_path / "images")
    llm, vision = steerable_llama(len(sp_tokenizer)), tiny_clip()
    llm_before, vision_before = snapshot(llm), snapshot(vision.model)
    summary = train(config(tmp_path / "ckpt", epochs=200, batch_size=16, lr=1e-1, eval_every=100,
                           n_visual_tokens=8, cpu=False, mixed_precision="auto"),
                    llm=llm, tokenizer=sp_tokenizer,
                    vision=vision, kb=kb, train_mentions=mentions, dev_mentions=mentions)
    print(f"\ncuda train: {summary['steps']} steps, {summary['seconds_per_step']} s/step; best dev "
          f"H@1 {summary['best_dev_h1']} at step {summary['best_step']}")
    assert summary["best_dev_h1"] == 100.0, summary
    for name, value in snapshot(llm).items():
        assert torch.equal(value.cpu(), llm_before[name].cpu()), f"LLM weight {name} changed"
    for name, value in snapshot(vision.model).items():
        assert torch.equal(value.cpu(), vision_before[name].cpu()), f"vision weight {name} changed"
    assert summary["mixed_precision"] in ("bf16", "fp16")  # autocast was on
    assert LinearMapper.load(tmp_path / "ckpt" / "best").proj.weight.dtype == torch.float32


def test_only_target_tokens_carry_loss(tmp_path, sp_tokenizer):
    """Labels are -100 everywhere but the gold title's natural trie path (title tokens and the
    terminator, or their merged last token)."""
    from gemel.model import GemelModel
    from gemel.prompting import PromptBuilder
    from gemel.train import Item, build_batch
    from gemel.trie_store import build_trie

    kb, mentions = make_task(tmp_path / "images", shifts=(0,))
    llm = tiny_llama(len(sp_tokenizer))
    builder = PromptBuilder("gemel", sp_tokenizer, use_images=True, image_tokens=4)
    trie = build_trie(kb, sp_tokenizer, builder.answer_prefix, builder.terminator_text)
    model = GemelModel(sp_tokenizer, llm.get_input_embeddings(),
                       image_embedder=lambda slots: torch.zeros(len(slots), 4, 32))
    items = [Item(m, kb.title_index(m.entity)) for m in mentions[:3]]
    batch = build_batch(items, builder, model, trie, 4, lambda m: [])
    lp = len(sp_tokenizer(builder.answer_prefix, add_special_tokens=False)["input_ids"])
    for row, item in zip(batch.labels, items):
        target = [t for t in row.tolist() if t != -100]
        assert target == trie.sequence(item.title_index)
        # the natural tokenization of the answer as a demonstration shows it, newline included
        natural = sp_tokenizer(builder.answer_prefix + item.mention.entity + "\n",
                               add_special_tokens=False)["input_ids"][lp:]
        assert target == natural and trie.value(trie.node_of(target)) == item.title_index
    # right-padded: the mask is a prefix of ones
    mask = batch.attention_mask
    assert torch.equal(mask, mask.cumprod(dim=1))


def test_own_demonstration_is_excluded(tmp_path, sp_tokenizer):
    from gemel.model import GemelModel
    from gemel.prompting import PromptBuilder
    from gemel.train import Item, build_batch
    from gemel.trie_store import build_trie

    kb, mentions = make_task(tmp_path / "images", shifts=(0,))
    builder = PromptBuilder("gemel", sp_tokenizer, use_images=True, image_tokens=4)
    trie = build_trie(kb, sp_tokenizer, builder.answer_prefix, builder.terminator_text)
    seen = []
    model = GemelModel(sp_tokenizer, tiny_llama(len(sp_tokenizer)).get_input_embeddings(),
                       image_embedder=lambda slots: seen.extend(s.mention.id for s in slots)
                       or torch.zeros(len(slots), 4, 32))
    item = Item(mentions[0], kb.title_index(mentions[0].entity))
    build_batch([item], builder, model, trie, 4, lambda m: [mentions[0], mentions[1]])
    assert seen == [mentions[1].id, mentions[0].id]  # the other demonstration, then the query


def test_missing_image_is_a_data_error(tmp_path, sp_tokenizer):
    kb, mentions = make_task(tmp_path / "images", shifts=(0,))
    os.remove(mentions[0].image)
    with pytest.raises(DataError, match=mentions[0].id):
        train(config(tmp_path / "ckpt", epochs=1), llm=tiny_llama(len(sp_tokenizer)),
              tokenizer=sp_tokenizer, vision=tiny_clip(), kb=kb, train_mentions=mentions[:8])


def test_resume_continues_step_counter_and_optimizer(tmp_path, sp_tokenizer):
    """2 steps, then resume to step 6 (across an epoch boundary) == 6 steps straight: same
    weights, AdamW step count 6, the same data order (the epoch's first batches are skipped)."""
    from safetensors.torch import load_file

    kb, mentions = make_task(tmp_path / "images")  # 16 mentions, batch 4: 4 steps per epoch
    common = dict(epochs=2, batch_size=4, lr=1e-2, warmup=1)
    run = lambda out, **overrides: train(config(out, **common, **overrides), llm=tiny_llama(len(sp_tokenizer)),
                                  tokenizer=sp_tokenizer, vision=tiny_clip(), kb=kb,
                                  train_mentions=mentions)
    straight = run(tmp_path / "straight", max_steps=6)
    first = run(tmp_path / "split", max_steps=2)
    assert first["steps"] == 2
    state = json.loads((tmp_path / "split" / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_done_in_epoch"]) == (2, 0, 2)
    second = run(tmp_path / "split", max_steps=6, resume=True)
    assert second["resumed_from_step"] == 2 and second["steps"] == 6
    state = json.loads((tmp_path / "split" / "last" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batches_done_in_epoch"]) == (6, 1, 2)
    opt = load_file(str(tmp_path / "split" / "last" / "optimizer.safetensors"))
    assert {float(v) for k, v in opt.items() if k.endswith(".step")} == {6.0}
    a = load_file(str(tmp_path / "straight" / "last" / "mapper.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "mapper.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert straight["mapper_sha256"] != weights_sha256(
        LinearMapper(32, 32, 4).state_dict())  # it trained at all


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_processes_shard_the_data_and_agree(tmp_path):
    """torchrun --nproc_per_node 2: disjoint shards, one mapper (equal on both ranks and on disk)."""
    from safetensors.torch import load_file

    # the repository first (tests.* imports), then whatever PYTHONPATH the caller had
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    # --standalone: a free port and a local rendezvous (a fixed --master_port may be taken)
    cmd = [shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_train_script.py"), str(tmp_path)]
    # a session of its own, so that a hang kills torchrun *and* its workers (killing torchrun
    # alone leaves the workers waiting at the rendezvous)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun did not finish in 240 s:\n" + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    ids = [set(r["ids"]) for r in ranks]
    assert ids[0] and ids[1] and not ids[0] & ids[1]
    assert ids[0] | ids[1] == set(ranks[0]["all_ids"])
    assert ranks[0]["num_processes"] == ranks[1]["num_processes"] == 2
    assert ranks[0]["mapper_sha256"] == ranks[1]["mapper_sha256"]
    saved = load_file(str(tmp_path / "ckpt" / "last" / "mapper.safetensors"))
    assert weights_sha256(saved) == ranks[0]["mapper_sha256"]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0


def test_lora_adapters_train_and_save_alone(tmp_path, sp_tokenizer):
    """lora_r > 0: the LoRA adapters learn too, only they are saved; base weights stay put.
    Also logs through accelerate's tensorboard tracker."""
    from safetensors.torch import load_file

    from gemel.mapper import attach_lora

    kb, mentions = make_task(tmp_path / "images", shifts=(0,))
    llm = steerable_llama(len(sp_tokenizer))
    before = snapshot(llm)
    summary = train(config(tmp_path / "ckpt", epochs=3, batch_size=4, lr=1e-2, lora_r=2,
                           log_with="tensorboard"),
                    llm=llm, tokenizer=sp_tokenizer, vision=tiny_clip(), kb=kb,
                    train_mentions=mentions, dev_mentions=mentions[:2])
    assert summary["steps"] == 6
    for name in ("best", "last"):
        adapters = load_file(str(tmp_path / "ckpt" / name / "lora" / "adapter_model.safetensors"))
        assert adapters and all("lora_" in k for k in adapters)
    lora_b = [v for k, v in adapters.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    # peft injected the adapters into `llm`; its own (base) weights did not move
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in llm.state_dict().items() if "lora_" not in k}
    for name, value in before.items():
        assert torch.equal(base[name], value), name
    reloaded = attach_lora(steerable_llama(len(sp_tokenizer)), tmp_path / "ckpt" / "last")
    ids = torch.tensor([[1, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, llm(input_ids=ids).logits)
    assert list((tmp_path / "ckpt").rglob("events.out.tfevents*"))


def test_cli_flags_reach_the_config(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import gemel.train as train_module
    from gemel.cli import train_command

    captured = {}
    monkeypatch.setattr(train_module, "train",
                        lambda cfg: captured.setdefault("config", cfg) and {"process_index": 0})
    kb = tmp_path / "kb.jsonl"
    kb.write_text('{"id": "Q1", "title": "A"}\n')
    args = ["--kb", str(kb), "--data", str(kb), "--out", str(tmp_path / "o"), "--model", "m",
            "--vision", "v", "--feature", "layers:4,10,11,12", "--n-visual-tokens", "8",
            "--vp-mode", "overlay+crop", "--epochs", "2", "--lr", "0.01", "--batch-size", "3",
            "--grad-accum", "4", "--warmup", "10", "--eval-every", "50", "--seed", "7",
            "--resume", "--lora-r", "8", "--format", "native", "--dev-split", "val"]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    c = captured["config"]
    assert (c.model, c.vision, c.feature, c.n_visual_tokens, c.vp_mode) == (
        "m", "v", "layers:4,10,11,12", 8, "overlay+crop")
    assert (c.epochs, c.lr, c.batch_size, c.grad_accum, c.warmup, c.eval_every, c.seed) == (
        2, 0.01, 3, 4, 10.0, 50, 7)
    assert c.resume is True and c.lora_r == 8 and c.format == "native" and c.dev_split == "val"
    assert c.template == "gemel" and c.cpu is False  # unset flags keep the defaults


def test_bf16_autocast_run_after_an_fp32_run_in_one_process(tmp_path, sp_tokenizer):
    """accelerate's process-wide state would refuse a second precision; train() starts afresh."""
    import math

    kb, mentions = make_task(tmp_path / "images", shifts=(0,))
    run = lambda name, mp: train(config(tmp_path / name, epochs=1, batch_size=4,
                                        mixed_precision=mp),
                                 llm=steerable_llama(len(sp_tokenizer)), tokenizer=sp_tokenizer,
                                 vision=tiny_clip(), kb=kb, train_mentions=mentions)
    assert run("fp32", "no")["mixed_precision"] == "no"
    summary = run("bf16", "bf16")
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 2
    log = [json.loads(line) for line in (tmp_path / "bf16" / "train_log.jsonl").open()]
    assert all(math.isfinite(r["loss"]) for r in log if r["event"] == "step")
    saved = LinearMapper.load(tmp_path / "bf16" / "last")
    assert saved.proj.weight.dtype == torch.float32  # the mapper's weights stay fp32


def test_auto_mixed_precision_follows_the_backend_dtype_choice():
    """Training autocasts in the dtype the hf backend would load the LLM in (one precision rule)."""
    from gemel.machine import pick_dtype
    from gemel.train.launch import mixed_precision

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}
    assert mixed_precision("auto", "cpu") == names[pick_dtype("cpu")]
    assert mixed_precision("fp16", "cpu") == "fp16" and mixed_precision("no", "cuda") == "no"


def test_few_optimizer_steps_are_announced_with_the_epochs_that_would_do(caplog):
    """60 items at batch 8 and 5 epochs is 40 steps: the run says so and names the fix."""
    import logging

    from gemel.train.parts import FEW_STEPS, warn_if_few_steps

    with caplog.at_level(logging.WARNING, logger="gemel.train.parts"):
        warn_if_few_steps(TrainConfig(epochs=5, batch_size=8), n_items=60, total_steps=40)
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "only 40 optimizer steps" in text and "60 training items" in text
    assert f"raise --epochs to >= {-(-FEW_STEPS // 8)}" in text  # 8 steps per epoch
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gemel.train.parts"):
        warn_if_few_steps(TrainConfig(epochs=10, batch_size=4), n_items=60, total_steps=150)
        warn_if_few_steps(TrainConfig(epochs=5, batch_size=8, resume=True), 60, 40)
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="gemel.train.parts"):
        warn_if_few_steps(TrainConfig(epochs=10, batch_size=4, max_steps=6), 60, 150)
    text = caplog.records[0].getMessage()
    assert "only 6 optimizer steps" in text and f"raise --max-steps to >= {FEW_STEPS}" in text
