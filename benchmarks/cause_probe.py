"""Which model can read a rendered cause from the phantoms? A probe for issue 22.

Trains a small model from scratch on one fold of a phantom folder (``lidc-cdam phantoms``) for one target (or all
eight) and prints the held-out R^2, also for nodules under and over 10 mm. The model sees the central slice as the
trainer does (:func:`lidc_cdam.data.lidc.model_input.plane_input`, a random slice 14-18 and rotation when
training), or, with ``--input mask`` / ``body``, the rendered nodule's mask (with / without its spikes) as a
clean silhouette: what a model could read if nothing else were in the image.

    python benchmarks/cause_probe.py --data ph4 --model cnn --target sphericity
    python benchmarks/cause_probe.py --data ph4 --model vit --target all --input body
    python benchmarks/cause_probe.py --data ph5 --model vit --pool avgmax --vit-init mimetic --epochs 100

``cnn``: four blocks of two 3x3 convolutions (16-64 channels, batch norm, max pooling), average pooling, a
linear layer. ``vit``: the tiny preset's ViT (64 wide, ``--depth`` 2 blocks, 4 heads, patch 4 on 64 px), pooled by
``--pool`` (average by default), its attention initialised by timm or ``--vit-init mimetic``
(:mod:`lidc_cdam.train.mimetic_init`). Both AdamW (lr 1e-3, weight decay 0.05), cosine schedule, batch 16, one
thread by default. The results of issue 22 are in ``benchmarks/results/train-phantoms/issue22-experiments.md``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn

from lidc_cdam.data.lidc.datasets import lidc_datasets
from lidc_cdam.data.lidc.model_input import CENTRE, TRAIN_SLICES, plane_input
from lidc_cdam.data.lidc.nodules import BIOMARKERS
from lidc_cdam.train.mimetic_init import mimetic_init_

INPUTS = ("image", "mask", "body")
SIZE = 64
PARENCHYMA_HU = -850.0


def cnn(outputs: int) -> nn.Module:
    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, outputs))


def vit(outputs: int, depth: int = 2, pool: str = "avg", init: str = "timm", seed: int = 0) -> nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=outputs, img_size=SIZE,
                              patch_size=4, embed_dim=64, depth=depth, num_heads=4, mlp_ratio=2.0, qkv_bias=True,
                              global_pool=pool)
    if init == "mimetic":
        mimetic_init_(model.blocks, seed=seed)
    return model


def slices(root: str, table: pd.DataFrame, indices: range | list[int], what: str, stats) -> torch.Tensor:
    """``[nodules, len(indices), 3, SIZE, SIZE]``: the model input of each nodule's slices."""
    out = []
    for rel in table["crop_path"]:
        with np.load(f"{root}/{rel}") as crop:
            image = crop["image"].astype(np.float32)
            if what != "image":
                inside = crop["mask"].astype(bool)
                if what == "body":
                    inside &= ~crop["cause_spiculation"].astype(bool)
                image = np.where(inside, 0.0, PARENCHYMA_HU).astype(np.float32)
        planes = np.stack([image[i] for i in indices])[:, None]
        out.append(plane_input(planes, {"mean": stats.mean, "std": stats.std}, SIZE))
    return torch.as_tensor(np.stack(out))


def r_squared(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        p = torch.cat([model(x[i:i + 128]) for i in range(0, len(x), 128)])
    return (1 - ((p - y) ** 2).mean(0) / ((y - y.mean(0)) ** 2).mean(0).clamp_min(1e-12)).numpy()


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a lidc-cdam phantoms folder")
    parser.add_argument("--model", choices=("cnn", "vit"), default="cnn")
    parser.add_argument("--target", default="sphericity", help=f"one of {list(BIOMARKERS)}, or all")
    parser.add_argument("--input", choices=INPUTS, default="image")
    parser.add_argument("--epochs", type=int, default=35)
    parser.add_argument("--depth", type=int, default=2, help="the ViT's blocks")
    parser.add_argument("--pool", choices=("avg", "max", "avgmax", "token"), default="avg", help="the ViT's pooling")
    parser.add_argument("--vit-init", choices=("timm", "mimetic"), default="timm", help="the ViT's attention")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--folds", default=None, help="a folds CSV (nodule_id,fold); default the committed folds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    targets = list(BIOMARKERS) if args.target == "all" else [args.target]
    if any(t not in BIOMARKERS for t in targets):
        parser.error(f"--target must be one of {list(BIOMARKERS)} or all, got {args.target!r}")
    columns = [BIOMARKERS.index(t) for t in targets]
    parts = lidc_datasets(args.data, fold=args.fold, task="regression", size=SIZE, folds=args.folds)
    stats, tables = parts["stats"], parts["tables"]

    def standardised(table: pd.DataFrame) -> torch.Tensor:
        bio = (table[list(BIOMARKERS)].to_numpy(float) - stats.biomarker_mean) / stats.biomarker_std
        return torch.as_tensor(bio[:, columns], dtype=torch.float32)

    jitter = range(TRAIN_SLICES[0], TRAIN_SLICES[1] + 1)
    x_train = slices(args.data, tables["train"], jitter, args.input, stats)
    y_train = standardised(tables["train"])
    held_out = {name: (slices(args.data, tables[name], [CENTRE], args.input, stats)[:, 0], standardised(tables[name]))
                for name in ("val", "test")}
    model = (cnn(len(columns)) if args.model == "cnn"
             else vit(len(columns), args.depth, args.pool, args.vit_init, args.seed))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.epochs)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), 16):
            batch = order[i:i + 16]
            pick = torch.randint(0, len(jitter), (len(batch),), generator=generator)
            x = torch.rot90(x_train[batch, pick], int(torch.randint(0, 4, (), generator=generator)), (2, 3))
            loss = ((model(x) - y_train[batch]) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
        if epoch % 5 == 0 or epoch == args.epochs:
            shown = {name: [round(float(v), 2) for v in r_squared(model, *xy)] for name, xy in held_out.items()}
            print(f"epoch {epoch} ({time.time() - start:.0f} s): R^2 val {shown['val']} test {shown['test']}",
                  flush=True)
    result = {"targets": targets, "test": r_squared(model, *held_out["test"]).tolist()}
    diameter = torch.tensor(tables["test"]["diameter_mm"].to_numpy(float))
    for name, keep in (("test_under_10mm", diameter < 10), ("test_10mm_up", diameter >= 10)):
        x, y = held_out["test"]
        result[name] = r_squared(model, x[keep], y[keep]).tolist() if int(keep.sum()) > 1 else []
    print(f"{args.model} on the {args.input}, fold {args.fold}, {args.epochs} epochs: held-out R^2 " + ", ".join(
        f"{t} {v:.2f}" for t, v in zip(targets, result["test"], strict=True))
          + f" (under 10 mm {[round(v, 2) for v in result['test_under_10mm']]}, "
            f"10 mm up {[round(v, 2) for v in result['test_10mm_up']]})")
    return result


if __name__ == "__main__":
    main()
