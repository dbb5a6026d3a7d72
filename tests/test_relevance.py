"""Relevance propagation and partial LRP (docs/method.md, "Baselines") against literal, one-at-a-time versions."""

import pytest
import torch
import torch.nn.functional as F
from helpers import images_for, reg4_dinov2_like, tiny_vit
from torch.nn.modules import module as torch_module

from lidc_cdam import Concept, ViTModel, explain
from lidc_cdam.explain import relevance  # registers "relevance-propagation" and "partial-lrp"
from lidc_cdam.explain.targets import resolve_targets

METHODS = ["relevance-propagation", "partial-lrp"]
BUILDS = [pytest.param(tiny_vit, id="cls"), pytest.param(reg4_dinov2_like, id="reg4-layerscale")]


def latent_and_target(model: ViTModel, latent: torch.Tensor, target) -> torch.Tensor:
    return target.score(latent) if isinstance(target, Concept) else model.head(latent)[:, target]


# --------------------------------------------------------------------------- literal relevance propagation
def literal_relevance_propagation(model: ViTModel, image: torch.Tensor, target) -> torch.Tensor:
    """Chefer et al. 2021a written out: timm's unfused attention, a hook keeping each block's
    probabilities with retain_grad, one backward, R = I; R = R + cam @ R; CLS row over all tokens."""
    blocks = model.backbone.blocks
    saved, handles = [], []

    def keep(_module, _inputs, output):
        output.retain_grad()
        saved.append(output)

    fused = [blk.attn.fused_attn for blk in blocks]
    try:
        for blk in blocks:
            blk.attn.fused_attn = False
            handles.append(blk.attn.attn_drop.register_forward_hook(keep))
        with torch.enable_grad():
            bb = model.backbone
            latent = bb.forward_head(bb.forward_features(image[None]), pre_logits=True)
            latent_and_target(model, latent, target).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        for blk, flag in zip(blocks, fused, strict=True):
            blk.attn.fused_attn = flag
        model.zero_grad(set_to_none=True)
    n = saved[0].shape[-1]
    R = torch.eye(n, dtype=image.dtype)
    for attn in saved:
        cam = (attn.grad[0] * attn[0]).clamp(min=0).mean(0)
        R = R + cam @ R
    return R[0].detach()


