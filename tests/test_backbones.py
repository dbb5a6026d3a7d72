"""Every backbone family through the same checks (issue 13, docs/method.md, "Backbone families and 3D").

Tiny random models in float64, built offline from the families' own configs: timm ``VisionTransformer``
(CLS and average pooling), timm ``Eva`` as DINOv3 (CLS + 4 registers, RoPE, layer scale; CLS and average
pooling), EVA-02 (RoPE, SwiGLU) and Perception Encoder (RoPE, attention pooling), torchvision
``VisionTransformer`` (SWAG's class), Hugging Face ``transformers`` ``ViTForImageClassification`` and
``Dinov2WithRegistersModel`` (4 registers; with our head on CLS', and as ``ForImageClassification`` reading
``[CLS', mean patches']``; skipped without the ``hf`` extra), and MONAI's 3D ``ViT`` on a 32^3 volume
(a 4 x 4 x 4 token grid).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from captum.attr import LayerGradientXActivation
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT
from toy_family import ToyAdapter, ToyViT

from lidc_cdam import ModelInputError, TargetError, ViTModel, explain
from lidc_cdam.explain import METHODS
from lidc_cdam.explain.cdam import cdam_token_scores, cls_row_applies, fast_path_applies
from lidc_cdam.explain.relevance import RelevanceModelError
from lidc_cdam.explain.targets import resolve_targets
from lidc_cdam.models.backbones import ADAPTERS, build_backbone, register_adapter
from lidc_cdam.models.heads import LinearHead
from lidc_cdam.models.loading import CheckpointError

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=7)
TORCHVISION = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=48, mlp_dim=96, num_classes=7)


def sharpen(model: ViTModel, seed: int = 0) -> ViTModel:
    """Random weights away from the families' initialisations: non-zero biases (q, v, in_proj), layer scales of
    order 1, sharper attention and a non-zero head (torchvision starts from a zero head), in float64."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            if name.endswith(("qkv.weight", "in_proj_weight", ".q_proj.weight", ".k_proj.weight", ".v_proj.weight")):
                p.mul_(4.0)
        for layer in model.head.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 2 / layer.in_features**0.5)
    return model.double().eval()


def timm_model(name: str, **overrides) -> ViTModel:
    torch.manual_seed(0)
    return sharpen(ViTModel.from_config({**SMALL, **overrides}, timm_name=name))


def torchvision_model() -> ViTModel:
    torch.manual_seed(0)
    build = {"family": "torchvision", "torchvision_name": None, "torchvision_kwargs": dict(TORCHVISION)}
    return sharpen(ViTModel(TorchvisionViT(**TORCHVISION), build=build))


