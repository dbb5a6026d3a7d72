"""Loading model files: our checkpoints, DINO / DINOv2 files, timm state dicts, unsafe files."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from lidc_cdam.models.heads import LinearHead
from lidc_cdam.models.loading import (
    CheckpointError,
    PretrainedWeightsUnavailable,
    from_timm,
    load_model,
)
from lidc_cdam.models.vit import ViTModel

TINY = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=0)
# DINOv2-with-registers layout (timm's vit_*_reg4_dinov2), 3x3 patch grid
TINY_REG = dict(img_size=42, patch_size=14, embed_dim=192, depth=2, num_heads=3, num_classes=0,
                reg_tokens=4, no_embed_class=True, init_values=1e-5)


def _exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere (layer-scale gammas start at 1e-5, tokens near zero)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def _images(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def _same_outputs(loaded: ViTModel, ref: VisionTransformer, size: int) -> None:
    x = _images(size)
    with torch.no_grad():
        _exact(loaded.backbone.forward_features(x), ref.forward_features(x))
        _exact(loaded.latent(x), ViTModel(ref).latent(x))


def _dino_head(prefix: str, dim: int = 192) -> dict[str, torch.Tensor]:
    """A dummy DINO projection head (must be dropped by the loader)."""
    return {
        f"{prefix}head.mlp.0.weight": torch.randn(64, dim),
        f"{prefix}head.mlp.0.bias": torch.randn(64),
        f"{prefix}head.mlp.2.weight": torch.randn(16, 64),
        f"{prefix}head.last_layer.weight_g": torch.ones(100, 1),
        f"{prefix}head.last_layer.weight_v": torch.randn(100, 16),
    }


def _to_official_dinov2(timm_sd: dict[str, torch.Tensor], cls_pos: torch.Tensor) -> dict:
    """Inverse of timm's ``_convert_dinov2`` for a model with registers."""
    sd = dict(timm_sd)
    official = {
        "register_tokens": sd.pop("reg_token"),
        "cls_token": sd.pop("cls_token") - cls_pos,
        "pos_embed": torch.cat([cls_pos, sd.pop("pos_embed")], dim=1),
        "mask_token": torch.zeros(1, cls_pos.shape[-1]),
    }
    official.update(sd)
    return official


# ----------------------------------------------------------------------------- formats
def test_dino_backbone_state_dict(tmp_path: Path) -> None:
    ref = _randomize(VisionTransformer(**TINY))
    path = tmp_path / "dino_deittiny8_pretrain.pth"
    torch.save(ref.state_dict(), path)

    model = load_model(path)
    assert model.task == "features" and model.num_outputs == 0
    assert model.build["timm_name"] is None
    kw = model.build["timm_kwargs"]
    assert (kw["img_size"], kw["patch_size"], kw["embed_dim"], kw["depth"], kw["num_heads"]) == (
        32, 8, 192, 2, 3)
    assert kw["mlp_ratio"] == 4.0 and kw["qkv_bias"] is True
    _same_outputs(model, ref, 32)

    # re-saved in our format, it loads back the same
    resaved = load_model(model.save(tmp_path / "ours.pt"))
    _same_outputs(resaved, ref, 32)
    assert resaved.meta["source_format"] == "dino/timm backbone"


def test_dino_training_checkpoint_takes_teacher(tmp_path: Path) -> None:
    teacher = _randomize(VisionTransformer(**TINY))
    student = _randomize(VisionTransformer(**TINY))
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    **_dino_head("")},
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **_dino_head("module.")},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=8, local_crops_scale=(0.05, 0.4)),
        "dino_loss": {"center": torch.zeros(1, 100)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)

    model = load_model(path)
    assert model.meta["source_format"] == "dino-training (teacher)"
    assert not any(k.startswith("head.") for k in model.backbone.state_dict())
    _same_outputs(model, teacher, 32)


def test_dino_student_only_with_module_prefix(tmp_path: Path) -> None:
    student = _randomize(VisionTransformer(**TINY))
    sd = {f"module.backbone.{k}": v for k, v in student.state_dict().items()}
    torch.save({"student": {**sd, **_dino_head("module.")}}, tmp_path / "s.pth")
    _same_outputs(load_model(tmp_path / "s.pth"), student, 32)


