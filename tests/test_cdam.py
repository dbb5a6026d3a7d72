"""CDAM, Smooth and Integrated CDAM checked against the equations (docs/method.md, "CDAM" .. "Integrated CDAM")."""

import itertools

import pytest
import torch
from captum.attr import LayerGradientXActivation
from helpers import images_for, reg4_dinov2_like, tiny_vit

from lidc_cdam import Concept, ModelInputError, TargetError, ViTModel, explain
from lidc_cdam.explain.cdam import cdam_token_scores, fast_path_applies
from lidc_cdam.explain.targets import resolve_targets

VARIANTS = [
    ("vanilla", {}),
    ("smooth", {"n": 6, "seed": 3, "space": "block_input"}),
    ("smooth", {"n": 6, "seed": 3, "space": "tokens"}),
    ("integrated", {"n": 7, "space": "tokens"}),
    ("integrated", {"n": 7, "space": "block_input"}),
]


def target_value(model: ViTModel, resid, tokens, target):
    """F for one target from a residual X and normed tokens T (the definition, no shortcuts)."""
    latent = model.last(resid, tokens)
    return target.score(latent) if isinstance(target, Concept) else model.head(latent)[:, target]


def test_split_forward_equals_timm_forward():
    model = tiny_vit()
    x = images_for(model)
    torch.testing.assert_close(model(x), model.backbone(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("concept", [False, True])
def test_cdam_equals_finite_differences_float64(concept):
    """Eq. 2: S_i = T_i . dF/dT_i is the derivative of F along T_i -> T_i (1 + eps)."""
    model = tiny_vit()
    x = images_for(model, batch=1)
    target = Concept.from_images(model, images_for(model, 3)) if concept else 2
    attr = explain(model, x, [target], method="cdam")
    with torch.no_grad():
        resid = model.trunk(x)
        tokens = model.normed_tokens(resid)
        eps = 1e-6
        fd = []
        for i in range(tokens.shape[1]):
            up, down = tokens.clone(), tokens.clone()
            up[:, i] *= 1 + eps
            down[:, i] *= 1 - eps
            fd.append((target_value(model, resid, up, target) - target_value(model, resid, down, target)) / (2 * eps))
    fd = torch.stack(fd, dim=-1)[:, model.num_prefix_tokens :].reshape(attr.maps[:, 0].shape)
    torch.testing.assert_close(attr.maps[:, 0], fd, rtol=1e-6, atol=1e-9)


def captum_cdam(model: ViTModel, x, target: int):
    """Vanilla CDAM by captum: gradient x activation at blocks[-1].norm1, summed over features."""
    lga = LayerGradientXActivation(model, model.last_block.norm1)
    attr = lga.attribute(x, target=target)  # [B, N, D]
    return model.layout(tuple(x.shape[-2:])).patch_grid(attr.sum(-1))


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: tiny_vit(), id="cls"),
        pytest.param(lambda: reg4_dinov2_like(), id="reg4-layerscale"),
        pytest.param(lambda: tiny_vit(global_pool="avg", fc_norm=True), id="avg-pool"),
        pytest.param(lambda: tiny_vit(class_token=False, global_pool="avg"), id="no-cls-avg"),
        pytest.param(lambda: tiny_vit(global_pool="max", fc_norm=True), id="max-pool"),
        pytest.param(lambda: tiny_vit(global_pool="avgmax", fc_norm=True), id="avgmax-pool"),  # the phantom ViTs
    ],
)
def test_cdam_equals_captum_layer_gradient_x_activation(build):
    model = build()
    x = images_for(model)
    attr = explain(model, x, [1, 4], method="cdam")
    for k, target in enumerate([1, 4]):
        torch.testing.assert_close(attr.maps[:, k], captum_cdam(model, x, target), rtol=1e-9, atol=1e-12)


def test_non_square_images_with_dynamic_size():
    model = tiny_vit(dynamic_img_size=True)
    x = images_for(model, size=(32, 48))
    attr = explain(model, x, [0, 3], method="cdam")
    assert attr.maps.shape == (2, 2, 4, 6)
    assert attr.upsample().shape == (2, 2, 32, 48)
    torch.testing.assert_close(attr.maps[:, 1], captum_cdam(model, x, 3), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("variant", "options"), VARIANTS)
