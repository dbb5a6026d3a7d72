"""The LIDC cohort evaluation, its computation: for a part of the test nodules, every checkpoint's maps of every
method and target, their evidence shares, pointing game, MIF / LIF, box sensitivity and compactness, and on
phantoms the evidence in each target's own cause region (:mod:`.cause_regions`) (:func:`evaluate_part`); one
nodule's maps for the cause figure (:func:`cause_example`); the correlations with the reference map
(:func:`correlation_rows`), and the cascading randomisation check (:func:`randomization_rows`). Nothing here
writes a file (:mod:`.cohort_write` does)."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lidc_cdam.data.lidc.nodule_inputs import load_planes, plane_inputs
from lidc_cdam.evaluate.cause_regions import cause_columns, cause_model_regions, other_regions
from lidc_cdam.evaluate.cohort_plan import REGIONS, CohortModel, CohortSettings, attach_concepts, reference_model
from lidc_cdam.evaluate.localisation import pointing_game, positive_share_in_mask, ring_regions
from lidc_cdam.evaluate.metrics import evaluate_targets
from lidc_cdam.evaluate.perturbation import gaussian_blur, pearson
from lidc_cdam.evaluate.randomization import cascading_randomization
from lidc_cdam.evaluate.runner import box_generator
from lidc_cdam.explain.api import explain
from lidc_cdam.explain.targets import Concept


def blur_planes(hu: np.ndarray, sigma_mm: float, spacing_mm: float = 1.0) -> np.ndarray:
    """Gaussian blur of HU planes ``[n, h, w]`` with ``sigma_mm`` (the perturbation baseline, made in HU on the
    crop's 1 mm grid before the input transforms), by :func:`~lidc_cdam.evaluate.perturbation.gaussian_blur`."""
    if len(hu) == 0:
        return hu
    planes = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[:, None]
    return gaussian_blur(planes, sigma=sigma_mm / spacing_mm)[:, 0].cpu().numpy()


def model_regions(mask: np.ndarray, ring_mm: float, size: int) -> dict[str, torch.Tensor]:
    """Mask / ring / background ``[n, size, size]`` at the model's input size: made on the crop's 1 mm plane
    (:func:`ring_regions`), then nearest-resized (the input's bilinear resize keeps pixel centres aligned)."""
    regions = ring_regions(torch.from_numpy(np.asarray(mask, dtype=bool)), ring_mm, spacing=1.0)
    return {k: F.interpolate(v[:, None].float(), size=(size, size), mode="nearest")[:, 0] > 0.5
            for k, v in regions.items()}


class CountingScore:
    """``x -> [n, outputs + concepts]`` (head outputs, then each concept's similarity ``g(l, l_c)``),
    counting the images it was given (for the forward-pass lower bound)."""

    def __init__(self, model, concepts: Sequence[Concept], device: torch.device):
        self.model, self.concepts, self.device, self.images = model, list(concepts), device, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        with torch.no_grad():
            latent = self.model.latent(x.to(self.device))
            parts = [self.model.head(latent)] + [c.score(latent)[:, None] for c in self.concepts]
            return torch.cat(parts, dim=1).float()  # on the device: the metrics stay there


def _time(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def nodule_seed(seed: int, nodule_id: str) -> int:
    """A seeded method's seed for one nodule: its maps do not depend on which nodules share its batch."""
    return zlib.crc32(f"{seed}:{nodule_id}".encode()) & 0x7FFFFFFF


def explain_all(cm: CohortModel, inputs: torch.Tensor, methods: dict[str, dict[str, Any]], device: torch.device,
                nodule_ids: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
    """Pixel maps and native maps ``[n, K, ...]`` of every method for all the model's targets (outputs, then
    concepts: two calls, outputs and concepts cannot mix), and the seconds each method took. Methods with a
    ``seed`` run nodule by nodule with :func:`nodule_seed`."""
    pixel, native, seconds = {}, {}, {}
    x = inputs.to(device)
    calls = []
    if cm.model.num_outputs:
        calls.append(list(range(cm.model.num_outputs)))
    if cm.concepts:
        calls.append(list(cm.concepts))
    for method, options in methods.items():
        def run(method=method, options=options):
            if options.get("seed") is None:
                return [explain(cm.model, x, targets, method=method, **options) for targets in calls]
            per_nodule = [[explain(cm.model, x[j:j + 1], targets, method=method,
                                   **{**options, "seed": nodule_seed(options["seed"], nodule)})
                           for targets in calls] for j, nodule in enumerate(nodule_ids)]
            return [_stack_attributions([row[c] for row in per_nodule]) for c in range(len(calls))]

        attributions, took = _time(run, device)
        pixel[method] = torch.cat([a.upsample("nearest").detach().float() for a in attributions], 1)
        native[method] = torch.cat([a.maps.detach().float() for a in attributions], 1)
        seconds[method] = took
    return pixel, native, seconds


def _stack_attributions(parts: list) -> Any:
    """One :class:`Attribution` of several single-image ones (same method and targets)."""
    return replace(parts[0], maps=torch.cat([p.maps for p in parts]),
                   target_names=[n for p in parts for n in p.target_names], scores=None, latents=None)


def evaluate_part(models: list[CohortModel], planes, labels: dict[str, float], fold: int, settings: CohortSettings,
                  device: torch.device) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Metric rows, correlation rows and timing of a list of nodules (``planes``: :class:`NodulePlanes`)."""
    ids = planes.nodule_ids
    blurred_hu = blur_planes(planes.hu, settings.blur_mm)
    metric_rows: list[dict[str, Any]] = []
    maps_of: dict[str, dict[str, torch.Tensor]] = {}
    timing: dict[str, Any] = {"nodules": len(ids), "models": {}}
    for cm in models:
        inputs = plane_inputs(planes.hu, cm.stats, cm.size).to(device)  # images, masks, maps, scores on the device
        blurred = plane_inputs(blurred_hu, cm.stats, cm.size).to(device)
        regions = {r: m.to(device) for r, m in model_regions(planes.mask, settings.ring_mm, cm.size).items()}
        causes = {t: m.to(device) for t, m in cause_model_regions(planes.causes, cm.size).items()}
        score = CountingScore(cm.model, cm.concepts, device)
        values, forward_s = _time(lambda inputs=inputs, score=score: score(inputs), device)
        values_blurred = score(blurred).cpu()  # the whole plane blurred: how far from neutral the baseline is
        values = values.cpu()  # one copy each to the host, for the rows
        pixel, native, explain_s = explain_all(cm, inputs, settings.methods, device, ids)
        maps_of[cm.name] = pixel
        patch = int(cm.model.patch_size[0])
        sizes = settings.box_sizes or tuple(range(1, (cm.size - 1) // patch + 1))
        names, kinds = cm.target_names, cm.target_kinds()
        outputs = [n if kind == "output" else "" for n, kind in zip(names, kinds, strict=True)]  # causes: outputs
        score.images = 0
        start = time.perf_counter()
        for j, nodule in enumerate(ids):
            results = evaluate_targets(
                score, inputs[j], blurred[j], {m: p[j] for m, p in pixel.items()}, list(range(len(names))),
                patch=patch, native_maps={m: n[j] for m, n in native.items()}, box_sizes=sizes,
                n_boxes=settings.n_boxes, generator=box_generator(settings.seed, nodule),
                percents=settings.percents)
            region_j = {r: regions[r][j] for r in REGIONS}
            uniform = {r: region_j[r].float().mean().item() for r in REGIONS}
            cause_j = {t: m[j] for t, m in causes.items()}
            others_j = other_regions(cause_j)
            for method, per_target in results.items():
                shares = {r: positive_share_in_mask(pixel[method][j], region_j[r]) for r in REGIONS}  # [K]
                hits = pointing_game(pixel[method][j], region_j["mask"])
                cause = cause_columns(pixel[method][j], outputs, cause_j, others_j)
                for k, r in enumerate(per_target):
                    has_mask = bool(region_j["mask"].any())
                    metric_rows.append({
                        "fold": fold, "nodule_id": nodule, "label": labels.get(nodule, math.nan),
                        "model": cm.name, "target": names[k], "target_kind": kinds[k], "method": method,
                        "target_value": float(values[j, k]), "target_value_blurred": float(values_blurred[j, k]),
                        **{f"share_{reg}": shares[reg][k].item() if has_mask else math.nan for reg in REGIONS},
                        **{f"uniform_{reg}": uniform[reg] if has_mask else math.nan for reg in REGIONS},
                        "pointing_hit": float(hits[k].item()) if has_mask else math.nan,
                        "a_mif": r.a_mif, "a_lif": r.a_lif, "a_lif_mif": r.fidelity, "a_box": r.a_box,
                        "compactness": r.compactness, **cause[k],
                    })
        eval_s = time.perf_counter() - start
        timing["models"][cm.name] = {"targets": len(names), "forward_seconds": forward_s,
                                     "explain_seconds": explain_s, "evaluate_seconds": eval_s,
                                     "evaluate_forward_images": score.images,
                                     "per_image_forward_seconds": _per_image_forward(score, inputs, device)}
    return metric_rows, correlation_rows(models, maps_of, ids, fold, settings.reference), timing


def cause_example(models: list[CohortModel], data_root: Path, table: pd.DataFrame, nodule_id: str,
                  settings: CohortSettings, device: torch.device) -> dict[str, Any]:
    """One nodule's central plane, its cause regions (1 mm grid) and every method's output maps ``[K, H, W]`` of
    each model (as :func:`evaluate_part` made them: seeded methods keyed to the nodule), for the cause figure."""
    row = table[table["nodule_id"] == nodule_id]
    planes = load_planes(data_root, row, models[0].stats["view"])
    maps = {}
    for cm in models:
        outputs_only = replace(cm, concepts=[])
        pixel, _, _ = explain_all(outputs_only, plane_inputs(planes.hu, cm.stats, cm.size).to(device),
                                  settings.methods, device, [nodule_id])
        maps[cm.name] = {"targets": outputs_only.target_names,
                         "maps": {m: p[0].cpu().numpy() for m, p in pixel.items()}}
    return {"nodule_id": nodule_id, "hu": planes.hu[0], "mask": planes.mask[0],
            "causes": {t: r[0] for t, r in planes.causes.items()}, "models": maps}


def _per_image_forward(score: CountingScore, inputs: torch.Tensor, device: torch.device, batch: int = 256) -> float:
    """Seconds per image of a plain forward at the evaluation's batch size (the lower bound's unit)."""
    x = inputs.repeat(math.ceil(batch / max(len(inputs), 1)), 1, 1, 1)[:batch]
    score(x)  # warm
    _, took = _time(lambda: score(x), device)
    return took / len(x)


def correlation_rows(models: list[CohortModel], maps_of: dict[str, dict[str, torch.Tensor]], ids: list[str],
                     fold: int, reference: str) -> list[dict[str, Any]]:
    """Per nodule and method: Pearson correlation of the reference map with every other target's map
    (other models' maps resized to the reference model's input size, bilinear, when they differ)."""
    ref = reference_model(models, reference)
    if ref is None:
        return []
    k_ref = ref.target_names.index(reference)
    rows = []
    for method, ref_maps in maps_of[ref.name].items():
        a = ref_maps[:, k_ref].flatten(1)  # [n, HW]
        for cm in models:
            other = maps_of[cm.name][method]
            if tuple(other.shape[-2:]) != tuple(ref_maps.shape[-2:]):
                other = F.interpolate(other, size=tuple(ref_maps.shape[-2:]), mode="bilinear", align_corners=False)
            for k, (name, kind) in enumerate(zip(cm.target_names, cm.target_kinds(), strict=True)):
                if cm is ref and k == k_ref:
                    continue
                r = pearson(a, other[:, k].flatten(1))
                rows.extend({"fold": fold, "nodule_id": nodule, "method": method, "reference": reference,
                             "model": cm.name, "target": name, "target_kind": kind, "r": float(v)}
                            for nodule, v in zip(ids, r.tolist(), strict=True))
    return rows


def randomization_rows(plan: dict[int, list[CohortModel]], table: pd.DataFrame, data_root: Path,
                       settings: CohortSettings, device: torch.device, fixed: dict[str, list[Concept]] | None = None,
                       fixed_source: str = "") -> pd.DataFrame:
    """The cascading randomisation check per model on the first test nodules of the first fold."""
    fold, models = next(iter(plan.items()))
    # the first fold's concepts (a model may serve several folds)
    attach_concepts(models, fold, data_root, table, settings, fixed, fixed_source)
    test = table[table["fold"] == fold].sort_values("nodule_id").head(settings.randomization_nodules)
    planes = load_planes(data_root, test, models[0].stats["view"])
    rows = []
    for cm in models:
        x = plane_inputs(planes.hu, cm.stats, cm.size).to(device)
        for kind, targets in (("outputs", list(range(cm.model.num_outputs))), ("concepts", list(cm.concepts))):
            if not targets:
                continue
            for r in cascading_randomization(cm.model, x, targets, list(settings.methods),
                                             n_blocks=settings.randomization_blocks, seed=settings.seed,
                                             options=settings.methods):
                rows.append({"fold": fold, "model": cm.name, "targets": kind, "nodules": len(test), **r})
    return pd.DataFrame(rows)
