"""Mimetic initialisation of a new ViT's attention (lidc_cdam.train.mimetic_init), and the trainer's
``backbone.init: mimetic``."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from train_helpers import TINY_BACKBONE, toy_config

from lidc_cdam.train.backbones import build_model
from lidc_cdam.train.config import TrainConfigError, config_from_dict
from lidc_cdam.train.mimetic_init import mimetic_init_

DIM, HEADS = 64, 4


def tiny_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             embed_dim=DIM, depth=2, num_heads=HEADS, qkv_bias=True)


def products(block: nn.Module) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each head's ``W_q^h.T @ W_k^h`` and the whole ``W_o @ W_v``."""
    w, e = block.attn.qkv.weight.detach(), DIM // HEADS
    qk = [w[h * e:(h + 1) * e].T @ w[DIM + h * e:DIM + (h + 1) * e] for h in range(HEADS)]
    return qk, block.attn.proj.weight.detach() @ w[2 * DIM:]


def test_query_key_start_as_a_similarity_and_value_output_as_minus_identity():
    model = tiny_vit()
    mimetic_init_(model.blocks, seed=0)
    eye = torch.eye(DIM)
    for block in model.blocks:
        qk, vo = products(block)
        for head in qk:  # rank-e approximation of 0.7 Z + 0.7 I: a positive diagonal, a weak random rest
            assert torch.linalg.matrix_rank(head) == DIM // HEADS
            assert head.diagonal().mean() > 3 * (head - torch.diag(head.diagonal())).abs().mean()
            x = torch.randn(500, DIM)  # so a token's score with itself starts positive
            assert float(((x @ head) * x).sum(1).gt(0).float().mean()) > 0.9
        # full rank: W_o W_v is exactly 0.4 Z - 0.4 I, Z of standard deviation 1 / sqrt(d)
        assert float(vo.diagonal().mean()) == pytest.approx(-0.4, abs=0.05)
        rest = (vo + 0.4 * eye)[~eye.bool()]
        assert float(rest.std()) == pytest.approx(0.4 / DIM ** 0.5, rel=0.1)
    # a plain timm initialisation has nothing of the kind
    qk, vo = products(tiny_vit().blocks[0])
    assert abs(float(vo.diagonal().mean())) < 0.05


def test_the_seed_decides_and_the_rest_of_the_model_is_untouched():
    a, b, c = tiny_vit(), tiny_vit(), tiny_vit()
    b.load_state_dict(a.state_dict())
    before = {k: v.clone() for k, v in a.state_dict().items()}
    mimetic_init_(a.blocks, seed=3)
    mimetic_init_(b.blocks, seed=3)
    mimetic_init_(c.blocks, seed=4)
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"blocks.{i}.attn.{p}.weight" for i in range(2) for p in ("qkv", "proj")}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert torch.isfinite(a(torch.randn(2, 3, 32, 32))).all()


def test_attention_without_a_fused_qkv_is_refused():
    block = nn.Module()
    block.attn = nn.MultiheadAttention(8, 2)
    with pytest.raises(TypeError, match="fused qkv linear; block 0 has MultiheadAttention"):
        mimetic_init_([block])


def test_the_trainer_builds_a_mimetic_vit_and_refuses_it_for_weights_it_loads():
    config = toy_config(backbone={**TINY_BACKBONE, "init": "mimetic"}, seed=5)
    model = build_model(config, ["malignant"])
    plain = build_model(toy_config(), ["malignant"])
    w = model.backbone.blocks[0].attn.qkv.weight.detach()  # TINY_BACKBONE: 32 wide
    vo = model.backbone.blocks[0].attn.proj.weight.detach() @ w[64:]
    assert float(vo.diagonal().mean()) == pytest.approx(-0.4, abs=0.1)
    w0 = plain.backbone.blocks[0].attn.qkv.weight.detach()
    assert abs(float((plain.backbone.blocks[0].attn.proj.weight.detach() @ w0[64:]).diagonal().mean())) < 0.1
    again = build_model(toy_config(backbone={**TINY_BACKBONE, "init": "mimetic"}, seed=5), ["malignant"])
    assert torch.equal(again.backbone.blocks[1].attn.qkv.weight, model.backbone.blocks[1].attn.qkv.weight)
    base = {"name": "x", "task": "malignancy", "data": {"root": "d"}}
    for backbone, message in [({**TINY_BACKBONE, "init": "xavier"}, "backbone.init must be one of"),
                              ({"name": "vit_small_patch16_224", "checkpoint": "w.pth", "init": "mimetic"},
                               "trained from scratch")]:
        with pytest.raises(TrainConfigError, match=message):
            config_from_dict({**base, "backbone": backbone}, "x.yaml")