def hf_model(class_name: str, **config) -> ViTModel:
    """A transformers model from its config (no download); base models get a LinearHead on CLS'."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cls = getattr(transformers, class_name)
    backbone = cls(cls.config_class(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                    patch_size=8, num_labels=7, qkv_bias=True, **config))
    head = None if hasattr(backbone, "classifier") else LinearHead(48, 7)
    return sharpen(ViTModel(backbone, head))


def monai_model() -> ViTModel:
    torch.manual_seed(0)
    return sharpen(ViTModel.from_monai(**MONAI_3D))


MONAI_3D = dict(in_channels=1, img_size=(32, 32, 32), patch_size=(8, 8, 8), hidden_size=48, mlp_dim=96, num_layers=2,
                num_heads=4, num_classes=7, qkv_bias=True)

FAMILIES = {
    "timm-vit-cls": lambda: timm_model("vit_tiny_patch16_224"),
    "timm-vit-avg": lambda: timm_model("vit_tiny_patch16_224", global_pool="avg", class_token=False, fc_norm=True),
    "dinov3-cls": lambda: timm_model("vit_small_patch16_dinov3", global_pool="token"),
    "dinov3-avg": lambda: timm_model("vit_small_patch16_dinov3"),
    "eva02": lambda: timm_model("eva02_tiny_patch14_224", ref_feat_shape=(4, 4), scale_mlp=True),
    "pe-core": lambda: timm_model("vit_pe_core_tiny_patch16_384", ref_feat_shape=(4, 4), attn_pool_num_heads=4),
    "torchvision": torchvision_model,
    "hf-vit": lambda: hf_model("ViTForImageClassification", intermediate_size=96),
    "hf-dinov2-reg": lambda: hf_model("Dinov2WithRegistersModel", num_register_tokens=4, mlp_ratio=2),
    "hf-dinov2-reg-cls-mean": lambda: hf_model("Dinov2WithRegistersForImageClassification", num_register_tokens=4,
                                               mlp_ratio=2),
    "monai-3d": monai_model,
}
#: the CDAM implementation ``auto`` picks for each
EXPECTED_PATH = {"timm-vit-cls": "cls_row", "torchvision": "cls_row", "hf-vit": "cls_row", "hf-dinov2-reg": "cls_row",
                 "monai-3d": "cls_row"}
FAMILY_NAMES = {"timm VisionTransformer", "timm Eva", "torchvision VisionTransformer", "transformers ViT",
                "transformers DINOv2", "MONAI ViT"}
VARIANTS = [
    ("vanilla", {}),
    ("smooth", {"n": 4, "seed": 3, "space": "block_input"}),
    ("smooth", {"n": 4, "seed": 3, "space": "tokens"}),
    ("integrated", {"n": 5, "space": "tokens"}),
    ("integrated", {"n": 5, "space": "block_input"}),
]
METHOD_OF = {"vanilla": "cdam", "smooth": "smooth-cdam", "integrated": "integrated-cdam"}

family = pytest.mark.parametrize("name", list(FAMILIES))


@pytest.fixture(scope="module")
def models() -> dict[str, ViTModel]:
    return {}


def build(models: dict[str, ViTModel], name: str) -> ViTModel:
    if name not in models:
        models[name] = FAMILIES[name]()
    return models[name]


def images_for(model: ViTModel, batch: int = 2, size: tuple[int, ...] | None = None) -> torch.Tensor:
    size = size or model.default_image_size
    return torch.randn(batch, model.in_chans, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def own_forward(model: ViTModel, x: torch.Tensor) -> torch.Tensor:
    """The outputs by the family's own forward (MONAI returns (logits, hidden states), transformers a ModelOutput;
    a transformers base model's CLS' goes through our head)."""
    out = model.backbone(x)
    out = out[0] if isinstance(out, tuple) else out
    if hasattr(out, "logits"):
        return out.logits
    return model.head(out.last_hidden_state[:, 0]) if hasattr(out, "last_hidden_state") else out


def target_value(model: ViTModel, resid, tokens, target: int, grid) -> torch.Tensor:
    return model.head(model.last(resid, tokens, grid=grid))[:, target]


def captum_cdam(model: ViTModel, x, target: int) -> torch.Tensor:
    """CDAM by captum: gradient x activation at the last block's first norm, summed over features, prefix dropped."""
    attr = LayerGradientXActivation(model, model.norm1).attribute(x, target=target)
    return model.layout(tuple(x.shape[2:])).patch_grid(attr.sum(-1))


@family
def test_split_forward_equals_the_family_forward(models, name):
    model = build(models, name)
    x = images_for(model)
    torch.testing.assert_close(model(x), own_forward(model, x), rtol=0, atol=1e-12)
    assert model.family in FAMILY_NAMES


@family
def test_cdam_equals_captum_layer_gradient_x_activation(models, name):
    model = build(models, name)
    x = images_for(model)
    attr = explain(model, x, [1, 4], method="cdam")
    assert attr.maps.abs().amax() > 1e-5  # not trivially zero
    for k, target in enumerate([1, 4]):
        torch.testing.assert_close(attr.maps[:, k], captum_cdam(model, x, target), rtol=1e-9, atol=1e-12)


