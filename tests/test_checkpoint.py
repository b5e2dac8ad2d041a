"""A mapper checkpoint is the one source of truth at link time: `--mapper` takes the training
folder or a checkpoint, and the checkpoint's LoRA adapters and template are applied."""
from __future__ import annotations

import json
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch

from gemel.errors import DataError, GemelError
from gemel.linker import Linker
from gemel.mapper import LinearMapper, resolve_checkpoint
from gemel.prompting import load_template
from tests.bad_inputs import REPO, build_env


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("checkpoint-env"))


def linker(env, **overrides) -> Linker:
    return Linker.from_config(kb=REPO / "examples" / "kb.jsonl", model=str(env.model),
                              num_beams=2, top_k=2, feature_cache="none", dtype="fp32", **overrides)


def copy_checkpoint(env, tmp_path, **config_changes):
    """The env's best/ checkpoint copied, with fields of its config.json changed."""
    folder = tmp_path / "ckpt"
    shutil.copytree(env.mapper / "best", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_mapper_takes_the_training_folder_or_a_checkpoint(env, tmp_path):
    assert resolve_checkpoint(env.mapper) == env.mapper / "best"
    assert resolve_checkpoint(env.mapper / "best") == env.mapper / "best"
    only_last = tmp_path / "run"
    shutil.copytree(env.mapper / "best", only_last / "last")
    with pytest.warns(UserWarning, match="no best/ checkpoint"):
        assert resolve_checkpoint(only_last) == only_last / "last"
    with pytest.raises(DataError, match="not a mapper checkpoint"):
        resolve_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linked = linker(env, mapper=str(env.mapper))
    assert linked.checkpoint == env.mapper / "best"
    assert linked.model.image_embedder is not None and linked.builder.use_images


def test_template_precedence(env, tmp_path, monkeypatch):
    vp = load_template("gemel_vp")
    ckpt = copy_checkpoint(env, tmp_path, template="gemel_vp", template_block=vp.block)
    assert linker(env, mapper=str(ckpt)).builder.template.block == vp.block
    assert linker(env, mapper=str(ckpt), template="gemel_vp").builder.template.name == "gemel_vp"
    with pytest.raises(GemelError, match="--template 'gemel' differs from template 'gemel_vp'"):
        linker(env, mapper=str(ckpt), template="gemel")
    # --no-image still links with the checkpoint's template (text-only, same prompt format)
    ablation = linker(env, mapper=str(ckpt), no_image=True)
    assert ablation.builder.template.block == vp.block and not ablation.builder.use_images
    # without a checkpoint: the flag, else the model's configured template, else gemel
    assert linker(env).builder.template.name == "gemel"
    assert linker(env, template="gemel_vp").builder.template.name == "gemel_vp"
    from gemel import sources

    monkeypatch.setitem(sources.OFFLINE, str(env.model), SimpleNamespace(template="gemel_vp"))
    assert sources.default_template(str(env.model)) == "gemel_vp"


def test_the_saved_template_text_wins_over_an_edited_file(env, tmp_path):
    block = load_template("gemel").block.replace("[Question]", "[Q]")
    ckpt = copy_checkpoint(env, tmp_path, template_block=block)
    linked = linker(env, mapper=str(ckpt))
    assert linked.builder.template.block == block and "config.json" in linked.builder.template.source
    with pytest.raises(GemelError, match="differs from template 'gemel'"):
        linker(env, mapper=str(ckpt), template="gemel")


def test_lora_adapters_of_the_checkpoint_are_applied(env, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(env.model).eval()
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    mapper = LinearMapper.load(env.mapper / "best")
    mapper.save(tmp_path / "lora-ckpt", lora_model=peft_model)
    for no_image in (False, True):  # the ablation keeps the trained LLM
        linked = linker(env, mapper=str(tmp_path / "lora-ckpt"), no_image=no_image)
        with torch.no_grad():
            got = linked.backend.model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, plain, atol=1e-4)
        results = linked.link([next(iter(_mentions()))])
        assert results[0].error is None and len(results[0].candidates) == 2


def _mentions():
    from gemel.data import read_mentions

    return read_mentions(REPO / "examples" / "mentions.jsonl", limit=1)
