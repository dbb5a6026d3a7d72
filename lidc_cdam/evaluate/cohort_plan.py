"""The LIDC cohort evaluation, its plan: what a run computes (:class:`CohortSettings`), the checkpoints and the
test fold each one explains (:func:`plan_folds`), their concept vectors (Eq. 3 on the fold's training part, or
those of an earlier run) and the fingerprint that guards resuming. :mod:`lidc_cdam.evaluate.cohort` runs it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lidc_cdam.ct.concepts import concept_vectors, latents_of, load_checkpoint_model
from lidc_cdam.data.lidc.concepts import concept_groups, read_concept_definitions, training_part
from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.data.lidc.nodule_inputs import checkpoint_input_settings, load_planes, plane_inputs
from lidc_cdam.evaluate.perturbation import PERCENTS
from lidc_cdam.explain.targets import Concept
from lidc_cdam.models.checkpoint_format import CheckpointError, read_checkpoint
from lidc_cdam.models.demo_weights import sha256_of

#: the ten methods with the options of the offline benchmark preset (n = 50, seeded noise)
COHORT_METHODS: dict[str, dict[str, Any]] = {
    "cdam": {}, "integrated-cdam": {"n": 50, "space": "tokens"},
    "smooth-cdam": {"n": 50, "sigma": 0.05, "space": "block_input", "seed": 0},
    "relevance-propagation": {}, "partial-lrp": {"norm_act_rule": "identity"}, "attention": {},
    "smoothgrad": {"n": 50, "sigma": 0.15, "seed": 0}, "intgrad": {"n": 50}, "gradcam": {}, "input-x-grad": {},
}
REGIONS = ("mask", "ring", "background")
#: what a run's rows hold beyond its settings: 2 added the cause-region columns, 3 the shares of either sign (an
#: older run's parts do not resume)
ROWS_VERSION = 3
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
    return sha256_of(path) if path and Path(path).is_file() else ""


def load_cohort_models(checkpoints: Sequence[str | Path]) -> list[CohortModel]:
    """Checkpoints (paths or shipped names) with their names: ``meta["task"]`` (else the file stem)."""
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


def fingerprint(models: list[CohortModel], settings: CohortSettings, data_root: Path, folds_table: pd.DataFrame,
                concepts_file: str, concepts_from: str | Path | None = None) -> str:
    """What the results depend on: checkpoints, the data's nodule table, the folds, settings, definitions."""
    digest = hashlib.sha256(f"rows {ROWS_VERSION}\n".encode())
    for m in models:
        digest.update(f"{m.name}:{m.sha256 or m.source}\n".encode())
    digest.update((data_root / "nodules.csv").read_bytes())
    digest.update(folds_table[["nodule_id", "fold"]].to_csv(index=False).encode())
    digest.update(json.dumps(settings.without_speed(), sort_keys=True).encode())
    digest.update(Path(concepts_file).read_bytes())
    if concepts_from is not None:
        digest.update(Path(concepts_from).read_bytes())
    return digest.hexdigest()[:16]


def load_concepts(path: str | Path) -> dict[str, list[Concept]]:
    """:func:`save_concepts`' file, read with ``weights_only=True``; :class:`CohortError` naming the file."""
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
    counts = pd.DataFrame(rows, columns=["fold", "concept", "n_train", "n_high", "n_low"])  # none: `--concept`
    counts["used"] = counts["concept"].isin(used)
    return counts
