"""The seam between the explainers and a ViT family: what CDAM and the other methods need from a backbone.

Notation (paper section 3, Fig. 2b; docs/method.md, "Token layout", "Backbone families and 3D"):

* ``X`` the residual stream entering the last block ``[B, N, D]``, prefix tokens (CLS, registers) first;
* ``T = norm1(X)`` the tokens entering the last attention (Eq. 2's ``T``);
* the last block ``Y = X + attn_branch(T); Y = Y + mlp_branch(Y)``, then ``Z = norm(Y)``;
* the latent ``l = pool(Z)`` that the head reads (CLS' for token pooling).

A :class:`BackboneAdapter` answers these questions for one family; the explainers only talk to it through
:class:`~lidc_cdam.models.vit.ViTModel`. Grids are tuples of any length (``(gh, gw)`` in 2D, ``(gd, gh, gw)``
for a 3D ViT), images ``[B, C, *spatial]``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


class ModelInputError(ValueError):
    """Images that this model cannot take (channels, size, NaN values)."""


@dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens sit in the token sequence of one image size."""

    num_prefix_tokens: int  # CLS + registers
    grid: tuple[int, ...]  # (gh, gw) patch grid, or (gd, gh, gw) in 3D
    patch_size: tuple[int, ...]

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def patch_grid(self, token_scores: torch.Tensor) -> torch.Tensor:
        """``[..., N]`` scores over all tokens to ``[..., *grid]`` over patches (prefix dropped)."""
        patches = token_scores[..., self.num_prefix_tokens :]
        return patches.reshape(*patches.shape[:-1], *self.grid)


@dataclass(frozen=True)
class QKVAttention:
    """The last attention as one affine map then softmax attention, what the closed-form CDAM path needs.

    ``qkv = T W^T + b`` gives per head (``H`` heads of size ``e``, ``A = H e``) queries, keys and values;
    ``rotate`` (rotary position embeddings, RoPE) turns the q or k of the patch tokens, ``[..., H, N, e]``
    (prefix tokens unchanged), after the projection; ``None`` without RoPE. Logits ``scale q'_i . k'_j``.
    ``T_i`` enters the block only through ``qkv``, so ``T_i . dF/dT_i = qkv_c,i . dF/dqkv_i`` with
    ``qkv_c = T W^T`` (docs/method.md, "Backbone families and 3D").
    """

    weight: torch.Tensor  # [3A, D]
    bias: torch.Tensor  # [3A]
    num_heads: int
    head_dim: int
    scale: float
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None


