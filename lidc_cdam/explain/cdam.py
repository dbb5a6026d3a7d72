"""CDAM (Eq. 2, 4), Smooth CDAM (Eq. 5) and Integrated CDAM (Eq. 6) in the normed-token space.

The score of token ``i`` for target ``F`` is ``S_i = sum_j T_ij dF/dT_ij`` with ``T = norm1(X)``
the tokens entering the final attention and the residual ``X`` held fixed. Smooth and Integrated
CDAM average such maps over ``n`` noisy or interpolated token sets ("points").

Three exact implementations share the point generators below. The first two rest on one identity:
``T`` enters the last block only through the affine ``qkv`` projection (rotary position embeddings act
after it), so ``T_i . dF/dT_i = qkv_c_i . dF/dqkv_i`` with ``qkv_c = T W_qkv^T`` (bias removed): no
projection back to ``T`` is needed (docs/method.md, "Backbone families and 3D").

* :func:`_scores_cls_row` (models whose head reads CLS' only, no RoPE). Only the CLS query row
  matters, so per point we need one attention row and the MLP on one token; the gradients of the
  row follow in closed form from ``dF/dlogits`` and ``dF/d(head outputs)``. All targets and points
  are one batch and one backward pass.
* :func:`_scores_rows` (any pooling, RoPE): the same closed form for every query row the pooling
  reads (the CLS row, the patch rows of average pooling, all rows of attention pooling), with q and k
  rotated per position. Keys are formed; the rest of the block runs on the pooled rows only.
* :func:`_scores_reference`: autograd through the family's own last block (any attention), the
  definition written out; used where the attention is not one affine ``qkv`` map then softmax
  (q/k norms, gates) and as the tests' oracle.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from lidc_cdam.explain.targets import TargetSpec
from lidc_cdam.models.backbones.base import merge_heads, split_heads
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
    """Whether a closed-form implementation (:func:`_scores_cls_row` or :func:`_scores_rows`) is exact for this
    model: its last attention is one affine ``qkv`` map (+ RoPE) then softmax."""
    return model.qkv_attention() is not None


def cls_row_applies(model: ViTModel) -> bool:
    """Whether :func:`_scores_cls_row` is exact: closed form, the head reads CLS' only, no RoPE."""
    qkv = model.qkv_attention()
    return qkv is not None and qkv.rotate is None and model.reads_cls_only


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
    ``max_points`` (docs/method.md, "Smooth CDAM", "Integrated CDAM"). Noise is drawn per image, all ``n``
    draws at once, so results do not depend on the chunking."""
    norm1 = model.normed_tokens
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
def _scores_cls_row(model: ViTModel, chunk: PointChunk, spec: TargetSpec, grid: tuple[int, ...]) -> torch.Tensor:
    """Sum over the chunk's points of ``T_i . dF/dT_i`` for each target: ``[B, K, N]``.

    With ``qkv_c = T W^T`` (the map's tokens, bias removed) and, per head, logits
    ``s_i = scale * q_0 . K_i`` and output ``o = sum_i a_i V_i`` of the CLS query row:
    ``T_i . dF/dT_i = dF/ds_i (scale q_0 . K_c,i) + a_i (V_c,i . dF/do) + [i = 0] q_c,0 . dF/dq_0``,
    summed over heads, where ``dF/dq_0 = scale * sum_i dF/ds_i K_i``.
    """
    attn = model.qkv_attention(grid)
    H, e = attn.num_heads, attn.head_dim
    A = H * e
    weight, bias = attn.weight, attn.bias
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


# ------------------------------------------------------------------- all pooled rows
def _scores_rows(model: ViTModel, chunk: PointChunk, spec: TargetSpec, grid: tuple[int, ...]) -> torch.Tensor:
    """Sum over the chunk's points of ``T_j . dF/dT_j`` for each target, ``[B, K, N]``, in closed form over the
    query rows ``i`` that the pooling reads (CLS; the patches for average pooling; all for attention pooling).

    Per head, with ``R_j`` the rotation of position ``j`` (identity without RoPE or for prefix tokens),
    ``q'_i = R_i q_i``, ``k'_j = R_j k_j``, logits ``s_ij = scale q'_i . k'_j``, ``o_i = sum_j a_ij v_j``, and
    centred ``q_c = T W_q^T`` (likewise ``k_c``, ``v_c``; the map's tokens, bias removed)::

        T_j . dF/dT_j = sum_i dF/ds_ij scale q'_i . R_j k_c,j          (key of j)
                      + [j read] sum_l dF/ds_jl scale R_j q_c,j . k'_l  (query of j)
                      + sum_i a_ij v_c,j . dF/do_i                     (value of j)

    ``dF/ds`` and ``dF/do`` come from softmax and the rest of the block on the read rows only
    (:meth:`ViTModel.finish_rows`): one forward for all points and targets, one vmapped backward per target.
    With average or attention pooling every patch row goes through the MLP, so the saving over the reference
    path is the ``qkv`` projection, ``norm1`` and the repeated forward (measured 1.0x for one target, 1.1-2.2x
    for 9, ``bench_cdam.py --families``); with CLS pooling (and RoPE) only one row does (1.1-6.9x).
    """
    qkv = model.qkv_attention(grid)
    H, e = qkv.num_heads, qkv.head_dim
    A = H * e
    tokens = chunk.tokens  # [B, m0, N, D]
    B, m0, N, _ = tokens.shape
    m, K = chunk.num_points, spec.num_targets
    rows = model.pooled_rows(N)
    rotate = qkv.rotate if qkv.rotate is not None else (lambda x: x)
    alpha = (chunk.alpha if chunk.alpha is not None else tokens.new_ones(m)).view(1, m, 1, 1, 1)

    q_c, k_c, v_c = (split_heads(p, H) for p in (tokens @ qkv.weight.T).split(A, dim=-1))  # [B, m0, H, N, e]
    rq_c, rk_c = rotate(q_c), rotate(k_c)
    b_q, b_k, b_v = (b.view(H, 1, e).expand(H, N, e) for b in qkv.bias.split(A))
    # at each point (alpha T on an integration path): q' = R (alpha q_c + b_q) = alpha R q_c + R b_q
    q = alpha * rq_c + rotate(b_q)  # [B, m, H, N, e]
    k = alpha * rk_c + rotate(b_k)
    v = alpha * v_c + b_v
    q_rows = q[..., rows, :]  # [B, m, H, Q, e]
    logits = qkv.scale * (q_rows @ k.transpose(-2, -1))  # [B, m, H, Q, N]

    # one forward for all targets; one backward per target, batched (vmap) where autograd can
    leaf = logits.detach().requires_grad_(True)
    probs = leaf.softmax(-1)
    heads = probs @ v  # o_i = sum_j a_ij v_j: [B, m, H, Q, e]
    latent = model.finish_rows(chunk.resid[:, :, rows], merge_heads(heads))  # [B, m, D']
    objective = spec.objective(model, latent[:, None].expand(B, K, *latent.shape[1:]))  # [B, K, m]
    d_logits, d_heads = _grads_per_target(objective, (leaf, heads))  # [B, K, m, H, Q, N], [B, K, m, H, Q, e]
    probs = probs[:, None]

    key_weights = qkv.scale * (q_rows @ rk_c.transpose(-2, -1))  # scale q'_i . R_j k_c,j: [B, m, H, Q, N]
    scores = torch.einsum("bkmhqn,bmhqn->bkn", d_logits, key_weights)
    query_weights = qkv.scale * (rq_c[..., rows, :] @ k.transpose(-2, -1))  # scale R_i q_c,i . k'_l
    scores[..., rows] += torch.einsum("bkmhqn,bmhqn->bkq", d_logits, query_weights)
    d_values = probs.detach().transpose(-2, -1) @ d_heads  # dF/dv_j: [B, K, m, H, N, e]
    if m0 == 1:
        scores += torch.einsum("bkhne,bhne->bkn", d_values.sum(2), v_c[:, 0])
    else:
        scores += torch.einsum("bkmhne,bmhne->bkn", d_values, v_c)
    return scores


def _grads_per_target(objective: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``d objective[:, k].sum() / d input`` for every target ``k``, stacked as ``[B, K, ...]``: one vmapped
    backward (``is_grads_batched``), or one backward per target where an op has no batching rule."""
    K = objective.shape[1]
    onehot = torch.zeros(K, *objective.shape, dtype=objective.dtype, device=objective.device)
    onehot[torch.arange(K), :, torch.arange(K)] = 1
    try:
        grads = torch.autograd.grad(objective, inputs, onehot, retain_graph=True, is_grads_batched=True)
    except RuntimeError:
        per_target = [torch.autograd.grad(objective[:, k].sum(), inputs, retain_graph=True) for k in range(K)]
        grads = tuple(torch.stack(g) for g in zip(*per_target, strict=True))
    return tuple(g.movedim(0, 1) for g in grads)


# ---------------------------------------------------------------------- reference path
def _scores_reference(model: ViTModel, chunk: PointChunk, spec: TargetSpec, grid: tuple[int, ...]) -> torch.Tensor:
    """Sum over the chunk's points of ``T_i . dF/dT_i`` by autograd through the family's own last block."""
    B, m, N, D = chunk.resid.shape
    n_targets = spec.num_targets
    points = chunk.tokens if chunk.alpha is None else chunk.alpha.view(1, m, 1, 1) * chunk.tokens
    leaf = points[:, None].expand(B, n_targets, m, N, D).reshape(-1, N, D).detach().requires_grad_(True)
    resid = chunk.resid[:, None].expand(B, n_targets, m, N, D).reshape(-1, N, D)
    latent = model.last(resid, leaf, grid=grid)
    objective = spec.objective(model, latent.reshape(B, n_targets, m, -1))
    (grad,) = torch.autograd.grad(objective.sum(), leaf)
    grad = grad.reshape(B, n_targets, m, N, D)
    return (grad * chunk.tokens[:, None]).sum(dim=(2, 4))


# ----------------------------------------------------------------------------- driver
Implementation = Literal["auto", "cls_row", "rows", "reference"]
SCORERS = {"cls_row": _scores_cls_row, "rows": _scores_rows, "reference": _scores_reference}


def auto_implementation(model: ViTModel, num_targets: int, num_tokens: int) -> str:
    """The exact implementation that is fastest here (measured, ``benchmarks/bench_cdam.py --families``):
    ``cls_row`` where it applies; the closed form over the pooled ``rows`` when the pooling reads one row, or for
    several targets (a pooling over every row pays the MLP on each row per target: with one target autograd
    through the real block, ``reference``, is as fast or faster); else ``reference``."""
    if cls_row_applies(model):
        return "cls_row"
    if not fast_path_applies(model):
        return "reference"
    rows = model.pooled_rows(num_tokens)
    one_row = len(range(*rows.indices(num_tokens))) == 1
    return "rows" if one_row or num_targets > 1 else "reference"


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
    (docs/method.md). ``seed`` (or a ``generator``) makes Smooth CDAM reproducible.
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
        implementation = auto_implementation(model, spec.num_targets, model.layout(tuple(images.shape[2:])).num_tokens)
    elif implementation == "cls_row" and not cls_row_applies(model):
        raise ValueError("the CLS-row implementation needs a model whose head reads CLS' only, whose last attention "
                         "is one affine qkv map then softmax and has no rotary embedding")
    elif implementation == "rows" and not fast_path_applies(model):
        raise ValueError(f"the closed-form implementation needs a last attention that is one affine qkv map then "
                         f"softmax; this {model.family} model's is not (q/k norms, gate): use 'reference'")
    elif implementation not in SCORERS:
        raise ValueError(f"unknown implementation {implementation!r}; choose from auto, {', '.join(SCORERS)}")
    scorer = SCORERS[implementation]
    grid = model.layout(tuple(images.shape[2:])).grid
    if generator is None and seed is not None:
        generator = torch.Generator(device=images.device).manual_seed(seed)

    with torch.no_grad():
        resid = model.trunk(images)
        latents = model.last(resid, grid=grid)
        values = spec.objective(model, latents[:, None].expand(-1, spec.num_targets, -1))
    B, N = resid.shape[:2]
    per_point = _bytes_per_point(model, implementation, resid, spec.num_targets)
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
                    total[sl] += scorer(model, chunk, sub, grid).detach()
    return total / num_points(variant, n, space), values, latents


def _bytes_per_point(model: ViTModel, implementation: str, resid: torch.Tensor, num_targets: int) -> int:
    """Rough size of the tensors one point (one noisy or interpolated token set) needs, all targets."""
    _, N, D = resid.shape
    size = resid.element_size()
    if implementation == "cls_row":
        return N * D * size * 4
    if implementation == "reference":
        return N * D * size * 16 * num_targets
    Q = len(range(N)[model.pooled_rows(N)])
    return size * (8 * N * D + num_targets * (4 * model.num_heads * Q * N + 16 * Q * D))


def normed_token_gradients(
    model: ViTModel, images: torch.Tensor, spec: TargetSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normed tokens ``T`` ``[B, N, D]`` and ``dF_k/dT`` ``[B, K, N, D]`` (residual fixed), by
    autograd through the last block: one forward of the trunk, one batched backward."""
    grid = model.layout(tuple(images.shape[2:])).grid
    with torch.no_grad():
        resid = model.trunk(images)
        tokens = model.normed_tokens(resid)
    B, N, D = tokens.shape
    n_targets = spec.num_targets
    with torch.enable_grad():
        leaf = tokens[:, None].expand(B, n_targets, N, D).reshape(-1, N, D).clone().requires_grad_(True)
        latent = model.last(resid[:, None].expand(B, n_targets, N, D).reshape(-1, N, D), leaf, grid=grid)
        objective = spec.objective(model, latent.reshape(B, n_targets, -1))
        (grad,) = torch.autograd.grad(objective.sum(), leaf)
    return tokens, grad.reshape(B, n_targets, N, D)
