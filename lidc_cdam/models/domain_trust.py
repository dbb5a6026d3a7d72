"""The trust flag, version 3: how far a crop's features are from the model's own training features.

Generic (nothing here knows what the training data were) and after Lee et al. 2018, "A simple unified framework
for detecting out-of-distribution samples and adversarial attacks" (NeurIPS): a Gaussian with a shared (here
Ledoit-Wolf shrinkage) covariance fitted on the training inputs' features of an intermediate block, and the
Mahalanobis distance of a new input's features to it,

    d(f) = min_c sqrt((f - mu_c)^T Sigma^-1 (f - mu_c))                        (Lee et al. 2018, Eq. 2)

Lee et al. fit one mean per class with a shared covariance and take the closest class. The classes here are
found in the training features themselves (:data:`CLUSTERS` = 2 k-means clusters; no labels, so regression
models get them too), and ``Sigma`` is the Ledoit-Wolf covariance of the features less their cluster's mean.
Version 2 was the same with one mean (``"centres"`` absent); its statistics are still read.

**Features.** ``f`` is the class token of the residual stream entering the last block (``X[:, 0]`` of
:meth:`ViTModel.trunk <lidc_cdam.models.vit.ViTModel.trunk>`; the mean token for a model without prefix
tokens): the output of the second-to-last block. On the shipped phantom models it separates real CT from
phantoms better than the latent the head reads (``benchmarks/results/trust/``), which is what version 1
(:mod:`lidc_cdam.models.trust`) used. The explainers run the trunk anyway, so :func:`recording_trunk` takes
the features from their own pass: the flag then costs a few small matrix products, not a forward pass.

**A crop's score** is the mean distance over the slices ``CENTRE + OFFSETS`` along the model's view (seven
slices, the centre +- 3; for a 3D model: the one input), which steadies it. Its percentile among the training
crops' own scores is reported; above :data:`THRESHOLD` the crop is "unlike the training data".

**Fitting** (:func:`fit_domain_trust`): every training crop's slices, each under the eight flips and
transpositions of the image plane (the dihedral group; skipped for 1000 crops or more, or for a 3D model), give
the cluster means and the covariance; the training crops' own scores are *cross-fitted* (5 folds by crop: each
crop's score uses means and covariance fitted without the crops of its fold), so they are distributed as a new
in-distribution crop's; the crops' scores of :data:`REPEATS` such cross-fittings (different fold draws)
together are the reference.

**How it was chosen** (``benchmarks/results/trust/``): on the shipped phantom models and a model the engine
trains, against the validation part of the phantoms and half the real-CT points (version 2 with one mean
flagged 78-98 % of them; 2 clusters 87-99 %, 4 to 16 clusters less, patch-token, embedding and slice-spread
families and their per-family percentile combinations no better); the committed rates are measured on the
held-out test part and all real-CT points.

The statistics are a dict of float64 tensors and plain values (loadable with ``torch.load(weights_only=True)``),
stored by the training engine as ``meta["trust"]`` with ``version == 3``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from lidc_cdam.data.lidc.model_input import CENTRE, VOLUME, model_inputs, volume_input

TRUST_VERSION = 3
#: k-means clusters of the training features, each with its own mean and a shared covariance (Lee et al.'s classes)
CLUSTERS = 2
#: cross-fittings (5 folds each, different draws) whose scores together are the reference
REPEATS = 3
#: Above this percentile of the training crops' cross-fitted scores a crop is "unlike the training data".
THRESHOLD = 97.5
#: slices (offsets from the crop's centre along the model's view) whose distances are averaged
OFFSETS = (-3, -2, -1, 0, 1, 2, 3)
FEATURE = "trunk_cls"
METHOD = ("mahalanobis to the closest of 2 k-means cluster means, shared Ledoit-Wolf covariance (Lee et al. "
          "2018), features = class token entering the last block, mean over the centre +- 3 slices")
GRID = 101
MAX_AUGMENTED_CROPS = 1000  # the dihedral augmentation only below this many training crops


def is_domain_stats(stats: Any) -> bool:
    """Whether ``stats`` are version-2 or -3 statistics (this module) rather than version 1 (:mod:`.trust`)."""
    return isinstance(stats, dict) and int(stats.get("version", 1)) >= 2


def features_from_trunk(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """The trust features ``[B, D]`` (float32, detached) from the residual stream ``X`` ``[B, N, D]`` entering
    the last block: the class token, or the mean token for a model without prefix tokens."""
    resid = resid.detach()
    if int(getattr(model, "num_prefix_tokens", 1)) > 0:
        return resid[:, 0].float()
    return resid.mean(1).float()


@torch.no_grad()
def input_features(model: Any, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The trust features ``[N, D]`` of model inputs (the trunk only, in eval mode, on the model's device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [features_from_trunk(model, model.trunk(chunk.to(device))).cpu() for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.embed_dim)


@contextmanager
def recording_trunk(model: Any) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(images, features)`` of every call of ``model.trunk`` inside the block (the explainers' own
    pass), so that the trust flag needs no forward pass of its own. The model is unchanged afterwards."""
    records: list[tuple[torch.Tensor, torch.Tensor]] = []
    had_own = "trunk" in vars(model)
    original = model.trunk

    def trunk(images: torch.Tensor) -> torch.Tensor:
        resid = original(images)
        records.append((images, features_from_trunk(model, resid)))
        return resid

    model.trunk = trunk
    try:
        yield records
    finally:
        if had_own:
            model.trunk = original
        else:
            del model.trunk