@pytest.mark.parametrize("concept", [False, True])
def test_cls_row_fast_path_equals_full_block(variant, options, concept):
    model = reg4_dinov2_like()
    x = images_for(model, batch=3)
    assert fast_path_applies(model)
    if concept:
        c = Concept.from_images(model, images_for(model, 4))
        targets = [c, Concept(c.vector, "cosine"), Concept(c.vector, "neg_l2")]
    else:
        targets = [0, 5, 6]
    spec = resolve_targets(model, targets, x.shape[0])
    fast, _, _ = cdam_token_scores(model, x, spec, variant, implementation="cls_row", **options)
    full, _, _ = cdam_token_scores(model, x, spec, variant, implementation="reference", **options)
    torch.testing.assert_close(fast, full, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("variant", "options"), VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_targets_equal_one_by_one(variant, options, dtype):
    model = tiny_vit(dtype)
    x = images_for(model, batch=2)
    method = {"vanilla": "cdam", "smooth": "smooth-cdam", "integrated": "integrated-cdam"}[variant]
    together = explain(model, x, [6, 0, 3], method=method, **options)
    for k, t in enumerate([6, 0, 3]):
        alone = explain(model, x, [t], method=method, **options)
        torch.testing.assert_close(together.maps[:, k], alone.maps[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.scores[:, k], model(x)[:, t], rtol=1e-5, atol=1e-6)


def test_per_image_targets_and_names():
    model = tiny_vit()
    x = images_for(model, batch=2)
    per_image = explain(model, x, [[1, 2], [3, 4]])
    assert per_image.maps.shape == (2, 2, 4, 4)
    torch.testing.assert_close(per_image.maps[1, 0], explain(model, x, [3]).maps[1, 0])
    as_tensor = explain(model, x, torch.tensor([5, 6]))
    torch.testing.assert_close(as_tensor.maps[0, 0], explain(model, x, 5).maps[0, 0])
    model.output_names = [f"class{i}" for i in range(7)]
    named = explain(model, x, ["class3"])
    assert named.target_names == [["class3"], ["class3"]]
    torch.testing.assert_close(named.maps, explain(model, x, [3]).maps)
    top1 = explain(model, x)  # default: the predicted class
    expected = model(x).argmax(-1)
    assert [names[0] for names in top1.target_names] == [f"class{i}" for i in expected.tolist()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integrated_cdam_completeness_converges(dtype):
    """Eq. 6 in token space keeps the IG completeness axiom: sum_i S_i -> F(T) - F(0)."""
    model = tiny_vit(dtype)
    x = images_for(model, batch=2)
    with torch.no_grad():
        resid = model.trunk(x)
        tokens = model.normed_tokens(resid)
        gap = target_value(model, resid, tokens, 4) - target_value(model, resid, torch.zeros_like(tokens), 4)
    spec = resolve_targets(model, [4], 2)
    errors = []
    for n in (4, 16, 64, 256):
        scores, _, _ = cdam_token_scores(model, x, spec, "integrated", n=n, space="tokens")
        errors.append((scores[:, 0].sum(-1) - gap).abs().max().item())
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.01 * gap.abs().max().item(), (errors, gap)


def test_smooth_cdam_seeded_is_reproducible():
    model = tiny_vit(torch.float32)
    x = images_for(model)
    a = explain(model, x, [1], method="smooth-cdam", n=8, seed=11)
    b = explain(model, x, [1], method="smooth-cdam", n=8, seed=11, chunk_bytes=1)  # one point per chunk
    c = explain(model, x, [1], method="smooth-cdam", n=8, seed=12)
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(a.maps, c.maps)
    vanilla = explain(model, x, [1]).maps
    zero_noise = explain(model, x, [1], method="smooth-cdam", n=3, sigma=0.0, seed=0).maps
    torch.testing.assert_close(zero_noise, vanilla, rtol=1e-5, atol=1e-7)


class CraftedResidual(ViTModel):
    """A ViT whose trunk output X is given, to place tokens where the CLS query ignores them."""

    def trunk(self, images):
        return self.crafted.to(images.dtype).expand(images.shape[0], -1, -1)


@pytest.mark.parametrize("implementation", ["cls_row", "reference"])
def test_zero_attention_gives_zero_score(implementation):
    """Appendix A.1, Eq. 9: A_i = 0 implies S_i = 0.

    One head, W_q = c * shift, W_k = c * I: the CLS query points along shift(T_0); a token placed
    opposite to it gets logit -128 below the others, so its attention underflows to exactly 0.
    """
    d, c = 64, 4.0
    base = tiny_vit(torch.float32, embed_dim=d, num_heads=1, qkv_bias=False)
    model = CraftedResidual(base.backbone)
    blk = model.last_block
    eye = torch.eye(d)
    with torch.no_grad():
        blk.norm1.weight.fill_(1.0)
        blk.norm1.bias.zero_()
        blk.attn.qkv.weight[:d] = c * eye.roll(1, dims=0)  # q = c * shift(T)
        blk.attn.qkv.weight[d : 2 * d] = c * eye
    n_tokens, ignored = 17, 5
    resid = torch.randn(1, n_tokens, d, generator=torch.Generator().manual_seed(0))
    resid[0, :, 1:3] *= 0.05  # other tokens barely project on the query direction e1 - e2
    resid[0, 0] = eye[0] - eye[1]  # CLS
    resid[0, ignored] = -(eye[1] - eye[2])  # opposite to shift(CLS)
    model.crafted = resid
    x = images_for(model, batch=1).float()
    with torch.no_grad():
        tokens = model.normed_tokens(resid)[0]
        logits = (tokens[0] @ blk.attn.qkv.weight[:d].T) @ (tokens @ blk.attn.qkv.weight[d : 2 * d].T).T
        attn = (logits * blk.attn.scale).softmax(-1)
    assert attn[ignored] == 0.0 and (attn > 1e-3).sum() > 10
    spec = resolve_targets(model, [0, 1, 2], 1)
    scores, _, _ = cdam_token_scores(model, x, spec, implementation=implementation)
    assert torch.all(scores[0, :, ignored] == 0.0)
    assert torch.all(scores[0, :, attn > 1e-3].abs().amin(-1) > 0)


def test_concept_targets():
    model = tiny_vit()
    examples = images_for(model, batch=4)
    concept = Concept.from_images(model, examples, name="examples")
    torch.testing.assert_close(concept.vector, model.latent(examples).mean(0))
    x = images_for(model, batch=2)
    attr = explain(model, x, concept)
    assert attr.target_names == [["examples"], ["examples"]]
    torch.testing.assert_close(attr.scores[:, 0], model.latent(x) @ concept.vector)
    with pytest.raises(TargetError, match="dimension"):
        explain(model, x, Concept(torch.zeros(5)))


def test_bad_input_raises_clear_errors():
    model = tiny_vit(torch.float32)
    x = images_for(model).float()
    with pytest.raises(ModelInputError, match="3-channel"):
        explain(model, x[:, :1], [0])
    with pytest.raises(ModelInputError, match="32x32"):
        explain(model, torch.zeros(1, 3, 40, 40), [0])
    with pytest.raises(ModelInputError, match="multiple of the patch size"):
        explain(tiny_vit(torch.float32, dynamic_img_size=True), torch.zeros(1, 3, 36, 32), [0])
    with pytest.raises(TargetError, match="out of range"):
        explain(model, x, [7])
    with pytest.raises(TargetError, match="unknown target name"):
        explain(model, x, ["cat"])
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ModelInputError, match="NaN"):
        explain(model, nan, [0])
    with pytest.raises(ValueError, match="unknown method"):
        explain(model, x, [0], method="magic")
    with pytest.raises(TypeError, match="unknown option"):
        explain(model, x, [0], method="cdam", n=5)
    with pytest.raises(TypeError, match="VisionTransformer"):
        ViTModel(torch.nn.Linear(3, 3))


def test_upsample_nearest_repeats_patch_scores():
    model = tiny_vit()
    attr = explain(model, images_for(model), [0])
    up = attr.upsample()
    assert up.shape == (2, 1, 32, 32)
    torch.testing.assert_close(up[:, :, ::8, ::8], attr.maps)
    torch.testing.assert_close(up[:, :, 7::8, 7::8], attr.maps)
    assert attr.upsample("bilinear").shape == (2, 1, 32, 32)


def test_explain_restores_training_mode_and_needs_no_grad_context():
    model = tiny_vit()
    model.train()
    with torch.no_grad():
        attr = explain(model, images_for(model), [0])
    assert model.training and torch.isfinite(attr.maps).all()


def test_attention_map_equals_timm_probabilities_and_ignores_the_target():
    model = reg4_dinov2_like()
    x = images_for(model)
    attn = model.last_block.attn
    captured = {}
    attn.fused_attn = False  # timm's explicit softmax path, to read its probabilities
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("p", o))
    try:
        model(x)
    finally:
        handle.remove()
        attn.fused_attn = True
    expected = captured["p"][:, :, 0, model.num_prefix_tokens :].mean(1).reshape(2, 3, 3)
    a = explain(model, x, [0, 5], method="attention")
    torch.testing.assert_close(a.maps[:, 0], expected)
    torch.testing.assert_close(a.maps[:, 0], a.maps[:, 1])


def test_bare_timm_model_is_wrapped_and_left_in_its_mode():
    model = tiny_vit()
    backbone = model.backbone
    backbone.train()
    x = images_for(model)
    attr = explain(backbone, x, [2])
    assert backbone.training
    torch.testing.assert_close(attr.maps, explain(model, x, [2]).maps)


@pytest.mark.parametrize("method", ["cdam", "smooth-cdam", "integrated-cdam"])
def test_cdam_returns_the_latents_and_outputs_of_its_own_forward(method):
    model = tiny_vit()
    x = images_for(model, batch=3)
    attr = explain(model, x, targets=[0, 1], method=method, **({"n": 4} if method != "cdam" else {}))
    with torch.no_grad():
        latents = model.latent(x)
    torch.testing.assert_close(attr.latents, latents)
    torch.testing.assert_close(model.head(attr.latents)[:, :2], attr.scores)
