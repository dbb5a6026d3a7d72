"""The LIDC cohort evaluation (issue 14): are the maps on the nodule, faithful on the crops, and do the
malignancy model's evidence and the biomarkers' and concepts' evidence co-locate?

Over the test nodules of each fold, for every checkpoint of that fold, every target (the model's
outputs and, on the reference model, the radiological concepts of :mod:`lidc_cdam.data.lidc.concepts`,
Eq. 3-4, from the fold's training part) and every method, on the central slice of each crop:

* evidence share: :func:`~lidc_cdam.evaluate.localisation.positive_share_in_mask` in the consensus
  mask, in a ``ring_mm`` ring around it and in the background, beside the area share a uniform map
  would give; the pointing game on the mask;
* MIF / LIF and box sensitivity (:func:`~lidc_cdam.evaluate.metrics.evaluate_targets`, the boxes'
  forwards shared by every method and target), the blurred baseline made in HU on the crop's 1 mm
  plane (Gaussian, ``blur_mm``) and then passed through the checkpoint's input transforms; compactness;
* the Pearson correlation, per nodule and method, of the reference map (``malignant``) with every other
  target's map;
* the cascading randomisation check (:mod:`~lidc_cdam.evaluate.randomization`).

Nodules are processed in parts of ``batch_nodules`` per fold; each part's rows are written atomically
(``parts/fold<k>/part_NNNNN.*``, the ``.json`` last as its done-marker), so an interrupted run resumes.
A checkpoint is only evaluated on the test fold it records (``meta["fold"]``): its training nodules
never enter its results. Tables and figures: :mod:`lidc_cdam.evaluate.cohort_report`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.evaluate.localisation import pointing_game, positive_share_in_mask, ring_regions
from lidc_cdam.evaluate.metrics import evaluate_targets
from lidc_cdam.evaluate.perturbation import PERCENTS, gaussian_blur, pearson
from lidc_cdam.evaluate.runner import box_generator, write_parquet
from lidc_cdam.explain.api import explain
from lidc_cdam.explain.targets import Concept
from lidc_cdam.io import atomic_write, write_json

log = logging.getLogger(__name__)

#: the ten methods with the options of the offline benchmark preset (n = 50, seeded noise)
COHORT_METHODS: dict[str, dict[str, Any]] = {
    "cdam": {}, "integrated-cdam": {"n": 50, "space": "tokens"},
    "smooth-cdam": {"n": 50, "sigma": 0.05, "space": "block_input", "seed": 0},
    "relevance-propagation": {}, "partial-lrp": {"norm_act_rule": "identity"}, "attention": {},
    "smoothgrad": {"n": 50, "sigma": 0.15, "seed": 0}, "intgrad": {"n": 50}, "gradcam": {}, "input-x-grad": {},
}
REGIONS = ("mask", "ring", "background")
PHANTOM_WARNING = "phantoms, not CT"


class CohortError(LidcError):
    """A cohort run that cannot start: no checkpoint for a fold, a folder holding another run..."""


@dataclass(frozen=True)
class CohortSettings:
    """What a cohort run computes (its fingerprint guards resuming)."""

    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(COHORT_METHODS))
    percents: tuple[int, ...] = PERCENTS
    box_sizes: tuple[int, ...] | None = None  # patch units; None: 1 .. (image side - 1) // patch
    n_boxes: int = 100
    blur_mm: float = 2.0  # the paper's 14 px at 224 px (1/16 of the image) on the 32 mm crop
    ring_mm: float = 3.0
    seed: int = 0
    batch_nodules: int = 16
    concepts: tuple[str, ...] | None = None  # None: every defined concept and contrast with enough examples
    concepts_on: str = "reference"  # "reference" (the model with the reference output) or "all"
    similarity: str | None = None  # None: the YAML's (dot, the paper's)
    reference: str = "malignant"  # the output whose map the others are correlated with
    randomization_nodules: int = 16
    randomization_blocks: int = 2

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def without_speed(self) -> dict[str, Any]:
        """The settings that change results (``batch_nodules`` does not)."""
        d = self.to_dict()
        d.pop("batch_nodules")
        return d


@dataclass
class CohortModel:
    """One checkpoint: its name in the tables, fold, input settings and targets."""

    name: str
    model: Any
    fold: int | None
    stats: dict[str, Any]
    size: int
    source: str
    sha256: str
    concepts: list[Concept] = field(default_factory=list)

    @property
    def target_names(self) -> list[str]:
        return list(self.model.output_names or [str(i) for i in range(self.model.num_outputs)]) + \
            [c.name for c in self.concepts]

    def target_kinds(self) -> list[str]:
        return ["output"] * self.model.num_outputs + ["concept"] * len(self.concepts)


def _sha256(path: str) -> str:
    from lidc_cdam.models.demo_weights import sha256_of

    return sha256_of(path) if path and Path(path).is_file() else ""


def load_cohort_models(checkpoints: Sequence[str | Path]) -> list[CohortModel]:
    """Checkpoints (paths or shipped names) with their names: ``meta["task"]`` (else the file stem)."""
    from lidc_cdam.ct.concepts import load_checkpoint_model
    from lidc_cdam.data.lidc.nodule_inputs import checkpoint_input_settings

    out: list[CohortModel] = []
    for ref in checkpoints:
        model = load_checkpoint_model(str(ref)).eval()
        meta = model.meta or {}
        source = str(meta.get("checkpoint_path", ref))
        stats, size = checkpoint_input_settings(model)
        name = str(meta.get("task") or Path(source).stem)
        taken = {m.name for m in out}
        base, k = name, 2
        while name in taken:
            name, k = f"{base}-{k}", k + 1
        fold = meta.get("fold")
        out.append(CohortModel(name, model, None if fold is None else int(fold), stats, size, source,
                               _sha256(source)))
    return out


def plan_folds(models: list[CohortModel], folds: Sequence[int] | None) -> dict[int, list[CohortModel]]:
    """Which checkpoints explain which test fold. A checkpoint recording its fold serves that fold only; one
    without a recorded fold needs exactly one ``folds`` entry. Raises :class:`CohortError`."""
    unknown = [m for m in models if m.fold is None]
    if unknown and (folds is None or len(folds) != 1):
        raise CohortError(f"{unknown[0].source}: the checkpoint does not record its fold (meta['fold']): "
                          "give exactly one --folds value for it")
    wanted = sorted({m.fold for m in models if m.fold is not None} | set(folds or [])) if folds is None \
        else sorted(set(folds))
    plan = {f: [m for m in models if m.fold in (f, None)] for f in wanted}
    empty = [f for f, ms in plan.items() if not ms]
    if empty:
        have = ", ".join(f"{m.source} (fold {m.fold})" for m in models)
        raise CohortError(f"no checkpoint for test fold(s) {empty}: a checkpoint is only evaluated on the fold it "
                          f"was trained for ({have})")
    return plan


def reference_model(models: list[CohortModel], reference: str) -> CohortModel | None:
    """The first model with an output named ``reference``."""
    return next((m for m in models if reference in (m.model.output_names or [])), None)


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
            return torch.cat(parts, dim=1).float().cpu()


def _time(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


def nodule_seed(seed: int, nodule_id: str) -> int:
    """A seeded method's seed for one nodule: its maps do not depend on which nodules share its batch."""
    import zlib

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
        pixel[method] = torch.cat([a.upsample("nearest").detach().float().cpu() for a in attributions], 1)
        native[method] = torch.cat([a.maps.detach().float().cpu() for a in attributions], 1)
        seconds[method] = took
    return pixel, native, seconds


