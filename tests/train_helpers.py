"""A small learnable nodule-like task for the trainer's tests: 32 px images where malignant items
carry a brighter upper-left quadrant, eight "biomarkers" that depend on the blob, ids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from lidc_cdam.train.config import config_from_dict
from lidc_cdam.train.cross_validation import BIOMARKERS
from lidc_cdam.train.engine import FoldData

TINY_BACKBONE = {"random_init": True,
                 "timm_kwargs": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, qkv_bias=True)}


class ToyNodules(Dataset):
    def __init__(self, n: int = 100, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.label = (torch.rand(n, generator=g) > 0.5).float()
        self.size = self.label + 0.5 * torch.rand(n, generator=g)
        self.image = torch.randn(n, 3, 32, 32, generator=g)
        self.image[:, :, :16, :16] += 1.5 * self.size.view(-1, 1, 1, 1)
        self.biomarkers = torch.stack([self.size * (k + 1) / 8 + 0.1 * torch.randn(n, generator=g)
                                       for k in range(8)], 1)
        self.ids = [f"toy{i:03d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, i: int, task: str) -> dict:
        target = self.label[i : i + 1] if task == "malignancy" else self.biomarkers[i]
        return {"image": self.image[i], "target": target, "nodule_id": self.ids[i]}

    def table(self) -> pd.DataFrame:
        frame = pd.DataFrame({"nodule_id": self.ids, "label": self.label.int().numpy()})
        for k, name in enumerate(BIOMARKERS):
            frame[name] = self.biomarkers[:, k].numpy()
        return frame

    def split(self, fold: int) -> dict[str, list[str]]:
        fold_of = np.arange(len(self)) % 5
        val = (fold + 1) % 5
        return {"test": [i for i, f in zip(self.ids, fold_of, strict=True) if f == fold],
                "val": [i for i, f in zip(self.ids, fold_of, strict=True) if f == val],
                "train": [i for i, f in zip(self.ids, fold_of, strict=True) if f not in (fold, val)]}


class _Part(Dataset):
    def __init__(self, toy: ToyNodules, ids: list[str], task: str) -> None:
        self.toy, self.index, self.task = toy, [toy.ids.index(i) for i in ids], task

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        return self.toy.item(self.index[k], self.task)


def fold_data(toy: ToyNodules, fold: int, task: str = "malignancy") -> FoldData:
    parts = toy.split(fold)
    names = ["malignant"] if task == "malignancy" else list(BIOMARKERS)
    return FoldData(_Part(toy, parts["train"], task), _Part(toy, parts["val"], task), names, fold,
                    test=_Part(toy, parts["test"], task), input_stats={"mean": 0.0, "std": 1.0})


def toy_config(**changes):
    data = {"name": "toy", "task": "malignancy", "backbone": TINY_BACKBONE, "data": {"root": "unused"},
            "epochs": 4, "batch_size": 16, "lr": 1e-3, "schedule": {"type": "exponential", "gamma": 0.9},
            "amp": False, **changes}
    return config_from_dict(data, "toy.yaml")


MONAI_3D_TINY = {"img_size": [16, 16, 16], "patch_size": [8, 8, 8], "hidden_size": 32, "mlp_dim": 64,
                 "num_layers": 2, "num_heads": 2}


class ToyVolumes(ToyNodules):
    """The same task in 3D: 1-channel 16^3 volumes, malignant ones brighter in one octant."""

    def __init__(self, n: int = 60, seed: int = 0) -> None:
        super().__init__(n, seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.image = torch.randn(n, 1, 16, 16, 16, generator=g)
        self.image[:, :, :8, :8, :8] += 1.5 * self.size.view(-1, 1, 1, 1, 1)


def toy_config_3d(**changes):
    return toy_config(backbone={"random_init": True, "monai_kwargs": MONAI_3D_TINY},
                      data={"root": "unused", "view": "3d", "image_size": 16}, **changes)