@family
def test_cdam_equals_finite_differences_float64(models, name):
    """Eq. 2: S_i = T_i . dF/dT_i is the derivative of F along T_i -> T_i (1 + eps), residual fixed."""
    model = build(models, name)
    x = images_for(model, batch=1)
    attr = explain(model, x, [2], method="cdam")
    grid = model.layout().grid
    with torch.no_grad():
        resid = model.trunk(x)
        tokens = model.normed_tokens(resid)
        eps, fd = 1e-6, []
        for i in range(tokens.shape[1]):
            up, down = tokens.clone(), tokens.clone()
            up[:, i] *= 1 + eps
            down[:, i] *= 1 - eps
            fd.append((target_value(model, resid, up, 2, grid) - target_value(model, resid, down, 2, grid)) / (2 * eps))
    fd = model.layout().patch_grid(torch.stack(fd, dim=-1))
    torch.testing.assert_close(attr.maps[:, 0], fd, rtol=1e-6, atol=1e-9)


@family
@pytest.mark.parametrize(("variant", "options"), VARIANTS)
def test_closed_form_equals_reference_path(models, name, variant, options):
    model = build(models, name)
    assert fast_path_applies(model)
    assert cls_row_applies(model) == (EXPECTED_PATH.get(name) == "cls_row")
    x = images_for(model, batch=2)
    spec = resolve_targets(model, [0, 5, 6], 2)
    reference, _, _ = cdam_token_scores(model, x, spec, variant, implementation="reference", **options)
    for implementation in ("auto", "rows"):
        fast, _, _ = cdam_token_scores(model, x, spec, variant, implementation=implementation, **options)
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-12)


