"""Visual prompts: outlines land where the region is, crops have the promised size, bad regions
name their mention."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gemel.errors import DataError, GemelError
from gemel.visual_prompt import (VisualPrompt, clip_polygon, crop_box, line_width, n_images, render,
                                 settings_key)

RED = np.array([255, 0, 0])


@pytest.fixture()
def photo() -> Image.Image:
    """A 200 x 120 image with no pure red in it, and every pixel different from its neighbours."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 200, size=(120, 200, 3), dtype=np.uint8)
    pixels[..., 0] //= 2  # keep the red channel far from 255
    return Image.fromarray(pixels)


def is_red(a: np.ndarray, x: int, y: int) -> bool:
    return bool((a[y, x] == RED).all())


def test_overlay_draws_red_box_outline_and_leaves_the_rest(photo):
    before = np.array(photo)
    (out,) = render(photo, bbox=[40, 30, 120, 90], mode="overlay", width_frac=0.05)
    a = np.array(out)
    width = line_width(photo.size, 0.05)
    assert width == 6
    for x, y in [(40, 30), (80, 30), (119, 60), (80, 89), (40, 60), (45, 35)]:
        assert is_red(a, x, y), (x, y)
    # inside the box beyond the line, and outside the box: untouched
    assert (a[60, 80] == before[60, 80]).all()
    assert (a[29, 80] == before[29, 80]).all() and (a[60, 121] == before[60, 121]).all()
    changed = (a != before).any(axis=2)
    ys, xs = np.nonzero(changed)
    assert xs.min() == 40 and xs.max() == 119 and ys.min() == 30 and ys.max() == 89
    # the input is not modified
    assert (np.array(photo) == before).all()


def test_line_width_follows_image_size():
    assert line_width((1000, 800), 0.01) == 8
    assert line_width((100, 100), 0.01) == 1  # never thinner than a pixel
    small = np.array(render(Image.new("RGB", (100, 100)), bbox=[10, 10, 90, 90])[0])
    big = np.array(render(Image.new("RGB", (1000, 1000)), bbox=[100, 100, 900, 900])[0])
    assert (small[50, :, 0] == 255).sum() == 2  # left and right edges, 1 px each
    assert (big[500, :, 0] == 255).sum() == 20  # 10 px each


def test_crop_size_with_margin(photo):
    (crop,) = render(photo, bbox=[50, 40, 100, 80], mode="crop", margin=0.2)
    # 50 x 40 box grown by 20% of its width / height on each side
    assert crop.size == (50 + 2 * 10, 40 + 2 * 8)
    assert (np.array(crop) == np.array(photo)[32:88, 40:110]).all()
    (tight,) = render(photo, bbox=[50, 40, 100, 80], mode="crop", margin=0.0)
    assert tight.size == (50, 40)


def test_overlay_plus_crop_gives_context_and_clean_close_up(photo):
    overlay, crop = render(photo, bbox=[50, 40, 100, 80], mode="overlay+crop", margin=0.0)
    assert overlay.size == photo.size and is_red(np.array(overlay), 50, 40)
    # the close-up comes from the unmarked image
    assert (np.array(crop) == np.array(photo)[40:80, 50:100]).all()
    assert n_images("overlay+crop") == 2 and VisualPrompt("crop").n_images == 1


def test_boxes_reaching_outside_are_clipped(photo):
    (out,) = render(photo, bbox=[150, -30, 260, 60], mode="overlay", width_frac=0.02)
    a = np.array(out)
    # the clipped box is [150, 0, 200, 60]: its top and right edges run along the image border
    assert is_red(a, 175, 0) and is_red(a, 199, 30) and is_red(a, 150, 30)
    (crop,) = render(photo, bbox=[150, -30, 260, 60], mode="crop", margin=0.1)
    assert crop.size == (200 - 145, 66)  # grown by 5 px left and 6 px down, cut at the border
    assert crop_box((200, 120), (150.0, 0.0, 200.0, 60.0), 0.1) == (145, 0, 200, 66)


