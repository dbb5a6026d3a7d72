"""timm ``VisionTransformer`` (ViT, DeiT, DINO, DINOv2 with registers): pre-norm ``Block`` with timm ``Attention``.

Also the timm side of saving and loading: saved specs ``{"timm_name": name | None, "timm_kwargs": {...}}`` (the
default family of a spec without ``"family"``; timm ``Eva`` models are built by name through it too), the
architecture of a plain timm / DINO / DINOv2 state dict inferred from its shapes (:func:`infer_vit_kwargs`), and
timm's hub (:func:`create_timm_model`: ``pretrained=True`` downloads, with a clear error offline).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn, global_pool_nlc
from torch import nn

from lidc_cdam.models.backbones.base import (
    UNDERSTOOD,
    BackboneAdapter,
    CheckpointError,
    PretrainedWeightsUnavailable,
    QKVAttention,
    all_but_last,
    first_line,
    heads_for,
    numbered,
    reads,
    split_heads,
    square_side,
)


class TimmPatchEmbedLayout:
    """Layout of timm models with a ``PatchEmbed`` (``patch_embed``): fixed or dynamic image size; the widths and
    prefix tokens timm's ``VisionTransformer`` and ``Eva`` both record, and their final norm and pooling."""

    backbone: nn.Module
    size_hint = "resize the images or build the timm model with dynamic_img_size=True"

    embed_dim = reads("backbone.embed_dim", int)
    num_prefix_tokens = reads("backbone.num_prefix_tokens", int)
    num_heads = reads("last_block.attn.num_heads", int)
    in_chans = reads("backbone.patch_embed.proj.in_channels", int)
    patch_size = reads("backbone.patch_embed.patch_size", tuple)
    default_image_size = reads("backbone.patch_embed.img_size", tuple)
    strict_image_size = reads("backbone.patch_embed.strict_img_size", bool)
    pads_images = reads("backbone.patch_embed.dynamic_img_pad", bool)

    def grid(self, image_size: tuple[int, ...]) -> tuple[int, ...]:
        pe = self.backbone.patch_embed
        return tuple(pe.grid_size) if pe.strict_img_size else tuple(pe.dynamic_feat_size(tuple(image_size)))

    depth = reads("backbone.blocks", len)
    last_block = reads("backbone.blocks", itemgetter(-1))
    norm1 = reads("last_block.norm1")
    head = reads("backbone.head")

    def remove_head(self) -> None:
        self.backbone.reset_classifier(0)

    def final_norm(self, y: torch.Tensor) -> torch.Tensor:
        return self.backbone.norm(y)

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        return bb.head_drop(bb.fc_norm(bb.pool(z)))


def pool_rows(z: torch.Tensor, pool_type: str, attn_pool: nn.Module | None) -> torch.Tensor:
    """Pool the rows ``[..., Q, D]`` that the model's pooling reads (as chosen by ``pooled_rows``)."""
    if attn_pool is not None:
        lead = z.shape[:-2]
        return attn_pool(z.reshape(-1, *z.shape[-2:])).reshape(*lead, -1)
    if pool_type == "token":
        return z[..., 0, :]
    lead = z.shape[:-2]
    return global_pool_nlc(z.reshape(-1, *z.shape[-2:]), pool_type=pool_type, num_prefix_tokens=0).reshape(*lead, -1)


def attention_parts(attn: nn.Module, tokens: torch.Tensor, query: slice | None = None):
    """Attention probabilities ``[B, H, n_q, N]`` and values ``[B, H, N, e]`` of a timm ``Attention``
    on normed tokens ``[B, N, D]``, as timm's unfused path computes them; ``query`` restricts the
    query rows (e.g. ``slice(0, 1)`` for CLS)."""
    B, N, _ = tokens.shape
    H, e = attn.num_heads, attn.head_dim
    qkv = attn.qkv(tokens).reshape(B, N, 3, H, e).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if query is not None:
        q = q[:, :, query]
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn.attn_drop(probs), v


