"""Import a ViT exported to ONNX from Hugging Face ``ViTModel`` / ``Dinov2Model`` as a timm ``VisionTransformer``.

An ONNX export keeps the parameters as *initializers*. The TorchScript exporter (``torch.onnx.export(...,
dynamo=False)``) names most of them after the module (``backbone.encoder.layer.0.norm1.weight``) but stores every
``nn.Linear`` weight transposed under an anonymous name (``onnx::MatMul_1966``) and constant-folds the position
embedding into anonymous pieces (``onnx::Concat_*`` for the CLS row, ``onnx::Reshape_*`` for the patch grid).
:func:`onnx_vit_state_dict` recovers the Hugging Face names:

* an anonymous ``MatMul`` weight takes the name of the bias of the ``Add`` that follows it (``...query.bias``
  gives ``...query.weight``), else the module path in the ``MatMul`` node's name; it is transposed back;
* the position embedding is the ``[1, 1, D]`` CLS row and the ``[1, g*g, D]`` patch grid concatenated;
* ``Identity`` nodes that alias an initializer (the exporter merges equal tensors) name a copy of it;
* the layer-norm epsilon is read from the graph (``LayerNormalization``, or the constant added to the variance).

Both transformers layouts are understood (4.x ``attention.attention.query`` / ``intermediate.dense``, 5.x
``attention.q_proj`` / ``mlp.fc1``; ``encoder.layer.N`` or ``layers.N``), under any prefix (``backbone.``);
initializers of other modules (a decoder after the backbone) are listed as unused. :func:`hf_to_timm` maps the
names to a timm ``VisionTransformer`` (q, k, v stacked into ``qkv``; layer scale as ``ls1`` / ``ls2``), which
loads strictly and goes through the timm adapter (the fast CDAM path). A graph whose parameters cannot be
mapped raises :class:`OnnxImportError` naming what is missing. Needs the ``onnx`` package (the ``onnx`` extra).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidc_cdam.models.backbones import build_backbone

__all__ = ["OnnxImportError", "OnnxViT", "hf_to_timm", "onnx_vit_state_dict", "timm_backbone_from_onnx"]

#: the standard heads per width (ViT-Ti/S/B/L/g); other widths need ``num_heads=``
_NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}


class OnnxImportError(ValueError):
    """An ONNX graph that is not a Hugging Face ViT / DINOv2 export this importer can map."""


@dataclass
class OnnxViT:
    """What :func:`onnx_vit_state_dict` read: Hugging Face-named tensors (prefix removed) and the architecture."""

    tensors: dict[str, torch.Tensor]
    family: str  # "dinov2" or "vit"
    layer_norm_eps: float
    input_size: tuple[int, int] | None  # the graph input's static (H, W), if any
    prefix: str = ""  # e.g. "backbone."
    unused: list[str] = field(default_factory=list)  # initializers outside the backbone (a decoder...)


def _require_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise OnnxImportError("importing an ONNX model needs the onnx package: pip install 'lidc-cdam[onnx]'") from None
    return onnx, numpy_helper


def _module_path(node_name: str) -> str | None:
    """``/backbone/encoder/layer.0/attention/attention/key/MatMul`` -> ``backbone.encoder.layer.0...key``."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2 or not parts[-1].startswith("MatMul"):
        return None
    return ".".join(parts[:-1])


def _constant_scalar(name: str, inits: dict[str, np.ndarray], constants: dict[str, np.ndarray]) -> float | None:
    value = inits.get(name, constants.get(name))
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _layer_norm_eps(graph: Any, inits: dict[str, np.ndarray], constants: dict[str, np.ndarray]) -> float | None:
    """The epsilon of the first layer norm: a ``LayerNormalization`` node's attribute, or the constant that a
    decomposed norm adds to the variance before ``Sqrt``."""
    import onnx

    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "LayerNormalization":
            for attr in node.attribute:
                if attr.name == "epsilon":
                    return float(onnx.helper.get_attribute_value(attr))
            return 1e-5  # the operator's default
        if node.op_type == "Sqrt" and "norm" in node.name.lower():
            add = producers.get(node.input[0])
            if add is not None and add.op_type == "Add":
                for name in add.input:
                    eps = _constant_scalar(name, inits, constants)
                    if eps is not None and 0 < eps < 1e-2:
                        return eps
    return None