def test_dinov2_with_registers(tmp_path: Path) -> None:
    ref = _randomize(VisionTransformer(**TINY_REG))
    with torch.no_grad():  # dyadic values: (cls - cls_pos) + cls_pos is exact in float32
        ref.cls_token.copy_(torch.randint(-64, 64, ref.cls_token.shape) / 64)
    cls_pos = torch.randint(-64, 64, (1, 1, 192)) / 64
    assert cls_pos.abs().sum() > 0
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(_to_official_dinov2(ref.state_dict(), cls_pos), path)

    model = load_model(path)
    kw = model.build["timm_kwargs"]
    assert kw["reg_tokens"] == 4 and kw["no_embed_class"] is True and kw["img_size"] == 42
    assert kw["init_values"] == 1e-5 and kw["patch_size"] == 14
    assert model.num_prefix_tokens == 5 and model.meta["source_format"] == "dinov2"
    _same_outputs(model, ref, 42)

    # the same weights as a plain timm state dict (3x3 grid: 9 pos tokens, 4 registers)
    torch.save(ref.state_dict(), tmp_path / "timm_reg.pth")
    _same_outputs(load_model(tmp_path / "timm_reg.pth"), ref, 42)

    # an explicit timm architecture instead of the inference
    named = load_model(path, arch="vit_small_patch14_reg4_dinov2", embed_dim=192, num_heads=3,
                       depth=2, img_size=42)
    assert named.build["timm_name"] == "vit_small_patch14_reg4_dinov2"
    _same_outputs(named, ref, 42)


def test_dinov2_swiglu_without_registers(tmp_path: Path) -> None:
    """DINOv2 giant layout (fused SwiGLU ``mlp.w12`` / ``mlp.w3``), shrunk."""
    ref = _randomize(timm.create_model("vit_giant_patch14_dinov2", embed_dim=48, num_heads=2,
                                       depth=1, img_size=28, num_classes=0))
    sd = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v
          for k, v in ref.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 48)
    torch.save(sd, tmp_path / "dinov2_giant.pth")

    model = load_model(tmp_path / "dinov2_giant.pth", num_heads=2)
    assert model.build["timm_name"] == "vit_giant_patch14_dinov2"
    _same_outputs(model, ref, 28)


def test_lidc_cdam_checkpoint_roundtrip(tmp_path: Path) -> None:
    names = ["subtlety", "margin", "malignancy"]
    model = ViTModel.from_config({k: v for k, v in TINY.items() if k != "num_classes"},
                                 head_outputs=3, task="regression", output_names=names,
                                 meta={"mean": [0.5], "std": [0.25]})
    _randomize(model)
    path = model.save(tmp_path / "model.pt", meta={"fold": 2})

    loaded = load_model(path)
    assert isinstance(loaded.head, LinearHead) and loaded.head.out_features == 3
    assert loaded.task == "regression" and loaded.output_names == names
    assert loaded.meta == {"mean": [0.5], "std": [0.25], "fold": 2}
    x = _images(32)
    with torch.no_grad():
        _exact(loaded(x), model(x))
        _exact(loaded.latent(x), model.latent(x))
    assert ViTModel.from_checkpoint(path).output_names == names


def test_from_timm_with_local_checkpoint(tmp_path: Path) -> None:
    small = dict(img_size=32, patch_size=8, depth=2, num_classes=0)
    ref = _randomize(timm.create_model("vit_tiny_patch16_224", **small))
    torch.save({"model": ref.state_dict()}, tmp_path / "w.pth")

    model = ViTModel.from_timm("vit_tiny_patch16_224", checkpoint=tmp_path / "w.pth", **small)
    assert model.build == {"timm_name": "vit_tiny_patch16_224", "timm_kwargs": small}
    _same_outputs(model, ref, 32)
    _same_outputs(load_model(model.save(tmp_path / "ours.pt")), ref, 32)

    # a DINO training checkpoint and our own format go into a timm model too
    teacher = {**{f"backbone.{k}": v for k, v in ref.state_dict().items()}, **_dino_head("")}
    torch.save({"teacher": teacher, "epoch": 1}, tmp_path / "dino.pth")
    _same_outputs(from_timm("vit_tiny_patch16_224", checkpoint=tmp_path / "dino.pth", **small),
                  ref, 32)
    _same_outputs(from_timm("vit_tiny_patch16_224", checkpoint=tmp_path / "ours.pt", **small),
                  ref, 32)


