"""`ViTModel`: a timm Vision Transformer plus a head, split at its last block.

Notation follows the paper (section 3, Fig. 2b) and SPEC.md "Token layout":

* ``X``  residual stream entering the final block, ``[B, N, D]``, prefix tokens first
  (CLS, then register tokens);
* ``T = blocks[-1].norm1(X)`` the layer-normalised tokens entering the final attention;
* the final block ``Y = X + ls1(attn(T)); Y = Y + ls2(mlp(norm2(Y)))``, then ``Z = norm(Y)``;
* the latent ``l`` read by the head: ``Z[:, 0]`` (CLS') for token pooling, else the model's pooling.

Explainers run :meth:`ViTModel.trunk` once and then re-run only the last block from ``T``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lidc_cdam.models import checkpoint_format

Task = Literal["classification", "regression", "features"]


class ModelInputError(ValueError):
    """Images that this model cannot take (channels, size, NaN values)."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens sit in the token sequence of one image size."""

    num_prefix_tokens: int  # CLS + registers
    grid: tuple[int, int]  # (gh, gw) patch grid
    patch_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def patch_grid(self, token_scores: torch.Tensor) -> torch.Tensor:
        """``[..., N]`` scores over all tokens to ``[..., gh, gw]`` over patches (prefix dropped)."""
        patches = token_scores[..., self.num_prefix_tokens :]
        return patches.reshape(*patches.shape[:-1], *self.grid)


def _check_supported(backbone: nn.Module) -> None:
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(
            f"ViTModel wraps timm VisionTransformer models, got {type(backbone).__name__}. "
            "Create one with timm.create_model('vit_...') or lidc_cdam.ViTModel.from_timm(name)."
        )
    last = backbone.blocks[-1]
    needed = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")
    missing = [name for name in needed if not hasattr(last, name)]
    if missing or not hasattr(last.attn, "qkv") or last.attn.qkv is None:
        raise TypeError(
            f"The last block ({type(last).__name__}) is not a pre-norm timm Block with a fused qkv "
            f"projection (missing: {missing or ['attn.qkv']}); CDAM needs the tokens entering its attention."
        )


