"""Feature layouts (global | grid:N | region): shapes, what the region token pools, cache keys and
the mismatch a mapper refuses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from gemel.errors import GemelError, MismatchError
from gemel.image_tokens import ImageTokens
from gemel.mapper import LinearMapper
from gemel.types import Mention
from gemel.feature_cache import FeatureCache
from gemel.vision import VisionEncoder, parse_layout
from gemel.visual_prompt import VisualPrompt, region_masks
from tests.test_vision import clip_parts


@pytest.fixture(scope="module")
def parts():
    return clip_parts()


@pytest.fixture(scope="module")
def square_images():
    """32 x 32 noise images: the tiny CLIP processor (shortest edge 32, crop 32) keeps them whole."""
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]


def test_layout_names():
    assert parse_layout("global") == ("global", 0)
    assert parse_layout("grid:4") == ("grid", 4)
    assert parse_layout("region") == ("region", None)
    assert parse_layout("region:-4") == ("region", -4)
    assert parse_layout("region:3") == ("region", 3)
    for bad in ("grid", "grid:0", "grid:x", "box", "region:0", "region:x", "region:"):
        with pytest.raises(GemelError, match="layout"):
            parse_layout(bad)


def test_grid_and_region_extend_the_global_feature(parts, square_images):
    model, proc = parts
    plain = VisionEncoder(model, proc, layout="global").encode(square_images)
    grid = VisionEncoder(model, proc, layout="grid:2")
    region = VisionEncoder(model, proc, layout="region")
    assert (grid.feature_dim, region.feature_dim) == (5 * 32, 2 * 32)
    g = grid.encode(square_images)
    r = region.encode(square_images)  # no masks: the region is the whole image
    assert g.shape == (3, 160) and r.shape == (3, 64)
    torch.testing.assert_close(g[:, :32], plain)  # the global feature comes first, unchanged
    torch.testing.assert_close(r[:, :32], plain)
    # without a region, the region token is the mean of all patches = the mean of the 4 cells
    torch.testing.assert_close(r[:, 32:], g[:, 32:].reshape(3, 4, 32).mean(1), atol=1e-5, rtol=1e-4)


def test_region_token_pools_the_patches_under_the_mask(parts, square_images):
    """A mask over the left half pools the left column of the 2 x 2 grid; the right half the
    right column."""
    model, proc = parts
    grid = VisionEncoder(model, proc, layout="grid:2").encode(square_images)
    cells = grid[:, 32:].reshape(3, 2, 2, 32)  # [n, row, column, hidden]
    region = VisionEncoder(model, proc, layout="region")
    for column, box in ((0, (0, 0, 15, 31)), (1, (16, 0, 31, 31))):
        mask = Image.new("L", (32, 32), 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        r = region.encode(square_images, [mask] * 3)
        torch.testing.assert_close(r[:, 32:], cells[:, :, column].mean(1), atol=2e-3, rtol=1e-3)


def test_region_token_follows_an_off_centre_box_through_resize_and_crop(parts):
    """A wide image (64 x 32): the processor keeps its centre 32 x 32 (x 16..48). A box off the
    centre (x 24..40, y 8..24 of the image) pools exactly the patch tokens under it in the
    processed pixels (the middle 2 x 2 of 4 x 4 patches), for the drawn overlay as encoded."""
    model, proc = parts
    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))
    prompt = VisualPrompt("overlay", width_frac=0.0)  # 1-pixel outline
    (overlay,), (mask,) = (prompt.render(image, bbox=[24, 8, 40, 24]),
                           prompt.regions(image, bbox=[24, 8, 40, 24]))
    got = VisionEncoder(model, proc, layout="region").encode([overlay], [mask])
    pixels = proc(images=[overlay], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape[-2:]) == (32, 32)
    with torch.no_grad():
        tokens = model(pixel_values=pixels).last_hidden_state[:, 1:].reshape(1, 4, 4, 32)
    torch.testing.assert_close(got[:, 32:], tokens[:, 1:3, 1:3].reshape(1, 4, 32).mean(1),
                               atol=1e-4, rtol=1e-4)


def test_region_layer_pools_an_earlier_hidden_state(parts, square_images):
    """``region:L`` pools hidden state L's patch tokens, each layer-normed without weights, under
    the mask; the global feature and the pooled region are then layer-normed each (equal scale in
    the mapper); a layer the model lacks is an error."""
    model, proc = parts
    plain = VisionEncoder(model, proc, layout="region")
    early = VisionEncoder(model, proc, layout="region:-3")
    assert early.feature_dim == 64 and early.identity["layout"] == "region:-3"
    assert early.identity_key != plain.identity_key  # other features: other cache entries
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 15, 31), fill=255)  # the left column of 4 x 4 patches
    got = early.encode(square_images, [mask] * 3)
    norm = torch.nn.functional.layer_norm
    torch.testing.assert_close(got[:, :32], norm(plain.encode(square_images)[:, :32], (32,)),
                               atol=1e-4, rtol=1e-4)
    pixels = proc(images=square_images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-3]
    tokens = norm(hidden[:, 1:], (32,)).reshape(3, 4, 4, 32)
    region = norm(tokens[:, :, :2].reshape(3, 8, 32).mean(1), (32,))
    torch.testing.assert_close(got[:, 32:], region, atol=5e-3, rtol=1e-3)
    assert got[:, 32:].std(-1, correction=0).sub(1).abs().max() < 0.01  # unit scale, as the global
    assert not torch.allclose(got[:, 32:], plain.encode(square_images, [mask] * 3)[:, 32:])
    for bad in ("region:5", "region:-6"):  # 4 blocks: hidden states 0..4
        with pytest.raises(GemelError, match="hidden states 0..4"):
            VisionEncoder(model, proc, layout=bad)
    VisionEncoder(model, proc, layout="region:-5")  # -5 is state 0, the embeddings: allowed


def test_region_masks_follow_the_visual_prompt():
    im = Image.new("RGB", (40, 20))
    overlay, crop = region_masks(im, bbox=[4, 2, 14, 12], mode="overlay+crop")
    assert crop is None and overlay.size == (40, 20)
    a = np.asarray(overlay)
    assert a[2:12, 4:14].min() == 255 and a.sum() == 255 * 10 * 10
    assert region_masks(im, bbox=[4, 2, 14, 12], mode="none") == [None]
    assert region_masks(im, mode="overlay") == [None]  # no region: the whole image
    poly = region_masks(im, polygon=[[0, 0], [20, 0], [0, 19]], mode="overlay")[0]
    assert 0 < np.asarray(poly).mean() < 255 / 2 + 10  # a triangle: about half of its box


def test_cache_keys_include_the_layout(parts, tmp_path, square_images):
    model, proc = parts
    path = tmp_path / "a.png"
    square_images[0].save(path)
    m = Mention("m1", "t", image=str(path), bbox=(2, 2, 20, 20))
    cache = FeatureCache(tmp_path / "cache")
    prompt = VisualPrompt("overlay")
    first = VisionEncoder(model, proc, layout="global").encode_mentions([m], prompt, cache=cache)
    region = VisionEncoder(model, proc, layout="region")
    second = region.encode_mentions([m], prompt, cache=cache)
    assert cache.stats["misses"] == 2 and cache.stats["hits"] == 0
    assert first.shape[-1] == 32 and second.shape[-1] == 64
    again = VisionEncoder(model, proc, layout="region").encode_mentions([m], prompt, cache=cache)
    assert cache.stats["hits"] == 1
    torch.testing.assert_close(again, second)
    # the region is part of the key: another box is another entry
    moved = Mention("m2", "t", image=str(path), bbox=(10, 10, 30, 30))
    region.encode_mentions([moved], prompt, cache=cache)
    assert cache.stats["misses"] == 3


def test_mapper_refuses_another_layout(parts, tmp_path):
    model, proc = parts
    region = VisionEncoder(model, proc, layout="region", name="tiny-clip")
    mapper = LinearMapper(region.feature_dim, 16, 2,
                          meta={"vision": region.identity, "layout": region.layout})
    mapper.save(tmp_path / "m")
    plain = VisionEncoder(model, proc, layout="global", name="tiny-clip")
    with pytest.raises(MismatchError, match="layout 'region'"):
        LinearMapper.load(tmp_path / "m", expect_vision=plain)
    loaded = LinearMapper.load(tmp_path / "m", expect_vision=region)
    with pytest.raises(MismatchError, match="layout"):
        ImageTokens(plain, loaded, "overlay")
    ImageTokens(region, loaded, "overlay")  # the right one is accepted
