"""The device policy (lidc_cdam.device) and the CUDA-only failures it guards against, checked on the CPU:
every tensor -> NumPy conversion goes through the host, device specs resolve or fail clearly, memory
budgets follow the GPU's free memory."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_device import CUDA_NUMPY_ERROR, fake_cuda

from lidc_cdam.device import DeviceError, memory_budget, resolve_device, to_numpy

LIBRARY = Path(__file__).resolve().parents[1] / "lidc_cdam"
#: files allowed to convert without ``.cpu()`` (none: the CT path's maps go through the host too)
PENDING: set[str] = set()


def _receivers(node: ast.expr):
    while isinstance(node, ast.Call | ast.Attribute | ast.Subscript):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            yield node.func.attr
            node = node.func.value
        elif isinstance(node, ast.Call):
            node = node.func
        else:
            node = node.value


def numpy_without_cpu(path: Path) -> list[int]:
    """Lines of ``x.numpy()`` calls whose chain has no ``.cpu()``: a TypeError when ``x`` is on a GPU."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy"
                and not any(kw.arg == "force" for kw in node.keywords)
                and "cpu" not in set(_receivers(node.func.value))):
            bad.append(node.lineno)
    return bad


def test_every_tensor_to_numpy_conversion_goes_through_the_host():
    found = {str(p.relative_to(LIBRARY)): numpy_without_cpu(p) for p in sorted(LIBRARY.rglob("*.py"))}
    bad = {f: lines for f, lines in found.items() if lines and f not in PENDING}
    assert not bad, f".numpy() without .cpu() (fails on CUDA tensors): {bad}"


def test_the_fake_cuda_tensor_fails_as_cuda_does():
    x = fake_cuda(torch.arange(4.0))
    assert x.device.type == "cuda" and (x * 2).device.type == "cuda"
    with pytest.raises(TypeError, match="cuda"):
        x.numpy()
    with pytest.raises(TypeError, match="cuda"):
        np.asarray(x)
    assert type(x.cpu()) is torch.Tensor and to_numpy(x * 2).tolist() == [0, 2, 4, 6]
    assert CUDA_NUMPY_ERROR.startswith("can't convert")


def test_randomization_similarities_take_device_maps():
    from lidc_cdam.evaluate.randomization import _spearman, ssim

    a, b = torch.rand(7, 7, generator=torch.Generator().manual_seed(0)), torch.rand(7, 7)
    assert _spearman(fake_cuda(a), fake_cuda(b)) == pytest.approx(_spearman(a, b))
    assert ssim(fake_cuda(a), fake_cuda(b)) == pytest.approx(ssim(a, b))


def test_cascading_randomization_with_maps_on_a_device(monkeypatch):
    """The benchmark's and the cohort's finish() run this on the GPU's maps (issue 23, defect 1)."""
    import lidc_cdam.evaluate.randomization as randomization
    from lidc_cdam.explain.api import explain as real_explain
    from lidc_cdam.models.vit import ViTModel

    def explain_on_device(*args, **kwargs):
        attribution = real_explain(*args, **kwargs)
        attribution.maps = fake_cuda(attribution.maps)
        return attribution

    monkeypatch.setattr(randomization, "explain", explain_on_device)
    import timm

    torch.manual_seed(0)
    model = ViTModel(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                       depth=2, num_classes=3)).eval()
    rows = randomization.cascading_randomization(model, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]),
                                                 ["cdam", "attention"], n_blocks=1)
    assert len(rows) == 4 and all(np.isfinite(r["ssim"]) for r in rows)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(DeviceError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(DeviceError, match="only cpu and cuda"):
        resolve_device("meta")


def test_resolve_device_without_enough_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1) == resolve_device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_memory_budget_follows_the_gpus_free_memory(monkeypatch):
    assert memory_budget(torch.device("cpu"), 2**30) == 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 140 * 2**30))
    assert memory_budget(torch.device("cuda", 0), 2**30) == int(0.4 * 100 * 2**30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 140 * 2**30))
    assert memory_budget(torch.device("cuda", 0), 2**30) == 2**30  # never below the CPU size


def test_a_forward_pass_on_a_device_does_not_wait_for_it():
    """The NaN check of every forward pass was a host sync on a GPU (training steps, metric batches)."""
    import timm
    from fake_device import FakeCudaTensor

    from lidc_cdam.models.vit import ModelInputError, ViTModel

    model = ViTModel(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                                       num_classes=2))
    FakeCudaTensor.syncs.clear()
    model(fake_cuda(torch.randn(2, 3, 32, 32))).sum().backward()
    assert FakeCudaTensor.syncs == []
    with pytest.raises(ModelInputError, match="NaN"):  # still checked on the CPU
        model(torch.full((1, 3, 32, 32), float("nan")))
