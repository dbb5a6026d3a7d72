"""torchvision ``VisionTransformer`` (``vit_b_16`` ... ``vit_h_14``; the SWAG weights of the paper's A.5.1).

``EncoderBlock``: ``x = X + dropout(MHA(ln_1(X))); Y = x + mlp(ln_2(x))``; then ``encoder.ln`` and CLS'.
``nn.MultiheadAttention`` keeps q, k, v as one affine map (``in_proj_weight``, ``in_proj_bias``): ``ln_1`` is
``norm1`` and the CLS-row closed form applies as for timm.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from lidc_cdam.models.backbones.base import BackboneAdapter, QKVAttention, split_heads


class TorchvisionViTAdapter(BackboneAdapter):
    """torchvision ``VisionTransformer``: CLS token, CLS pooling, one fixed square image size."""

    family = "torchvision VisionTransformer"
    module_type = VisionTransformer
    size_hint = "resize the images (a torchvision VisionTransformer takes one image size)"

    @classmethod
    def check(cls, backbone: nn.Module) -> None:
        for i, blk in enumerate(backbone.encoder.layers):
            mha = getattr(blk, "self_attention", None)
            if not isinstance(blk, EncoderBlock) or not isinstance(mha, nn.MultiheadAttention):
                raise TypeError(f"torchvision VisionTransformer: encoder layer {i} is {type(blk).__name__}, not an "
                                "EncoderBlock with nn.MultiheadAttention")
        if not backbone.encoder.layers[-1].self_attention._qkv_same_embed_dim:
            raise TypeError("torchvision VisionTransformer: the last attention has separate q, k, v projections")

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.hidden_dim)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def has_class_token(self) -> bool:
        return True

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

    @property
    def depth(self) -> int:
        return len(self.backbone.encoder.layers)

    @property
    def num_heads(self) -> int:
        return int(self.last_block.self_attention.num_heads)

    def grid(self, image_size: tuple[int, ...]) -> tuple[int, ...]:
        side = int(self.backbone.image_size) // int(self.backbone.patch_size)
        return (side, side)

    @property
    def last_block(self) -> nn.Module:
        return self.backbone.encoder.layers[-1]

    @property
    def norm1(self) -> nn.Module:
        return self.last_block.ln_1

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        x = bb._process_input(images)
        x = torch.cat([bb.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = bb.encoder.dropout(x + bb.encoder.pos_embedding)
        for layer in bb.encoder.layers[:-1]:
            x = layer(x)
        return x

    def block(self, resid: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, ...] | None) -> torch.Tensor:
        blk = self.last_block
        x = resid + blk.dropout(blk.self_attention(tokens, tokens, tokens, need_weights=False)[0])
        return x + blk.mlp(blk.ln_2(x))

    def final_norm(self, y: torch.Tensor) -> torch.Tensor:
        return self.backbone.encoder.ln(y)

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, 0]

    def pooled_rows(self, num_tokens: int) -> slice:
        return slice(0, 1)

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

    @property
    def head(self) -> nn.Module:
        return self.backbone.heads

    def remove_head(self) -> None:
        self.backbone.heads = nn.Identity()
        self.backbone.num_classes = 0