class BackboneAdapter(ABC):
    """One ViT family seen as ``trunk -> norm1 -> attention -> rest of the last block -> norm -> pool``.

    An adapter holds the backbone module (it is not a module itself: no parameters are registered twice).
    Subclasses set :attr:`family` and :attr:`module_type` and implement the abstract members.
    """

    family: ClassVar[str]
    module_type: ClassVar[type[nn.Module]]
    #: what to do about an image of the wrong size (appended to the error)
    size_hint: ClassVar[str] = "resize the images"

    def __init__(self, backbone: nn.Module) -> None:
        self.check(backbone)
        self.backbone = backbone

    @classmethod
    def check(cls, backbone: nn.Module) -> None:
        """Raise ``TypeError`` if this backbone's structure is not one the adapter can split (default: accept)."""
        return None

    @classmethod
    def filter_state_dict(cls, state_dict: dict[str, Any], backbone: nn.Module) -> dict[str, Any]:
        """Convert an external state dict to this family's keys (default: unchanged)."""
        return state_dict

    def unused_parameters(self) -> set[str]:
        """Names (in the backbone) of parameters the forward pass never uses, e.g. layers built but switched off.
        Training freezes them: DDP's default settings fail on trainable parameters without gradients."""
        return set()

    def build_spec(self) -> dict[str, Any] | None:
        """How to rebuild this backbone (``ViTModel.build``, saved in checkpoints) when the module itself says
        (a Hugging Face config, a MONAI ViT from :func:`build_monai_vit`); ``None`` otherwise."""
        return None

    # ------------------------------------------------------------------ layout
    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @property
    @abstractmethod
    def num_prefix_tokens(self) -> int: ...

    @property
    @abstractmethod
    def has_class_token(self) -> bool: ...

    @property
    @abstractmethod
    def in_chans(self) -> int: ...

    @property
    @abstractmethod
    def patch_size(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def default_image_size(self) -> tuple[int, ...]: ...

    @property
    def strict_image_size(self) -> bool:
        """True when only :attr:`default_image_size` is accepted."""
        return True

    @property
    def pads_images(self) -> bool:
        """True when images whose size is not a multiple of the patch size are padded."""
        return False

    @property
    @abstractmethod
    def depth(self) -> int: ...

    @property
    @abstractmethod
    def num_heads(self) -> int:
        """Heads of the last attention."""

    @abstractmethod
    def grid(self, image_size: tuple[int, ...]) -> tuple[int, ...]:
        """The patch grid of images of ``image_size``."""

    def layout(self, image_size: tuple[int, ...] | None = None) -> TokenLayout:
        size = tuple(image_size) if image_size is not None else self.default_image_size
        return TokenLayout(self.num_prefix_tokens, tuple(self.grid(size)), self.patch_size)

    def resolve_grid(self, num_tokens: int, grid: tuple[int, ...] | None) -> tuple[int, ...]:
        """``grid`` if given; else the default image size's grid, or a square (cube) one, that fits ``num_tokens``."""
        if grid is not None:
            return tuple(grid)
        default = self.grid(self.default_image_size)
        patches = num_tokens - self.num_prefix_tokens
        if math.prod(default) == patches:
            return tuple(default)
        side = round(patches ** (1 / len(default)))
        if side ** len(default) == patches:
            return (side,) * len(default)
        raise ValueError(f"cannot tell the patch grid of {patches} patch tokens; pass grid=")

    def check_images(self, images: torch.Tensor, finite: bool = True) -> torch.Tensor:
        """Raise :class:`ModelInputError` with a clear message if the model cannot take ``images``;
        ``finite``: also check for NaN / infinite values (on a GPU a host sync: not on every forward pass)."""
        dims = len(self.patch_size)
        if not isinstance(images, torch.Tensor) or images.ndim != 2 + dims:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            axes = "H, W" if dims == 2 else "D, H, W"
            raise ModelInputError(f"images must be a [B, C, {axes}] tensor, got {shape}")
        c, size = images.shape[1], tuple(images.shape[2:])
        if c != self.in_chans:
            raise ModelInputError(f"the model takes {self.in_chans}-channel images, got {c} channels")
        if self.strict_image_size and size != tuple(self.default_image_size):
            raise ModelInputError(
                f"the model takes {'x'.join(map(str, self.default_image_size))} images, got "
                f"{'x'.join(map(str, size))}; {self.size_hint}"
            )
        if not self.strict_image_size and not self.pads_images and any(
            s % p for s, p in zip(size, self.patch_size, strict=True)
        ):
            raise ModelInputError(
                f"image size {'x'.join(map(str, size))} is not a multiple of the patch size "
                f"{'x'.join(map(str, self.patch_size))}"
            )
        if finite and not torch.isfinite(images).all():
            raise ModelInputError("images contain NaN or infinite values")
        return images

    # ----------------------------------------------------------- split forward
    @property
    @abstractmethod
    def last_block(self) -> nn.Module: ...

    @property
    @abstractmethod
    def norm1(self) -> nn.Module:
        """The last block's first norm: ``T = norm1(X)``."""

    @abstractmethod
    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Everything before the last block: the residual stream ``X`` ``[B, N, D]``."""

    @abstractmethod
    def block(self, resid: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, ...] | None) -> torch.Tensor:
        """The last block's output ``Y`` from ``X`` (residual branch) and ``T`` (entering the attention)."""

    @abstractmethod
    def final_norm(self, y: torch.Tensor) -> torch.Tensor:
        """The final norm: ``Z = norm(Y)``."""

    @abstractmethod
    def pool(self, z: torch.Tensor) -> torch.Tensor:
        """Pooling (and ``fc_norm``): the latent ``l`` from ``Z`` ``[B, N, D]``."""

    def final(self, y: torch.Tensor) -> torch.Tensor:
        """The latent ``l`` from the last block's output ``Y``."""
        return self.pool(self.final_norm(y))

    @abstractmethod
    def pooled_rows(self, num_tokens: int) -> slice:
        """The rows of ``Z`` the pooling reads: ``slice(0, 1)`` for CLS pooling, the patch rows for
        average pooling, all rows for attention pooling."""

    def reads_cls_only(self) -> bool:
        """True when the head reads CLS' alone (docs/method.md, "Where the speed comes from")."""
        return self.pooled_rows(self.layout().num_tokens) == slice(0, 1)

    @abstractmethod
    def qkv_attention(self, grid: tuple[int, ...] | None) -> QKVAttention | None:
        """The last attention as :class:`QKVAttention`, or ``None`` when it is not one affine ``qkv`` map then
        softmax attention (q/k norms, gates, grouped keys): then CDAM takes the reference path."""

    @abstractmethod
    def finish(self, resid_rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """The latent from the pooled rows only: ``X`` rows ``[..., Q, D]`` and the concatenated head outputs
        ``sum_j a_ij V_j`` of those rows ``[..., Q, A]`` (before the attention's output norm and projection).

        Leading dimensions broadcast. Exact because the rest of the block and the final norm act row by row.
        """

    @abstractmethod
    def attention_probs(self, tokens: torch.Tensor, grid: tuple[int, ...] | None, query: slice) -> torch.Tensor:
        """Softmax attention of the last block for the ``query`` rows: ``[B, H, n_q, N]`` (Eq. 1)."""

    # ------------------------------------------------------------------ head
    @property
    @abstractmethod
    def head(self) -> nn.Module:
        """The family's own head on the latent."""

    @abstractmethod
    def remove_head(self) -> None:
        """Replace the family's own head by ``Identity`` (a separate head is used)."""

    @property
    def num_classes(self) -> int:
        return int(getattr(self.backbone, "num_classes", 0))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[..., N, H e]`` to ``[..., H, N, e]``."""
    *lead, n, a = x.shape
    return x.reshape(*lead, n, num_heads, a // num_heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[..., H, N, e]`` to ``[..., N, H e]``."""
    return x.transpose(-3, -2).flatten(-2)
