"""Mimetic initialisation of a ViT's self-attention (Trockman & Kolter, ICML 2023), for training from scratch.

A ViT trained from scratch on a few hundred images (the phantoms) starts with attention that mixes all tokens
alike, and can stay there: the tiny phantom ViT averaged a small nodule's 4-20 tokens into 256 and never learned
its shape (``docs/method.md``, "Phantoms with a known cause"). Pretrained ViTs' attention instead looks like

    W_q^h W_k^h^T ~ alpha_1 Z_1 + beta_1 I      (each head attends to tokens like itself, e.g. nearby ones)
    W_v W_o       ~ alpha_2 Z_2 - beta_2 I      (the value / output path partly cancels the residual)

with ``Z`` a random ``d x d`` matrix of standard deviation ``1 / sqrt(d)``. This module sets the query / key
weights of every head, and the value and output projections, to a factorisation of those matrices (a truncated
SVD where a head has fewer than ``d`` dimensions). Biases are left at timm's zeros.
"""

from __future__ import annotations

import torch
from torch import nn

#: the constants used here (query-key, then value-output); the paper tunes them per setting. With these, the tiny
#: phantom ViT read a nodule's silhouette at R^2 0.60 where timm's initialisation gave 0.38 (docs/method.md)
ALPHA_QK, BETA_QK = 0.7, 0.7
ALPHA_VO, BETA_VO = 0.4, 0.4


def _factors(dim: int, rank: int, alpha: float, beta: float, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``L [dim, rank]`` and ``R [rank, dim]`` with ``L @ R`` the best rank-``rank`` approximation of
    ``alpha Z + beta I``."""
    target = alpha * torch.randn(dim, dim, generator=generator) / dim ** 0.5 + beta * torch.eye(dim)
    u, s, vh = torch.linalg.svd(target)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def mimetic_init_(blocks: nn.Sequential | list[nn.Module], seed: int = 0, alpha_qk: float = ALPHA_QK,
                  beta_qk: float = BETA_QK, alpha_vo: float = ALPHA_VO, beta_vo: float = BETA_VO) -> None:
    """Initialise the attention of timm ``Block`` s in place (fused ``attn.qkv`` and ``attn.proj`` linears).

    Per head ``h`` (``e`` = head dim): ``W_q^h.T @ W_k^h`` is the rank-``e`` approximation of
    ``alpha_qk Z + beta_qk I``, so the pre-softmax score ``x W_q^h.T W_k^h x'`` starts as a similarity of ``x`` and
    ``x'``; ``W_o @ W_v`` is ``alpha_vo Z - beta_vo I`` (full rank over the heads).
    """
    generator = torch.Generator().manual_seed(seed)
    for index, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
            raise TypeError(f"mimetic initialisation needs timm attention with a fused qkv linear; block {index} "
                            f"has {type(attn).__name__}")
        dim, heads = qkv.in_features, int(attn.num_heads)
        head_dim = qkv.out_features // 3 // heads
        if qkv.out_features != 3 * dim or proj.in_features != dim:
            raise TypeError(f"mimetic initialisation needs square attention (qkv {dim} -> 3 x {dim}); block {index} "
                            f"has qkv {qkv.in_features} -> {qkv.out_features}")
        with torch.no_grad():
            for h in range(heads):
                rows = slice(h * head_dim, (h + 1) * head_dim)
                left, right = _factors(dim, head_dim, alpha_qk, beta_qk, generator)
                qkv.weight[rows] = left.T  # W_q^h [e, d]: q = x W_q^h.T
                qkv.weight[dim:][rows] = right  # W_k^h [e, d]
            left, right = _factors(dim, dim, alpha_vo, -beta_vo, generator)
            qkv.weight[2 * dim:] = right  # W_v [d, d]
            proj.weight.copy_(left)  # W_o [d, d]: W_o @ W_v = alpha Z - beta I
