"""The seam between the explainers and a ViT family: what CDAM and the other methods need from a backbone.

Notation (paper section 3, Fig. 2b; docs/method.md, "Token layout", "Backbone families and 3D"):

* ``X`` the residual stream entering the last block ``[B, N, D]``, prefix tokens (CLS, registers) first;
* ``T = norm1(X)`` the tokens entering the last attention (Eq. 2's ``T``);
* the last block ``Y = X + attn_branch(T); Y = Y + mlp_branch(Y)``, then ``Z = norm(Y)``;
* the latent ``l = pool(Z)`` that the head reads (CLS' for token pooling).

A :class:`BackboneAdapter` answers these questions for one family; the explainers only talk to it through
:class:`~lidc_cdam.models.vit.ViTModel`. It also owns how its family is saved and loaded: how a backbone is built
from a saved spec (:meth:`BackboneAdapter.build`, for ``build["family"] ==`` :attr:`~BackboneAdapter.build_family`),
and how a plain state dict of the family is recognised and its spec inferred
(:meth:`~BackboneAdapter.recognises`, :meth:`~BackboneAdapter.spec_from_state_dict`);
:mod:`lidc_cdam.models.checkpoint_format` only reads and writes the files.
Grids are tuples of any length (``(gh, gw)`` in 2D, ``(gd, gh, gw)`` for a 3D ViT), images ``[B, C, *spatial]``.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, ClassVar

import torch
from torch import nn


class ModelInputError(ValueError):
    """Images that this model cannot take (channels, size, NaN values)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unsafe, unknown format, wrong shapes)."""


class PretrainedWeightsUnavailable(CheckpointError):
    """``pretrained=True`` weights could not be fetched (offline); pass a local file instead."""


#: ``num_heads`` of the standard ViT widths (Ti, S, B, L, g); other widths need ``num_heads=``.
NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}

#: the model files :func:`lidc_cdam.models.loading.load_model` reads (said when a file is none of them)
UNDERSTOOD = (
    "understood formats: lidc-cdam checkpoints (ViTModel.save), official DINO backbones and DINO "
    "training checkpoints ('teacher'/'student'), official DINOv2 backbones, timm "
    "VisionTransformer state dicts (optionally under 'model' or 'state_dict') and torchvision "
    "VisionTransformer state dicts (e.g. the SWAG weights)"
)


def first_line(err: BaseException) -> str:
    """The first non-blank line of an error's text."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else ""


def square_side(n: int) -> int | None:
    """``s`` with ``s * s == n`` (``n > 0``), else ``None``."""
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def numbered(state_dict: dict[str, Any], pattern: str, source: str, what: str) -> int:
    """How many layers ``pattern`` (a regex whose group 1 is the layer number) finds in a state dict's keys;
    :class:`CheckpointError` unless they are numbered ``0 .. depth - 1``."""
    found = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    if not found or found != set(range(max(found) + 1)):
        raise CheckpointError(f"{source}: {what} missing or not numbered 0..depth-1 (found {sorted(found)[:8]})")
    return len(found)


def heads_for(width: int, num_heads: int | None, source: str, hint: str) -> int:
    """``num_heads`` if given, else the standard one of ``width`` (:data:`NUM_HEADS`)."""
    if num_heads is not None:
        return num_heads
    if width not in NUM_HEADS:
        raise CheckpointError(f"{source}: cannot infer the number of attention heads for width {width} "
                              f"(known widths: {NUM_HEADS}); pass num_heads=...{hint}")
    return NUM_HEADS[width]


def reads(path: str, convert: Callable[[Any], Any] | None = None, doc: str | None = None) -> property:
    """A read-only property: the attribute at the dotted ``path`` of the object (``"backbone.hidden_dim"``,
    ``"last_block.attn.num_heads"``), passed through ``convert`` if given. The adapters' (and
    :class:`~lidc_cdam.models.vit.ViTModel`'s) plain reads of their modules, written once."""
    get = attrgetter(path)
    return property(get if convert is None else lambda self: convert(get(self)), doc=doc)


