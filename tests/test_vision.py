"""VisionEncoder over tiny random CLIP / SigLIP / DINOv2 models, and the on-disk feature cache."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from gemel.errors import DataError, GemelError, MismatchError
from gemel.types import Mention
from gemel.feature_cache import FeatureCache
from gemel.vision import VisionEncoder
from gemel.visual_prompt import VisualPrompt, settings_key


def _processor(name: str, **kwargs):
    """The PIL flavour when this transformers has it (no torchvision needed)."""
    return (getattr(transformers, name + "Pil", None) or getattr(transformers, name))(**kwargs)


def clip_parts(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=4, image_size=32, patch_size=8)
    proc = _processor("CLIPImageProcessor", size={"shortest_edge": 32},
                      crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(cfg), proc


@pytest.fixture(scope="session")
def clip():
    model, proc = clip_parts()
    return VisionEncoder(model, proc, feature="pooled", name="tiny-clip", batch_size=3)


@pytest.fixture(scope="session")
def images():
    """Six different 48 x 40 noise images (the processor resizes them)."""
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(6)]


@pytest.fixture()
def image_files(tmp_path, images):
    paths = []
    for i, im in enumerate(images):
        path = tmp_path / f"img{i}.png"
        im.save(path)
        paths.append(str(path))
    return paths


def count_forwards(encoder: VisionEncoder) -> list[int]:
    """Number of images the model has seen, updated by a forward hook."""
    seen = [0]
    encoder.model.register_forward_hook(lambda m, args, kwargs, out: seen.__setitem__(
        0, seen[0] + kwargs["pixel_values"].shape[0]), with_kwargs=True)
    return seen


# ---- features -----------------------------------------------------------------------------------

def test_features_are_what_their_names_say(clip, images):
    model, proc = clip.model, clip.processor
    pixels = proc(images=images[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    pooled = clip.encode(images[:2])
    assert pooled.shape == (2, 32) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, out.pooler_output)
    cls = VisionEncoder(model, proc, feature="cls").encode(images[:2])
    torch.testing.assert_close(cls, out.last_hidden_state[:, 0])
    mean = VisionEncoder(model, proc, feature="mean").encode(images[:2])
    assert out.last_hidden_state.shape[1] == 1 + 16  # CLS + 4 x 4 patches
    torch.testing.assert_close(mean, out.last_hidden_state[:, 1:].mean(1))
    layers = VisionEncoder(model, proc, feature="layers:1,3,4")
    assert layers.feature_dim == 96
    got = layers.encode(images[:2])
    want = torch.cat([out.hidden_states[i][:, 0] for i in (1, 3, 4)], dim=-1)
    torch.testing.assert_close(got, want)


def test_bad_feature_names_are_refused(clip):
    with pytest.raises(GemelError, match="unknown vision feature"):
        VisionEncoder(clip.model, clip.processor, feature="avg")
    with pytest.raises(GemelError, match="hidden states 0..4"):
        VisionEncoder(clip.model, clip.processor, feature="layers:2,9")


def test_encoder_is_frozen_and_batching_does_not_change_features(clip, images):
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    one_by_one = VisionEncoder(clip.model, clip.processor, batch_size=1).encode(images)
    all_at_once = VisionEncoder(clip.model, clip.processor, batch_size=16).encode(images)
    torch.testing.assert_close(one_by_one, all_at_once, atol=1e-5, rtol=1e-5)
    assert clip.encode([]).shape == (0, 32)
    out = clip.encode(images[:2])
    assert not out.requires_grad


def test_siglip_has_pooled_and_mean_but_no_class_token(images):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, image_size=32, patch_size=8)
    model = SiglipVisionModel(cfg)
    proc = _processor("SiglipImageProcessor", size={"height": 32, "width": 32})
    enc = VisionEncoder(model, proc, feature="pooled")
    assert enc.encode(images[:3]).shape == (3, 32)
    pixels = proc(images=images[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape[1] == 16  # patches only: mean must use all of them
    torch.testing.assert_close(VisionEncoder(model, proc, feature="mean").encode(images[:1]),
                               hidden.mean(1))
    with pytest.raises(GemelError, match="has none"):
        VisionEncoder(model, proc, feature="cls")


def test_dinov2_from_config(images):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=32, patch_size=8, mlp_ratio=2))
    proc = _processor("BitImageProcessor", size={"height": 32, "width": 32}, do_center_crop=False)
    enc = VisionEncoder(model, proc, feature="pooled")
    pixels = proc(images=images[:2], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixels)
    # DINOv2's pooled output is the normed class token
    torch.testing.assert_close(enc.encode(images[:2]), out.last_hidden_state[:, 0])
    torch.testing.assert_close(VisionEncoder(model, proc, feature="mean").encode(images[:2]),
                               out.last_hidden_state[:, 1:].mean(1))


def test_from_name_loads_the_vision_tower_of_a_full_clip_checkpoint(tmp_path, clip, images):
    from transformers import CLIPConfig, CLIPModel

    vision = clip.model.config.to_dict()
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16))
    full.vision_model.load_state_dict(clip.model.state_dict())
    full.save_pretrained(tmp_path / "clip")
    clip.processor.save_pretrained(tmp_path / "clip")
    loaded = VisionEncoder.from_name(str(tmp_path / "clip"), feature="pooled")
    assert type(loaded.model).__name__ == "CLIPVisionModel"
    assert loaded.feature_dim == 32  # the pooled feature, before CLIP's projection
    torch.testing.assert_close(loaded.encode(images[:2]), clip.encode(images[:2]))
    # the same model read back from disk has the same identity, up to its name
    a, b = loaded.identity, clip.identity
    assert {k for k in a if a[k] != b[k]} == {"model"}
    loaded.check_identity(clip.identity | {"model": loaded.name})  # no error, no warning
    # a full CLIPModel object given directly is reduced to its vision tower too
    assert VisionEncoder(full, clip.processor).feature_dim == 32


def test_identity_tells_encoders_apart(clip):
    other_feature = VisionEncoder(clip.model, clip.processor, feature="cls", name="tiny-clip")
    assert other_feature.identity_key != clip.identity_key
    with pytest.raises(MismatchError, match="feature: saved 'pooled', now 'cls'"):
        other_feature.check_identity(clip.identity, source="mapper/config.json")
    retrained, proc = clip_parts(seed=1)
    same_arch = VisionEncoder(retrained, proc, name="tiny-clip")
    assert same_arch.identity["config_sha256"] == clip.identity["config_sha256"]
    assert same_arch.identity["weights_sha256"] != clip.identity["weights_sha256"]
    assert same_arch.identity_key != clip.identity_key
    with pytest.warns(UserWarning, match="weights_sha256"):
        same_arch.check_identity(clip.identity)
    json.dumps(clip.identity)  # goes into a mapper's config.json as it is


# ---- feature cache ------------------------------------------------------------------------------

def test_second_run_is_served_from_the_cache(tmp_path, image_files):
    enc = VisionEncoder(*clip_parts(), name="tiny-clip", batch_size=4)
    seen = count_forwards(enc)
    cache = FeatureCache(tmp_path / "cache")
    first = enc.encode_paths(image_files, cache=cache)
    assert first.shape == (6, 1, 32) and seen[0] == 6
    assert cache.stats == {"hits": 0, "misses": 6, "written": 6}
    again = FeatureCache(tmp_path / "cache")  # a new process reading the same folder
    second = enc.encode_paths(image_files, cache=again)
    assert seen[0] == 6, "cache hits must not run the model"
    assert torch.equal(first, second)
    assert again.stats["hits"] == 6 and again.hit_rate == 1.0
    assert "100.0% hit rate" in again.summary()
    # features equal plain encoding of the files
    direct = enc.encode([Image.open(p) for p in image_files])
    torch.testing.assert_close(first[:, 0], direct)
    # storage is .npy + JSON only
    files = {p.suffix for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert files <= {".npy", ".json", ""}  # "" is the lock file
    for shard in (tmp_path / "cache" / "shards").glob("*.npy"):
        assert np.load(shard, allow_pickle=False).dtype == np.float32


def test_cache_is_keyed_by_content_encoder_and_prompt(tmp_path, image_files):
    enc = VisionEncoder(*clip_parts(), name="tiny-clip")
    cache = FeatureCache(tmp_path / "cache")
    enc.encode_paths(image_files[:2], cache=cache)
    # same bytes under another name: a hit
    copy = tmp_path / "renamed.png"
    shutil.copy(image_files[0], copy)
    enc.encode_paths([str(copy)], cache=cache)
    assert cache.stats["hits"] == 1
    # same name, new bytes: a miss
    Image.new("RGB", (48, 40), (9, 9, 9)).save(image_files[1])
    enc.encode_paths([image_files[1]], cache=cache)
    assert cache.stats["misses"] == 3
    # another feature of the same model: a miss
    VisionEncoder(enc.model, enc.processor, feature="mean").encode_paths([str(copy)], cache=cache)
    assert cache.stats["misses"] == 4


def test_repeated_images_are_encoded_once(tmp_path, image_files):
    enc = VisionEncoder(*clip_parts(), name="tiny-clip")
    seen = count_forwards(enc)
    out = enc.encode_paths([image_files[0], image_files[1], image_files[0]],
                           cache=FeatureCache(tmp_path / "c"))
    assert seen[0] == 2 and torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    seen[0] = 0
    enc.encode_paths([image_files[0]] * 3)  # without a cache too
    assert seen[0] == 1


def test_mentions_with_visual_prompts(tmp_path, image_files):
    enc = VisionEncoder(*clip_parts(), name="tiny-clip")
    seen = count_forwards(enc)
    mentions = [Mention("a", "t", image=image_files[0], bbox=(4, 4, 30, 30)),
                Mention("b", "t", image=image_files[0], bbox=(10, 8, 44, 36)),
                Mention("c", "t", image=image_files[1], polygon=((2, 2), (40, 5), (20, 35))),
                Mention("d", "t", image=image_files[2])]
    prompt = VisualPrompt("overlay+crop")
    cache = FeatureCache(tmp_path / "cache")
    feats = enc.encode_mentions(mentions, prompt, cache=cache)
    assert feats.shape == (4, 2, 32) and seen[0] == 8
    # same image, different boxes: different overlay and crop features
    assert not torch.allclose(feats[0, 0], feats[1, 0]) and not torch.allclose(feats[0, 1], feats[1, 1])
    # the overlay is not the plain image; the un-boxed mention's two images are both the plain one
    plain = enc.encode_paths(image_files[:3])
    assert not torch.allclose(feats[0, 0], plain[0, 0])
    torch.testing.assert_close(feats[3, 0], plain[2, 0])
    torch.testing.assert_close(feats[3, 1], plain[2, 0])
    # matches rendering by hand
    im = Image.open(image_files[0]).convert("RGB")
    by_hand = enc.encode(prompt.render(im, bbox=(4, 4, 30, 30)))
    torch.testing.assert_close(feats[0], by_hand)
    # a run with another prompt does not reuse these features; the same prompt does
    seen[0] = 0
    enc.encode_mentions(mentions[:1], VisualPrompt("overlay", color=(0, 255, 0)), cache=cache)
    assert cache.stats["hits"] == 0 and seen[0] == 1
    enc.encode_mentions(mentions, prompt, cache=cache)
    assert cache.stats["hits"] == 4 and seen[0] == 1


def test_bad_inputs_name_the_mention(tmp_path, image_files):
    enc = VisionEncoder(*clip_parts(), name="tiny-clip")
    with pytest.raises(DataError, match="m-noimg.*image"):
        enc.encode_mentions([Mention("m-noimg", "text")])
    with pytest.raises(DataError, match="missing.png.*m-gone.*not found"):
        enc.encode_mentions([Mention("m-gone", "t", image=str(tmp_path / "missing.png"))],
                            cache=FeatureCache(tmp_path / "c"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="m-bad.*cannot read"):
        enc.encode_mentions([Mention("m-bad", "t", image=str(broken))])
    with pytest.raises(DataError, match="m-box.*outside"):
        enc.encode_mentions([Mention("m-box", "t", image=image_files[0], bbox=(100, 100, 120, 130))],
                            VisualPrompt("overlay"))
    with pytest.raises(GemelError, match="needs vp_settings"):
        enc.encode_paths(image_files[:1], cache=FeatureCache(tmp_path / "c"),
                         render=lambda i, im: [im])


def test_interrupted_flush_leaves_a_valid_cache(tmp_path, image_files, monkeypatch):
    import gemel.feature_cache as feature_cache

    enc = VisionEncoder(*clip_parts(), name="tiny-clip")
    folder = tmp_path / "cache"
    enc.encode_paths(image_files[:2], cache=FeatureCache(folder))
    index_before = (folder / "index.json").read_text()

    real = feature_cache.write_atomic  # how the cache writes its index

    def crash_on_index(path, text):
        if path.name == "index.json":
            raise KeyboardInterrupt  # killed between writing the shard and the index
        real(path, text)

    monkeypatch.setattr(feature_cache, "write_atomic", crash_on_index)
    with pytest.raises(KeyboardInterrupt):
        enc.encode_paths(image_files[2:4], cache=FeatureCache(folder))
    monkeypatch.setattr(feature_cache, "write_atomic", real)
    assert (folder / "index.json").read_text() == index_before
    assert not list(folder.rglob("*.tmp"))
    reopened = FeatureCache(folder)
    assert len(reopened) == 2
    enc.encode_paths(image_files[:4], cache=reopened)
    assert reopened.stats == {"hits": 2, "misses": 2, "written": 2}


def test_two_writers_merge_their_entries(tmp_path, image_files):
    enc = VisionEncoder(*clip_parts(), name="tiny-clip")
    a, b = FeatureCache(tmp_path / "cache"), FeatureCache(tmp_path / "cache")
    enc.encode_paths(image_files[:2], cache=a)
    enc.encode_paths(image_files[2:4], cache=b)  # b never saw a's entries in memory
    assert len(FeatureCache(tmp_path / "cache")) == 4


def test_cache_put_get_and_bad_index(tmp_path):
    cache = FeatureCache(tmp_path / "c", flush_rows=3)
    key = FeatureCache.key("enc", "img", settings_key("overlay", [1, 2, 3, 4]))
    cache.put(key, np.ones((2, 5)))
    assert (tmp_path / "c" / "index.json").exists() is False  # 2 rows < flush_rows
    cache.put("other", torch.zeros(5))
    assert (tmp_path / "c" / "index.json").exists()  # 3 rows: flushed
    fresh = FeatureCache(tmp_path / "c")
    assert fresh.get(key).shape == (2, 5) and fresh.get("other").shape == (1, 5)
    assert fresh.get("absent") is None
    (tmp_path / "c" / "index.json").write_text("{broken")
    with pytest.raises(DataError, match="index.json.*delete"):
        FeatureCache(tmp_path / "c")


def test_image_retriever_finds_the_same_picture_and_reuses_the_cache(tmp_path, clip, image_files):
    from gemel.retrieval import get_retriever

    train = [Mention(f"t{i}", f"caption {i}", f"m{i}", image=p) for i, p in enumerate(image_files)]
    train.append(Mention("noimg", "caption without image", "m"))
    retriever = get_retriever("image", encoder=clip, cache_dir=tmp_path / "features").fit(train)
    # a query whose picture is a copy of train image 2 under another name and id
    copy = tmp_path / "copy.png"
    shutil.copy(image_files[2], copy)
    demos = retriever.query(Mention("q", "another caption", "q", image=str(copy)), k=3)
    assert demos[0].mention.id == "t2" and demos[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert demos[0].similarity > demos[1].similarity >= demos[2].similarity
    assert "noimg" not in {d.mention.id for d in demos[:len(image_files)]}
    # the query itself is never its own demonstration
    assert "t2" not in {d.mention.id for d in retriever.query(train[2], k=6)}
    # no image: similarity 0 to everything
    assert all(d.similarity == 0.0 for d in retriever.query(Mention("x", "text only", "x"), k=3))
    forwards = count_forwards(clip)
    get_retriever("image", encoder=clip, cache_dir=tmp_path / "features").fit(train)
    assert forwards[0] == 0  # second fit: every feature from the cache


def test_open_feature_cache_resolves_the_setting(tmp_path, monkeypatch):
    """One place turns --feature-cache into a cache: auto, none, or a folder."""
    from gemel.feature_cache import open_feature_cache

    monkeypatch.setenv("GEMEL_CACHE", str(tmp_path / "gemel-cache"))
    assert open_feature_cache("none") is None and open_feature_cache(None) is None
    assert open_feature_cache(tmp_path / "mine").folder == tmp_path / "mine"
    assert open_feature_cache("auto").folder == tmp_path / "gemel-cache" / "features"
    assert (tmp_path / "gemel-cache" / "features" / "shards").is_dir()