def _stack_attributions(parts: list) -> Any:
    """One :class:`Attribution` of several single-image ones (same method and targets)."""
    from dataclasses import replace

    return replace(parts[0], maps=torch.cat([p.maps for p in parts]),
                   target_names=[n for p in parts for n in p.target_names], scores=None, latents=None)


def evaluate_part(models: list[CohortModel], planes, labels: dict[str, float], fold: int, settings: CohortSettings,
                  device: torch.device) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Metric rows, correlation rows and timing of a list of nodules (``planes``: :class:`NodulePlanes`)."""
    from lidc_cdam.data.lidc.nodule_inputs import plane_inputs

    ids = planes.nodule_ids
    blurred_hu = blur_planes(planes.hu, settings.blur_mm)
    metric_rows: list[dict[str, Any]] = []
    maps_of: dict[str, dict[str, torch.Tensor]] = {}
    timing: dict[str, Any] = {"nodules": len(ids), "models": {}}
    for cm in models:
        inputs = plane_inputs(planes.hu, cm.stats, cm.size)
        blurred = plane_inputs(blurred_hu, cm.stats, cm.size)
        regions = model_regions(planes.mask, settings.ring_mm, cm.size)
        score = CountingScore(cm.model, cm.concepts, device)
        values, forward_s = _time(lambda inputs=inputs, score=score: score(inputs), device)
        values_blurred = score(blurred)  # the whole plane blurred: how far from neutral the baseline is
        pixel, native, explain_s = explain_all(cm, inputs, settings.methods, device, ids)
        maps_of[cm.name] = pixel
        patch = int(cm.model.patch_size[0])
        sizes = settings.box_sizes or tuple(range(1, (cm.size - 1) // patch + 1))
        names, kinds = cm.target_names, cm.target_kinds()
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
            for method, per_target in results.items():
                shares = {r: positive_share_in_mask(pixel[method][j], region_j[r]) for r in REGIONS}  # [K]
                hits = pointing_game(pixel[method][j], region_j["mask"])
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
                        "compactness": r.compactness,
                    })
        eval_s = time.perf_counter() - start
        timing["models"][cm.name] = {"targets": len(names), "forward_seconds": forward_s,
                                     "explain_seconds": explain_s, "evaluate_seconds": eval_s,
                                     "evaluate_forward_images": score.images,
                                     "per_image_forward_seconds": _per_image_forward(score, inputs, device)}
    return metric_rows, correlation_rows(models, maps_of, ids, fold, settings.reference), timing


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


def fingerprint(models: list[CohortModel], settings: CohortSettings, data_root: Path, folds_table: pd.DataFrame,
                concepts_file: str, concepts_from: str | Path | None = None) -> str:
    """What the results depend on: checkpoints, the data's nodule table, the folds, settings, definitions."""
    digest = hashlib.sha256()
    for m in models:
        digest.update(f"{m.name}:{m.sha256 or m.source}\n".encode())
    digest.update((data_root / "nodules.csv").read_bytes())
    digest.update(folds_table[["nodule_id", "fold"]].to_csv(index=False).encode())
    digest.update(json.dumps(settings.without_speed(), sort_keys=True).encode())
    digest.update(Path(concepts_file).read_bytes())
    if concepts_from is not None:
        digest.update(Path(concepts_from).read_bytes())
    return digest.hexdigest()[:16]