class ViTModel(nn.Module):
    """A timm ``VisionTransformer`` backbone and a head on its latent (CLS' or pooled tokens).

    Args:
        backbone: any timm ``VisionTransformer`` (CLS or average pooling, register tokens,
            layer scale, fixed or dynamic image size).
        head: module on the latent ``l``; ``None`` keeps the backbone's own timm head. A given head
            replaces the backbone's (its classifier is reset to ``Identity``).
        task: what the outputs are: class logits, regression outputs, or plain features.
        output_names: a name per output (e.g. the biomarker names), usable as targets.
        build: how to rebuild the backbone (``{"timm_name": ..., "timm_kwargs": {...}}``);
            saved in checkpoints by :func:`lidc_cdam.models.loading.save_checkpoint`.
        meta: free-form, checkpoint-safe metadata (normalisation statistics, fold, metrics...).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        head: nn.Module | None = None,
        *,
        task: Task = "classification",
        output_names: list[str] | None = None,
        build: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _check_supported(backbone)
        if head is not None:
            backbone.reset_classifier(0)
            self.head = head
        else:
            self.head = backbone.head
        self.backbone = backbone
        self.task: Task = task
        self.output_names = list(output_names) if output_names is not None else None
        self.build = dict(build or {})
        self.meta = dict(meta or {})
        self.eval()

    # ---------------------------------------------------------------- building
    @classmethod
    def from_config(
        cls,
        timm_kwargs: dict[str, Any],
        *,
        timm_name: str | None = None,
        head_outputs: int | None = None,
        head_dropout: float = 0.0,
        **kwargs: Any,
    ) -> ViTModel:
        """A new (randomly initialised) model: ``timm.create_model(timm_name, **timm_kwargs)`` or,
        without a name, ``VisionTransformer(**timm_kwargs)``; with ``head_outputs`` a
        :class:`~lidc_cdam.models.heads.LinearHead` replaces the timm head."""
        from lidc_cdam.models.heads import LinearHead

        build = {"timm_name": timm_name, "timm_kwargs": dict(timm_kwargs)}
        backbone = checkpoint_format.build_backbone(build)
        head = LinearHead(backbone.embed_dim, head_outputs, head_dropout) if head_outputs else None
        return cls(backbone, head, build=build, **kwargs)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> ViTModel:
        """Load a model file: a lidc-cdam checkpoint, or an official DINO / DINOv2 backbone
        (see :func:`lidc_cdam.models.loading.load_model`). Read with ``weights_only=True``."""
        return checkpoint_format.load_model_file(cls, path, **kwargs)

    @classmethod
    def from_timm(cls, name: str, *, pretrained: bool = False, checkpoint: str | os.PathLike | None = None,
                  **kwargs: Any) -> ViTModel:
        """A timm ViT by name, e.g. ``"vit_small_patch8_224.dino"``; weights downloaded with
        ``pretrained=True`` or read from a local ``checkpoint`` file."""
        return checkpoint_format.model_from_timm(cls, name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)

    def save(self, path: str | os.PathLike, meta: dict[str, Any] | None = None):
        """Write a checkpoint that :meth:`from_checkpoint` rebuilds (weights-only safe)."""
        return checkpoint_format.save_checkpoint(self, path, meta)

    # ------------------------------------------------------------------ layout
    @property
    def last_block(self) -> nn.Module:
        return self.backbone.blocks[-1]

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.backbone.num_prefix_tokens)

    @property
    def in_chans(self) -> int:
        return int(self.backbone.patch_embed.proj.in_channels)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.patch_size)

    @property
    def default_image_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.img_size)

    @property
    def num_outputs(self) -> int:
        """Number of head outputs; 0 for a feature-only model (no head)."""
        if isinstance(self.head, nn.Identity):
            return 0
        out = getattr(self.head, "out_features", None)
        if out is not None:
            return int(out)
        with torch.no_grad():
            param = next(self.parameters())
            probe = torch.zeros(1, self.embed_dim, dtype=param.dtype, device=param.device)
            return int(self.head(probe).shape[-1])

    @property
    def reads_cls_only(self) -> bool:
        """True when the head reads CLS' alone (token pooling), so the last block's other
        query rows cannot influence any target (SPEC "Where the speed is")."""
        bb = self.backbone
        return bool(bb.has_class_token) and bb.global_pool == "token" and bb.attn_pool is None

    def layout(self, image_size: tuple[int, int] | None = None) -> TokenLayout:
        """Token layout for images of ``(H, W)`` (default: the model's configured size)."""
        pe = self.backbone.patch_embed
        hw = tuple(image_size) if image_size is not None else self.default_image_size
        grid = tuple(pe.dynamic_feat_size(hw)) if not pe.strict_img_size else tuple(pe.grid_size)
        return TokenLayout(self.num_prefix_tokens, grid, self.patch_size)

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raise :class:`ModelInputError` with a clear message if the model cannot take ``images``."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ModelInputError(f"images must be a [B, C, H, W] tensor, got {shape}")
        _, c, h, w = images.shape
        if c != self.in_chans:
            raise ModelInputError(f"the model takes {self.in_chans}-channel images, got {c} channels")
        pe = self.backbone.patch_embed
        ph, pw = self.patch_size
        if pe.strict_img_size and (h, w) != tuple(pe.img_size):
            raise ModelInputError(
                f"the model takes {pe.img_size[0]}x{pe.img_size[1]} images, got {h}x{w}; resize the "
                "images or build the timm model with dynamic_img_size=True"
            )
        if not pe.strict_img_size and not pe.dynamic_img_pad and (h % ph or w % pw):
            raise ModelInputError(
                f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}"
            )
        if not torch.isfinite(images).all():
            raise ModelInputError("images contain NaN or infinite values")
        return images

    # ----------------------------------------------------------- split forward
    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding and ``blocks[:-1]``: the residual stream ``X`` entering the last block."""
        bb = self.backbone
        x = bb.patch_embed(images)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        x = bb.norm_pre(x)
        for block in bb.blocks[:-1]:
            x = block(x)
        return x

    def normed_tokens(self, resid: torch.Tensor) -> torch.Tensor:
        """``T = norm1(X)``: the tokens entering the final attention (Eq. 2's ``T``)."""
        return self.last_block.norm1(resid)

    def latent_from_final(self, z: torch.Tensor) -> torch.Tensor:
        """Pool the final-norm tokens ``Z`` to the latent ``l`` the head reads (CLS' for token pooling)."""
        bb = self.backbone
        return bb.head_drop(bb.fc_norm(bb.pool(z)))

    def finish_cls(self, resid_cls: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Rest of the last block for the CLS row only, from the concatenated head outputs
        ``attn_out`` (before ``attn.norm`` and ``proj``); returns the latent ``l``.

        Valid when :attr:`reads_cls_only`; works on any leading batch shape.
        """
        blk, bb = self.last_block, self.backbone
        y = resid_cls + blk.drop_path1(blk.ls1(blk.attn.proj(blk.attn.norm(attn_out))))
        y = y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
        return bb.head_drop(bb.fc_norm(bb.norm(y)))

    def last(self, resid: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Last block, final norm and pooling from the residual ``X`` and normed tokens ``T``.

        ``T`` defaults to ``norm1(X)``; passing it lets explainers differentiate with respect to
        ``T`` while the residual branch ``X`` stays fixed (SPEC "CDAM"). Returns the latent ``l``.
        """
        blk = self.last_block
        t = self.normed_tokens(resid) if tokens is None else tokens
        y = resid + blk.drop_path1(blk.ls1(blk.attn(t)))
        y = y + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(y))))
        return self.latent_from_final(self.backbone.norm(y))

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """The latent ``l`` (CLS' for token pooling) that the head and concepts read (Eq. 3)."""
        self.check_images(images)
        return self.last(self.trunk(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.latent(images))

    def extra_repr(self) -> str:
        return f"task={self.task}, outputs={self.output_names or self.num_outputs}"
