"""Fold ensembles: several checkpoints of one task (the five folds of ``lidc-cdam train``) explaining one crop.

Per target: the mean prediction over the models and its standard deviation (population sd, ``ddof=0``: a
single checkpoint is an ensemble of one with sd 0), the mean map, and the sign agreement: per location, the
share of the models whose map has the mean map's sign (``np.sign``, so where the mean and every map are 0
the agreement is 1).

- :func:`group_checkpoints` - checkpoints grouped by task and output names (malignancy models form one
  ensemble, biomarker models another);
- :func:`combine` - an :class:`EnsembleResult` from the models' :class:`~lidc_cdam.ct.maps.MapResult` (numpy only);
- :func:`explain_crop_steps` / :func:`explain_crop` - every model of one group on a crop in memory, combined
  (the steps yield after each batch of slices, so a viewer can report progress and cancel between them).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.cache import cached_crop_steps
from lidc_cdam.ct.checkpoint import LoadedModel, load_checked_model
from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.inputs import CENTRE, VOLUME, model_inputs, volume_input
from lidc_cdam.ct.inputs import CENTRE as CENTRE_SLICE
from lidc_cdam.ct.maps import MapResult, relay
from lidc_cdam.models import domain_trust
from lidc_cdam.models.trust import THRESHOLD, model_latents, trust_percentile


@dataclass
class EnsembleResult:
    """One task's models on one crop: maps ``[K, 32, 32, 32]`` in crop coordinates, predictions per target."""

    task: str  # "malignancy" or "biomarkers"
    checkpoints: list[str]
    targets: list[str]
    method: str
    view: str
    mean: dict[str, float]  # mean prediction per target (malignancy probability, biomarkers in rating units)
    sd: dict[str, float]  # its standard deviation over the models (ddof=0)
    per_model: list[dict[str, float]]
    mean_maps: np.ndarray  # [K, 32, 32, 32]
    agreement: np.ndarray  # [K, 32, 32, 32] share of models whose map has the mean map's sign
    signed: bool
    #: the trust flag (docs/method.md): see :func:`crop_trust`; None when no model carries training statistics
    trust: dict[str, Any] | None = None
    #: every model's maps ``[M, K, 32, 32, 32]`` (for viewing one fold beside the ensemble)
    model_maps: np.ndarray | None = None
    #: explained slice indices along the view and, per slice, the mean prediction and its sd over the models
    slices: list[int] | None = None
    slice_mean: list[dict[str, float]] | None = None
    slice_sd: list[dict[str, float]] | None = None
    cached: bool = False  # every model's maps came from a cache

    @property
    def n(self) -> int:
        return len(self.checkpoints)

    def predictions_at(self, index: int) -> tuple[dict[str, float], dict[str, float]] | None:
        """``(mean, sd)`` of the predictions on crop slice ``index`` along the view; None if not explained."""
        if self.slices is None or self.slice_mean is None or self.slice_sd is None or index not in self.slices:
            return None
        k = self.slices.index(index)
        return self.slice_mean[k], self.slice_sd[k]


def as_loaded(checkpoint: str | Path | LoadedModel) -> LoadedModel:
    return checkpoint if isinstance(checkpoint, LoadedModel) else load_checked_model(checkpoint)


def group_checkpoints(checkpoints: Sequence[str | Path | LoadedModel]) -> dict[tuple[str, ...], list[LoadedModel]]:
    """Checkpoints (paths or loaded) checked and grouped by their output names, in the order first seen:
    ``{("malignancy",): [...], (eight biomarkers): [...]}``; :class:`CTError` for none or a bad one."""
    if not checkpoints:
        raise CTError("no checkpoint given")
    groups: dict[tuple[str, ...], list[LoadedModel]] = {}
    for c in checkpoints:
        loaded = as_loaded(c)
        groups.setdefault(tuple(loaded.targets), []).append(loaded)
    return groups