@pytest.mark.parametrize("bbox, words", [
    ([50, 40, 50, 80], "empty"),       # zero width
    ([90, 40, 50, 80], "empty"),       # x1 < x0
    ([250, 10, 300, 50], "outside"),   # right of a 200-wide image
    ([-50, -50, -10, -10], "outside"),
])
def test_degenerate_boxes_name_the_mention(photo, bbox, words):
    with pytest.raises(DataError) as err:
        render(photo, bbox=bbox, mode="overlay", mention_id="wd-test-0042")
    assert "wd-test-0042" in str(err.value) and words in str(err.value)
    assert "bbox" in str(err.value)


def test_malformed_regions_are_data_errors(photo):
    with pytest.raises(DataError, match="m7.*4 numbers"):
        render(photo, bbox=[1, 2, 3], mention_id="m7")
    with pytest.raises(DataError, match="m8.*at least 3 points"):
        render(photo, polygon=[[1, 2], [30, 40]], mention_id="m8")
    with pytest.raises(DataError, match="non-finite"):
        render(photo, bbox=[0, 0, float("nan"), 5], mention_id="m9")
    with pytest.raises(GemelError, match="unknown visual prompt mode"):
        render(photo, bbox=[0, 0, 5, 5], mode="box")


def test_polygon_outline(photo):
    before = np.array(photo)
    triangle = [[20, 100], [100, 20], [180, 100]]
    (out,) = render(photo, polygon=triangle, mode="overlay", width_frac=0.02)
    a = np.array(out)
    assert is_red(a, 60, 60) and is_red(a, 140, 60) and is_red(a, 100, 100)  # edge midpoints
    assert (a[75, 100] == before[75, 100]).all()  # inside, away from the edges
    assert (a[30, 30] == before[30, 30]).all() and (a[110, 100] == before[110, 100]).all()
    # the crop uses the polygon's bounding box
    (crop,) = render(photo, polygon=triangle, mode="crop", margin=0.0)
    assert crop.size == (160, 80)


def test_polygon_crossing_the_border_is_clipped_not_bent(photo):
    # a square half outside on the left: after clipping, its left side runs along x = 0
    (out,) = render(photo, polygon=[[-40, 20], [40, 20], [40, 80], [-40, 80]], width_frac=0.01)
    a = np.array(out)
    assert is_red(a, 0, 50) and is_red(a, 20, 20) and is_red(a, 40, 50)
    clipped = clip_polygon([(-40, 20), (40, 20), (40, 80), (-40, 80)], (0, 0, 199, 119))
    assert sorted(clipped) == [(0, 20), (0, 80), (40, 20), (40, 80)]
    # a diagonal edge keeps its slope: (-20, 0) -> (20, 40) meets x = 0 at y = 20
    assert (0.0, 20.0) in clip_polygon([(-20, 0), (20, 40), (20, 0)], (0, 0, 199, 119))


def test_no_region_keeps_the_whole_image(photo):
    for mode in ("none", "overlay", "crop"):
        (out,) = render(photo, mode=mode)
        assert (np.array(out) == np.array(photo)).all()
    assert len(render(photo, mode="overlay+crop")) == 2


def test_non_rgb_images_are_converted():
    gray = Image.new("L", (50, 40), 100)
    (out,) = render(gray, bbox=[5, 5, 45, 35])
    assert out.mode == "RGB" and is_red(np.array(out), 5, 5)


def test_settings_key_changes_exactly_when_pixels_can():
    box = [10, 20, 50, 60]
    assert settings_key("overlay", box) != settings_key("overlay", [10, 20, 50, 61])
    assert settings_key("overlay", box) != settings_key("overlay", box, color=(0, 255, 0))
    assert settings_key("overlay", box) != settings_key("overlay", box, width_frac=0.02)
    assert settings_key("crop", box, color=(0, 0, 255)) == settings_key("crop", box)
    assert settings_key("crop", box, margin=0.2) != settings_key("crop", box)
    # without a region every mode shows the plain image
    assert settings_key("none", box) == settings_key("overlay") == settings_key("crop")
    assert settings_key("overlay+crop", box).count("+") == 1
    assert settings_key("overlay", polygon=[[0, 0], [5, 0], [5, 5]]) != settings_key("overlay", box)
    vp = VisualPrompt("overlay+crop", margin=0.3)
    assert vp.key(box) == settings_key("overlay+crop", box, margin=0.3)