def _check_out(out: Path, print_: str, restart: bool) -> None:
    run_file = out / "run.json"
    if run_file.exists() and not restart:
        previous = json.loads(run_file.read_text()).get("fingerprint")
        if previous != print_:
            raise CohortError(f"{run_file}: holds results of another run (fingerprint {previous}, now {print_}: other "
                              "checkpoints, data, folds or settings); use another --out or --restart")
    if restart and (out / "parts").exists():
        import shutil

        shutil.rmtree(out / "parts")
        for name in ("randomization.csv",):
            (out / name).unlink(missing_ok=True)


def save_concepts(path: Path, vectors: dict[str, list[Concept]]) -> Path:
    """The concept vectors of a run (``{"fold<k>/<model>": [Concept]}``) as plain tensors (``concepts.pt``)."""
    payload = {key: {"names": [c.name for c in cs], "similarity": [c.similarity for c in cs],
                     "vectors": torch.stack([c.vector.float().cpu() for c in cs]) if cs else torch.zeros(0)}
               for key, cs in vectors.items()}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_concepts(path: str | Path) -> dict[str, list[Concept]]:
    """:func:`save_concepts`' file, read with ``weights_only=True``; :class:`CohortError` naming the file."""
    from lidc_cdam.models.checkpoint_format import CheckpointError, read_checkpoint

    try:
        payload = read_checkpoint(path)  # weights only; a file that carries code is refused and named so
    except CheckpointError as err:
        raise CohortError(str(err)) from None
    try:
        return {key: [Concept(v, similarity=sim, name=name) for name, sim, v in
                      zip(entry["names"], entry["similarity"], entry["vectors"], strict=True)]
                for key, entry in payload.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CohortError(f"{path}: not a concepts file of a cohort run ({err.__class__.__name__}: {err})") from None


def attach_concepts(models: list[CohortModel], fold: int, data_root: Path, table: pd.DataFrame,
                    settings: CohortSettings, fixed: dict[str, list[Concept]] | None = None,
                    fixed_source: str = "") -> pd.DataFrame:
    """Set each model's concepts for ``fold`` (Eq. 3 on the fold's training part, or ``fixed`` ones of an
    earlier run); returns the group sizes in the data."""
    from lidc_cdam.ct.concepts import concept_vectors, latents_of
    from lidc_cdam.data.lidc.concepts import concept_groups, read_concept_definitions, training_part
    from lidc_cdam.data.lidc.nodule_inputs import load_planes, plane_inputs

    definitions = read_concept_definitions()
    names = list(settings.concepts) if settings.concepts is not None else definitions.names()
    ref = reference_model(models, settings.reference)
    train = training_part(table, fold).reset_index(drop=True)
    rows = []
    for name in names:
        high, low = concept_groups(train, name, definitions)
        rows.append({"fold": fold, "concept": name, "n_train": len(train), "n_high": int(high.sum()),
                     "n_low": int(low.sum()) if low is not None else None})
    for cm in models:
        cm.concepts = []
        if not names or (settings.concepts_on != "all" and cm is not ref):
            continue
        if fixed is not None:
            key = f"fold{fold}/{cm.name}"
            if key not in fixed:
                raise CohortError(f"{fixed_source}: no concepts for {key} (it has {', '.join(fixed) or 'none'})")
            cm.concepts = [c for c in fixed[key] if c.name in names]
            continue
        planes = load_planes(data_root, train, cm.stats["view"])
        latents = latents_of(cm.model, plane_inputs(planes.hu, cm.stats, cm.size))
        cm.concepts = concept_vectors(latents, train, names, definitions, similarity=settings.similarity,
                                      strict=settings.concepts is not None)
    used = {c.name for cm in models for c in cm.concepts}
    counts = pd.DataFrame(rows)
    counts["used"] = counts["concept"].isin(used)
    return counts


def run_cohort(checkpoints: Sequence[str | Path], data_root: str | Path, out: str | Path, *,
               folds: Sequence[int] | None = None, settings: CohortSettings | None = None,
               folds_table: str | Path | None = None, restart: bool = False, progress: bool = True,
               device: str | torch.device | None = "cpu", max_parts: int | None = None,
               concepts_from: str | Path | None = None) -> dict[str, Any] | None:
    """Run (or resume) the cohort evaluation into ``out``; returns the summary (``None`` when ``max_parts``
    stopped it early, which tests use to simulate an interruption). ``concepts_from``: the ``concepts.pt``
    of an earlier run, whose concept vectors are used instead of recomputing them from the training part
    (to reproduce a run on a subset of its data)."""
    from tqdm.auto import tqdm

    from lidc_cdam.data.lidc.concepts import read_concept_definitions
    from lidc_cdam.data.lidc.folds import read_folds
    from lidc_cdam.data.lidc.nodule_inputs import load_planes, read_data_table
    from lidc_cdam.resources import manifest_path

    settings = settings or CohortSettings()
    unknown = sorted(set(settings.methods) - set(_methods()))
    if unknown:
        raise CohortError(f"unknown method(s) {unknown}; available: {', '.join(_methods())}")
    from lidc_cdam.device import resolve_device

    out, data_root, device = Path(out), Path(data_root), resolve_device(device)
    models = load_cohort_models(checkpoints)
    plan = plan_folds(models, folds)
    if folds_table is not None and not Path(folds_table).is_file():
        raise CohortError(f"{folds_table}: no such folds table")
    fold_df = read_folds(folds_table)
    table = read_data_table(data_root, fold_df)
    concepts_file = str(manifest_path("lidc_concepts.yaml"))
    read_concept_definitions(concepts_file)
    fixed = load_concepts(concepts_from) if concepts_from is not None else None
    stamp = fingerprint(models, settings, data_root, fold_df, concepts_file, concepts_from)
    _check_out(out, stamp, restart)
    phantom = "source" in table.columns and (table["source"].astype(str) == "phantom").all()
    write_json(out / "run.json", {
        "fingerprint": stamp, "data": str(data_root), "phantoms": bool(phantom),
        "note": PHANTOM_WARNING if phantom else "CT crops",
        "checkpoints": [{"name": m.name, "source": m.source, "sha256": m.sha256, "fold": m.fold} for m in models],
        "folds": list(plan), "settings": settings.to_dict()})
    # the settings alone (no local paths) are committed with the tables: what a rerun needs
    write_json(out / "settings.json", {"settings": settings.to_dict(), "folds": list(plan),
                                       "checkpoints": [{"name": m.name, "sha256": m.sha256, "fold": m.fold}
                                                       for m in models]})
    for m in models:
        m.model.to(device).eval()
    done_here, concept_counts, vectors = 0, [], {}
    for fold, fold_models in plan.items():
        test = table[table["fold"] == fold].sort_values("nodule_id").reset_index(drop=True)
        if test.empty:
            raise CohortError(f"{data_root / 'nodules.csv'}: no test nodules of fold {fold}")
        concept_counts.append(attach_concepts(fold_models, fold, data_root, table, settings, fixed,
                                              str(concepts_from)))
        vectors.update({f"fold{fold}/{cm.name}": list(cm.concepts) for cm in fold_models})
        labels = dict(zip(test["nodule_id"], test["label"].astype(float), strict=True)) if "label" in test else {}
        folder = out / "parts" / f"fold{fold}"
        n_parts = math.ceil(len(test) / settings.batch_nodules)
        todo = [p for p in range(n_parts) if not (folder / f"part_{p:05d}.json").exists()]
        bar = tqdm(todo, desc=f"fold {fold} ({len(test)} nodules)", unit="part", disable=not progress)
        for part in bar:
            if max_parts is not None and done_here >= max_parts:
                return None
            rows = test.iloc[part * settings.batch_nodules:(part + 1) * settings.batch_nodules]
            start = time.perf_counter()
            planes = load_planes(data_root, rows, fold_models[0].stats["view"])
            metrics, correlations, timing = evaluate_part(fold_models, planes, labels, fold, settings, device)
            write_parquet(pd.DataFrame(metrics), folder / f"part_{part:05d}.metrics.parquet")
            write_parquet(pd.DataFrame(correlations), folder / f"part_{part:05d}.correlations.parquet")
            write_json(folder / f"part_{part:05d}.json", {**timing, "nodule_ids": list(rows["nodule_id"]),
                                                          "seconds": time.perf_counter() - start})
            done_here += 1
    counts = pd.concat(concept_counts, ignore_index=True)
    atomic_write(out / "concepts.csv", lambda tmp: counts.to_csv(tmp, index=False))
    save_concepts(out / "concepts.pt", vectors)
    return finish(out, plan, table, settings, device, fixed, str(concepts_from))


def _methods() -> list[str]:
    from lidc_cdam.explain.api import METHODS

    return list(METHODS)


def merge_parts(out: Path, plan: dict[int, list[CohortModel]]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Metric rows, correlation rows and the timing rows (one per part and model) of every finished part."""
    metrics, correlations, timing = [], [], []
    for fold in plan:
        folder = out / "parts" / f"fold{fold}"
        for marker in sorted(folder.glob("part_*.json")):
            stem = marker.name[: -len(".json")]
            metrics.append(pd.read_parquet(folder / f"{stem}.metrics.parquet"))
            correlations.append(pd.read_parquet(folder / f"{stem}.correlations.parquet"))
            info = json.loads(marker.read_text())
            for name, t in info["models"].items():
                timing.append({"fold": fold, "part": stem, "model": name, "nodules": info["nodules"],
                               "targets": t["targets"], "forward_seconds": t["forward_seconds"],
                               "explain_seconds": sum(t["explain_seconds"].values()),
                               **{f"explain_seconds_{m}": s for m, s in t["explain_seconds"].items()},
                               "evaluate_seconds": t["evaluate_seconds"],
                               "evaluate_forward_images": t["evaluate_forward_images"],
                               "per_image_forward_seconds": t["per_image_forward_seconds"]})

    def cat(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    return cat(metrics), cat(correlations), pd.DataFrame(timing)


def randomization_check(out: Path, plan: dict[int, list[CohortModel]], table: pd.DataFrame, data_root: Path,
                        settings: CohortSettings, device: torch.device, fixed: dict[str, list[Concept]] | None = None,
                        fixed_source: str = "") -> pd.DataFrame | None:
    """The cascading randomisation check per model on the first test nodules of the first fold (cached)."""
    from lidc_cdam.data.lidc.nodule_inputs import load_planes, plane_inputs
    from lidc_cdam.evaluate.randomization import cascading_randomization

    path = out / "randomization.csv"
    if settings.randomization_nodules < 1:
        return None
    if path.exists():
        return pd.read_csv(path)
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
    frame = pd.DataFrame(rows)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return frame


def finish(out: Path, plan: dict[int, list[CohortModel]], table: pd.DataFrame, settings: CohortSettings,
           device: torch.device, fixed: dict[str, list[Concept]] | None = None, fixed_source: str = ""
           ) -> dict[str, Any]:
    """Merge the parts, run the randomisation check, write the tables and figures."""
    from lidc_cdam.evaluate.cohort_report import write_cohort_report

    metrics, correlations, timing = merge_parts(out, plan)
    for name, frame in (("metrics", metrics), ("correlations", correlations), ("timing", timing)):
        write_parquet(frame, out / f"{name}.parquet")
        atomic_write(out / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    run = json.loads((out / "run.json").read_text())
    randomization = randomization_check(out, plan, table, Path(run["data"]), settings, device, fixed, fixed_source)
    return write_cohort_report(out, metrics, correlations, timing, randomization, run)
