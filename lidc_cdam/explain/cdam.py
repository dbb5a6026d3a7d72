"""CDAM (Eq. 2, 4), Smooth CDAM (Eq. 5) and Integrated CDAM (Eq. 6) in the normed-token space.

The score of token ``i`` for target ``F`` is ``S_i = sum_j T_ij dF/dT_ij`` with ``T = norm1(X)``
the tokens entering the final attention and the residual ``X`` held fixed. Smooth and Integrated
CDAM average such maps over ``n`` noisy or interpolated token sets ("points").

Two exact implementations share the point generators below:

* :func:`_scores_cls_row` (fast path, models whose head reads CLS' only). ``T`` enters the last
  block only through the affine ``qkv`` projection, so ``T_i . dF/dT_i = qkv_c_i . dF/dqkv_i``
  with ``qkv_c = T W_qkv^T`` (bias removed): no projection back to ``T`` is needed. Only the CLS
  query row matters, so per point we need one attention row and the MLP on one token; the
  gradients of the row follow in closed form from ``dF/dlogits`` and ``dF/d(head outputs)``.
  All targets and points are one batch and one backward pass.
* :func:`_scores_reference`: autograd through timm's own last block (any pooling), the
  definition written out; used for average-pooling models and as the tests' oracle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from lidc_cdam.explain.targets import TargetSpec
from lidc_cdam.models.vit import ViTModel

Space = Literal["block_input", "tokens"]
Variant = Literal["vanilla", "smooth", "integrated"]

#: default memory budget for one batch of points (bytes of token-sized tensors)
DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass
class PointChunk:
    """``m`` points at which gradients are taken, for ``B`` images.

    ``resid`` is the block input ``X`` at each point ``[B, m, N, D]`` (an expanded view when it is
    held fixed). ``tokens`` are the normed tokens whose products with the gradients form the map:
    the points themselves (``alpha is None``, ``[B, m, N, D]``), or, along an integration path, the
    end point ``T`` ``[B, 1, N, D]`` with the points at ``alpha[k] * T`` (Eq. 6).
    """

    resid: torch.Tensor
    tokens: torch.Tensor
    alpha: torch.Tensor | None = None

    @property
    def num_points(self) -> int:
        return int(self.resid.shape[1])


def fast_path_applies(model: ViTModel) -> bool:
    """Whether the CLS-row implementation is exact for this model."""
    attn = model.last_block.attn
    plain_qk = isinstance(attn.q_norm, torch.nn.Identity) and isinstance(attn.k_norm, torch.nn.Identity)
    return model.reads_cls_only and plain_qk and getattr(attn, "gate", None) is None


def point_chunks(
    model: ViTModel,
    resid: torch.Tensor,
    variant: Variant,
    *,
    n: int,
    sigma: float,
    space: Space,
    generator: torch.Generator | None,
    max_points: int,
) -> Iterator[PointChunk]:
    """Yield the points of one explainer for images ``resid`` ``[B, N, D]`` in chunks of at most
    ``max_points`` (SPEC "Smooth CDAM", "Integrated CDAM"). Noise is drawn per image, all ``n``
    draws at once, so results do not depend on the chunking."""
    norm1 = model.last_block.norm1
    B, N, D = resid.shape
    if variant == "vanilla":
        yield PointChunk(resid[:, None], norm1(resid)[:, None])
        return
    if variant == "integrated" and space == "tokens":
        # Eq. 6 with baseline 0: points alpha_k T, alpha_k = k/n, k = 1..n; residual fixed.
        alpha = torch.arange(1, n + 1, dtype=resid.dtype, device=resid.device) / n
        tokens = norm1(resid)[:, None]
        for sl in _slices(n, max_points):
            yield PointChunk(resid[:, None].expand(B, sl.stop - sl.start, N, D), tokens, alpha[sl])
        return
    if variant == "integrated":  # block_input, the authors' code: X_k = (k/n) X, k = 1..n-1
        scales = torch.arange(1, n, dtype=resid.dtype, device=resid.device) / n
        for sl in _slices(n - 1, max_points):
            x_k = scales[sl].view(1, -1, 1, 1) * resid[:, None]
            yield PointChunk(x_k, norm1(x_k))
        return
    # smooth: Gaussian noise, std = sigma * (max - min) of the perturbed tensor, per image
    base = resid if space == "block_input" else norm1(resid)
    spread = (base.amax(dim=(1, 2)) - base.amin(dim=(1, 2))).view(B, 1, 1, 1)
    noise = torch.randn((B, n, N, D), generator=generator, dtype=resid.dtype, device=resid.device)
    noise.mul_(sigma * spread)
    for sl in _slices(n, max_points):
        noisy = base[:, None] + noise[:, sl]
        if space == "block_input":
            yield PointChunk(noisy, norm1(noisy))
        else:
            yield PointChunk(resid[:, None].expand_as(noisy), noisy)


def _slices(count: int, size: int) -> Iterator[slice]:
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def num_points(variant: Variant, n: int, space: Space) -> int:
    if variant == "vanilla":
        return 1
    if variant == "integrated" and space == "block_input":
        return n - 1
    return n


# --------------------------------------------------------------------------- fast path
def _scores_cls_row(model: ViTModel, chunk: PointChunk, spec: TargetSpec) -> torch.Tensor:
    """Sum over the chunk's points of ``T_i . dF/dT_i`` for each target: ``[B, K, N]``.

    With ``qkv_c = T W^T`` (the map's tokens, bias removed) and, per head, logits
    ``s_i = scale * q_0 . K_i`` and output ``o = sum_i a_i V_i`` of the CLS query row:
    ``T_i . dF/dT_i = dF/ds_i (scale q_0 . K_c,i) + a_i (V_c,i . dF/do) + [i = 0] q_c,0 . dF/dq_0``,
    summed over heads, where ``dF/dq_0 = scale * sum_i dF/ds_i K_i``.
    """
    attn = model.last_block.attn
    H, e = attn.num_heads, attn.head_dim
    A = H * e
    weight = attn.qkv.weight
    bias = attn.qkv.bias if attn.qkv.bias is not None else weight.new_zeros(3 * A)
    bq, bk, bv = (b.view(H, e) for b in bias.split(A))

    w_q, w_k, w_v = (w.view(H, e, -1) for w in weight.split(A))  # per-head [H, e, D]
    tokens = chunk.tokens  # [B, m0, N, D]
    B, m0, N, _ = tokens.shape
    m = chunk.num_points
    shared = m0 == 1  # one token set for all points (vanilla, integration path)
    tok = "bnd" if shared else "bmnd"
    toks = tokens[:, 0] if shared else tokens
    alpha = (chunk.alpha if chunk.alpha is not None else tokens.new_ones(m)).view(1, m, 1, 1)

    # Keys are never formed: q . K_c,i = T_i . (W_k,h^T q) per head ("key side in token space").
    q_c = torch.einsum("bmd,hed->bmhe", tokens[..., 0, :], w_q)  # centred CLS query [B, m0, H, e]
    q0 = alpha * q_c + bq  # the CLS query at each point: [B, m, H, e]
    qk = torch.einsum(f"bmhd,{tok}->bmhn", torch.einsum("bmhe,hed->bmhd", q0, w_k), toks)
    logits = attn.scale * (alpha * qk + (q0 * bk).sum(-1, keepdim=True))
    # K_i . q_c for the CLS-query term, with K_i = alpha K_c,i + b_k the keys at the point
    kq = torch.einsum(f"bmhd,{tok}->bmhn", torch.einsum("bmhe,hed->bmhd", q_c, w_k), toks)
    query_weights = attn.scale * (alpha * kq + (q_c * bk).sum(-1, keepdim=True))
    v_c = torch.einsum(f"{tok},hed->{tok[:-2]}hne", toks, w_v)  # centred values [B, (m,) H, N, e]

    n_targets = spec.num_targets
    leaf = logits.detach()[:, None].expand(B, n_targets, m, H, N).clone().requires_grad_(True)
    probs = leaf.softmax(-1)
    values = _attend(probs, v_c)
    head_out = alpha[:, None] * values + bv  # o = sum_i a_i (alpha V_c,i + b_v), sum_i a_i = 1
    latent = model.finish_cls(chunk.resid[:, None, :, 0], head_out.flatten(-2))
    objective = spec.objective(model, latent)  # [B, K, m]
    d_logits, d_out = torch.autograd.grad(objective.sum(), (leaf, head_out))

    probs = probs.detach()
    scores = (d_logits * (attn.scale * qk)[:, None]).sum(dim=(2, 3))  # key terms: [B, K, N]
    if shared:
        weighted = torch.einsum("bkmhn,bkmhe->bkhne", probs, d_out)
        scores += torch.einsum("bkhne,bhne->bkn", weighted, v_c)
    else:
        # V_c,i . dF/do per target: [B, m, H, N, e] @ [B, m, H, e, K], no copies of V per target
        v_dot = (v_c @ d_out.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)  # [B, K, m, H, N]
        scores += (probs * v_dot).sum(dim=(2, 3))
    scores[..., 0] += (d_logits * query_weights[:, None]).sum(dim=(2, 3, 4))
    return scores


def _attend(probs: torch.Tensor, v_c: torch.Tensor) -> torch.Tensor:
    """``sum_i a_i V_c,i`` for probabilities ``[B, K, m, H, N]`` and values ``[B, H, N, e]`` (shared
    by all points) or ``[B, m, H, N, e]``, as matmuls whose batch dimensions match (einsum would copy
    the values once per target)."""
    B, K, m, H, N = probs.shape
    if v_c.ndim == 4:  # rows (K, m) of each (image, head) against one value matrix
        out = probs.permute(0, 3, 1, 2, 4).reshape(B, H, K * m, N) @ v_c  # [B, H, K m, e]
        return out.reshape(B, H, K, m, -1).permute(0, 2, 3, 1, 4)
    out = probs.permute(0, 2, 3, 1, 4) @ v_c  # [B, m, H, K, e]
    return out.permute(0, 3, 1, 2, 4)


# ---------------------------------------------------------------------- reference path
def _scores_reference(model: ViTModel, chunk: PointChunk, spec: TargetSpec) -> torch.Tensor:
    """Sum over the chunk's points of ``T_i . dF/dT_i`` by autograd through timm's last block."""
    B, m, N, D = chunk.resid.shape
    n_targets = spec.num_targets
    points = chunk.tokens if chunk.alpha is None else chunk.alpha.view(1, m, 1, 1) * chunk.tokens
    leaf = points[:, None].expand(B, n_targets, m, N, D).reshape(-1, N, D).detach().requires_grad_(True)
    resid = chunk.resid[:, None].expand(B, n_targets, m, N, D).reshape(-1, N, D)
    latent = model.last(resid, leaf)
    objective = spec.objective(model, latent.reshape(B, n_targets, m, -1))
    (grad,) = torch.autograd.grad(objective.sum(), leaf)
    grad = grad.reshape(B, n_targets, m, N, D)
    return (grad * chunk.tokens[:, None]).sum(dim=(2, 4))


# ----------------------------------------------------------------------------- driver
Implementation = Literal["auto", "cls_row", "reference"]


def cdam_token_scores(
    model: ViTModel,
    images: torch.Tensor,
    spec: TargetSpec,
    variant: Variant = "vanilla",
    *,
    n: int = 50,
    sigma: float = 0.05,
    space: Space | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    implementation: Implementation = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores over all tokens (prefix included) ``[B, K, N]``, target values ``F`` ``[B, K]`` and the
    images' latents ``l`` ``[B, D]`` (what the head reads: outputs and the trust flag need no second pass).

    ``space`` defaults to ``"block_input"`` for Smooth CDAM and ``"tokens"`` for Integrated CDAM
    (SPEC). ``seed`` (or a ``generator``) makes Smooth CDAM reproducible.
    """
    if variant not in ("vanilla", "smooth", "integrated"):
        raise ValueError(f"unknown CDAM variant {variant!r}")
    space = space or ("block_input" if variant == "smooth" else "tokens")
    if space not in ("block_input", "tokens"):
        raise ValueError(f"space must be 'block_input' or 'tokens', got {space!r}")
    if variant != "vanilla" and n < (2 if variant == "integrated" and space == "block_input" else 1):
        raise ValueError(f"n must be a positive number of points, got {n}")
    if variant == "smooth" and not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if implementation == "auto":
        implementation = "cls_row" if fast_path_applies(model) else "reference"
    elif implementation == "cls_row" and not fast_path_applies(model):
        raise ValueError("the CLS-row implementation needs a model whose head reads CLS' only")
    scorer = _scores_cls_row if implementation == "cls_row" else _scores_reference
    if generator is None and seed is not None:
        generator = torch.Generator(device=images.device).manual_seed(seed)

    with torch.no_grad():
        resid = model.trunk(images)
        latents = model.last(resid)
        values = spec.objective(model, latents[:, None].expand(-1, spec.num_targets, -1))
    B, N, D = resid.shape
    per_point = N * D * resid.element_size() * (4 if implementation == "cls_row" else 16 * spec.num_targets)
    max_points = max(1, chunk_bytes // per_point)
    # the points of one image form the batch; images are batched together when they fit
    group = B if variant == "vanilla" else max(1, min(B, max_points // max(n, 1)))
    total = torch.zeros(B, spec.num_targets, N, dtype=resid.dtype, device=resid.device)
    for start in range(0, B, group):
        sl = slice(start, min(start + group, B))
        sub = spec.subset(sl)
        with torch.no_grad():
            chunks = point_chunks(
                model, resid[sl], variant, n=n, sigma=sigma, space=space, generator=generator,
                max_points=max(1, max_points // (sl.stop - sl.start)),
            )
            for chunk in chunks:
                with torch.enable_grad():
                    total[sl] += scorer(model, chunk, sub).detach()
    return total / num_points(variant, n, space), values, latents


def normed_token_gradients(
    model: ViTModel, images: torch.Tensor, spec: TargetSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normed tokens ``T`` ``[B, N, D]`` and ``dF_k/dT`` ``[B, K, N, D]`` (residual fixed), by
    autograd through the last block: one forward of the trunk, one batched backward."""
    with torch.no_grad():
        resid = model.trunk(images)
        tokens = model.normed_tokens(resid)
    B, N, D = tokens.shape
    n_targets = spec.num_targets
    with torch.enable_grad():
        leaf = tokens[:, None].expand(B, n_targets, N, D).reshape(-1, N, D).clone().requires_grad_(True)
        latent = model.last(resid[:, None].expand(B, n_targets, N, D).reshape(-1, N, D), leaf)
        objective = spec.objective(model, latent.reshape(B, n_targets, -1))
        (grad,) = torch.autograd.grad(objective.sum(), leaf)
    return tokens, grad.reshape(B, n_targets, N, D)
