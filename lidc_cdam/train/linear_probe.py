"""ImageNet linear probe on a frozen ViT backbone (docs/method.md, "Data": the paper's classifier).

The paper explains a frozen DINO ViT-S/8 with ``Linear(384, 1000)`` on CLS' (the CLS token after the
final norm), trained with RandomResizedCrop 224 + horizontal flip, Adam (lr 3e-4), batch 128, 10 epochs
(77.0 % top-1). :func:`train_linear_probe` does that for any backbone :func:`~lidc_cdam.models.loading.load_model`
or :func:`~lidc_cdam.models.loading.from_timm` gives, reading a training folder in the synset layout
(``train/n01440764/*.JPEG``). Labels follow timm's ImageNet class order (the sorted WordNet ids, the
standard ImageNet-1k indices); ``classes="folders"`` trains on the folders present only (small runs, tests).

* The backbone is frozen and in eval mode; only the head learns. Its weights start as in DINO's linear
  evaluation (normal, std 0.01; bias 0).
* ``augment=False`` replaces the augmentation by the evaluation preprocessing (resize to the model's
  input size, ImageNet mean/std); with ``cache_features=True`` the latents are then computed once and
  the head trains on them (in memory: 1.28 M x 384 floats is about 2 GB).
* Validation images (synset layout) are read like the evaluation images (resize to 224 x 224, docs/method.md,
  "Evaluation"); top-1 is reported after training, and after every epoch when features are cached.
* Seeded: the head's initialisation, the shuffling and the augmentation draws (also in loader workers)
  follow ``seed``. The result is a :class:`~lidc_cdam.models.vit.ViTModel` with a
  :class:`~lidc_cdam.models.heads.LinearHead` and the class names as ``output_names``, which
  :func:`~lidc_cdam.models.loading.save_checkpoint` writes and ``lidc-cdam explain --checkpoint`` loads.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lidc_cdam.data.imagenet import (
    NUM_CLASSES,
    SynsetImages,
    class_names,
    collate_labelled,
    imagenet_synsets,
    synset_folders,
)
from lidc_cdam.data.images import ImageReadError, model_normalization
from lidc_cdam.models.heads import LinearHead
from lidc_cdam.models.vit import ViTModel

log = logging.getLogger(__name__)

ClassMode = Literal["imagenet", "folders"]


@dataclass(frozen=True)
class LinearProbeConfig:
    """Training settings; the defaults are the paper's (docs/method.md, "Data")."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-4
    augment: bool = True  # RandomResizedCrop + horizontal flip; False: the evaluation preprocessing
    cache_features: bool = False  # needs augment=False: latents computed once
    image_size: int | None = None  # None: the backbone's input size (224 for ViT-S/8)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # "auto": cuda when available
    amp: bool = False  # bfloat16 autocast for the frozen backbone (GPU speed-up)
    on_error: Literal["raise", "skip"] = "raise"
    max_per_class: int | None = None  # use at most this many training images per class
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LinearProbeConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"LinearProbeConfig.lr must be positive, got {self.lr!r}")
        if self.cache_features and self.augment:
            raise ValueError("cache_features needs augment=False: augmented crops differ every epoch")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def probe_classes(train_root: str | Path, mode: ClassMode = "imagenet") -> tuple[list[str], list[str]]:
    """``(folder names, output names)`` of the probe's classes, in label order.

    ``"imagenet"``: the 1000 ImageNet-1k synsets in timm's order (every folder must be one of them);
    ``"folders"``: the sub-folders present, sorted (names from timm for ImageNet synsets).
    """
    folders = synset_folders(train_root)
    synsets = imagenet_synsets()
    names = dict(zip(synsets, class_names(), strict=True))
    if mode == "imagenet":
        unknown = sorted(set(folders) - set(synsets))
        if unknown:
            raise ImageReadError(f"{train_root}: folders that are not ImageNet-1k synsets: {unknown[:5]}"
                                 f"{'...' if len(unknown) > 5 else ''} (use classes='folders' for other data)")
        missing = NUM_CLASSES - len(set(folders))
        if missing:
            log.warning("%s: %d of the 1000 ImageNet classes have no folder", train_root, missing)
        return synsets, [names[s] for s in synsets]
    if mode == "folders":
        return folders, [names.get(f, f) for f in folders]
    raise ValueError(f"classes must be 'imagenet' or 'folders', got {mode!r}")