def features_of(records: Sequence[tuple[torch.Tensor, torch.Tensor]], images: torch.Tensor) -> torch.Tensor | None:
    """The recorded features of exactly ``images`` (the first call on these inputs; perturbation methods call
    the trunk on altered copies too), or None."""
    for seen, feats in records:
        if seen is images or (seen.shape == images.shape and torch.equal(seen.detach(), images.detach())):
            return feats.cpu()
    return None


def trust_slices(stats: dict[str, Any]) -> list[int]:
    """The crop slices the statistics score (``CENTRE + offsets``)."""
    return [CENTRE + int(o) for o in stats.get("offsets", OFFSETS)]


def dihedral(images: torch.Tensor) -> list[torch.Tensor]:
    """The eight flips and transpositions of the last two (image plane) axes."""
    t = images.transpose(-1, -2)
    return [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2),
            t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]


def crop_inputs(crop_hu: np.ndarray, view: str, input_stats: dict[str, Any], size: int,
                offsets: Sequence[int] = OFFSETS) -> torch.Tensor:
    """The model inputs the flag scores for one crop ``[32, 32, 32]`` HU: the slices ``CENTRE + offsets`` along
    ``view`` (``[S, 3, size, size]``), or the whole crop for a 3D model (``[1, 1, size, size, size]``)."""
    if view == VOLUME:
        return volume_input(crop_hu, input_stats, size)
    return model_inputs(crop_hu, view, [CENTRE + int(o) for o in offsets], input_stats, size)


def crops_features(model: Any, crops: Iterable[np.ndarray], input_stats: dict[str, Any], *, augment: bool = True,
                   offsets: Sequence[int] = OFFSETS, batch_size: int = 64) -> torch.Tensor:
    """Features ``[N, A, S, D]`` of N crops: S slices each (one input for a 3D model), under A = 8 flips and
    transpositions of the image plane with ``augment`` (2D models), else A = 1."""
    view = str(input_stats.get("view", "axial"))
    size = int(input_stats.get("image_size") or model.default_image_size[0])
    out = []
    for crop in crops:
        x = crop_inputs(np.asarray(crop, dtype=np.float32), view, input_stats, size, offsets)
        variants = dihedral(x) if augment and view != VOLUME else [x]
        feats = input_features(model, torch.cat(variants), batch_size)
        out.append(feats.reshape(len(variants), len(x), -1))
    if not out:
        raise ValueError("the trust flag needs the features of at least 2 training crops, got 0")
    return torch.stack(out)


