"""Relevance propagation (Chefer et al. 2021a) and partial LRP (Voita et al. 2019, as in Chefer's code).

Both are token maps over the patch tokens, one per target, read from the CLS query row. Neither
installs hooks nor flips timm's ``fused_attn``: the attention probabilities they need are
recomputed from each block's own ``qkv`` projection (``q_norm`` / ``k_norm``, ``scale``, softmax),
exactly as timm's unfused path does, in a forward written here over timm's modules. Both need a
CLS token; relevance propagation takes gradients through the model's own pooling (any), partial
LRP propagates through CLS, average, max or avg+max pooling (not an attention pool) and, for head
targets, needs a linear head.

**relevance-propagation** (docs/method.md, "Baselines"; Chefer, Gur & Wolf, "Generic attention-model
explainability", ICCV 2021). With ``A_b`` ``[B, H, N, N]`` the attention probabilities of block
``b`` and ``G_b = dF/dA_b`` (``F`` the raw target: logit, output or concept similarity)::

    R = I;  for b = 1..L:  R = R + mean_heads(clamp(G_b * A_b, min=0)) @ R;   map = R[CLS, patches]

Only the CLS row of ``R`` is read, and ``e_0^T R_L = e_0^T (I + M_L) ... (I + M_1)``, so the row
is rolled out right to left as a batched row-vector x matrix product (``r <- r + r @ M_b``, blocks
in reverse): the same numbers as the literal ``N x N`` recursion at ``1/N`` of its cost.

**partial-lrp** (Chefer's ``relprop(..., method="last_layer")``, the LRP variant of Voita et al.):
relevance starts at the target and is propagated with Chefer's rules (``layers_ours.py``) through
the head, ``fc_norm``, the final ``norm``, the CLS selection, the last block (second residual add,
``ls2``, MLP, ``norm2``, the residual fork, first residual add, ``ls1``, ``attn.proj``) to the
``A @ V`` product; the relevance of the attention probabilities, clamped at 0 and averaged over
heads, CLS row, patch columns, is the map. A model that pools the patch tokens (``global_pool``
``avg``, ``max``, ``avgmax``; ours) has no CLS selection: the pooling takes the generic rule
(gradient x input of timm's own ``pool``; conservative, as each of these is homogeneous of degree
one), the last block runs on every query row, and the map is the attention relevance summed over
the query rows (each key column's total), then clamped and averaged over heads. On a CLS-pooled
model that path gives the CLS path's map (only the CLS row carries relevance; tested). The rules
(each a function below):

* :func:`safe_divide` ``a / b`` with Chefer's stabiliser (``a / (b + 1e-9)``, 0 where ``b == 0``);
* :func:`linear_zplus` Linear, alpha-beta with alpha=1, beta=0 (z+ with the sign split):
  ``Z = x+ W+^T + x- W-^T``, ``S = R / Z``, ``R_in = x+ * (S W+) + x- * (S W-)``; the bias takes
  no relevance, so the rule conserves ``sum R`` (``Z >= 0``) up to the stabiliser and outputs
  with ``Z = 0``, whose relevance is dropped;
* :func:`generic_rule` gradient x input ``R_in = X * grad(Z, X, R / Z)`` (Chefer's
  ``RelPropSimple``), by autograd for LayerNorm / GELU / LayerScale with
  ``norm_act_rule="gradient"``, in closed form for the CLS selection and the residual fork
  (:func:`clone_rule`: ``R_in = X * sum_i R_i / X``, Chefer's ``IndexSelect`` / ``Clone``) and
  for ``A @ V``;
* :func:`add_rule` residual add ``Z = a + b`` (Chefer's ``Add.relprop``): generic shares
  ``a R / Z`` and ``b R / Z``, each then rescaled so the two sums split ``sum R`` in proportion to
  their absolute sums: conservative by construction;
* :func:`matmul_rule` ``A @ V`` by the generic two-input rule, then both parts halved (Chefer's
  ``cam1 /= 2; cam_v /= 2``): each part alone carries ``sum R``, together after halving ``sum R``;
* LayerNorm, GELU, LayerScale: **pass-through** ``R_in = R`` by default, which is what Chefer's
  code does (``LayerNorm``, ``GELU``, ``Softmax``, ``Dropout`` inherit ``RelProp.relprop``, which
  returns ``R`` unchanged). ``norm_act_rule="gradient"`` applies :func:`generic_rule` to them
  instead (not conservative for LayerNorm and GELU). Dropout / DropPath are identities (eval).

The relevance entering the network is Chefer's: a one-hot vector on the head outputs (1 at the
target; not the logit value). For a :class:`~lidc_cdam.Concept` target ``g(l, l_c)`` the similarity
is treated as a one-output Linear layer on ``l`` with relevance 1: weight ``l_c`` for ``dot`` and
``cosine`` (cosine is the dot product of ``l / |l|`` and ``l_c / |l_c|``; the z+ rule is invariant
to those positive scalings), and its gradient direction ``l_c - l`` for ``neg_l2``.

When the head reads CLS' alone, only the CLS row of the last block carries relevance, so partial
LRP runs the trunk once (timm's own, fused attention) and the last block on the CLS row only; all
targets of all images are one batch ``[B, K, ...]``.

Why one module of about 480 lines: the two methods share the forward written over timm's modules and
the propagation rules, and the rules are Chefer's chain, each a few lines that read best beside the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from timm.layers import Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn

from lidc_cdam.device import memory_budget
from lidc_cdam.explain.api import register
from lidc_cdam.explain.attribution import Attribution
from lidc_cdam.explain.targets import TargetSpec
from lidc_cdam.models.backbones.timm_vit import TimmViTAdapter, attention_parts
from lidc_cdam.models.vit import ViTModel

NormActRule = Literal["identity", "gradient"]

#: Chefer's stabiliser in ``safe_divide``
EPS = 1e-9
#: default memory budget for one chunk of images in relevance propagation (bytes)
DEFAULT_CHUNK_BYTES = 256 * 2**20


class RelevanceModelError(TypeError):
    """A model these relevance methods cannot explain (no CLS token, unsupported block...)."""


# --------------------------------------------------------------------------- model checks
def _check_model(model: ViTModel, method: str, *, cls_pooling: bool) -> None:
    if model.family != TimmViTAdapter.family:
        raise RelevanceModelError(
            f"{method} has rules for timm VisionTransformer blocks only; this model is a {model.family}. "
            "Use 'cdam', 'attention', 'gradcam' or a pixel method instead."
        )
    bb = model.backbone
    if not bb.has_class_token:
        raise RelevanceModelError(
            f"{method} reads the CLS row of the attention and needs a model with a CLS token; this model has "
            "none (class_token=False). Use 'cdam' or a pixel method instead."
        )
    if cls_pooling and not model.reads_cls_only:
        raise RelevanceModelError(
            f"{method} propagates relevance from a head that reads CLS' only (global_pool='token'); this "
            f"model pools with global_pool={bb.global_pool!r}{' and an attention pool' if bb.attn_pool else ''}."
        )
    for i, blk in enumerate(bb.blocks):
        if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
            raise RelevanceModelError(
                f"{method} recomputes attention in timm pre-norm Blocks with timm Attention; block {i} is "
                f"{type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__}."
            )


# --------------------------------------------------------------------------- explicit forward
def embed(model: ViTModel, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding, position embedding and prefix tokens: the stream entering ``blocks[0]``."""
    bb = model.backbone
    return bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))