def train_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]):
    """The paper's augmentation: RandomResizedCrop to ``size``, horizontal flip, then normalisation."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(size, antialias=True),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(list(mean), list(std)),
    ])


def build_probe_model(
    backbone: ViTModel, output_names: list[str], meta: dict[str, Any] | None = None
) -> ViTModel:
    """The backbone (frozen) with a new ``LinearHead(embed_dim, len(output_names))`` on its latent,
    initialised as DINO's linear evaluation (weights N(0, 0.01), bias 0) from the current torch seed."""
    head = LinearHead(backbone.embed_dim, len(output_names))
    with torch.no_grad():
        head[1].weight.normal_(0.0, 0.01)
        head[1].bias.zero_()
    model = ViTModel(backbone.backbone, head, task="classification", output_names=output_names,
                     build=backbone.build, meta={**backbone.meta, **(meta or {})})
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    return model


def _loader(dataset: Dataset, batch_size: int, config: LinearProbeConfig, shuffle: bool = False,
            generator: torch.Generator | None = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=config.num_workers, collate_fn=collate_labelled,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


def _latents(model: ViTModel, images: torch.Tensor, device: torch.device, amp: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return model.latent(images.to(device, non_blocking=True)).float()


def extract_features(
    model: ViTModel, dataset: Dataset, config: LinearProbeConfig, device: torch.device, progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Latents (CLS') of every image of a :class:`SynsetImages`: ``(features [N, D] float32 on the CPU,
    labels [N], skipped files)``."""
    feats, labels, skipped = [], [], []
    model.eval()
    for images, labs, sk in tqdm(_loader(dataset, config.eval_batch_size, config), desc=desc, unit="batch",
                                 disable=not progress, leave=False):
        skipped.extend((s.file, s.reason) for s in sk)
        if images is not None:
            feats.append(_latents(model, images, device, config.amp).cpu())
            labels.append(labs)
    if not feats:
        raise ImageReadError("no readable images to compute features from")
    return torch.cat(feats), torch.cat(labels), skipped


@torch.no_grad()
def _top1_from_features(head: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor,
                        device: torch.device, batch_size: int) -> float:
    correct = 0
    for lo in range(0, len(feats), batch_size):
        logits = head(feats[lo : lo + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[lo : lo + batch_size]).sum())
    return correct / max(1, len(feats))


@torch.no_grad()
def evaluate_top1(model: ViTModel, dataset: Dataset, config: LinearProbeConfig, device: torch.device,
                  progress: bool = False) -> tuple[float, int, list[tuple[str, str]]]:
    """Top-1 accuracy of ``model`` on a labelled data set: ``(accuracy, images, skipped files)``."""
    feats, labels, skipped = extract_features(model, dataset, config, device, progress, desc="validation")
    return _top1_from_features(model.head, feats, labels, device, config.eval_batch_size), len(labels), skipped


def train_linear_probe(
    backbone: ViTModel,
    train_root: str | Path,
    config: LinearProbeConfig | None = None,
    *,
    val_root: str | Path | None = None,
    classes: ClassMode = "imagenet",
    progress: bool = True,
) -> tuple[ViTModel, dict[str, Any]]:
    """Train a linear head on the frozen ``backbone``'s latent; returns the model (CPU, eval mode) and a
    report (``losses`` per step, ``epoch_losses``, ``val_top1``, ``skipped`` files, counts, seconds).

    The same information, losses summarised, goes into ``model.meta`` (``normalization``, ``synsets``,
    ``linear_probe``), so a saved checkpoint documents itself.
    """
    config = config or LinearProbeConfig()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    folders, names = probe_classes(train_root, classes)
    mean, std = model_normalization(backbone)
    size = ((config.image_size, config.image_size) if config.image_size
            else tuple(backbone.default_image_size))
    model = build_probe_model(backbone, names)
    model.to(device).eval()
    head = model.head
    head.train()

    index = {f: i for i, f in enumerate(folders)}
    common = dict(image_size=size, mean=mean, std=std, on_error=config.on_error)
    transform = train_transform(size, mean, std) if config.augment else None
    train_set = SynsetImages(train_root, index, transform=transform, max_per_class=config.max_per_class, **common)
    val_set = SynsetImages(val_root, index, **common) if val_root is not None else None

    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    skipped: dict[str, str] = {}
    losses: list[float] = []
    epoch_losses: list[float] = []
    val_per_epoch: list[float] = []
    start = time.perf_counter()

    def step(feats: torch.Tensor, labels: torch.Tensor) -> None:
        loss = F.cross_entropy(head(feats), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    if config.cache_features:
        train_feats, train_labels, sk = extract_features(model, train_set, config, device, progress, "train features")
        skipped.update(sk)
        val_cache = None
        if val_set is not None:
            *val_cache, sk = extract_features(model, val_set, config, device, progress, "val features")
            skipped.update(sk)
        train_feats = train_feats.to(device)
        for _ in tqdm(range(config.epochs), desc="linear probe (cached features)", unit="epoch",
                      disable=not progress):
            first = len(losses)
            order = torch.randperm(len(train_feats), generator=generator)
            for lo in range(0, len(order), config.batch_size):
                batch = order[lo : lo + config.batch_size]
                step(train_feats[batch.to(device)], train_labels[batch])
            epoch_losses.append(float(np.mean(losses[first:])))
            if val_cache is not None:
                head.eval()
                val_per_epoch.append(_top1_from_features(head, *val_cache, device, config.eval_batch_size))
                head.train()
        n_train = len(train_feats)
    else:
        loader = _loader(train_set, config.batch_size, config, shuffle=True, generator=generator)
        n_train = 0
        for epoch in range(config.epochs):
            first = len(losses)
            bar = tqdm(loader, desc=f"linear probe epoch {epoch + 1}/{config.epochs}", unit="batch",
                       disable=not progress, leave=False)
            for images, labels, sk in bar:
                skipped.update((s.file, s.reason) for s in sk)
                if images is None:
                    continue
                step(_latents(model, images, device, config.amp), labels)
                if epoch == 0:
                    n_train += len(labels)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            epoch_losses.append(float(np.mean(losses[first:])) if len(losses) > first else float("nan"))
            log.info("epoch %d/%d: mean training loss %.4f", epoch + 1, config.epochs, epoch_losses[-1])
        val_cache = None

    head.eval()
    val_top1 = n_val = None
    if val_set is not None:
        if val_cache is not None:
            val_top1, n_val = val_per_epoch[-1], len(val_cache[1])
        else:
            val_top1, n_val, sk = evaluate_top1(model, val_set, config, device, progress)
            skipped.update(sk)
    train_seconds = time.perf_counter() - start
    for path, reason in skipped.items():
        log.warning("skipped %s: %s", path, reason)

    model.cpu().eval()
    for p in model.backbone.parameters():
        p.requires_grad_(True)  # as a loaded model would be: explanations differentiate through it
    model.meta.update({
        "dataset": "imagenet-linear-probe",
        "normalization": {"mean": list(mean), "std": list(std)},
        "synsets": list(folders),
        "linear_probe": {
            **config.to_dict(), "device": str(device), "classes": classes, "image_size": list(size),
            "train_images": n_train, "val_images": n_val, "val_top1": val_top1,
            "epoch_losses": epoch_losses, "skipped_files": len(skipped),
            "train_seconds": round(train_seconds, 2),
        },
    })
    report = {"losses": losses, "epoch_losses": epoch_losses, "val_top1": val_top1, "val_top1_per_epoch":
              val_per_epoch, "train_images": n_train, "val_images": n_val, "skipped": sorted(skipped.items()),
              "train_seconds": train_seconds, "device": str(device), "classes": list(folders)}
    return model, report