def _fit(x: np.ndarray, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Cluster means ``[K, D]``, the shared precision and Ledoit-Wolf's shrinkage of vectors ``x`` ``[M, D]``."""
    from sklearn.cluster import KMeans
    from sklearn.covariance import LedoitWolf

    k = max(1, min(int(clusters), len(x) // 2))
    if k == 1:
        centres = x.mean(0, keepdims=True)
        residual = x - centres
    else:
        km = KMeans(k, n_init=10, random_state=seed).fit(x)
        centres = km.cluster_centers_
        residual = x - centres[km.labels_]
    lw = LedoitWolf(store_precision=True, assume_centered=True).fit(residual)
    return np.asarray(centres, dtype=np.float64), lw.precision_, float(lw.shrinkage_)


def _distances(x: np.ndarray, centres: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Distance of ``x`` ``[..., D]`` to the closest of the ``centres`` ``[K, D]`` (or one mean ``[D]``)."""
    out = None
    for c in np.atleast_2d(centres):
        d = x - c
        dist = np.sqrt(np.maximum(np.einsum("...d,de,...e->...", d, precision, d), 0.0))
        out = dist if out is None else np.minimum(out, dist)
    return out


def fit_domain_trust(features: Any, *, cross_fit: int = 5, threshold: float = THRESHOLD, seed: int = 0,
                     offsets: Sequence[int] = OFFSETS, augment: str = "dihedral", clusters: int = CLUSTERS,
                     repeats: int = REPEATS) -> dict[str, Any]:
    """Version-3 trust statistics of training features ``[N crops, A augmentations, S slices, D]``.

    Returns ``{"version": 3, "method", "feature", "centres" [K, D], "mean" [D] (of all features), "precision"
    [D, D], "shrinkage", "clusters", "train_distances" (sorted cross-fitted crop scores [repeats * N * A]),
    "percentiles" [101], "n_train" (crops), "n_vectors", "dim", "offsets", "augment", "cross_fit", "repeats",
    "threshold"}``. ``N < 2`` raises ValueError.
    """
    f = torch.as_tensor(features).detach().cpu().double().numpy()
    if f.ndim != 4:
        raise ValueError(f"features must be [N crops, A, S, D], got shape {tuple(f.shape)}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinite values")
    n, a, s, dim = f.shape
    if n < 2:
        raise ValueError(f"the trust flag needs the features of at least 2 training crops, got {n}")
    flat = f.reshape(-1, dim)
    centres, precision, shrinkage = _fit(flat, clusters, seed)
    folds = min(int(cross_fit), n)
    if folds >= 2 and n - math.ceil(n / folds) >= 2:
        reference = []
        for r in range(max(1, int(repeats))):
            order = np.random.default_rng(seed + r).permutation(n)
            scores = np.empty((n, a))
            for part in np.array_split(order, folds):
                rest = np.setdiff1d(order, part)
                c, p, _ = _fit(f[rest].reshape(-1, dim), clusters, seed)
                scores[part] = _distances(f[part], c, p).mean(-1)
            reference.append(scores.ravel())
        reference = np.sort(np.concatenate(reference))
    else:
        folds, repeats = 0, 1
        reference = np.sort(_distances(f, centres, precision).mean(-1).ravel())
    return {
        "version": TRUST_VERSION,
        "method": METHOD,
        "feature": FEATURE,
        "centres": torch.from_numpy(np.ascontiguousarray(centres)),
        "mean": torch.from_numpy(flat.mean(0)),
        "precision": torch.from_numpy(np.ascontiguousarray(precision)),
        "shrinkage": shrinkage,
        "clusters": len(centres),
        "train_distances": torch.from_numpy(reference),
        "percentiles": torch.from_numpy(np.percentile(reference, np.linspace(0, 100, GRID))),
        "n_train": int(n),
        "n_vectors": int(n * a * s),
        "dim": int(dim),
        "offsets": [int(o) for o in offsets] if s > 1 else [0],
        "augment": augment if a > 1 else "none",
        "cross_fit": int(folds),
        "repeats": int(repeats) if folds else 1,
        "threshold": float(threshold),
    }


def fit_from_crops(model: Any, crops: Sequence[np.ndarray] | Iterable[np.ndarray], input_stats: dict[str, Any],
                   *, augment: bool | None = None, batch_size: int = 64, **kwargs: Any) -> dict[str, Any]:
    """:func:`fit_domain_trust` of a model's training crops (``[32, 32, 32]`` HU each, e.g. from
    :func:`lidc_cdam.data.lidc.crops.read_crop`), with the checkpoint's ``input_stats``. ``augment`` defaults
    to the dihedral augmentation below :data:`MAX_AUGMENTED_CROPS` crops."""
    crops = list(crops)
    if augment is None:
        augment = len(crops) < MAX_AUGMENTED_CROPS
    volume = str(input_stats.get("view", "axial")) == VOLUME
    feats = crops_features(model, crops, input_stats, augment=augment, batch_size=batch_size)
    return fit_domain_trust(feats, offsets=(0,) if volume else OFFSETS,
                            augment="dihedral" if augment and not volume else "none", **kwargs)


def fit_from_images(model: Any, images: torch.Tensor, batch_size: int = 64, **kwargs: Any) -> dict[str, Any]:
    """:func:`fit_domain_trust` of plain training inputs ``[N, C, ...]`` (one input per item, no crops:
    ``offsets == [0]``, scored on the input itself)."""
    feats = input_features(model, images, batch_size)
    return fit_domain_trust(feats[:, None, None], offsets=(0,), augment="none", **kwargs)


def _check(stats: dict[str, Any], dim: int) -> None:
    if not is_domain_stats(stats) or "mean" not in stats or "precision" not in stats:
        raise ValueError("not version-2/3 trust statistics (fit_domain_trust's dict)")
    if int(stats["dim"]) != dim:
        raise ValueError(f"features have dimension {dim}, the trust statistics were fitted on {stats['dim']}")


def distances(stats: dict[str, Any], features: Any) -> np.ndarray:
    """Mahalanobis distances (Lee et al. 2018, Eq. 2) of features ``[..., D]`` to the closest training cluster."""
    f = torch.as_tensor(features).detach().cpu().double().numpy()
    _check(stats, f.shape[-1])
    centres = torch.as_tensor(stats["centres"] if "centres" in stats else stats["mean"],  # version 2: one mean
                              dtype=torch.float64).cpu().numpy()
    precision = torch.as_tensor(stats["precision"], dtype=torch.float64).cpu().numpy()
    return _distances(f, centres, precision)


def crop_score(stats: dict[str, Any], features: Any) -> np.ndarray:
    """Scores of crops from their features ``[S, D]`` (one crop) or ``[N, S, D]``: the mean distance over the
    S slices."""
    d = distances(stats, features)
    return np.atleast_1d(d.mean(-1))


def percentile_of_score(stats: dict[str, Any], scores: Any) -> np.ndarray:
    """Percentiles in [0, 100] of scores among the training crops' own cross-fitted scores."""
    reference = torch.as_tensor(stats["train_distances"], dtype=torch.float64).cpu().numpy()
    s = np.atleast_1d(np.asarray(scores, dtype=np.float64))
    return np.interp(s, reference, np.linspace(0.0, 100.0, len(reference)))


def crop_percentile(stats: dict[str, Any], features: Any) -> np.ndarray:
    """Percentiles of crops' features (``[S, D]`` or ``[N, S, D]``) among the training crops' scores."""
    return percentile_of_score(stats, crop_score(stats, features))


def is_unlike(stats: dict[str, Any], percentile: float) -> bool:
    """``percentile > stats["threshold"]``."""
    return bool(float(percentile) > float(stats.get("threshold", THRESHOLD)))