def _input_size(graph: Any) -> tuple[int, int] | None:
    dims = graph.input[0].type.tensor_type.shape.dim if graph.input else []
    if len(dims) == 4 and dims[2].dim_value > 0 and dims[3].dim_value > 0:
        return int(dims[2].dim_value), int(dims[3].dim_value)
    return None


def _strip_prefix(names: list[str]) -> str:
    """The prefix before ``embeddings.patch_embeddings`` (``""`` or e.g. ``"backbone."``)."""
    for name in names:
        match = re.match(r"^(.*?)embeddings\.patch_embeddings\.projection\.weight$", name)
        if match:
            return match.group(1)
    raise OnnxImportError(
        "no Hugging Face patch embedding (an initializer named '...embeddings.patch_embeddings.projection.weight') "
        "in this graph: only ViTs exported from transformers ViTModel / Dinov2Model can be imported"
    )


def onnx_vit_state_dict(path: str | os.PathLike) -> OnnxViT:
    """Read an ONNX file and name its backbone parameters as the Hugging Face model does (see the module text)."""
    onnx, numpy_helper = _require_onnx()
    path = Path(path)
    if not path.is_file():
        raise OnnxImportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf decode errors and the like
        raise OnnxImportError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in graph.node:  # the exporter merges equal tensors and aliases them with Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in inits:
            inits[node.output[0]] = inits[node.input[0]]
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    named: dict[str, np.ndarray] = {k: v for k, v in inits.items() if not k.startswith("onnx::")}
    anonymous = {k: v for k, v in inits.items() if k.startswith("onnx::")}
    prefix = _strip_prefix(list(named))
    cls_pos = patch_pos = None
    for key, value in anonymous.items():
        users = consumers.get(key, [])
        matmuls = [n for n in users if n.op_type == "MatMul" and n.input[1] == key]
        if matmuls and value.ndim == 2:
            node = matmuls[0]
            name = None
            for nxt in consumers.get(node.output[0], []):
                if nxt.op_type == "Add":
                    bias = [b for b in nxt.input if b != node.output[0] and b.endswith(".bias")]
                    if bias:
                        name = bias[0][: -len(".bias")]
                        break
            name = name or _module_path(node.name)
            if name is None:
                raise OnnxImportError(f"{path}: cannot name the MatMul weight {key} {list(value.shape)} "
                                      f"(node {node.name!r}: no bias after it, no module path in its name)")
            named[f"{name}.weight"] = value.T
        elif value.ndim == 3 and value.shape[:2] == (1, 1) and any(n.op_type == "Concat" for n in users):
            cls_pos = value
        elif value.ndim == 3 and value.shape[0] == 1 and math.isqrt(value.shape[1]) ** 2 == value.shape[1]:
            patch_pos = value
    pos_key = f"{prefix}embeddings.position_embeddings"
    if pos_key not in named:
        if cls_pos is None or patch_pos is None:
            raise OnnxImportError(f"{path}: no position embedding (neither {pos_key!r} nor the constant-folded CLS "
                                  "row and patch grid of an interpolating export)")
        named[pos_key] = np.concatenate([cls_pos, patch_pos], axis=1)

    tensors = {k[len(prefix):]: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in named.items()
               if k.startswith(prefix)}
    unused = sorted(k for k in named if not k.startswith(prefix))
    family = "dinov2" if any(".layer_scale1." in k or re.search(r"\.norm1\.weight$", k) for k in tensors) else "vit"
    eps = _layer_norm_eps(graph, inits, constants)
    if eps is None:
        eps = 1e-6 if family == "dinov2" else 1e-12  # the transformers defaults
    return OnnxViT(tensors, family, float(f"{eps:.6g}"), _input_size(graph), prefix, unused)


#: Hugging Face sub-module names (both layouts) -> timm block names
_BLOCK_NAMES = [
    (r"(norm1|layernorm_before)\.", "norm1."),
    (r"(norm2|layernorm_after)\.", "norm2."),
    (r"(attention\.output\.dense|attention\.o_proj)\.", "attn.proj."),
    (r"(mlp\.fc1|intermediate\.dense)\.", "mlp.fc1."),
    (r"(mlp\.fc2|output\.dense)\.", "mlp.fc2."),
    (r"layer_scale1\.lambda1", "ls1.gamma"),
    (r"layer_scale2\.lambda1", "ls2.gamma"),
]
_QKV = {"q": r"attention\.(attention\.query|q_proj)\.", "k": r"attention\.(attention\.key|k_proj)\.",
        "v": r"attention\.(attention\.value|v_proj)\."}