def attention_output(attn: Attention, tokens: torch.Tensor, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """timm ``Attention.forward`` after the probabilities: ``proj(norm(A @ V)) (* gate)``."""
    B, _, n_q, _ = probs.shape
    out = (probs @ v).transpose(1, 2).reshape(B, n_q, attn.attn_dim)
    out = attn.norm(out)
    if attn.gate is not None:
        out = out * attn.gate(tokens).sigmoid()
    return attn.proj_drop(attn.proj(out))


def block_forward(blk: Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Block.forward`` with the attention probabilities ``[B, H, N, N]`` returned."""
    tokens = blk.norm1(x)
    probs, v = attention_parts(blk.attn, tokens)
    x = x + blk.drop_path1(blk.ls1(attention_output(blk.attn, tokens, probs, v)))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, probs


# --------------------------------------------------------------------------- relevance propagation
def rollout_cls_row(cams: list[torch.Tensor]) -> torch.Tensor:
    """CLS row of ``R`` after ``R = I; R = R + M_b @ R`` over blocks ``b = 1..L``: ``[..., N]``.

    ``cams`` are the ``M_b`` ``[..., N, N]`` in block order. ``e_0^T R_L`` is computed as
    ``r = e_0; r = r + r @ M_b`` for ``b = L..1`` (batched row-vector products).
    """
    row = torch.zeros_like(cams[0][..., :1, :])
    row[..., 0, 0] = 1
    for cam in reversed(cams):
        row = row + row @ cam
    return row[..., 0, :]


def _cams_for_targets(values: torch.Tensor, probs: list[torch.Tensor], targets: range, batched: bool,
                      retain: bool) -> list[torch.Tensor]:
    """``M_b = mean_heads(clamp(dF_k/dA_b * A_b, min=0))`` for targets ``k`` in ``targets``: ``[B, k, N, N]``."""
    n = len(targets)
    if batched and n > 1:  # one vmapped backward for these targets (is_grads_batched)
        onehot = torch.zeros(n, *values.shape, dtype=values.dtype, device=values.device)
        which = torch.arange(n, device=values.device)
        onehot[which, :, which + targets.start] = 1
        try:
            grads = torch.autograd.grad(values, probs, onehot, retain_graph=True, is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: fall back to one backward per target
            return _cams_for_targets(values, probs, targets, False, retain)
        return [(g * p).clamp(min=0).mean(2).transpose(0, 1) for g, p in zip(grads, probs, strict=True)]
    per_target = []
    for i, k in enumerate(targets):
        grads = torch.autograd.grad(values[:, k].sum(), probs, retain_graph=retain or i < n - 1)
        per_target.append([(g * p).clamp(min=0).mean(1) for g, p in zip(grads, probs, strict=True)])
    return [torch.stack(cams, dim=1) for cams in zip(*per_target, strict=True)]


def _rp_chunk(model: ViTModel, images: torch.Tensor, spec: TargetSpec, target_group: int, batched: bool):
    bb = model.backbone
    B, K = images.shape[0], spec.num_targets
    with torch.enable_grad():
        x = embed(model, images.detach())
        probs = []
        for blk in bb.blocks:
            x, p = block_forward(blk, x)
            probs.append(p)
        latent = model.latent_from_final(bb.norm(x))
        values = spec.objective(model, latent[:, None].expand(B, K, latent.shape[-1]))  # [B, K]
        rows = []
        for start in range(0, K, target_group):
            targets = range(start, min(start + target_group, K))
            cams = _cams_for_targets(values, probs, targets, batched, retain=targets.stop < K)
            rows.append(rollout_cls_row(cams))  # [B, k, N]
    return torch.cat(rows, dim=1).detach(), values.detach()


def relevance_propagation_scores(
    model: ViTModel,
    images: torch.Tensor,
    spec: TargetSpec,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    batched_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance-propagation scores over all tokens (CLS row of ``R``) ``[B, K, N]`` and ``F`` ``[B, K]``.

    Images are processed in chunks whose autograd graph and attention gradients fit ``chunk_bytes``
    (a rough estimate); the targets of a chunk share one forward pass. With ``batched_grads`` the
    gradients for a group of targets come from one vmapped backward (``is_grads_batched``; falls
    back to one backward per target if that fails), else from one backward per target.
    """
    _check_model(model, "relevance-propagation", cls_pooling=False)
    bb = model.backbone
    B, K = images.shape[0], spec.num_targets
    N = model.layout(tuple(images.shape[2:])).num_tokens
    H = bb.blocks[0].attn.num_heads
    scale = len(bb.blocks) * images.element_size()
    graph = scale * (4 * H * N * N + 16 * N * model.embed_dim)  # per image: the forward's autograd graph
    grads = scale * 2 * H * N * N if batched_grads else 0  # per image and target in one batched backward
    group = max(1, min(B, chunk_bytes // (graph + grads * K)))
    target_group = K if not grads else max(1, min(K, (chunk_bytes - group * graph) // (group * grads)))
    rows, values = [], []
    for start in range(0, B, group):
        sl = slice(start, min(start + group, B))
        r, v = _rp_chunk(model, images[sl], spec.subset(sl), target_group, batched_grads)
        rows.append(r)
        values.append(v)
    return torch.cat(rows), torch.cat(values)


@register(
    "relevance-propagation",
    {},
    "Relevance propagation (Chefer et al. 2021a): R = I; R += mean_heads(clamp(dF/dA * A, 0)) @ R over blocks; "
    "CLS row",
    signed=False,
)
def relevance_propagation(model: ViTModel, images: torch.Tensor, spec: TargetSpec, **options: Any) -> Attribution:
    # a share of the GPU's free memory on CUDA, the CPU-sized default elsewhere
    chunk_bytes = options.get("chunk_bytes") or memory_budget(images.device, DEFAULT_CHUNK_BYTES)
    scores, values = relevance_propagation_scores(model, images, spec, chunk_bytes=chunk_bytes)
    layout = model.layout(tuple(images.shape[2:]))
    return Attribution(layout.patch_grid(scores), "relevance-propagation", "tokens", tuple(images.shape[2:]),
                       spec.names, scores=values, options=options)


# --------------------------------------------------------------------------- LRP rules
def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chefer's ``safe_divide``: ``a / (b + 1e-9)``, and 0 where ``b == 0``."""
    den = b.clamp(min=EPS) + b.clamp(max=EPS)
    den = den + den.eq(0).to(den.dtype) * EPS
    return a / den * b.ne(0).to(b.dtype)


def linear_zplus(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """LRP alpha-beta rule with alpha=1, beta=0 for a Linear layer (Chefer's ``Linear.relprop``).

    ``Z = x+ W+^T + x- W-^T`` (bias ignored), ``S = R / Z``, ``R_in = x+ * (S W+) + x- * (S W-)``
    with ``x+ = max(x, 0)``, ``x- = min(x, 0)``, ``W+ = max(W, 0)``, ``W- = min(W, 0)``.
    Conservative: ``sum R_in = sum R`` (``Z >= 0``; up to the stabiliser of :func:`safe_divide`),
    except that the relevance of an output with ``Z = 0`` (no input drives it positively) is dropped.

    ``x`` ``[..., in]``, ``weight`` ``[out, in]`` or batched ``[..., out, in]``, ``relevance``
    ``[..., out]``; leading dimensions broadcast.
    """
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    px, nx = x.clamp(min=0), x.clamp(max=0)
    z = (pw @ px[..., None] + nw @ nx[..., None])[..., 0]
    s = safe_divide(relevance, z)[..., None, :]
    return px * (s @ pw)[..., 0, :] + nx * (s @ nw)[..., 0, :]


def generic_rule(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
                 relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradient x input (Chefer's ``RelPropSimple``): ``R_in_i = X_i * grad(Z, X_i, R / Z)``, ``Z = fn(*X)``.

    Conservative for maps homogeneous of degree one in each input taken alone (selection, copy);
    for products of two inputs each part alone carries ``sum R``.
    """
    with torch.enable_grad():
        xs = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
        z = fn(*xs)
        grads = torch.autograd.grad(z, xs, safe_divide(relevance, z.detach()))
    return tuple(x.detach() * g for x, g in zip(xs, grads, strict=True))


def _sample_sum(t: torch.Tensor, lead: int) -> torch.Tensor:
    """Sum over all but the first ``lead`` dimensions, kept for broadcasting."""
    return t.sum(dim=tuple(range(lead, t.ndim)), keepdim=True) if t.ndim > lead else t


def add_rule(
    a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor, lead: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add ``Z = a + b`` (Chefer's ``Add.relprop``), per sample (sums over all but ``lead`` dims).

    ``r_a = a R / Z``, ``r_b = b R / Z`` (the generic rule); then ``r_a <- r_a * f_a / sum(r_a)``
    with ``f_a = |sum r_a| / (|sum r_a| + |sum r_b|) * sum R`` and likewise ``r_b``: the two parts
    sum to ``sum R``. ``a``, ``b`` broadcast against ``relevance`` ``[B, K, ...]``.
    """
    s = safe_divide(relevance, a + b)
    ra, rb = a * s, b * s
    sa, sb, total = _sample_sum(ra, lead), _sample_sum(rb, lead), _sample_sum(relevance, lead)
    denom = sa.abs() + sb.abs()
    fa = safe_divide(sa.abs(), denom) * total
    fb = safe_divide(sb.abs(), denom) * total
    return ra * safe_divide(fa, sa), rb * safe_divide(fb, sb)


def clone_rule(x: torch.Tensor, *relevances: torch.Tensor) -> torch.Tensor:
    """A tensor used by several branches (Chefer's ``Clone.relprop``): ``R = x * sum_i R_i / x``."""
    return x * sum(safe_divide(r, x) for r in relevances)


def matmul_rule(probs: torch.Tensor, v: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Z = A @ V`` by the generic two-input rule, both parts halved (Chefer's attention relprop).

    With ``S = R / Z``: ``R_A = A * (S V^T) / 2``, ``R_V = V * (A^T S) / 2``. Each unhalved part
    sums to ``sum R``, so the halved pair conserves ``sum R``; ``R_A`` alone does not.

    ``probs`` ``[B, H, n, N]``, ``v`` ``[B, H, N, e]``, ``relevance`` ``[B, K, H, n, e]``;
    returns ``R_A`` ``[B, K, H, n, N]`` and ``R_V`` ``[B, K, H, N, e]``.
    """
    s = safe_divide(relevance, (probs @ v)[:, None])
    r_attn = probs[:, None] * (s @ v[:, None].transpose(-2, -1))
    r_v = v[:, None] * (probs[:, None].transpose(-2, -1) @ s)
    return r_attn / 2, r_v / 2


def _passive(module: nn.Module, x: torch.Tensor, relevance: torch.Tensor, rule: NormActRule) -> torch.Tensor:
    """LayerNorm, activation, LayerScale: Chefer's pass-through or the generic gradient x input rule."""
    if rule == "identity" or isinstance(module, nn.Identity | nn.Dropout):
        return relevance
    return generic_rule(module, (x.expand_as(relevance),), relevance)[0]


# --------------------------------------------------------------------------- partial LRP
def _head_weight(model: ViTModel) -> torch.Tensor:
    head = model.head
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    others = [m for m in layers if not isinstance(m, nn.Linear | nn.Dropout | nn.Identity)]
    if len(linears) != 1 or others or layers[-1] is not linears[0]:
        raise RelevanceModelError(
            f"partial-lrp propagates through a linear head (nn.Linear, optionally after Dropout); got "
            f"{type(head).__name__}. Explain a Concept instead."
        )
    return linears[0].weight


def _check_last_block(model: ViTModel) -> None:
    blk = model.last_block
    mlp = blk.mlp
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise RelevanceModelError(
            f"partial-lrp needs timm's Mlp (fc1, act, fc2) in the last block; got {type(mlp).__name__}"
        )
    if blk.attn.gate is not None:
        raise RelevanceModelError("partial-lrp has no rule for gated attention (Attention(gated=True))")


def partial_lrp_relevance(
    model: ViTModel,
    images: torch.Tensor,
    spec: TargetSpec,
    *,
    norm_act_rule: NormActRule = "identity",
    trace: list[tuple[str, bool, torch.Tensor, tuple[torch.Tensor, ...]]] | None = None,
    all_rows: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LRP relevance of the last block's attention probabilities ``[B, K, H, N]`` (of the CLS query, or
    summed over the query rows) and ``F`` ``[B, K]``, propagated from each target with Chefer's rules
    (module docstring).

    ``all_rows``: propagate through timm's pooling and every query row; ``None`` (the default) does so
    exactly when the head does not read CLS' alone.

    ``trace``, if given, receives one entry per rule ``(name, conservative, arriving, leaving)``:
    the relevance arriving at the rule from the output side and the tuple of relevances it sends to
    its inputs, each ``[B, K, ...]``; ``conservative`` marks the rules for which both have the same
    total per image and target (``norm_act_rule="gradient"`` makes the norm / activation steps
    non-conservative).
    """
    _check_model(model, "partial-lrp", cls_pooling=False)
    _check_last_block(model)
    if norm_act_rule not in ("identity", "gradient"):
        raise ValueError(f"norm_act_rule must be 'identity' or 'gradient', got {norm_act_rule!r}")
    bb, blk = model.backbone, model.last_block
    if bb.attn_pool is not None:
        raise RelevanceModelError("partial-lrp has no rule for an attention pool (global_pool='map'); "
                                  "use 'relevance-propagation' or 'cdam'")
    all_rows = not model.reads_cls_only if all_rows is None else all_rows
    rows = slice(None) if all_rows else slice(0, 1)
    attn, mlp = blk.attn, blk.mlp
    B, K = images.shape[0], spec.num_targets
    cons = norm_act_rule == "identity"

    def log(name: str, conservative: bool, arriving: torch.Tensor, *leaving: torch.Tensor) -> None:
        if trace is not None:
            trace.append((name, conservative, arriving, leaving))

    with torch.no_grad():
        # forward: trunk (timm, fused attention), then the last block on the CLS row (or every row)
        x = model.trunk(images)
        tokens = blk.norm1(x)
        probs, v = attention_parts(attn, tokens, rows)  # [B, H, n, N], [B, H, N, e]
        n = probs.shape[2]
        heads = (probs @ v).transpose(1, 2).reshape(B, n, attn.attn_dim)  # [B, n, H*e]
        normed_heads = attn.norm(heads)
        proj = attn.proj_drop(attn.proj(normed_heads))
        x0 = x[:, rows]
        y1 = x0 + blk.drop_path1(blk.ls1(proj))
        branch1 = y1 - x0
        n2 = blk.norm2(y1)
        h1 = mlp.fc1(n2)
        h2 = mlp.drop1(mlp.act(h1))
        h3 = mlp.norm(h2)
        m = mlp.drop2(mlp.fc2(h3))
        y2 = y1 + blk.drop_path2(blk.ls2(m))
        branch2 = y2 - y1
        z = bb.norm(y2)  # [B, n, D]
        pool_out = bb.pool(z) if all_rows else z[:, 0]
        pooled = bb.fc_norm(pool_out)
        latent = bb.head_drop(pooled)
        values = spec.objective(model, latent[:, None].expand(B, K, latent.shape[-1]))

        # relevance at the latent
        lat = latent[:, None]  # [B, 1, D]
        if spec.concepts is None:
            weight = _head_weight(model)
            r_out = torch.zeros(B, K, weight.shape[0], dtype=latent.dtype, device=latent.device)
            r_out.scatter_(-1, spec.indices.to(latent.device)[..., None], 1.0)
            r_lat = linear_zplus(lat, weight, r_out)
        else:
            rows = []
            for c in spec.concepts:
                vec = c.vector.to(latent)
                rows.append((vec - latent) if c.similarity == "neg_l2" else vec.expand_as(latent))
            weight = torch.stack(rows, dim=1)[..., None, :]  # [B, K, 1, D]: a one-output Linear per target
            r_out = torch.ones(B, K, 1, dtype=latent.dtype, device=latent.device)
            r_lat = linear_zplus(lat, weight, r_out)
        log("head", True, r_out, r_lat)
        r = _passive(bb.fc_norm, pool_out[:, None], r_lat, norm_act_rule)
        log("fc_norm", cons, r_lat, r)
        if all_rows:  # timm's pooling over the rows, by the generic rule
            def pool(t: torch.Tensor) -> torch.Tensor:
                return bb.pool(t.flatten(0, 1)).unflatten(0, (B, K))

            r_z = generic_rule(pool, (z[:, None].expand(B, K, *z.shape[1:]),), r)[0]
            log("pool", True, r, r_z)
        else:
            r_z = clone_rule(z[:, None], r[:, :, None])  # CLS selection (IndexSelect): X * R / X on the CLS row
            log("cls_select", True, r, r_z)
        r_y2 = _passive(bb.norm, y2[:, None], r_z, norm_act_rule)
        log("norm", cons, r_z, r_y2)
        r_res2, r_b2 = add_rule(y1[:, None], branch2[:, None], r_y2)
        log("add2", True, r_y2, r_res2, r_b2)
        r = _passive(blk.ls2, m[:, None], r_b2, norm_act_rule)
        log("ls2", cons, r_b2, r)
        r_h3 = linear_zplus(h3[:, None], mlp.fc2.weight, r)
        log("mlp.fc2", True, r, r_h3)
        r_h2 = _passive(mlp.norm, h2[:, None], r_h3, norm_act_rule)
        log("mlp.norm", cons, r_h3, r_h2)
        r_h1 = _passive(mlp.act, h1[:, None], r_h2, norm_act_rule)
        log("mlp.act", cons, r_h2, r_h1)
        r_n2 = linear_zplus(n2[:, None], mlp.fc1.weight, r_h1)
        log("mlp.fc1", True, r_h1, r_n2)
        r_y1b = _passive(blk.norm2, y1[:, None], r_n2, norm_act_rule)
        log("norm2", cons, r_n2, r_y1b)
        r_y1 = clone_rule(y1[:, None], r_res2, r_y1b)
        log("clone2", True, r_res2 + r_y1b, r_y1)
        r_x0, r_b1 = add_rule(x0[:, None], branch1[:, None], r_y1)
        log("add1", True, r_y1, r_x0, r_b1)
        r = _passive(blk.ls1, proj[:, None], r_b1, norm_act_rule)
        log("ls1", cons, r_b1, r)
        r_nh = linear_zplus(normed_heads[:, None], attn.proj.weight, r)
        log("attn.proj", True, r, r_nh)
        r_heads = _passive(attn.norm, heads[:, None], r_nh, norm_act_rule)
        log("attn.norm", cons, r_nh, r_heads)
        r_o = r_heads.reshape(B, K, n, attn.num_heads, attn.head_dim).transpose(2, 3)  # [B, K, H, n, e]
        r_attn, r_v = matmul_rule(probs, v, r_o)  # [B, K, H, n, N], [B, K, H, N, e]
        log("attn@v", True, r_o, r_attn, r_v)
    return r_attn.sum(3), values


@register(
    "partial-lrp",
    {"norm_act_rule": "identity"},
    "Partial LRP (Voita et al. 2019 as in Chefer's code, method='last_layer'): LRP relevance (alpha=1) of the "
    "last block's attention probabilities, clamped >= 0, mean over heads, CLS row (summed over the rows for a "
    "model that pools the patch tokens)",
    signed=False,
)
def partial_lrp(model: ViTModel, images: torch.Tensor, spec: TargetSpec, **options: Any) -> Attribution:
    rule = options.get("norm_act_rule", "identity")
    relevance, values = partial_lrp_relevance(model, images, spec, norm_act_rule=rule)
    scores = relevance.clamp(min=0).mean(2)  # [B, K, N]
    layout = model.layout(tuple(images.shape[2:]))
    return Attribution(layout.patch_grid(scores), "partial-lrp", "tokens", tuple(images.shape[2:]), spec.names,
                       scores=values, options=options)