@family
@pytest.mark.parametrize(("variant", "options"), VARIANTS[::2])
def test_batched_targets_equal_one_by_one(models, name, variant, options):
    model = build(models, name)
    x = images_for(model, batch=2)
    together = explain(model, x, [6, 0, 3], method=METHOD_OF[variant], **options)
    for k, t in enumerate([6, 0, 3]):
        alone = explain(model, x, [t], method=METHOD_OF[variant], **options)
        torch.testing.assert_close(together.maps[:, k], alone.maps[:, 0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(together.scores[:, k], model(x)[:, t], rtol=1e-9, atol=1e-12)


@family
def test_integrated_cdam_completeness_converges(models, name):
    """Eq. 6 in token space: sum_i S_i -> F(T) - F(0) as n grows (prefix tokens included in the sum)."""
    model = build(models, name)
    x = images_for(model, batch=2)
    grid = model.layout().grid
    with torch.no_grad():
        resid = model.trunk(x)
        tokens = model.normed_tokens(resid)
        zero = torch.zeros_like(tokens)
        gap = target_value(model, resid, tokens, 4, grid) - target_value(model, resid, zero, 4, grid)
    spec = resolve_targets(model, [4], 2)
    errors = []
    for n in (4, 16, 64, 256):
        scores, _, _ = cdam_token_scores(model, x, spec, "integrated", n=n, space="tokens")
        errors.append((scores[:, 0].sum(-1) - gap).abs().max().item())
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.01 * gap.abs().max().item(), (errors, gap)


@family
def test_smooth_cdam_runs_through_the_shared_point_generator(models, name):
    model = build(models, name)
    x = images_for(model)
    a = explain(model, x, [1], method="smooth-cdam", n=6, seed=11)
    b = explain(model, x, [1], method="smooth-cdam", n=6, seed=11, chunk_bytes=1)  # one point per chunk
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-9, atol=1e-12)
    zero_noise = explain(model, x, [1], method="smooth-cdam", n=2, sigma=0.0, seed=0)
    torch.testing.assert_close(zero_noise.maps, explain(model, x, [1]).maps, rtol=1e-9, atol=1e-12)


@family
def test_all_ten_methods_run_or_name_the_family(models, name):
    model = build(models, name)
    x = images_for(model)
    assert len(METHODS) == 10
    ran = []
    for method in METHODS:
        options = {"n": 3} if method in ("smooth-cdam", "integrated-cdam", "smoothgrad", "intgrad") else {}
        try:
            attr = explain(model, x, [1, 3], method=method, **options)
        except RelevanceModelError as err:  # Chefer's rules are written for timm's Block and Attention
            assert method in ("relevance-propagation", "partial-lrp"), err
            assert model.family in str(err) or not model.reads_cls_only, err
            continue
        except ValueError as err:  # the attention map of a model without CLS
            assert method == "attention" and not model.has_class_token and "CLS token" in str(err)
            continue
        grid = model.layout().grid if attr.kind == "tokens" else model.default_image_size
        assert attr.maps.shape == (2, 2, *grid) and torch.isfinite(attr.maps).all(), method
        ran.append(method)
    assert {"cdam", "smooth-cdam", "integrated-cdam", "gradcam", "input-x-grad", "smoothgrad", "intgrad"} <= set(ran)
    if model.has_class_token:
        assert "attention" in ran


@family
def test_attention_map_is_the_cls_row_of_the_family_attention(models, name):
    """Eq. 1 from the adapter equals the family's own attention probabilities (timm's unfused path, or
    nn.MultiheadAttention's averaged weights)."""
    model = build(models, name)
    if not model.has_class_token:
        with pytest.raises(ValueError, match="CLS token"):
            explain(model, images_for(model), [0], method="attention")
        return
    x = images_for(model)
    blk, got = model.last_block, explain(model, x, [0], method="attention").maps[:, 0]
    tolerance = {"rtol": 1e-9, "atol": 1e-12}
    tokens = model.normed_tokens(model.trunk(x))
    if name == "torchvision":
        _, weights = blk.self_attention(tokens, tokens, tokens, need_weights=True, average_attn_weights=True)
        expected = weights[:, 0]
    elif name.startswith("hf-"):  # transformers' eager attention returns its probabilities (softmax in float32)
        tolerance = {"rtol": 1e-6, "atol": 1e-7}
        config = blk.attention.config
        saved, config._attn_implementation = config._attn_implementation, "eager"
        try:
            expected = blk.attention(tokens)[1][:, :, 0].mean(1)
        finally:
            config._attn_implementation = saved
    elif name == "monai-3d":  # SABlock(save_attn=True) keeps its probabilities
        blk.attn.save_attn = True
        try:
            model(x)
            expected = blk.attn.att_mat[:, :, 0].mean(1)
        finally:
            blk.attn.save_attn = False
    else:
        captured = {}
        blk.attn.fused_attn = False
        handle = blk.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.setdefault("p", o))
        try:
            model(x)
        finally:
            handle.remove()
            blk.attn.fused_attn = True
        expected = captured["p"][:, :, 0].mean(1)
    torch.testing.assert_close(got, model.layout().patch_grid(expected), **tolerance)


@family
def test_weights_only_checkpoint_round_trip(models, name, tmp_path):
    model = copy.deepcopy(build(models, name)).float()  # checkpoints rebuild float32 models
    path = model.save(tmp_path / f"{name}.pt")
    torch.load(path, weights_only=True)  # plain tensors and containers only
    loaded = ViTModel.from_checkpoint(path)
    assert loaded.family == model.family and loaded.build == model.build
    x = images_for(model).float()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(explain(loaded, x, [3]).maps, explain(model, x, [3]).maps, rtol=0, atol=0)


@family
def test_bad_input_raises_the_same_clear_errors(models, name):
    model = build(models, name)
    x = images_for(model)
    c, dims = model.in_chans, len(model.default_image_size)
    with pytest.raises(ModelInputError, match=f"{c}-channel"):
        explain(model, torch.cat([x, x], dim=1), [0])
    with pytest.raises(ModelInputError, match=r"\[B, C, H, W\]" if dims == 2 else r"\[B, C, D, H, W\]"):
        explain(model, x[0], [0])
    if model.adapter.strict_image_size:
        with pytest.raises(ModelInputError, match="x".join(["32"] * dims)):
            explain(model, torch.zeros(1, c, *[40] * dims, dtype=torch.float64), [0])
    else:
        with pytest.raises(ModelInputError, match="multiple of the patch size"):
            explain(model, torch.zeros(1, c, 36, 32, dtype=torch.float64), [0])
    with pytest.raises(TargetError, match="out of range"):
        explain(model, x, [7])
    with pytest.raises(TargetError, match="unknown target name"):
        explain(model, x, ["cat"])
    nan = x.clone()
    nan.view(-1)[0] = float("nan")
    with pytest.raises(ModelInputError, match="NaN"):
        explain(model, nan, [0])