_TOP_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_IGNORED = re.compile(r"^(embeddings\.mask_token|pooler\.)")


def hf_to_timm(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ViT / DINOv2 parameter names (either transformers layout) to timm ``VisionTransformer`` keys."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
            continue
        if _IGNORED.match(key):
            continue
        match = re.match(r"^(?:encoder\.layer|layers|encoder\.layers)\.(\d+)\.(.+)$", key)
        if not match:
            unknown.append(key)
            continue
        index, rest = int(match.group(1)), match.group(2)
        for letter, pattern in _QKV.items():
            part = re.match(pattern + r"(weight|bias)$", rest)
            if part:
                qkv.setdefault(index, {})[f"{letter}.{part.group(2)}"] = value
                break
        else:
            for pattern, new in _BLOCK_NAMES:
                if re.match(pattern, rest):
                    out[f"blocks.{index}.{re.sub('^' + pattern, new, rest)}"] = value
                    break
            else:
                unknown.append(key)
    for index, parts in qkv.items():
        for kind in ("weight", "bias"):
            missing = [c for c in "qkv" if f"{c}.{kind}" not in parts]
            if missing and kind == "weight":
                raise OnnxImportError(f"layer {index}: no attention {'/'.join(missing)} weight in the graph")
            if not missing:
                out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts[f"{c}.{kind}"] for c in "qkv"])
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise OnnxImportError(f"parameters that are not those of a Hugging Face ViT / DINOv2: {shown}")
    return out


def _timm_kwargs(sd: dict[str, torch.Tensor], num_heads: int | None, image_size: tuple[int, int]) -> dict[str, Any]:
    required = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.0.attn.qkv.weight",
                "blocks.0.mlp.fc1.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise OnnxImportError(f"the graph lacks parts of a ViT (timm names): {missing}")
    width = int(sd["cls_token"].shape[-1])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = num_heads or _NUM_HEADS.get(width)
    if not heads:
        raise OnnxImportError(f"cannot tell the number of attention heads of width {width}; pass num_heads=")
    patch = tuple(int(s) for s in sd["patch_embed.proj.weight"].shape[-2:])
    kwargs: dict[str, Any] = {
        "img_size": list(image_size), "patch_size": patch[0], "embed_dim": width, "depth": depth,
        "num_heads": int(heads), "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / width, "qkv_bias":
        "blocks.0.attn.qkv.bias" in sd, "num_classes": 0, "in_chans": int(sd["patch_embed.proj.weight"].shape[1]),
    }
    if "blocks.0.ls1.gamma" in sd:
        kwargs["init_values"] = 1e-5  # any value: the gammas are loaded
    return kwargs


def timm_backbone_from_onnx(path: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                            num_heads: int | None = None) -> tuple[torch.nn.Module, dict[str, Any], OnnxViT]:
    """A timm ``VisionTransformer`` with the ONNX graph's backbone weights, its build spec and what was read.

    ``image_size``: the input size the model takes (default: the graph's static input size, else the size of its
    position-embedding grid). The position embedding is resampled to that size as the exported
    ``interpolate_pos_encoding`` does (bicubic, no antialiasing); the model takes that one size (as the graph,
    whose input size is fixed when exported).
    """
    from timm.layers import resample_abs_pos_embed

    read = onnx_vit_state_dict(path)
    sd = hf_to_timm(read.tensors)
    patch = int(sd["patch_embed.proj.weight"].shape[-1]) if "patch_embed.proj.weight" in sd else 1
    grid_side = math.isqrt(int(sd["pos_embed"].shape[1]) - 1) if "pos_embed" in sd else 0
    if image_size is None:
        size = read.input_size or (grid_side * patch, grid_side * patch)
    else:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if size[0] % patch or size[1] % patch:
        raise OnnxImportError(f"image size {size[0]}x{size[1]} is not a multiple of the patch size {patch}")
    kwargs = _timm_kwargs(sd, num_heads, size)
    new_grid = [size[0] // patch, size[1] // patch]
    if new_grid != [grid_side, grid_side]:
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], new_grid, [grid_side, grid_side],
                                                 num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    build = {"timm_name": None, "timm_kwargs": kwargs, "layer_norm_eps": read.layer_norm_eps}
    backbone = build_backbone(build)
    result = backbone.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise OnnxImportError(f"{path}: the mapped weights do not fit a timm VisionTransformer "
                              f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})")
    return backbone.eval(), build, read