def test_pos_embed_resampled_to_requested_size(tmp_path: Path) -> None:
    torch.save(_randomize(VisionTransformer(**TINY)).state_dict(), tmp_path / "w.pth")
    model = load_model(tmp_path / "w.pth", img_size=48)
    assert model.default_image_size == (48, 48)
    assert model.latent(_images(48)).shape == (2, 192)


# ----------------------------------------------------------------------------- arch inference
def test_unknown_width_needs_num_heads(tmp_path: Path) -> None:
    ref = _randomize(VisionTransformer(img_size=16, patch_size=8, embed_dim=96, depth=1,
                                       num_heads=4, num_classes=0))
    torch.save(ref.state_dict(), tmp_path / "w96.pth")
    with pytest.raises(CheckpointError, match=r"num_heads") as info:
        load_model(tmp_path / "w96.pth")
    assert "w96.pth" in str(info.value) and "96" in str(info.value)

    model = load_model(tmp_path / "w96.pth", num_heads=4)
    assert model.build["timm_kwargs"]["num_heads"] == 4
    _same_outputs(model, ref, 16)


def test_timm_state_dict_with_classifier(tmp_path: Path) -> None:
    ref = _randomize(VisionTransformer(**{**TINY, "num_classes": 5}))
    torch.save(ref.state_dict(), tmp_path / "cls.pth")
    model = load_model(tmp_path / "cls.pth")
    assert model.task == "classification" and model.num_outputs == 5
    x = _images(32)
    with torch.no_grad():
        _exact(model(x), ref(x))


# ----------------------------------------------------------------------------- bad files
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickling ran code"))


def test_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    sd = VisionTransformer(**TINY).state_dict()
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "extra": _RunsCode(marker)}, path)

    for load in (load_model, lambda p: from_timm("vit_tiny_patch16_224", checkpoint=p,
                                                 img_size=32, patch_size=8, depth=2)):
        with pytest.raises(CheckpointError, match="refused") as info:
            load(path)
        assert str(path) in str(info.value)
    assert not marker.exists()


def test_truncated_garbage_and_missing_files(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    torch.save(VisionTransformer(**TINY).state_dict(), good)
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pth").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "text.pth").write_text("not a checkpoint\n" * 20)

    for name in ("truncated.pth", "garbage.pth", "text.pth"):
        with pytest.raises(CheckpointError, match="not a readable") as info:
            load_model(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        from_timm("vit_tiny_patch16_224", checkpoint=tmp_path / "missing.pth", img_size=32,
                  patch_size=8, depth=2)


def test_wrong_shapes(tmp_path: Path) -> None:
    sd = VisionTransformer(**TINY).state_dict()
    sd["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"][:100]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth.*do not fit"):
        load_model(tmp_path / "bad.pth")

    # a ViT-Ti file into a wider timm model
    torch.save(VisionTransformer(**TINY).state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match=r"tiny\.pth"):
        from_timm("vit_small_patch16_224", checkpoint=tmp_path / "tiny.pth", img_size=32,
                  patch_size=8, depth=2, num_classes=0)

    # our format with a tampered tensor
    model = ViTModel.from_config({k: v for k, v in TINY.items() if k != "num_classes"},
                                 head_outputs=2)
    path = model.save(tmp_path / "ours.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.1.weight"] = torch.zeros(7, 192)
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"ours\.pt"):
        load_model(path)


def test_unrecognised_contents(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "notes": "hello"}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="understood formats") as info:
        load_model(tmp_path / "odd.pth")
    assert "odd.pth" in str(info.value)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "mlp.pth")
    with pytest.raises(CheckpointError, match="understood formats"):
        load_model(tmp_path / "mlp.pth")


# ----------------------------------------------------------------------------- from_timm
def test_pretrained_offline_gives_clear_error() -> None:
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:  # would retry the network for ~1 minute
        pytest.skip("HF_HUB_OFFLINE is not set")
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        ViTModel.from_timm("vit_tiny_patch16_224", pretrained=True)
    msg = str(info.value)
    assert "vit_tiny_patch16_224" in msg and "checkpoint=PATH" in msg and "--checkpoint" in msg
    assert isinstance(info.value, CheckpointError)


def test_non_vit_timm_model_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="VisionTransformer"):
        from_timm("resnet18", num_classes=0)