def test_rope_model_at_a_non_square_size_uses_its_own_grid(models):
    """DINOv3 takes any multiple of the patch size (dynamic_img_size): RoPE follows the 4 x 6 grid."""
    model = build(models, "dinov3-cls")
    x = images_for(model, size=(32, 48))
    attr = explain(model, x, [0, 3], method="cdam")
    assert attr.maps.shape == (2, 2, 4, 6) and attr.upsample().shape == (2, 2, 32, 48)
    torch.testing.assert_close(attr.maps[:, 1], captum_cdam(model, x, 3), rtol=1e-9, atol=1e-12)
    spec = resolve_targets(model, [0, 3], 2)
    fast, _, _ = cdam_token_scores(model, x, spec, "smooth", n=3, seed=0)
    reference, _, _ = cdam_token_scores(model, x, spec, "smooth", n=3, seed=0, implementation="reference")
    torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-12)


def test_qk_norm_takes_the_reference_path_and_says_so():
    """q/k norms sit between qkv and the logits: no closed form, autograd through the real block instead."""
    model = timm_model("vit_small_patch16_dinov3", global_pool="token", qk_norm=True)
    assert not fast_path_applies(model)
    x = images_for(model)
    torch.testing.assert_close(explain(model, x, [2]).maps[:, 0], captum_cdam(model, x, 2), rtol=1e-9, atol=1e-12)
    spec = resolve_targets(model, [2], 2)
    with pytest.raises(ValueError, match="timm Eva model's is not"):
        cdam_token_scores(model, x, spec, implementation="rows")


def test_torchvision_state_dict_file_loads_weights_only(models, tmp_path):
    """A torchvision ViT state dict (the SWAG files' format) loads with its architecture inferred."""
    model = build(models, "torchvision")
    path = tmp_path / "vit_swag_like.pth"
    torch.save(copy.deepcopy(model.backbone).float().state_dict(), path)
    loaded = ViTModel.from_checkpoint(path, num_heads=4)  # a width the head table does not know
    assert loaded.family == "torchvision VisionTransformer" and loaded.meta["source_format"] == "torchvision"
    assert loaded.build["torchvision_kwargs"] == TORCHVISION
    x = images_for(model)
    torch.testing.assert_close(loaded.double()(x), model(x), rtol=0, atol=0)
    resaved = ViTModel.from_checkpoint(loaded.float().save(tmp_path / "resaved.pt"))
    torch.testing.assert_close(resaved(x.float()), loaded(x.float()), rtol=0, atol=0)


def test_unsupported_module_names_the_families():
    with pytest.raises(TypeError, match="timm VisionTransformer, timm Eva, torchvision VisionTransformer, "
                                        "transformers ViT, transformers DINOv2, MONAI ViT"):
        ViTModel(torch.nn.Linear(3, 3))