def sign_agreement(maps: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """``maps`` ``[M, ...]``: per location the share of the M maps with the sign of their mean."""
    maps = np.asarray(maps)
    mean = maps.mean(0) if mean is None else mean
    return (np.sign(maps) == np.sign(mean)[None]).mean(0).astype(np.float32)


def combine(results: Sequence[MapResult], checkpoints: Sequence[str], task: str) -> EnsembleResult:
    """The ensemble of the models' results on one crop (same targets, method and view)."""
    if not results:
        raise CTError("an ensemble needs at least one result")
    first = results[0]
    for r in results[1:]:
        if r.targets != first.targets or r.method != first.method or r.view != first.view:
            raise CTError(f"cannot combine maps of {r.targets} ({r.method}, {r.view}) with {first.targets} "
                          f"({first.method}, {first.view})")
    stack = np.stack([r.maps for r in results]).astype(np.float64)  # [M, K, 32, 32, 32]
    mean_maps = stack.mean(0)
    values = {t: np.array([r.predictions[t] for r in results], dtype=float) for t in first.targets}
    slice_mean = slice_sd = None
    if all(getattr(r, "slice_predictions", None) is not None and r.slices == first.slices for r in results):
        per_slice = [{t: np.array([r.slice_predictions[k][t] for r in results], dtype=float) for t in first.targets}
                     for k in range(len(first.slices))]
        slice_mean = [{t: float(v.mean()) for t, v in row.items()} for row in per_slice]
        slice_sd = [{t: float(v.std()) for t, v in row.items()} for row in per_slice]
    return EnsembleResult(task, [str(c) for c in checkpoints], list(first.targets), first.method, first.view,
                          {t: float(v.mean()) for t, v in values.items()},
                          {t: float(v.std()) for t, v in values.items()},
                          [dict(r.predictions) for r in results], mean_maps.astype(np.float32),
                          sign_agreement(stack, mean_maps), first.signed, model_maps=stack.astype(np.float32),
                          slices=list(getattr(first, "slices", []) or []), slice_mean=slice_mean, slice_sd=slice_sd,
                          cached=all(getattr(r, "cached", False) for r in results))


def explain_crop_steps(models: Sequence[str | Path | LoadedModel], crop: dict[str, Any],
                       targets: Sequence[str] | None = None, method: str = "cdam", view: str | None = None,
                       slices: str = "all", margin: int = 3, options: dict[str, Any] | None = None, batch: int = 8,
                       where: object = "crop", cache: Any = None, concepts: Callable[[LoadedModel], list] | None = None
                       ) -> Generator[tuple[int, int], None, EnsembleResult]:
    """Every model of one task on a crop in memory (:func:`lidc_cdam.ct.maps.crop_steps`), combined; all
    targets by default; ``view`` defaults to the view the models were trained on (they must agree). Yields
    ``(batches done, batches in all)`` over all the models. With a :class:`~lidc_cdam.ct.cache.MapCache`, each
    model's maps come from it when computed before. ``concepts(model)`` gives each model its concept targets
    (:class:`lidc_cdam.Concept`, Eq. 3: the mean latent of that model's own training-fold examples), explained
    after the outputs (Eq. 4)."""
    loaded = [as_loaded(m) for m in models]
    if not loaded:
        raise CTError("no checkpoint given")
    outputs = {tuple(m.targets) for m in loaded}
    if len(outputs) > 1:
        raise CTError(f"an ensemble needs models of one task with the same outputs, got {sorted(outputs)}")
    views = {m.view for m in loaded}
    if VOLUME in views and len(views) > 1:
        raise CTError(f"an ensemble cannot mix 3D and 2D models (views {sorted(views)})")
    if VOLUME in views:
        view = VOLUME  # 3D models read the whole crop, whatever 2D view was asked for
    elif view is None:
        if len(views) > 1:
            raise CTError(f"the models were trained on different views {sorted(views)}: choose one view")
        view = views.pop()
    targets = tuple(loaded[0].targets) if targets is None else tuple(targets)
    results: list[MapResult] = []
    for n, m in enumerate(loaded):
        asked = targets + tuple(concepts(m) if concepts is not None else ())
        if not asked:
            raise CTError("no target to explain: choose an output or a concept")
        steps = cached_crop_steps(m, crop, asked, method, view, slices, margin, options, batch, where, cache)
        results.append((yield from relay(steps, n, len(loaded))))
    result = combine(results, [str(m.path) for m in loaded], loaded[0].task)
    result.trust = crop_trust(loaded, crop, view, [r.central_latent for r in results],
                              [getattr(r, "trust_features", None) for r in results])
    return result


def explain_tasks_steps(checkpoints: Sequence[str | Path | LoadedModel], crop: dict[str, Any],
                        targets: Sequence[str] | None = None, *, concepts: Callable[[LoadedModel], list] | None = None,
                        concept_task: str = "malignancy", **kwargs: Any
                        ) -> Generator[tuple[int, int], None, list[EnsembleResult]]:
    """Every task's checkpoints (grouped by :func:`group_checkpoints`) on one crop: one :class:`EnsembleResult`
    per task. ``targets`` limits each task to those of its outputs (a task with none of them is skipped, unless
    it explains the concepts); ``concepts`` (see :func:`explain_crop_steps`) go to the ``concept_task`` models
    (else the first task's); ``kwargs`` go to :func:`explain_crop_steps`. Yields ``(steps done, steps in all)``
    over all tasks."""
    groups = list(group_checkpoints(checkpoints).values())
    concept_group = next((g for g in groups if g[0].task == concept_task), groups[0]) if concepts else None
    if targets is not None:
        wanted = set(targets)
        groups = [g for g in groups if wanted & set(g[0].targets) or g is concept_group]
        if not groups:
            raise CTError(f"none of the checkpoints explains {sorted(wanted)}")
    ensembles = []
    for g, models in enumerate(groups):
        chosen = None if targets is None else [t for t in models[0].targets if t in set(targets)]
        steps = explain_crop_steps(models, crop, chosen, concepts=concepts if models is concept_group else None,
                                   **kwargs)
        ensembles.append((yield from relay(steps, g, len(groups))))
    return ensembles


def explain_crop(models: Sequence[str | Path | LoadedModel], crop: dict[str, Any], targets: Sequence[str] | None = None,
                 method: str = "cdam", view: str | None = None, slices: str = "all", margin: int = 3,
                 options: dict[str, Any] | None = None, batch: int = 8, where: object = "crop",
                 progress: Callable[[], None] | None = None,
                 concepts: Callable[[LoadedModel], list] | None = None) -> EnsembleResult:
    """:func:`explain_crop_steps` run to its result; ``progress()`` is called after each model."""
    steps = explain_crop_steps(models, crop, targets, method, view, slices, margin, options, batch, where,
                               concepts=concepts)
    count, reported = max(len(models), 1), 0
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        finished = done * count // max(total, 1)  # models done
        while progress and reported < finished:
            reported += 1
            progress()


def crop_trust(models: Sequence[LoadedModel], crop: dict[str, Any], view: str,
               latents: Sequence[np.ndarray | None] | None = None,
               features: Sequence[dict[int, np.ndarray] | None] | None = None) -> dict[str, Any] | None:
    """The trust flag of a crop (see docs "Provenance and trust"): for each model whose checkpoint carries
    training statistics (``meta["trust"]``), the percentile of the crop among the training crops.

    Versions 2 and 3 (:mod:`lidc_cdam.models.domain_trust`): the mean Mahalanobis distance (version 3: to the
    closer of two cluster means) of the features of the block before the last over the crop's centre +- 3
    slices; ``features`` (per model, slice -> features, from the maps' own pass,
    :attr:`~lidc_cdam.ct.maps.MapResult.trust_features`) spare the forward pass, and only the slices missing there
    go through the trunk. Version 1 (:mod:`lidc_cdam.models.trust`, older
    checkpoints): the central slice's latent; ``latents`` (per model) spare its forward pass.

    The ensemble reports the largest percentile (the most cautious model) and is ``unlike_training`` above that
    model's threshold. None when no model has the statistics."""
    per_model: list[float | None] = []
    thresholds: list[float] = []
    versions: list[int] = []
    for k, m in enumerate(models):
        stats = m.model.meta.get("trust")
        if not stats:
            per_model.append(None)
            continue
        if domain_trust.is_domain_stats(stats):
            known = (features[k] if features is not None else None) or {}
            feats = _domain_features(m, crop, view, stats, known)
            per_model.append(float(domain_trust.crop_percentile(stats, feats)[0]))
            versions.append(int(stats.get("version", 2)))
        else:
            per_model.append(_latent_percentile(m, crop, view, stats, latents[k] if latents is not None else None,
                                                model_latents, trust_percentile))
            versions.append(1)
        thresholds.append(float(stats.get("threshold", THRESHOLD)))
    known_p = [(p, t) for p, t in zip([p for p in per_model if p is not None], thresholds, strict=True)]
    if not known_p:
        return None
    worst, threshold = max(known_p, key=lambda pt: pt[0] - pt[1])
    version = min(versions)
    note = ("percentile of the crop's mean Mahalanobis distance (block before the last, centre +- 3 slices) among "
            "the training crops'" if version >= 2 else
            "percentile of the input among the training crops' own Mahalanobis distances (latent CLS')")
    return {"percentile": worst, "per_model": per_model, "threshold": threshold, "version": version,
            "unlike_training": bool(any(p > t for p, t in known_p)), "note": note}


def _domain_features(m: LoadedModel, crop: dict[str, Any], view: str, stats: dict[str, Any],
                     known: dict[int, np.ndarray]) -> np.ndarray:
    """``[S, D]`` version-2/3 features of the crop's scored slices: those of the maps' pass, the rest computed."""
    if view == VOLUME:
        if CENTRE_SLICE in known:
            return np.asarray(known[CENTRE_SLICE])[None]
        x = domain_trust.crop_inputs(crop["image"], view, m.input_stats, m.image_size)
        return domain_trust.input_features(m.model, x).cpu().numpy()
    wanted = domain_trust.trust_slices(stats)
    missing = [s for s in wanted if s not in known]
    computed: dict[int, np.ndarray] = {}
    if missing:
        x = model_inputs(crop["image"], view, missing, m.input_stats, m.image_size)
        computed = dict(zip(missing, domain_trust.input_features(m.model, x).cpu().numpy(), strict=True))
    return np.stack([np.asarray(known[s] if s in known else computed[s]) for s in wanted])


def _latent_percentile(m: LoadedModel, crop: dict[str, Any], view: str, stats: dict[str, Any],
                       known_latent: np.ndarray | None, model_latents: Any, trust_percentile: Any) -> float:
    if known_latent is not None:
        import torch

        latent = torch.as_tensor(np.asarray(known_latent, dtype=np.float32))[None]
    elif view == VOLUME:
        latent = model_latents(m.model, volume_input(crop["image"], m.input_stats, m.image_size))
    else:
        latent = model_latents(m.model, model_inputs(crop["image"], view, [CENTRE], m.input_stats, m.image_size))
    return float(trust_percentile(stats, latent)[0])
