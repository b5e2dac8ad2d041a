"""LinearMapper save/load and identity checks; ImageTokens (vision encoder + mapper -> soft tokens)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from gemel.errors import DataError, MismatchError
from gemel.image_tokens import ImageTokens
from gemel.mapper import LinearMapper, attach_lora, has_lora, llm_identity
from gemel.prompting import ImageSlot
from gemel.types import Mention
from gemel.feature_cache import FeatureCache
from tests.conftest import tiny_llama, tiny_opt
from tests.test_train import tiny_clip


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def mapper_for(llm, vision, name="tiny-llama", n_tokens=4, k=1, vp_mode="none") -> LinearMapper:
    torch.manual_seed(0)
    return LinearMapper(vision.feature_dim, llm.config.hidden_size, n_tokens, images_per_mention=k,
                        meta={"llm": llm_identity(llm, name), "vision": vision.identity,
                              "vp_mode": vp_mode, "template": "gemel"})


def test_forward_shapes_and_dtype():
    m = LinearMapper(16, 8, n_tokens=3, images_per_mention=2, out_dtype=torch.bfloat16)
    out = m(torch.randn(5, 2, 16))
    assert out.shape == (5, 6, 8) and out.dtype == torch.bfloat16
    assert m(torch.randn(5, 16)).shape == (5, 3, 8)
    # the k images are mapped by the same layer, in order: slot = [image 0 tokens, image 1 tokens]
    x = torch.randn(1, 2, 16)
    torch.testing.assert_close(m(x)[0, 3:], m(x[:, 1])[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[n, k, 16\]"):
        m(torch.randn(5, 2, 15))


def test_save_load_round_trip(tmp_path, sp_tokenizer, clip):
    llm = tiny_llama(len(sp_tokenizer))
    mapper = mapper_for(llm, clip)
    mapper.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "gemel-mapper"
    assert (config["feature_dim"], config["hidden"], config["n_tokens"]) == (32, 32, 4)
    assert config["llm"]["name"] == "tiny-llama" and config["vision"]["model"] == "tiny-clip"
    loaded = LinearMapper.load(tmp_path / "m", expect_llm=llm, expect_vision=clip)
    for k, v in mapper.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    x = torch.randn(3, 32)
    torch.testing.assert_close(mapper(x), loaded(x), rtol=0, atol=0)
    assert loaded.meta["vp_mode"] == "none" and loaded.out_dtype == torch.float32
    # the same LLM in bf16 (inference) is accepted, and soft tokens come out in bf16
    bf16 = LinearMapper.load(tmp_path / "m", expect_llm=llm.to(torch.bfloat16))
    assert bf16.out_dtype == torch.bfloat16
    llm.float()


def test_loading_into_another_llm_names_both(tmp_path, sp_tokenizer, bpe_tokenizer, clip):
    llama = tiny_llama(len(sp_tokenizer))
    mapper_for(llama, clip, name="tiny-llama").save(tmp_path / "m")
    opt = tiny_opt(len(bpe_tokenizer))
    with pytest.raises(MismatchError) as err:
        LinearMapper.load(tmp_path / "m", expect_llm=llm_identity(opt, "tiny-opt"))
    assert "tiny-llama" in str(err.value) and "tiny-opt" in str(err.value)
    # same architecture and sizes, other weights: still another LLM
    other = tiny_llama(len(sp_tokenizer), seed=5)
    with pytest.raises(MismatchError, match="embedding weights"):
        LinearMapper.load(tmp_path / "m", expect_llm=llm_identity(other, "llama-seed-5"))
    # the same weights under another name load, with a warning
    with pytest.warns(UserWarning, match="same shapes"):
        LinearMapper.load(tmp_path / "m", expect_llm=llm_identity(llama, "copy-of-tiny-llama"))


def test_loading_with_another_vision_encoder_names_both(tmp_path, sp_tokenizer, clip):
    import transformers
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from gemel.vision import VisionEncoder

    llm = tiny_llama(len(sp_tokenizer))
    mapper_for(llm, clip).save(tmp_path / "m")
    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8)
    proc = (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor)(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    wide = VisionEncoder(CLIPVisionModel(cfg), proc, name="wide-clip")
    with pytest.raises(MismatchError) as err:
        LinearMapper.load(tmp_path / "m", expect_vision=wide)
    assert "tiny-clip" in str(err.value) and "wide-clip" in str(err.value)


def test_bad_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="mapper.safetensors"):
        LinearMapper.load(tmp_path)


def test_lora_adapters_saved_alone_and_reattached(tmp_path, sp_tokenizer, clip):
    from peft import LoraConfig, get_peft_model

    llm = tiny_llama(len(sp_tokenizer))
    mapper = mapper_for(llm, clip)
    peft_model = get_peft_model(llm, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    mapper.save(tmp_path / "m", lora_model=peft_model)
    assert has_lora(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m" / "lora").iterdir()}
    assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "m" / "lora" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # adapters only, no base weights
    fresh = attach_lora(tiny_llama(len(sp_tokenizer)), tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected)


# -- ImageTokens ------------------------------------------------------------------------------
def _image(tmp_path, name="a.png", colour=(255, 0, 0)):
    im = Image.new("RGB", (40, 32), (10, 10, 10))
    ImageDraw.Draw(im).rectangle([8, 8, 24, 20], fill=colour)
    path = tmp_path / name
    im.save(path)
    return str(path)


def test_image_tokens_shapes_and_overlay_crop(tmp_path, sp_tokenizer, clip):
    llm = tiny_llama(len(sp_tokenizer))
    m = Mention("m1", "t", "x", image=_image(tmp_path), bbox=(8, 8, 24, 20))
    one = ImageTokens(clip, mapper_for(llm, clip), "none")
    assert one([ImageSlot(m), ImageSlot(m)]).shape == (2, 4, 32)
    two = ImageTokens(clip, mapper_for(llm, clip, k=2, vp_mode="overlay+crop"), "overlay+crop")
    assert two.tokens_per_slot == 8
    out = two([ImageSlot(m)])
    assert out.shape == (1, 8, 32)
    feats = two.features([m])  # [1, 2, 32]: overlay, then crop
    torch.testing.assert_close(out[0, 4:], two.mapper(feats[:, 1])[0])
    assert not torch.allclose(feats[0, 0], feats[0, 1])
    with pytest.raises(MismatchError, match="overlay\\+crop"):
        ImageTokens(clip, mapper_for(llm, clip), "overlay+crop")


def test_image_tokens_grad_and_cache(tmp_path, sp_tokenizer, clip):
    llm = tiny_llama(len(sp_tokenizer))
    mapper = mapper_for(llm, clip)
    cache = FeatureCache(tmp_path / "cache")
    m = Mention("m1", "t", "x", image=_image(tmp_path))
    seen = []
    hook = clip.model.register_forward_hook(lambda mod, inp, out: seen.append(1))
    try:
        embedder = ImageTokens(clip, mapper, "overlay", cache=cache)
        mapper.train()
        out = embedder([ImageSlot(m)])
        assert out.requires_grad  # the mapper part keeps its gradient when training
        out.sum().backward()
        assert mapper.proj.weight.grad is not None
        assert all(p.grad is None for p in clip.model.parameters())  # features: no grad
        mapper.eval()
        assert not embedder([ImageSlot(m)]).requires_grad
        assert len(seen) == 1  # encoded once (in-memory memo)
        # features are the encoder's own precision even under the caller's autocast
        fresh = ImageTokens(clip, mapper, "overlay")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = fresh.features([m])
        assert under.dtype == torch.float32
        torch.testing.assert_close(under, embedder.features([m]), rtol=1e-5, atol=1e-6)
        seen.clear()
        # a new embedder (another run) finds the features in the disk cache
        again = ImageTokens(clip, mapper, "overlay", cache=FeatureCache(tmp_path / "cache"))
        again([ImageSlot(m)])
        assert not seen
    finally:
        hook.remove()


def test_missing_or_unreadable_image_names_mention_and_path(tmp_path, sp_tokenizer, clip):
    llm = tiny_llama(len(sp_tokenizer))
    embedder = ImageTokens(clip, mapper_for(llm, clip), "none")
    gone = str(tmp_path / "gone.png")
    with pytest.raises(DataError) as err:
        embedder([ImageSlot(Mention("m-missing", "t", "x", image=gone))])
    assert "m-missing" in str(err.value) and "gone.png" in str(err.value)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError) as err:
        embedder([ImageSlot(Mention("m-bad", "t", "x", image=str(bad)))])
    assert "m-bad" in str(err.value) and "bad.png" in str(err.value)
    with pytest.raises(DataError, match="m-none"):
        embedder([ImageSlot(Mention("m-none", "t", "x", image=None))])