def timm_to_hf_vit(model: ViTModel) -> ViTModel:
    """The transformers ``ViTForImageClassification`` twin of a timm ViT: the same weights, ``qkv`` split into
    ``q_proj`` / ``k_proj`` / ``v_proj``."""
    transformers = pytest.importorskip("transformers")
    bb = model.backbone
    config = transformers.ViTConfig(hidden_size=bb.embed_dim, num_hidden_layers=len(bb.blocks),
                                    num_attention_heads=bb.blocks[0].attn.num_heads,
                                    intermediate_size=bb.blocks[0].mlp.fc1.out_features,
                                    image_size=bb.patch_embed.img_size[0],
                                    patch_size=bb.patch_embed.patch_size[0], num_labels=bb.num_classes, qkv_bias=True,
                                    layer_norm_eps=bb.norm.eps, hidden_act="gelu")
    hf = transformers.ViTForImageClassification(config).to(torch.float64)
    sd = {"vit.embeddings.cls_token": bb.cls_token, "vit.embeddings.position_embeddings": bb.pos_embed,
          "vit.embeddings.patch_embeddings.projection.weight": bb.patch_embed.proj.weight,
          "vit.embeddings.patch_embeddings.projection.bias": bb.patch_embed.proj.bias,
          "vit.layernorm.weight": bb.norm.weight, "vit.layernorm.bias": bb.norm.bias,
          "classifier.weight": bb.head.weight, "classifier.bias": bb.head.bias}
    for i, blk in enumerate(bb.blocks):
        out = f"vit.layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = getattr(blk.attn.qkv, part).chunk(3)
            sd |= {out + f"attention.q_proj.{part}": q, out + f"attention.k_proj.{part}": k,
                   out + f"attention.v_proj.{part}": v, out + f"attention.o_proj.{part}": getattr(blk.attn.proj, part),
                   out + f"layernorm_before.{part}": getattr(blk.norm1, part),
                   out + f"layernorm_after.{part}": getattr(blk.norm2, part),
                   out + f"mlp.fc1.{part}": getattr(blk.mlp.fc1, part),
                   out + f"mlp.fc2.{part}": getattr(blk.mlp.fc2, part)}
    hf.load_state_dict(sd, strict=True)
    return ViTModel(hf.eval())


@pytest.mark.parametrize("method", ["cdam", "smooth-cdam", "integrated-cdam", "attention", "gradcam"])
def test_timm_vit_and_its_transformers_twin_give_the_same_maps(models, method):
    timm_vit = build(models, "timm-vit-cls")
    twin = timm_to_hf_vit(timm_vit)
    assert twin.family == "transformers ViT"
    x = images_for(timm_vit)
    torch.testing.assert_close(twin(x), timm_vit(x), rtol=1e-9, atol=1e-12)
    options = {"n": 4, "seed": 0} if method in ("smooth-cdam", "integrated-cdam") else {}
    if method == "integrated-cdam":
        options.pop("seed")
    a, b = explain(timm_vit, x, [0, 5], method=method, **options), explain(twin, x, [0, 5], method=method, **options)
    assert a.maps.abs().amax() > 1e-5
    torch.testing.assert_close(b.maps, a.maps, rtol=1e-9, atol=1e-12)


def test_transformers_model_wraps_and_explains_with_its_own_head():
    """``ViTModel(hf_model)``: the classifier is the head, ``explain()`` uses the exact CLS-row path, and the
    config rebuilds the model (checkpoints hold it as plain data)."""
    model = hf_model("ViTForImageClassification", intermediate_size=96)
    assert cls_row_applies(model) and model.num_outputs == 7 and model.build["transformers_class"] == (
        "ViTForImageClassification")
    x = images_for(model)
    attr = explain(model, x)  # the predicted class
    assert attr.maps.shape == (2, 1, 4, 4)
    torch.testing.assert_close(attr.scores[:, 0], model(x).amax(-1), rtol=1e-9, atol=1e-12)


def test_monai_3d_maps_have_a_token_grid_and_upsample_to_the_volume(models):
    model = build(models, "monai-3d")
    x = images_for(model)
    assert x.shape == (2, 1, 32, 32, 32) and model.layout().grid == (4, 4, 4)
    attr = explain(model, x, [1, 4], method="cdam")
    assert attr.maps.shape == (2, 2, 4, 4, 4) and attr.image_size == (32, 32, 32)
    nearest = attr.upsample()
    assert nearest.shape == (2, 2, 32, 32, 32)
    torch.testing.assert_close(nearest[..., ::8, ::8, ::8], attr.maps, rtol=0, atol=0)  # one value per 8^3 patch
    torch.testing.assert_close(nearest[..., 7::8, 7::8, 7::8], attr.maps, rtol=0, atol=0)
    smooth = attr.upsample("trilinear")
    assert smooth.shape == (2, 2, 32, 32, 32) and not torch.equal(smooth, nearest)
    torch.testing.assert_close(smooth.mean(dim=(2, 3, 4)), attr.maps.mean(dim=(2, 3, 4)), rtol=0.2, atol=1e-3)
    with pytest.raises(ValueError, match="upsample mode"):
        attr.upsample("bicubic")
    # one patch of the volume, and only its token, is what a token's map entry is about: the grid follows the axes
    token = model.layout().patch_grid(torch.arange(model.layout().num_tokens, dtype=torch.float64))
    assert token[1, 2, 3] == 1 + (1 * 16 + 2 * 4 + 3)


