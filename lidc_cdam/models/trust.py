"""The trust flag, version 1 (docs/method.md, "Trust and provenance"): how unlike the training crops an input is.

The input's latent ``l`` (CLS' after the final norm, :meth:`ViTModel.latent`) is compared with the training
crops' latents by its Mahalanobis distance to their mean under a Ledoit-Wolf shrinkage covariance
(:class:`sklearn.covariance.LedoitWolf`), and the distance is reported as a percentile of the training crops'
own distances; above the 99th the input is "unlike the training data".

The training crops' own distances are *cross-fitted* by default (``cross_fit=5``): each crop's distance comes
from mean and covariance fitted without the fifth of the crops it belongs to, so it is distributed as a new
in-distribution input's distance. In-sample distances (``cross_fit=0``) are too small when there are not many
more crops than latent dimensions, and would flag ordinary held-out crops. Mean and precision used for new
inputs are fitted on all crops.

Degenerate inputs: Ledoit-Wolf's covariance is positive definite however few the crops are (fewer crops than
dimensions included: the shrinkage then pulls it towards a scaled identity), so the distance is always
defined; fewer than 2 crops are refused (:class:`ValueError`). When a fold would leave fewer than 2 crops to
fit on, the reference distances are in-sample (``stats["cross_fit"] == 0``).

The statistics are a dict of tensors and plain values (loadable with ``torch.load(weights_only=True)``); the
training engine stores them as ``meta["trust_latent"]`` in ``best.pt`` beside the current version
(:mod:`lidc_cdam.models.domain_trust`, ``meta["trust"]``); older checkpoints carry them as ``meta["trust"]``, and are
still read. :func:`lidc_cdam.train.trust_checkpoint.add_trust_to_checkpoint` adds both to an existing checkpoint.

>>> stats = fit_trust(model_latents(model, train_images))
>>> trust_percentile(stats, model_latents(model, images))  # tensor([37.2, 99.8, ...])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

TRUST_VERSION = 1
#: Above this percentile of the training crops' distances an input is "unlike the training data".
THRESHOLD = 99.0
GRID = 101  # percentiles 0, 1, ..., 100 of the training distances, for display


def _as_array(latents: Any) -> np.ndarray:
    if isinstance(latents, torch.Tensor):
        latents = latents.detach().cpu().double().numpy()
    x = np.asarray(latents, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"latents must be [N, D], got shape {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("latents contain NaN or infinite values")
    return x


def _ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, precision and shrinkage of Ledoit-Wolf's covariance of ``x`` [N, D]."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf(store_precision=True, assume_centered=False).fit(x)
    return lw.location_, lw.precision_, float(lw.shrinkage_)


def _distances(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x - mean
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, precision, d), 0.0))


def fit_trust(latents: Any, *, cross_fit: int = 5, threshold: float = THRESHOLD, seed: int = 0) -> dict[str, Any]:
    """Trust statistics of the training crops' latents ``[N, D]`` (tensor or array).

    Returns ``{"version", "method", "mean" [D], "precision" [D, D], "shrinkage", "train_distances" (sorted
    [N]), "percentiles" (distances at percentiles 0..100, [101]), "n_train", "dim", "cross_fit",
    "threshold"}``: float64 tensors and plain values. ``cross_fit``: folds for the reference distances
    (0: in-sample). ``N < 2`` raises :class:`ValueError`.
    """
    x = _as_array(latents)
    n, dim = x.shape
    if n < 2:
        raise ValueError(f"the trust flag needs the latents of at least 2 training crops, got {n}")
    mean, precision, shrinkage = _ledoit_wolf(x)
    folds = min(int(cross_fit), n)
    if folds >= 2 and n - math.ceil(n / folds) >= 2:
        order = np.random.default_rng(seed).permutation(n)
        reference = np.empty(n)
        for part in np.array_split(order, folds):
            rest = np.setdiff1d(order, part)
            m, p, _ = _ledoit_wolf(x[rest])
            reference[part] = _distances(x[part], m, p)
    else:
        folds = 0
        reference = _distances(x, mean, precision)
    reference = np.sort(reference)
    return {
        "version": TRUST_VERSION,
        "method": "mahalanobis, Ledoit-Wolf covariance, latent = CLS' after the final norm",
        "mean": torch.from_numpy(mean.copy()),
        "precision": torch.from_numpy(np.ascontiguousarray(precision)),
        "shrinkage": shrinkage,
        "train_distances": torch.from_numpy(reference),
        "percentiles": torch.from_numpy(np.percentile(reference, np.linspace(0, 100, GRID))),
        "n_train": int(n),
        "dim": int(dim),
        "cross_fit": int(folds),
        "threshold": float(threshold),
    }


def _check_stats(stats: dict[str, Any], dim: int) -> None:
    if not isinstance(stats, dict) or "mean" not in stats or "precision" not in stats:
        raise ValueError("not trust statistics (fit_trust's dict with 'mean', 'precision', 'train_distances')")
    if int(stats["dim"]) != dim:
        raise ValueError(f"latents have dimension {dim}, the trust statistics were fitted on {stats['dim']}")


def mahalanobis(stats: dict[str, Any], latents: Any) -> torch.Tensor:
    """Mahalanobis distances ``[N]`` (float64) of ``latents [N, D]`` to the training crops' latents."""
    x = _as_array(latents)
    _check_stats(stats, x.shape[1])
    mean = torch.as_tensor(stats["mean"], dtype=torch.float64).cpu().numpy()
    precision = torch.as_tensor(stats["precision"], dtype=torch.float64).cpu().numpy()
    return torch.from_numpy(_distances(x, mean, precision))


def percentile_of_distance(stats: dict[str, Any], distances: Any) -> torch.Tensor:
    """Percentiles in [0, 100] of distances among the training crops' own (linear interpolation between the
    sorted training distances: the smallest is 0, the largest 100; beyond them 0 and 100)."""
    reference = torch.as_tensor(stats["train_distances"], dtype=torch.float64).cpu().numpy()
    d = np.atleast_1d(np.asarray(distances, dtype=np.float64))
    ranks = np.linspace(0.0, 100.0, len(reference))
    return torch.from_numpy(np.interp(d, reference, ranks))


def trust_percentile(stats: dict[str, Any], latents: Any) -> torch.Tensor:
    """Percentiles ``[N]`` in [0, 100] of the latents' Mahalanobis distances among the training crops' own."""
    return percentile_of_distance(stats, mahalanobis(stats, latents))


def is_unlike_training(percentile: Any, threshold: float = THRESHOLD) -> Any:
    """``percentile > threshold`` (a bool for a number, a bool tensor / array for many)."""
    if isinstance(percentile, torch.Tensor | np.ndarray):
        return percentile > threshold
    return bool(float(percentile) > threshold)


@torch.no_grad()
def model_latents(model: Any, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The latents ``[N, D]`` (CLS' after the final norm; float32 on the CPU) of model inputs ``[N, C, H, W]``,
    in eval mode and without gradients, on the model's device."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = [model.latent(chunk.to(device)).float().cpu() for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.embed_dim)


def dataset_latents(model: Any, dataset: Any, batch_size: int = 64) -> torch.Tensor:
    """The latents of every item's ``"image"`` of a dataset (in order)."""
    from torch.utils.data import DataLoader

    out = [model_latents(model, batch["image"], batch_size) for batch in
           DataLoader(dataset, batch_size=batch_size, shuffle=False)]
    return torch.cat(out) if out else torch.empty(0, model.embed_dim)