@pytest.mark.parametrize("build", BUILDS)
def test_relevance_propagation_equals_literal_loop(build):
    model = build()
    x = images_for(model, batch=2)
    concept = Concept.from_images(model, images_for(model, 4), similarity="cosine")
    targets = [[1, 4], [6, 6]]
    attr = explain(model, x, targets, method="relevance-propagation")
    attr_c = explain(model, x, [concept], method="relevance-propagation")
    layout = model.layout()
    assert attr.maps.shape == (2, 2, *layout.grid)
    for b in range(2):
        for k, target in enumerate(targets[b]):
            expected = layout.patch_grid(literal_relevance_propagation(model, x[b], target))
            torch.testing.assert_close(attr.maps[b, k], expected, rtol=1e-10, atol=1e-12)
        expected = layout.patch_grid(literal_relevance_propagation(model, x[b], concept))
        torch.testing.assert_close(attr_c.maps[b, 0], expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(attr.scores[:, 0], model(x)[torch.arange(2), [1, 6]])


def test_relevance_propagation_batched_grads_loop_and_chunks_agree():
    model = reg4_dinov2_like()
    x = images_for(model, batch=3)
    spec = resolve_targets(model, [3, 1, 5], 3)
    ref, values = relevance.relevance_propagation_scores(model, x, spec, batched_grads=False)
    for kwargs in ({"batched_grads": True}, {"batched_grads": True, "chunk_bytes": 1},
                   {"batched_grads": False, "chunk_bytes": 1}):
        scores, v = relevance.relevance_propagation_scores(model, x, spec, **kwargs)
        torch.testing.assert_close(scores, ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(v, values, rtol=1e-12, atol=1e-14)  # chunking changes BLAS rounding


def test_rollout_row_equals_full_matrix_recursion():
    torch.manual_seed(3)
    cams = [torch.rand(2, 3, 7, 7, dtype=torch.float64) for _ in range(4)]
    R = torch.eye(7, dtype=torch.float64).expand(2, 3, 7, 7)
    for cam in cams:
        R = R + cam @ R
    torch.testing.assert_close(relevance.rollout_cls_row(cams), R[..., 0, :], rtol=1e-13, atol=0)


# --------------------------------------------------------------------------- literal partial LRP
def sdiv(a, b):
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).to(den.dtype) * 1e-9
    return a / den * b.ne(0).to(b.dtype)


def simple_rule(fn, xs, R):
    """Chefer's RelPropSimple: X * grad(Z, X, R / Z) for each input X."""
    xs = [x.detach().requires_grad_(True) for x in xs]
    with torch.enable_grad():
        Z = fn(*xs)
        grads = torch.autograd.grad(Z, xs, sdiv(R, Z))
    return [x.detach() * g for x, g in zip(xs, grads, strict=True)]


def linear_rule(x, W, R):
    """Chefer's Linear.relprop with alpha=1, beta=0, by autograd as in his code."""
    pw, nw = W.clamp(min=0), W.clamp(max=0)
    px = x.clamp(min=0).detach().requires_grad_(True)
    nx = x.clamp(max=0).detach().requires_grad_(True)
    with torch.enable_grad():
        Z1, Z2 = F.linear(px, pw), F.linear(nx, nw)
        S = sdiv(R, Z1 + Z2)
        C1 = px * torch.autograd.grad(Z1, px, S)[0]
        C2 = nx * torch.autograd.grad(Z2, nx, S)[0]
    return (C1 + C2).detach()


def add_rule(a, b, R):
    """Chefer's Add.relprop for one image (sums over the whole tensor)."""
    ra, rb = simple_rule(torch.add, [a, b], R)
    sa, sb = ra.sum(), rb.sum()
    fa = sdiv(sa.abs(), sa.abs() + sb.abs()) * R.sum()
    fb = sdiv(sb.abs(), sa.abs() + sb.abs()) * R.sum()
    return ra * sdiv(fa, sa), rb * sdiv(fb, sb)


@torch.no_grad()
def literal_partial_lrp(model: ViTModel, image: torch.Tensor, target: int) -> torch.Tensor:
    """Chefer's relprop(method="last_layer") for one image and one class, over all N tokens; the
    last block rebuilt from timm's modules, the pooling (CLS selection or timm's ``pool``) by Chefer's
    generic rule. Returns the map over all tokens [N]: the attention relevance summed over the query
    rows (for CLS pooling only the CLS row is non-zero, Chefer's reading), clamped, mean over heads."""
    bb, blk = model.backbone, model.last_block
    attn, mlp = blk.attn, blk.mlp
    x = model.trunk(image[None])  # [1, N, D]
    N = x.shape[1]
    H, e = attn.num_heads, attn.head_dim
    t = blk.norm1(x)
    q, k, v = attn.qkv(t).reshape(1, N, 3, H, e).permute(2, 0, 3, 1, 4).unbind(0)
    A = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    heads = (A @ v).transpose(1, 2).reshape(1, N, H * e)
    branch1 = blk.ls1(attn.proj(heads))
    y1 = x + branch1
    n2 = blk.norm2(y1)
    h = mlp.act(mlp.fc1(n2))
    branch2 = blk.ls2(mlp.fc2(h))
    y2 = y1 + branch2
    z = bb.norm(y2)
    latent = bb.fc_norm(bb.pool(z))
    torch.testing.assert_close(model.head(latent), model(image[None]))  # the rebuilt forward is the model's

    R = F.one_hot(torch.tensor([target]), model.num_outputs).to(x.dtype)
    R = linear_rule(latent, model.head.weight, R)  # head; fc_norm and norm pass relevance through
    R = simple_rule(bb.pool, [z], R)[0]  # the pooling: CLS selection, average, max
    r_res, r_mlp = add_rule(y1, branch2, R)
    r_mlp = linear_rule(h, mlp.fc2.weight, r_mlp)  # ls2, act, norm2: pass-through
    r_mlp = linear_rule(n2, mlp.fc1.weight, r_mlp)
    R = y1 * (sdiv(r_res, y1) + sdiv(r_mlp, y1))  # Clone
    _, r_attn = add_rule(x, branch1, R)
    r_attn = linear_rule(heads, attn.proj.weight, r_attn)
    r_attn = r_attn.reshape(1, N, H, e).transpose(1, 2)
    cam, _ = simple_rule(torch.matmul, [A, v], r_attn)
    cam = cam / 2
    return cam[0].sum(1).clamp(min=0).mean(0)


POOLED = [pytest.param(lambda pool=pool: tiny_vit(global_pool=pool), id=pool) for pool in ("avg", "max", "avgmax")]


@pytest.mark.parametrize("build", BUILDS + POOLED)
def test_partial_lrp_equals_literal_full_token_version(build):
    model = build()
    x = images_for(model, batch=2)
    targets = [[1, 4, 6], [0, 2, 2]]
    attr = explain(model, x, targets, method="partial-lrp")
    layout = model.layout()
    for b in range(2):
        for k, target in enumerate(targets[b]):
            expected = layout.patch_grid(literal_partial_lrp(model, x[b], target))
            torch.testing.assert_close(attr.maps[b, k], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_batched_targets_equal_one_at_a_time(method):
    model = reg4_dinov2_like()
    x = images_for(model, batch=2)
    concepts = [Concept.from_images(model, images_for(model, 4), similarity=s, name=s) for s in ("dot", "neg_l2")]
    for targets in ([[1, 4], [6, 6]], concepts):
        attr = explain(model, x, targets, method=method)
        for b in range(2):
            row = targets[b] if isinstance(targets[0], list) else targets
            for k, target in enumerate(row):
                single = explain(model, x[b : b + 1], [target], method=method)
                torch.testing.assert_close(attr.maps[b, k], single.maps[0, 0], rtol=1e-10, atol=1e-13)
                torch.testing.assert_close(attr.scores[b, k], single.scores[0, 0])


def test_partial_lrp_dot_and_cosine_concepts_agree():
    """The z+ rule is invariant to positive rescaling, so cosine = dot (module docstring)."""
    model = tiny_vit()
    x = images_for(model, batch=2)
    vec = Concept.from_images(model, images_for(model, 4)).vector
    dot = explain(model, x, Concept(vec, "dot"), method="partial-lrp")
    cos = explain(model, x, Concept(vec, "cosine"), method="partial-lrp")
    torch.testing.assert_close(dot.maps, cos.maps, rtol=1e-9, atol=1e-14)


# --------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("pool", ["token", "avgmax"])
@pytest.mark.parametrize("rule", ["identity", "gradient"])
def test_partial_lrp_conserves_relevance_rule_by_rule(rule, pool):
    """Every rule flagged conservative sends on the total it receives, per image and target (up to
    Chefer's 1e-9 stabiliser: rtol 1e-6). With Chefer's pass-through rules (default) every step is
    conservative, so the relevance reaching the last block's input residual, A and V is the unit one-hot.
    The same holds through average + max pooling of the patch tokens (the generic rule)."""
    model = reg4_dinov2_like(global_pool=pool)
    x = images_for(model, batch=3)
    spec = resolve_targets(model, [[1, 4], [0, 6], [2, 3]], 3)
    trace = []
    relevance.partial_lrp_relevance(model, x, spec, norm_act_rule=rule, trace=trace)

    def total(r):
        return r.flatten(2).sum(-1)  # [B, K]

    names = [name for name, *_ in trace]
    assert names == ["head", "fc_norm", "cls_select" if pool == "token" else "pool", "norm", "add2", "ls2",
                     "mlp.fc2", "mlp.norm", "mlp.act", "mlp.fc1", "norm2", "clone2", "add1", "ls1", "attn.proj",
                     "attn.norm", "attn@v"]
    ones = torch.ones(3, 2, dtype=x.dtype)
    torch.testing.assert_close(total(trace[0][2]), ones, rtol=0, atol=0)  # one-hot at the target
    # a pooled model's fc_norm is a LayerNorm: by gradient x input (scale-invariant) it passes ~1e-5 of the
    # relevance, and Chefer's 1e-9 stabiliser is then a 1e-4 relative error
    rtol = 1e-3 if (rule, pool) == ("gradient", "avgmax") else 1e-6
    for name, conservative, arriving, leaving in trace:
        if conservative:
            torch.testing.assert_close(sum(total(r) for r in leaving), total(arriving), rtol=rtol, atol=1e-9,
                                       msg=f"rule {name} is not conservative")
    assert [name for name, cons, *_ in trace if not cons] == (
        [] if rule == "identity" else ["fc_norm", "norm", "ls2", "mlp.norm", "mlp.act", "norm2", "ls1", "attn.norm"]
    )
    r_attn, r_v = trace[-1][3]
    r_residual, r_branch = trace[names.index("add1")][3]
    torch.testing.assert_close(total(r_attn), total(r_v), rtol=1e-12, atol=1e-12)  # each half carries sum R / 2
    torch.testing.assert_close(total(r_attn) + total(r_v), total(r_branch), rtol=rtol, atol=1e-9)
    if rule == "identity":  # what reaches the block input's residual, A and V is the unit one-hot
        torch.testing.assert_close(total(r_residual) + total(r_attn) + total(r_v), ones, rtol=1e-6, atol=0)
    else:  # LayerNorm / GELU by gradient x input do not conserve
        assert not torch.allclose(total(r_residual) + total(r_attn) + total(r_v), ones, rtol=1e-3)


def test_lrp_rules_on_small_tensors():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 5, dtype=torch.float64)
    W = torch.randn(4, 5, dtype=torch.float64)
    R = torch.rand(2, 3, 4, dtype=torch.float64)
    r_in = relevance.linear_zplus(x, W, R)
    pw, nw = W.clamp(min=0), W.clamp(max=0)
    z = x.clamp(min=0) @ pw.T + x.clamp(max=0) @ nw.T
    assert (z == 0).any()  # an output no input drives positively: its relevance is dropped (as Chefer's)
    torch.testing.assert_close(r_in.sum(-1), (R * (z > 0)).sum(-1), rtol=1e-6, atol=0)  # else z+ conserves
    torch.testing.assert_close(r_in[:, 0], linear_rule(x[:, 0], W, R[:, 0]), rtol=1e-12, atol=1e-15)
    a, b = torch.randn(2, 1, 5, dtype=torch.float64), torch.randn(2, 1, 5, dtype=torch.float64)
    ra, rb = relevance.add_rule(a, b, R[..., :1].expand(2, 3, 5))
    torch.testing.assert_close(ra.sum(-1) + rb.sum(-1), 5 * R[..., 0], rtol=1e-6, atol=0)
    gen = relevance.generic_rule(torch.mul, (a.expand(2, 3, 5), b.expand(2, 3, 5)), R[..., :1].expand(2, 3, 5))
    torch.testing.assert_close(gen[0], gen[1])  # x * y: both factors get the whole R
    torch.testing.assert_close(gen[0], R[..., :1].expand(2, 3, 5), rtol=1e-6, atol=0)  # stabiliser: 1e-9 / xy


# --------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("build", BUILDS)
def test_maps_depend_on_target_and_drop_prefix(method, build):
    model = build()
    x = images_for(model, batch=4)
    attr = explain(model, x, [1, 5], method=method)
    assert attr.kind == "tokens" and attr.method == method
    assert attr.maps.shape == (4, 2, *model.layout().grid)
    assert torch.isfinite(attr.maps).all() and (attr.maps >= 0).all()
    assert not torch.allclose(attr.maps[:, 0], attr.maps[:, 1], rtol=1e-4, atol=0)
    assert not torch.allclose(attr.maps[0], attr.maps[1], rtol=1e-4, atol=0)  # images differ too
    assert attr.target_names == [["1", "5"]] * 4


def hooks_left(model: ViTModel) -> list[str]:
    found = []
    for name, mod in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(mod, attr):
                found.append(f"{name}.{attr}")
    for p_name, p in model.named_parameters():
        if p._backward_hooks or p.grad is not None:
            found.append(f"{p_name} (hook or grad)")
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        if getattr(torch_module, attr):
            found.append(attr)
    return found


@pytest.mark.parametrize("method", METHODS)
def test_no_hooks_or_state_left_even_after_an_exception(method, monkeypatch):
    model = reg4_dinov2_like()
    model.train()
    fused = [blk.attn.fused_attn for blk in model.backbone.blocks]
    x = images_for(model, batch=2)
    explain(model, x, [1, 2], method=method)
    assert hooks_left(model) == [] and model.training

    def boom(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model.last_block.mlp.fc1, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, x, [1, 2], method=method)
    assert hooks_left(model) == [] and model.training
    assert [blk.attn.fused_attn for blk in model.backbone.blocks] == fused


@pytest.mark.parametrize("method", METHODS)
def test_models_without_cls_token_are_refused(method):
    model = tiny_vit(class_token=False, global_pool="avg")
    with pytest.raises(TypeError, match="CLS token"):
        explain(model, images_for(model), [1], method=method)


def test_partial_lrp_through_cls_and_patch_pooling_equal_on_a_cls_model():
    """The all-rows path (timm's pooling by the generic rule, the relevance summed over the query rows) gives
    a CLS-pooled model's CLS-row map: only that row carries relevance."""
    model = reg4_dinov2_like()
    x = images_for(model, batch=2)
    spec = resolve_targets(model, [[1, 4], [0, 6]], 2)
    cls_row, values = relevance.partial_lrp_relevance(model, x, spec)
    all_rows, values_all = relevance.partial_lrp_relevance(model, x, spec, all_rows=True)
    torch.testing.assert_close(all_rows, cls_row, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(values_all, values)


def test_partial_lrp_needs_no_attention_pool_and_a_linear_head():
    model = tiny_vit(global_pool="map")
    with pytest.raises(TypeError, match="attention pool"):
        explain(model, images_for(model), [1], method="partial-lrp")
    explain(model, images_for(model), [1], method="relevance-propagation")  # gradients through any pooling
    mlp_head = tiny_vit()
    mlp_head.head = torch.nn.Sequential(torch.nn.Linear(48, 8), torch.nn.ReLU(), torch.nn.Linear(8, 7)).double()
    with pytest.raises(TypeError, match="linear head"):
        explain(mlp_head, images_for(mlp_head), [1], method="partial-lrp")
    with pytest.raises(TypeError, match="unknown option"):
        explain(tiny_vit(), images_for(tiny_vit()), [1], method="partial-lrp", alpha=2)
    with pytest.raises(ValueError, match="norm_act_rule"):
        explain(tiny_vit(), images_for(tiny_vit()), [1], method="partial-lrp", norm_act_rule="zplus")
