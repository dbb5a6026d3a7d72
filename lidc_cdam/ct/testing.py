"""Test helpers for :mod:`lidc_cdam.ct` and the viewer (their tests, the docs screenshot, the viewer benchmark):
the synthetic scan and tiny random checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from lidc_cdam.ct.crop import read_crop
from lidc_cdam.ct.inputs import VIEWS, model_inputs
from lidc_cdam.ct.synthetic import synthetic_data
from lidc_cdam.data.lidc.nodules import BIOMARKERS as _BIOMARKERS
from lidc_cdam.models.loading import load_model, save_checkpoint
from lidc_cdam.models.trust import fit_trust, model_latents
from lidc_cdam.models.vit import ViTModel

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
STATS = {"mean": -700.0, "std": 300.0, "view": "axial", "image_size": 32, "hu_clip": [-1000, 400]}
BIOMARKERS = list(_BIOMARKERS)


@functools.cache
def synthetic() -> dict[str, Path]:
    """The synthetic scan in the lidc-cdam cache (tests: the session's LIDC_CDAM_CACHE), as the sample data uses it."""
    return synthetic_data()


def tiny_checkpoint(path: Path, task: str = "malignancy", seed: int = 0, **timm_kwargs) -> Path:
    """A random tiny LIDC model: malignancy (1 logit) or the eight biomarkers (standardised outputs)."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **timm_kwargs}
    stats = {**STATS, "image_size": kwargs["img_size"]}
    if task == "malignancy":
        model = ViTModel.from_config(kwargs, head_outputs=1, task="classification", output_names=["malignant"],
                                     meta={"input_stats": stats, "task": "malignancy"})
    else:
        model = ViTModel.from_config(kwargs, head_outputs=8, task="regression", output_names=BIOMARKERS,
                                     meta={"input_stats": stats, "task": "biomarkers", "target_stats": {
                                         "names": BIOMARKERS, "mean": [3.0] * 7 + [10.0], "std": [1.0] * 7 + [5.0]}})
    with torch.no_grad():  # sharper attention, larger outputs: maps with both signs
        for blk in model.backbone.blocks:
            blk.attn.qkv.weight.mul_(4.0)
        model.head[1].weight.mul_(10.0)
    return save_checkpoint(model, path)


def tiny_3d_checkpoint(path: Path, task: str = "malignancy", seed: int = 0) -> Path:
    """A random tiny 3D LIDC model (MONAI ViT on the whole 32^3 crop, 8^3 patches, view ``"3d"``)."""
    torch.manual_seed(seed)
    stats = {**STATS, "view": "3d", "image_size": 32}
    kwargs = dict(in_channels=1, img_size=(32, 32, 32), patch_size=(8, 8, 8), hidden_size=32, mlp_dim=64,
                  num_layers=2, num_heads=2)
    if task == "malignancy":
        model = ViTModel.from_monai(head_outputs=1, task="classification", **kwargs)
        model.output_names, model.meta = ["malignant"], {"input_stats": stats, "task": "malignancy"}
    else:
        model = ViTModel.from_monai(head_outputs=8, task="regression", **kwargs)
        model.output_names = BIOMARKERS
        model.meta = {"input_stats": stats, "task": "biomarkers", "target_stats": {
            "names": BIOMARKERS, "mean": [3.0] * 7 + [10.0], "std": [1.0] * 7 + [5.0]}}
    with torch.no_grad():  # sharper attention, larger outputs: maps with both signs
        for blk in model.backbone.blocks:
            blk.attn.qkv.weight.mul_(4.0)
        model.head[1].weight.mul_(10.0)
    return save_checkpoint(model, path)


def digits_checkpoint(path: Path) -> Path:
    """A checkpoint for another task: ten digit classes."""
    torch.manual_seed(0)
    model = ViTModel.from_config(TINY, head_outputs=10, task="classification",
                                 output_names=[str(i) for i in range(10)])
    return save_checkpoint(model, path)


def phantom_inputs(image_size: int = 32):
    """Model inputs of every slice, in all three views, of the synthetic scan's nodule crops (a phantom
    "training set" for the trust statistics of tiny test models)."""
    crops = sorted((synthetic()["crops_dir"] / "crops").glob("*.npz"))
    parts = [model_inputs(read_crop(c)["image"], view, list(range(32)), {**STATS, "image_size": image_size},
                          image_size) for c in crops for view in VIEWS]
    if not parts:
        raise FileNotFoundError(f"no crops in {synthetic()['crops_dir'] / 'crops'}")
    return torch.cat(parts)


def fold_checkpoints(folder: Path, n: int = 5, task: str = "malignancy", trust: bool = True) -> list[Path]:
    """``n`` tiny random "folds" of one task (seeds 0..n-1); with ``trust``, each carries trust statistics fitted on
    the latents of the synthetic phantom crops (:func:`phantom_inputs`), as training stores them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [tiny_checkpoint(folder / f"{task}-fold{k}.pt", task=task, seed=k + (0 if task == "malignancy" else 10))
             for k in range(n)]
    if trust:
        x = phantom_inputs()
        for p in paths:
            model = load_model(p)
            save_checkpoint(model, p, meta={"trust": fit_trust(model_latents(model, x))})
    return paths
