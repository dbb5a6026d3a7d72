"""Small timm ViTs for tests: built here, random weights, no downloads."""

from __future__ import annotations

import os

import torch
from timm.models.vision_transformer import VisionTransformer

from lidc_cdam import ViTModel

#: set in the subprocess of tests/test_demo_weights.py::test_committed_results_hold_under_another_kernel_set
#: (``ATEN_CPU_CAPABILITY=default``, one thread): the heavy ``committed_results`` tests then recompute a
#: representative part of their committed rows (each says which), not all of them
KERNEL_SUBSET = os.environ.get("LIDC_CDAM_KERNEL_SUBSET") == "1"

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=7, qkv_bias=True)


def tiny_vit(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> ViTModel:
    """A 2-block ViT (4x4 patches of 8 px) with random weights, scaled so attention is not uniform."""
    torch.manual_seed(seed)
    backbone = VisionTransformer(**{**TINY, **overrides})
    with torch.no_grad():  # sharper attention and larger head weights than timm's init
        for blk in backbone.blocks:
            blk.attn.qkv.weight.mul_(4.0)
        if isinstance(backbone.head, torch.nn.Linear):
            backbone.head.weight.mul_(10.0)
    return ViTModel(backbone).to(dtype)


def reg4_dinov2_like(dtype: torch.dtype = torch.float64, **overrides) -> ViTModel:
    """Shaped like timm's vit_small_patch14_reg4_dinov2 (4 registers, layer scale, no pos-embed on
    prefix tokens), only much smaller."""
    return tiny_vit(dtype, **{"img_size": 42, "patch_size": 14, "reg_tokens": 4, "no_embed_class": True,
                              "init_values": 1e-1, **overrides})


def images_for(model: ViTModel, batch: int = 2, size: tuple[int, int] | None = None) -> torch.Tensor:
    h, w = size or model.default_image_size
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1), dtype=dtype)


def pdf_text(data: bytes) -> str:
    """The text shown in an uncompressed PDF (matplotlib's with ``pdf.compression`` 0): the strings of every
    ``TJ`` array (joined: matplotlib splits a line where it kerns) and ``Tj``, one line per text operation."""
    import re

    string = rb"\(((?:[^()\\]|\\.)*)\)"
    array = rb"\[((?:\((?:[^()\\]|\\.)*\)|[^\]()])*)\]\s*TJ"  # strings and numbers: linear in the data
    found = [b"".join(re.findall(string, arr)) for arr in re.findall(array, data)]
    found += re.findall(string + rb"\s*Tj", data)
    return "\n".join(re.sub(rb"\\(.)", rb"\1", s).decode("latin-1") for s in found)


def torchrun(nproc: int = 2) -> list[str]:
    """The ``torchrun --standalone --nproc_per_node N`` command of this interpreter (no script on PATH needed)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def from_the_shipped_biomarker_model() -> str:
    """The ``--set`` that starts a phantom malignancy model from the shipped biomarker model's backbone, as the
    shipped malignancy model started (fold 0: the phantoms of fold 0's test part were never trained on)."""
    from lidc_cdam.models.demo_weights import shipped_checkpoint

    return f"backbone.checkpoint={shipped_checkpoint('phantom-biomarkers')}"
