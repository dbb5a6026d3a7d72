"""`ViTModel`: a Vision Transformer backbone plus a head, split at its last block.

The backbone is any supported family (timm ``VisionTransformer``, timm ``Eva``, torchvision
``VisionTransformer``, Hugging Face ``transformers`` ViT / DINOv2, MONAI ``ViT`` in 2D or 3D);
:mod:`lidc_cdam.models.backbones` holds one adapter per family, the seam the explainers use through this class.

Notation follows the paper (section 3, Fig. 2b) and docs/method.md, "Token layout":

* ``X``  residual stream entering the final block, ``[B, N, D]``, prefix tokens first
  (CLS, then register tokens);
* ``T = blocks[-1].norm1(X)`` the layer-normalised tokens entering the final attention;
* the final block ``Y = X + ls1(attn(T)); Y = Y + ls2(mlp(norm2(Y)))``, then ``Z = norm(Y)``;
* the latent ``l`` read by the head: ``Z[:, 0]`` (CLS') for token pooling, else the model's pooling.

Explainers run :meth:`ViTModel.trunk` once and then re-run only the last block from ``T``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from torch import nn

from lidc_cdam.models import checkpoint_format
from lidc_cdam.models.backbones import BackboneAdapter, QKVAttention, adapter_for, build_backbone
from lidc_cdam.models.backbones.base import ModelInputError, TokenLayout, reads
from lidc_cdam.models.heads import LinearHead

Task = Literal["classification", "regression", "features"]

__all__ = ["ModelInputError", "Task", "TokenLayout", "ViTModel"]


class ViTModel(nn.Module):
    """A ViT backbone and a head on its latent (CLS' or pooled tokens).

    Args:
        backbone: a timm ``VisionTransformer`` (CLS, average or attention pooling, register tokens,
            layer scale, fixed or dynamic image size), a timm ``Eva`` (DINOv3, EVA-02, PE: RoPE, SwiGLU), a
            torchvision ``VisionTransformer`` (SWAG), a Hugging Face ``ViTModel`` / ``ViTForImageClassification`` /
            ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (and their ``ForImageClassification``), or a MONAI
            ``ViT(classification=True)`` (3D: images ``[B, C, D, H, W]``, a ``(gd, gh, gw)`` token grid).
        head: module on the latent ``l``; ``None`` keeps the backbone's own timm head. A given head
            replaces the backbone's (its classifier is reset to ``Identity``).
        task: what the outputs are: class logits, regression outputs, or plain features.
        output_names: a name per output (e.g. the biomarker names), usable as targets.
        build: how to rebuild the backbone (``{"timm_name": ..., "timm_kwargs": {...}}``, see
            :func:`~lidc_cdam.models.backbones.build_backbone`); saved in checkpoints by
            :func:`lidc_cdam.models.loading.save_checkpoint`. Default: what the backbone says of itself (a Hugging
            Face config; a MONAI ViT made by :meth:`from_monai`), else nothing (the model cannot be saved).
        meta: free-form, checkpoint-safe metadata (normalisation statistics, fold, metrics...).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module | None = None,
        *,
        task: Task = "classification",
        output_names: list[str] | None = None,
        build: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        adapter = adapter_for(backbone)
        if head is not None:
            adapter.remove_head()
            self.head = head
        else:
            self.head = adapter.head
        self.backbone = backbone
        self._adapter = adapter
        self.task: Task = task
        self.output_names = list(output_names) if output_names is not None else None
        self.build = dict(build or adapter.build_spec() or {})
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
        build = {"timm_name": timm_name, "timm_kwargs": dict(timm_kwargs)}
        backbone = build_backbone(build)
        head = LinearHead(adapter_for(backbone).embed_dim, head_outputs, head_dropout) if head_outputs else None
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

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                  num_heads: int | None = None, **kwargs: Any) -> ViTModel:
        """A ViT exported to ONNX from Hugging Face ``ViTModel`` / ``Dinov2Model`` (other modules after it, e.g. a
        decoder, are ignored), as a feature model on a timm ``VisionTransformer`` taking ``image_size`` images
        (default: the graph's input size); see :mod:`lidc_cdam.models.onnx_import`. Needs the ``onnx`` extra."""
        return checkpoint_format.model_from_onnx(cls, path, image_size=image_size, num_heads=num_heads, **kwargs)

    def save(self, path: str | os.PathLike, meta: dict[str, Any] | None = None):
        """Write a checkpoint that :meth:`from_checkpoint` rebuilds (weights-only safe)."""
        return checkpoint_format.save_checkpoint(self, path, meta)

    @classmethod
    def from_monai(cls, *, head_outputs: int | None = None, head_dropout: float = 0.0, task: Task = "classification",
                   **monai_kwargs: Any) -> ViTModel:
        """A new MONAI ``ViT(classification=True, **monai_kwargs)``, e.g. ``in_channels=1, img_size=(32, 32, 32),
        patch_size=(8, 8, 8)`` (3D by default; MONAI's ``spatial_dims``); with ``head_outputs`` a
        :class:`~lidc_cdam.models.heads.LinearHead` on CLS' replaces MONAI's ``Linear`` + ``Tanh`` head."""
        build = {"family": "monai", "monai_kwargs": {"classification": True, **monai_kwargs}}
        backbone = build_backbone(build)
        head = LinearHead(adapter_for(backbone).embed_dim, head_outputs, head_dropout) if head_outputs else None
        return cls(backbone, head, task=task, build=build)

    @classmethod
    def from_torchvision(cls, name: str, *, checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> ViTModel:
        """A torchvision ViT by builder name (``"vit_b_16"``, ``"vit_l_16"``...), randomly initialised or with
        the weights of a local state-dict ``checkpoint`` (e.g. the SWAG files, with ``image_size=384``). No
        downloads."""
        return checkpoint_format.model_from_torchvision(cls, name, checkpoint=checkpoint, **kwargs)

    # ------------------------------------------------------------------ layout
    @property
    def adapter(self) -> BackboneAdapter:
        """The family adapter of :attr:`backbone` (:mod:`lidc_cdam.models.backbones`)."""
        if self._adapter.backbone is not self.backbone:  # the backbone was replaced
            self._adapter = adapter_for(self.backbone)
        return self._adapter

    family = reads("adapter.family", doc='The backbone family, e.g. ``"timm VisionTransformer"``, ``"timm Eva"``.')
    last_block = reads("adapter.last_block", doc="The last block.")
    norm1 = reads("adapter.norm1", doc="The last block's first norm: ``T = norm1(X)`` (Eq. 2's ``T``; captum's "
                  "layer for CDAM).")
    embed_dim = reads("adapter.embed_dim", doc="The token width ``D``.")
    num_prefix_tokens = reads("adapter.num_prefix_tokens", doc="The tokens before the patches (CLS, registers).")
    has_class_token = reads("adapter.has_class_token", doc="True when the first token is a CLS token.")
    in_chans = reads("adapter.in_chans", doc="The channels of the images the model takes.")
    patch_size = reads("adapter.patch_size", doc="The patch size, one entry per spatial axis.")
    default_image_size = reads("adapter.default_image_size", doc="The image size the model is built for.")
    depth = reads("adapter.depth", doc="The number of blocks.")
    num_heads = reads("adapter.num_heads", doc="Heads of the last attention.")

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
        query rows cannot influence any target (docs/method.md, "Where the speed comes from")."""
        return self.adapter.reads_cls_only()

    def pooled_rows(self, num_tokens: int) -> slice:
        """The rows of the last block's output that the pooling reads (CLS, the patches, or all)."""
        return self.adapter.pooled_rows(num_tokens)

    def layout(self, image_size: tuple[int, ...] | None = None) -> TokenLayout:
        """Token layout for images of ``(H, W)`` (default: the model's configured size)."""
        return self.adapter.layout(image_size)

    def check_images(self, images: torch.Tensor, finite: bool = True) -> torch.Tensor:
        """Raise :class:`ModelInputError` with a clear message if the model cannot take ``images``
        (``finite``: also NaN / infinite values, a host sync on a GPU)."""
        return self.adapter.check_images(images, finite)

    # ----------------------------------------------------------- split forward
    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding and every block but the last: the residual stream ``X`` entering the last block."""
        return self.adapter.trunk(images)

    def normed_tokens(self, resid: torch.Tensor) -> torch.Tensor:
        """``T = norm1(X)``: the tokens entering the final attention (Eq. 2's ``T``)."""
        return self.adapter.norm1(resid)

    def final_norm(self, y: torch.Tensor) -> torch.Tensor:
        """``Z = norm(Y)``: the final norm of the last block's output."""
        return self.adapter.final_norm(y)

    def latent_from_final(self, z: torch.Tensor) -> torch.Tensor:
        """Pool the final-norm tokens ``Z`` to the latent ``l`` the head reads (CLS' for token pooling)."""
        return self.adapter.pool(z)

    def qkv_attention(self, grid: tuple[int, ...] | None = None) -> QKVAttention | None:
        """The last attention as one affine ``qkv`` map (+ RoPE) and softmax, or ``None`` (see the adapter)."""
        return self.adapter.qkv_attention(grid)

    def finish_rows(self, resid_rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Rest of the last block on the pooled rows only (:meth:`pooled_rows`), from the concatenated head
        outputs ``heads`` ``[..., Q, A]`` (before the attention's output norm and projection) and the residual
        rows ``[..., Q, D]``; returns the latent ``l``. Leading dimensions broadcast."""
        return self.adapter.finish(resid_rows, heads)

    def finish_cls(self, resid_cls: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Rest of the last block for the CLS row only, from the concatenated head outputs
        ``attn_out`` (before ``attn.norm`` and ``proj``); returns the latent ``l``.

        Valid when :attr:`reads_cls_only`; works on any leading batch shape.
        """
        return self.adapter.finish(resid_cls[..., None, :], attn_out[..., None, :])

    def attention_probs(self, tokens: torch.Tensor, grid: tuple[int, ...] | None = None,
                        query: slice = slice(0, 1)) -> torch.Tensor:
        """Last-block attention probabilities of the ``query`` rows ``[B, H, n_q, N]`` (Eq. 1)."""
        return self.adapter.attention_probs(tokens, grid, query)

    def last(self, resid: torch.Tensor, tokens: torch.Tensor | None = None, *,
             grid: tuple[int, ...] | None = None) -> torch.Tensor:
        """Last block, final norm and pooling from the residual ``X`` and normed tokens ``T``.

        ``T`` defaults to ``norm1(X)``; passing it lets explainers differentiate with respect to
        ``T`` while the residual branch ``X`` stays fixed (docs/method.md, "CDAM"). ``grid`` is the patch grid (needed
        by RoPE models at a size other than the default one). Returns the latent ``l``.
        """
        t = self.normed_tokens(resid) if tokens is None else tokens
        return self.adapter.final(self.adapter.block(resid, t, grid))

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """The latent ``l`` (CLS' for token pooling) that the head and concepts read (Eq. 3). NaN / infinite
        values are checked on CPU inputs only: on a GPU that check would wait for the device on every forward
        pass (training steps, metric batches); :func:`lidc_cdam.explain` checks once per call."""
        self.check_images(images, finite=images.device.type == "cpu")
        return self.last(self.trunk(images), grid=self.layout(tuple(images.shape[2:])).grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.latent(images))

    def extra_repr(self) -> str:
        return f"family={self.family}, task={self.task}, outputs={self.output_names or self.num_outputs}"