class TimmViTAdapter(TimmPatchEmbedLayout, BackboneAdapter):
    """timm ``VisionTransformer``: CLS, average or attention pooling, registers, layer scale, dynamic size."""

    family = "timm VisionTransformer"
    module_type = VisionTransformer
    build_family = "timm"
    spec_keys = ("timm_name", "timm_kwargs")

    @classmethod
    def check(cls, backbone: nn.Module) -> None:
        last = backbone.blocks[-1]
        needed = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")
        missing = [name for name in needed if not hasattr(last, name)]
        if missing or not hasattr(last.attn, "qkv") or last.attn.qkv is None:
            raise TypeError(
                f"The last block ({type(last).__name__}) is not a pre-norm timm Block with a fused qkv "
                f"projection (missing: {missing or ['attn.qkv']}); CDAM needs the tokens entering its attention."
            )

    @classmethod
    def filter_state_dict(cls, state_dict: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        return checkpoint_filter_fn(dict(state_dict), backbone)

    @classmethod
    def build(cls, spec: dict[str, Any]) -> nn.Module:
        """``timm.create_model(timm_name, **timm_kwargs)`` (no download); without a name ``VisionTransformer``. A spec
        may add ``"layer_norm_eps"``: the epsilon of every ``LayerNorm`` (an imported ViT's own, e.g. from ONNX)."""
        kwargs = dict(spec.get("timm_kwargs") or {})
        name = spec.get("timm_name")
        backbone = timm.create_model(name, pretrained=False, **kwargs) if name else VisionTransformer(**kwargs)
        eps = spec.get("layer_norm_eps")
        if eps is not None:
            for module in backbone.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = float(eps)
        return backbone

    @classmethod
    def recognises(cls, state_dict: dict[str, Any]) -> bool:
        return "patch_embed.proj.weight" in state_dict

    @classmethod
    def spec_from_state_dict(cls, state_dict: dict[str, Any], arch: str | None, kwargs: dict[str, Any],
                             source: str) -> dict[str, Any]:
        if arch is not None:  # a timm name fixes the architecture; the classes come from the file
            head = state_dict.get("head.weight")
            return {"timm_name": arch, "timm_kwargs": {"num_classes": int(head.shape[0]) if head is not None else 0,
                                                       **kwargs}}
        name, inferred = infer_vit_kwargs(state_dict, kwargs.get("num_heads"), source)
        inferred.update(kwargs)
        if name is not None:
            inferred.pop("mlp_ratio", None)  # SwiGLU: the timm model name sets it
        return {"timm_name": name, "timm_kwargs": inferred}

    has_class_token = reads("backbone.has_class_token", bool)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        return all_but_last(bb.blocks, bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images)))))

    def block(self, resid: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, ...] | None) -> torch.Tensor:
        blk = self.last_block
        y = resid + blk.drop_path1(blk.ls1(blk.attn(tokens)))
        return y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))

    def pooled_rows(self, num_tokens: int) -> slice:
        bb = self.backbone
        if bb.attn_pool is None and bb.global_pool == "token":
            return slice(0, 1)
        return slice(0, None) if getattr(bb, "pool_include_prefix", False) else slice(self.num_prefix_tokens, None)

    def qkv_attention(self, grid: tuple[int, ...] | None) -> QKVAttention | None:
        attn = self.last_block.attn
        plain_qk = isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        if not plain_qk or getattr(attn, "gate", None) is not None:
            return None
        weight = attn.qkv.weight
        bias = attn.qkv.bias if attn.qkv.bias is not None else weight.new_zeros(weight.shape[0])
        return QKVAttention(weight, bias, attn.num_heads, attn.head_dim, attn.scale)

    def finish(self, resid_rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        blk, bb = self.last_block, self.backbone
        y = resid_rows + blk.drop_path1(blk.ls1(blk.attn.proj(blk.attn.norm(heads))))
        y = y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
        pool_type = "token" if self.pooled_rows(0) == slice(0, 1) else bb.global_pool
        return bb.head_drop(bb.fc_norm(pool_rows(bb.norm(y), pool_type, bb.attn_pool)))

    def attention_probs(self, tokens: torch.Tensor, grid: tuple[int, ...] | None, query: slice) -> torch.Tensor:
        return attention_parts(self.last_block.attn, tokens, query)[0]


def create_timm_model(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=..., **kwargs)``; without network access ``pretrained=True`` raises
    :class:`~lidc_cdam.models.backbones.base.PretrainedWeightsUnavailable` saying how to pass a local file."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as err:  # huggingface_hub / urllib errors are all OSErrors
        if not pretrained:
            raise
        raise PretrainedWeightsUnavailable(
            f"could not get the pretrained weights of timm model {name!r} "
            f"({err.__class__.__name__}: {first_line(err)}). Without network access, fetch the "
            f"weights file elsewhere and pass it: ViTModel.from_timm({name!r}, checkpoint=PATH), "
            f"or on the command line --model {name} --checkpoint PATH. (Set HF_HUB_OFFLINE=1 to "
            "fail at once instead of retrying the download.)"
        ) from err


def infer_vit_kwargs(
    state_dict: dict[str, Any], num_heads: int | None = None, source: str = "checkpoint"
) -> tuple[str | None, dict[str, Any]]:
    """``(timm_name, VisionTransformer kwargs)`` that fit a backbone state dict, from its shapes.

    ``timm_name`` is ``None`` (build ``VisionTransformer(**kwargs)``) except for DINOv2 SwiGLU
    (giant) files, whose MLP type only a timm model name can name.
    """
    sd = state_dict
    proj = sd.get("patch_embed.proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.ndim != 4:
        raise CheckpointError(f"{source}: no conv patch embedding 'patch_embed.proj.weight'; "
                              f"pass arch='<timm model name>'. {UNDERSTOOD}")
    embed_dim, in_chans, ph, pw = (int(s) for s in proj.shape)
    depth = numbered(sd, r"blocks\.(\d+)\.", source, "transformer blocks 'blocks.<i>.*'")
    num_heads = heads_for(embed_dim, num_heads, source, " or arch='<timm model name>'")

    dinov2 = "mask_token" in sd
    reg = sd.get("register_tokens", sd.get("reg_token"))
    reg_tokens = int(reg.shape[1]) if isinstance(reg, torch.Tensor) else 0
    class_token = "cls_token" in sd
    kwargs: dict[str, Any] = {
        "patch_size": ph if ph == pw else (ph, pw),
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
    }
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if "blocks.0.mlp.fc1.weight" in sd:
        kwargs["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    if "blocks.0.ls1.gamma" in sd:
        kwargs["init_values"] = 1e-5  # any value: the gammas are loaded
    if "blocks.0.attn.q_norm.weight" in sd:
        kwargs["qk_norm"] = True
    if "norm_pre.weight" in sd:
        kwargs["pre_norm"] = True
    if not class_token:
        kwargs["class_token"] = False
        kwargs["global_pool"] = "avg"
    if "fc_norm.weight" in sd:
        kwargs["global_pool"], kwargs["fc_norm"] = "avg", True
    elif not class_token:
        kwargs["fc_norm"] = False
    if reg_tokens:
        kwargs["reg_tokens"] = reg_tokens

    pos = sd.get("pos_embed")
    if not isinstance(pos, torch.Tensor):
        kwargs["pos_embed"] = "none"
    else:
        length, prefix = int(pos.shape[1]), int(class_token) + reg_tokens
        if dinov2:  # CLS slot, no register slots; timm drops the CLS slot when there are registers
            layouts = [(bool(reg_tokens), length - int(class_token))]
        elif reg_tokens:  # DINOv2-style registers first (timm's *_reg*_dinov2 use no_embed_class)
            layouts = [(True, length), (False, length - prefix)]
        else:
            layouts = [(False, length - prefix), (True, length)]
        fits = [(flag, side) for flag, n in layouts if (side := square_side(n)) is not None]
        if not fits:
            raise CheckpointError(f"{source}: cannot infer the image size from pos_embed of "
                                  f"{length} tokens; pass img_size=... or arch='<timm model name>'")
        no_embed_class, side = fits[0]
        if no_embed_class and prefix:
            kwargs["no_embed_class"] = True
        kwargs["img_size"] = side * ph if ph == pw else (side * ph, side * pw)

    if swiglu:
        name = "vit_giant_patch14_reg4_dinov2" if reg_tokens == 4 else "vit_giant_patch14_dinov2"
        return name, kwargs
    return None, kwargs


__all__ = [
    "TimmPatchEmbedLayout",
    "TimmViTAdapter",
    "attention_parts",
    "create_timm_model",
    "infer_vit_kwargs",
    "pool_rows",
    "split_heads",
]
