"""torchvision ``VisionTransformer`` (``vit_b_16`` ... ``vit_h_14``; the SWAG weights of the paper's A.5.1).

``EncoderBlock``: ``x = X + dropout(MHA(ln_1(X))); Y = x + mlp(ln_2(x))``; then ``encoder.ln`` and CLS'.
``nn.MultiheadAttention`` keeps q, k, v as one affine map (``in_proj_weight``, ``in_proj_bias``): ``ln_1`` is
``norm1`` and the CLS-row closed form applies as for timm.

Saved specs: ``{"family": "torchvision", "torchvision_name": name | None, "torchvision_kwargs": {...}}`` (a builder
such as ``vit_b_16``; without a name the class). A plain state dict (``conv_proj``, ``encoder.pos_embedding``,
``class_token``) is recognised and its architecture inferred (:func:`infer_torchvision_kwargs`).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from lidc_cdam.models.backbones.base import (
    BackboneAdapter,
    CheckpointError,
    ClassTokenPooling,
    QKVAttention,
    all_but_last,
    heads_for,
    numbered,
    reads,
    split_heads,
    square_side,
    with_class_token,
)


def infer_torchvision_kwargs(
    state_dict: dict[str, Any], num_heads: int | None = None, source: str = "checkpoint"
) -> dict[str, Any]:
    """``torchvision.models.VisionTransformer`` keyword arguments that fit a state dict, from its shapes."""
    sd = state_dict
    proj = sd.get("conv_proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.ndim != 4:
        raise CheckpointError(f"{source}: torchvision ViT without a conv patch embedding 'conv_proj.weight' "
                              "(conv-stem models): pass arch='<torchvision builder name>'")
    hidden, _, patch, _ = (int(d) for d in proj.shape)
    depth = numbered(sd, r"encoder\.layers\.encoder_layer_(\d+)\.", source,
                     "encoder layers 'encoder.layers.encoder_layer_<i>.*'")
    side = square_side(int(sd["encoder.pos_embedding"].shape[1]) - 1)
    if side is None:
        raise CheckpointError(f"{source}: cannot infer the image size from encoder.pos_embedding; pass image_size=")
    first = "encoder.layers.encoder_layer_0.mlp."
    mlp = sd.get(first + "0.weight", sd.get(first + "linear_1.weight"))  # torchvision's MLP keys, new and legacy
    kwargs: dict[str, Any] = {
        "image_size": side * patch,
        "patch_size": patch,
        "num_layers": depth,
        "num_heads": heads_for(hidden, num_heads, source, ""),
        "hidden_dim": hidden,
        "mlp_dim": int(mlp.shape[0]),
        "num_classes": int(sd["heads.head.weight"].shape[0]) if "heads.head.weight" in sd else 1000,
    }
    if "heads.pre_logits.weight" in sd:
        kwargs["representation_size"] = int(sd["heads.pre_logits.weight"].shape[0])
    return kwargs


class TorchvisionViTAdapter(ClassTokenPooling, BackboneAdapter):
    """torchvision ``VisionTransformer``: CLS token, CLS pooling, one fixed square image size."""

    family = "torchvision VisionTransformer"
    module_type = VisionTransformer
    size_hint = "resize the images (a torchvision VisionTransformer takes one image size)"
    build_family = "torchvision"
    spec_keys = ("torchvision_name", "torchvision_kwargs")
    state_dict_format = "torchvision"

    @classmethod
    def build(cls, spec: dict[str, Any]) -> nn.Module:
        """``torchvision.models.get_model(torchvision_name, weights=None, **torchvision_kwargs)``, or the class."""
        kwargs = dict(spec.get("torchvision_kwargs") or {})
        name = spec.get("torchvision_name")
        return torchvision.models.get_model(name, weights=None, **kwargs) if name else VisionTransformer(**kwargs)

    @classmethod
    def recognises(cls, state_dict: dict[str, Any]) -> bool:
        """Keys of a torchvision ``VisionTransformer`` (``encoder.pos_embedding``, ``class_token``)."""
        return "encoder.pos_embedding" in state_dict and "class_token" in state_dict

    @classmethod
    def spec_from_state_dict(cls, state_dict: dict[str, Any], arch: str | None, kwargs: dict[str, Any],
                             source: str) -> dict[str, Any]:
        inferred = infer_torchvision_kwargs(state_dict, kwargs.get("num_heads"), source)
        if arch is not None:  # a builder (vit_b_16...) fixes the architecture; size and classes come from the file
            inferred = {k: inferred[k] for k in ("image_size", "num_classes")}
        return {"family": "torchvision", "torchvision_name": arch, "torchvision_kwargs": {**inferred, **kwargs}}

    @classmethod
    def check(cls, backbone: nn.Module) -> None:
        for i, blk in enumerate(backbone.encoder.layers):
            mha = getattr(blk, "self_attention", None)
            if not isinstance(blk, EncoderBlock) or not isinstance(mha, nn.MultiheadAttention):
                raise TypeError(f"torchvision VisionTransformer: encoder layer {i} is {type(blk).__name__}, not an "
                                "EncoderBlock with nn.MultiheadAttention")
        if not backbone.encoder.layers[-1].self_attention._qkv_same_embed_dim:
            raise TypeError("torchvision VisionTransformer: the last attention has separate q, k, v projections")

    embed_dim = reads("backbone.hidden_dim", int)

    @property
    def in_chans(self) -> int:
        proj = self.backbone.conv_proj
        first = proj if isinstance(proj, nn.Conv2d) else next(m for m in proj.modules() if isinstance(m, nn.Conv2d))
        return int(first.in_channels)

    @property
    def patch_size(self) -> tuple[int, ...]:
        return (int(self.backbone.patch_size),) * 2

    @property
    def default_image_size(self) -> tuple[int, ...]:
        return (int(self.backbone.image_size),) * 2

    depth = reads("backbone.encoder.layers", len)
    num_heads = reads("last_block.self_attention.num_heads", int)

    def grid(self, image_size: tuple[int, ...]) -> tuple[int, ...]:
        side = int(self.backbone.image_size) // int(self.backbone.patch_size)
        return (side, side)

    last_block = reads("backbone.encoder.layers", itemgetter(-1))
    norm1 = reads("last_block.ln_1")

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = with_class_token(bb._process_input(images), bb.class_token)
        return all_but_last(bb.encoder.layers, bb.encoder.dropout(x + bb.encoder.pos_embedding))

    def block(self, resid: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, ...] | None) -> torch.Tensor:
        blk = self.last_block
        x = resid + blk.dropout(blk.self_attention(tokens, tokens, tokens, need_weights=False)[0])
        return x + blk.mlp(blk.ln_2(x))

    def final_norm(self, y: torch.Tensor) -> torch.Tensor:
        return self.backbone.encoder.ln(y)

    def qkv_attention(self, grid: tuple[int, ...] | None) -> QKVAttention | None:
        mha = self.last_block.self_attention
        if mha.bias_k is not None:
            return None
        weight = mha.in_proj_weight
        bias = mha.in_proj_bias if mha.in_proj_bias is not None else weight.new_zeros(weight.shape[0])
        return QKVAttention(weight, bias, mha.num_heads, mha.head_dim, mha.head_dim**-0.5)

    def finish(self, resid_rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        blk = self.last_block
        x = resid_rows + blk.dropout(blk.self_attention.out_proj(heads))
        x = x + blk.mlp(blk.ln_2(x))
        return self.backbone.encoder.ln(x)[..., 0, :]

    def attention_probs(self, tokens: torch.Tensor, grid: tuple[int, ...] | None, query: slice) -> torch.Tensor:
        mha = self.last_block.self_attention
        q, k, _ = (split_heads(p, mha.num_heads) for p in
                   F.linear(tokens, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1))
        return ((q[..., query, :] * mha.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)

    head = reads("backbone.heads")

    def remove_head(self) -> None:
        self.backbone.heads = nn.Identity()
        self.backbone.num_classes = 0


__all__ = ["TorchvisionViTAdapter", "infer_torchvision_kwargs"]