def test_monai_3d_concepts_and_the_non_cubic_grid():
    from lidc_cdam import Concept

    model = monai_model()
    x = images_for(model, batch=3)
    concept = Concept.from_images(model, x)
    attr = explain(model, x, concept)
    assert attr.maps.shape == (3, 1, 4, 4, 4) and torch.isfinite(attr.maps).all()
    anisotropic = sharpen(ViTModel.from_monai(**{**MONAI_3D, "img_size": (16, 32, 48)}))
    y = images_for(anisotropic, batch=1)
    attr = explain(anisotropic, y, [2])
    assert attr.maps.shape == (1, 1, 2, 4, 6) and attr.upsample().shape == (1, 1, 16, 32, 48)
    torch.testing.assert_close(attr.maps[:, 0], captum_cdam(anisotropic, y, 2), rtol=1e-9, atol=1e-12)
    from monai.networks.nets import ViT

    with pytest.raises(TypeError, match="classification=True"):
        ViTModel(ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=48, mlp_dim=96, num_layers=1, num_heads=4))


@pytest.mark.parametrize(("name", "one", "nine"), [("timm-vit-cls", "cls_row", "cls_row"),
                                                   ("dinov3-cls", "rows", "rows"),
                                                   ("timm-vit-avg", "reference", "rows"),
                                                   ("eva02", "reference", "rows"),
                                                   ("pe-core", "reference", "rows")])
def test_auto_picks_the_faster_exact_path(models, name, one, nine):
    """``auto``: the CLS row where it applies; the closed form over the pooled rows when the pooling reads one row or
    there are several targets; else autograd through the real block (measured: bench_cdam.py --families)."""
    from lidc_cdam.explain.cdam import auto_implementation

    model = build(models, name)
    tokens = model.layout().num_tokens
    assert (auto_implementation(model, 1, tokens), auto_implementation(model, 9, tokens)) == (one, nine)


@pytest.fixture
def toy_family():
    """The toy family of ``tests/toy_family.py``, registered for one test."""
    register_adapter(ToyAdapter)  # the one registration
    try:
        yield ToyViT
    finally:
        ADAPTERS.remove(ToyAdapter)


def test_a_new_family_is_one_module_and_one_registration(toy_family, tmp_path):
    """Wrapped, explained, saved and loaded back (from our checkpoint and from its plain state dict): same outputs."""
    torch.manual_seed(0)
    model = sharpen(ViTModel(toy_family(**SMALL))).float()
    assert model.family == "toy ViT" and model.build["family"] == "toy"
    x = torch.randn(2, 3, 32, 32)
    loaded = ViTModel.from_checkpoint(model.save(tmp_path / "toy.pt"))
    assert type(loaded.backbone) is toy_family and loaded.build == model.build
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(explain(loaded, x, [3]).maps, explain(model, x, [3]).maps, rtol=0, atol=0)

    torch.save(model.backbone.state_dict(), tmp_path / "toy_state_dict.pth")
    plain = ViTModel.from_checkpoint(tmp_path / "toy_state_dict.pth", num_heads=4)
    assert type(plain.backbone) is toy_family and plain.meta["source_format"] == "toy state dict"
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)


def test_a_saved_spec_of_an_unknown_family_is_named():
    with pytest.raises(CheckpointError, match=r"unknown backbone family 'toy'.*timm, torchvision"):
        build_backbone({"family": "toy"})