def required(doc: str) -> property:
    """An abstract read-only property of :class:`BackboneAdapter`: each family defines it (often with :func:`reads`)."""

    def get(self: Any) -> Any:
        raise NotImplementedError

    get.__doc__ = doc
    return property(abstractmethod(get), doc=doc)


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
    #: ``build["family"]`` of the saved specs that :meth:`build` builds (``None``: this adapter builds none)
    build_family: ClassVar[str | None] = None
    #: the keys of those specs that hold an architecture name and keyword arguments (``arch=`` and keyword
    #: arguments given when a checkpoint is loaded override them: :meth:`override_spec`)
    spec_keys: ClassVar[tuple[str | None, str | None]] = (None, None)
    #: ``meta["source_format"]`` of a model loaded from a plain state dict of this family (``None``: as found)
    state_dict_format: ClassVar[str | None] = None

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

    # ------------------------------------------------------ saving and loading
    @classmethod
    def build(cls, spec: dict[str, Any]) -> nn.Module:
        """A randomly initialised backbone from a saved spec (``ViTModel.build``) of :attr:`build_family`."""
        raise NotImplementedError(f"{cls.family}: no builder for saved specs")

    @classmethod
    def override_spec(cls, spec: dict[str, Any], arch: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A saved spec with an architecture name and keyword arguments given at loading (:attr:`spec_keys`)."""
        name_key, kwargs_key = cls.spec_keys
        out = dict(spec)
        if name_key is not None and arch is not None:
            out[name_key] = arch
        if kwargs_key is not None and kwargs:
            out[kwargs_key] = {**(spec.get(kwargs_key) or {}), **kwargs}
        return out

    @classmethod
    def recognises(cls, state_dict: dict[str, Any]) -> bool:
        """True when a plain state dict (no saved spec) is one of this family's (default: never)."""
        return False

    @classmethod
    def spec_from_state_dict(cls, state_dict: dict[str, Any], arch: str | None, kwargs: dict[str, Any],
                             source: str) -> dict[str, Any]:
        """The spec (for :meth:`build`) of a backbone that fits a recognised state dict, inferred from its shapes;
        ``arch`` (an architecture name of the family) and ``kwargs`` override the inference."""
        raise NotImplementedError(f"{cls.family}: plain state dicts are not read")

    def unused_parameters(self) -> set[str]:
        """Names (in the backbone) of parameters the forward pass never uses, e.g. layers built but switched off.
        Training freezes them: DDP's default settings fail on trainable parameters without gradients."""
        return set()

    def build_spec(self) -> dict[str, Any] | None:
        """How to rebuild this backbone (``ViTModel.build``, saved in checkpoints) when the module itself says
        (a Hugging Face config, a MONAI ViT from :func:`build_monai_vit`); ``None`` otherwise."""
        return None

    # ------------------------------------------------------------------ layout
    embed_dim = required("The token width ``D`` (an ``int``).")
    num_prefix_tokens = required("The tokens before the patches: CLS and register tokens (an ``int``).")
    has_class_token = required("True when the first token is a CLS token.")
    in_chans = required("The channels of the images the model takes (an ``int``).")
    patch_size = required("The patch size, one ``int`` per spatial axis.")
    default_image_size = required("The image size the model is built for, one ``int`` per spatial axis.")

    @property
    def strict_image_size(self) -> bool:
        """True when only :attr:`default_image_size` is accepted."""
        return True

    @property
    def pads_images(self) -> bool:
        """True when images whose size is not a multiple of the patch size are padded."""
        return False

    depth = required("The number of blocks (an ``int``).")
    num_heads = required("Heads of the last attention (an ``int``).")

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
    last_block = required("The last block (an ``nn.Module``).")
    norm1 = required("The last block's first norm: ``T = norm1(X)`` (an ``nn.Module``).")

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
    head = required("The family's own head on the latent (an ``nn.Module``).")

    @abstractmethod
    def remove_head(self) -> None:
        """Replace the family's own head by ``Identity`` (a separate head is used)."""

    @property
    def num_classes(self) -> int:
        return int(getattr(self.backbone, "num_classes", 0))


class ClassTokenPooling:
    """For families whose one prefix token is CLS and whose latent is CLS' (torchvision, MONAI): put it before
    :class:`BackboneAdapter` in the bases."""

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def has_class_token(self) -> bool:
        return True

    def pool(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, 0]

    def pooled_rows(self, num_tokens: int) -> slice:
        return slice(0, 1)


def with_class_token(x: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The patch tokens ``[B, N, D]`` with the CLS ``token`` ``[1, 1, D]`` put first."""
    return torch.cat([token.expand(x.shape[0], -1, -1), x], dim=1)


def all_but_last(blocks: nn.ModuleList | nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``x`` through every block but the last: the end of a trunk (the residual stream ``X``)."""
    for blk in blocks[:-1]:
        x = blk(x)
    return x


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[..., N, H e]`` to ``[..., H, N, e]``."""
    *lead, n, a = x.shape
    return x.reshape(*lead, n, num_heads, a // num_heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[..., H, N, e]`` to ``[..., N, H e]``."""
    return x.transpose(-3, -2).flatten(-2)
