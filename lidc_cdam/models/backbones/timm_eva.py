"""timm ``Eva``: DINOv3 (CLS + 4 registers), EVA-02 (SwiGLU), Perception Encoder (attention pooling), all with
rotary position embeddings (RoPE) applied to q and k of the patch tokens after the ``qkv`` projection.

CDAM's closed form holds as for timm's ViT: ``T_i`` enters the last block only through ``qkv``
(docs/method.md, "Backbone families and 3D"); the rotation is passed to the explainer as :attr:`QKVAttention.rotate`.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva, EvaBlock, checkpoint_filter_fn
from torch import nn
from torch.nn import functional as F

from lidc_cdam.models.backbones.base import BackboneAdapter, QKVAttention, split_heads
from lidc_cdam.models.backbones.timm_vit import TimmPatchEmbedLayout, pool_rows


def _qkv_affine(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` ``[3A, D]`` and ``b`` ``[3A]`` of ``EvaAttention`` / ``AttentionRope`` (fused or separate q, k, v)."""
    if attn.qkv is not None:
        weight = attn.qkv.weight
        if getattr(attn, "q_bias", None) is not None:  # EvaAttention: q and v biases, k bias a zero buffer
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        else:
            bias = attn.qkv.bias
    else:
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight = torch.cat([p.weight for p in projs])
        bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features) for p in projs])
    return weight, bias if bias is not None else weight.new_zeros(weight.shape[0])


class TimmEvaAdapter(TimmPatchEmbedLayout, BackboneAdapter):
    """timm ``Eva`` with pre-norm ``EvaBlock`` s (RoPE, SwiGLU, layer scale, registers; any pooling)."""

    family = "timm Eva"
    module_type = Eva

    @classmethod
    def check(cls, backbone: nn.Module) -> None:
        last = backbone.blocks[-1]
        if not isinstance(last, EvaBlock):
            raise TypeError(
                f"timm Eva: the last block is {type(last).__name__}, not a pre-norm EvaBlock (use_post_norm=True "
                "models normalise after the attention); CDAM needs the normed tokens entering the attention."
            )

    @classmethod
    def filter_state_dict(cls, state_dict: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        return checkpoint_filter_fn(dict(state_dict), backbone)

    @property
    def has_class_token(self) -> bool:
        return self.backbone.cls_token is not None

    def rope(self, grid: tuple[int, ...] | None, num_tokens: int | None = None) -> torch.Tensor | None:
        """The last block's rotary embedding for ``grid`` (as ``Eva._pos_embed`` builds it), or ``None``.
        Without ``grid``, the grid that fits ``num_tokens`` (default: the default image size's)."""
        bb = self.backbone
        if bb.rope is None:
            return None
        if bb.dynamic_img_size:
            n = num_tokens if num_tokens is not None else self.layout().num_tokens
            emb = bb.rope.get_embed(shape=self.resolve_grid(n, grid))
        elif hasattr(bb.rope, "feat_shape"):
            emb = bb.rope.get_embed()
        else:
            emb = bb.rope.get_embed(shape=bb.patch_embed.grid_size)
        return emb[-1] if getattr(bb, "rope_mixed", False) else emb  # mixed RoPE: one per block

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x, rope = bb._pos_embed(bb.patch_embed(images))
        x = bb.norm_pre(x)
        mixed = getattr(bb, "rope_mixed", False) and rope is not None
        for i, block in enumerate(bb.blocks[:-1]):
            x = block(x, rope=rope[i] if mixed else rope)
        return x

    def block(self, resid: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, ...] | None) -> torch.Tensor:
        blk = self.last_block
        x_attn = blk.attn(tokens, rope=self.rope(grid, tokens.shape[-2]))
        if blk.gamma_1 is not None:
            x_attn = blk.gamma_1 * x_attn
        y = resid + blk.drop_path1(x_attn)
        return y + self._mlp_branch(y)

    def _mlp_branch(self, y: torch.Tensor) -> torch.Tensor:
        blk = self.last_block
        x_mlp = blk.mlp(blk.norm2(y))
        if blk.gamma_2 is not None:
            x_mlp = blk.gamma_2 * x_mlp
        return blk.drop_path2(x_mlp)

    def pooled_rows(self, num_tokens: int) -> slice:
        bb = self.backbone
        if bb.attn_pool is not None:  # Eva.pool gives every token to the attention pool
            return slice(0, None)
        return slice(0, 1) if bb.global_pool == "token" else slice(self.num_prefix_tokens, None)

    def qkv_attention(self, grid: tuple[int, ...] | None) -> QKVAttention | None:
        attn = self.last_block.attn
        plain_qk = isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
        if not plain_qk or attn.gate is not None or getattr(attn, "num_kv_groups", 1) != 1:
            return None
        weight, bias = _qkv_affine(attn)
        rotate = None
        if self.backbone.rope is not None:
            rotate = self._rotation(self.rope(grid))
        return QKVAttention(weight, bias, attn.num_heads, attn.head_dim, attn.scale, rotate)

    def _rotation(self, emb: torch.Tensor):
        attn = self.last_block.attn
        npt, half = attn.num_prefix_tokens, bool(getattr(attn, "rotate_half", False))

        def rotate(x: torch.Tensor) -> torch.Tensor:  # [..., H, N, e]: patch tokens turned, as in the attention
            return torch.cat([x[..., :npt, :], apply_rot_embed_cat(x[..., npt:, :], emb, half=half)], dim=-2)

        return rotate

    def finish(self, resid_rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        blk, bb = self.last_block, self.backbone
        x_attn = blk.attn.proj(blk.attn.norm(heads))
        if blk.gamma_1 is not None:
            x_attn = blk.gamma_1 * x_attn
        y = resid_rows + blk.drop_path1(x_attn)
        y = y + self._mlp_branch(y)
        pool_type = "token" if self.pooled_rows(0) == slice(0, 1) else bb.global_pool
        return bb.head_drop(bb.fc_norm(pool_rows(bb.norm(y), pool_type, bb.attn_pool)))

    def attention_probs(self, tokens: torch.Tensor, grid: tuple[int, ...] | None, query: slice) -> torch.Tensor:
        attn = self.last_block.attn
        weight, bias = _qkv_affine(attn)
        H, e = attn.num_heads, attn.head_dim
        kv = (weight.shape[0] - H * e) // 2  # grouped-query attention: fewer key heads
        q, k, _ = F.linear(tokens, weight, bias).split([H * e, kv, kv], dim=-1)
        q, k = attn.q_norm(split_heads(q, H)), attn.k_norm(split_heads(k, kv // e))
        emb = self.rope(grid, tokens.shape[-2])
        if emb is not None:
            rotate = self._rotation(emb)
            q, k = rotate(q), rotate(k)
        k = k.repeat_interleave(H // k.shape[-3], dim=-3)
        return ((q[..., query, :] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
