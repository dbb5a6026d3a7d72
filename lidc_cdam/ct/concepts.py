"""Concept targets (concept CDAM, Eq. 3-4) and the one concept resolver of the CT path.

A concept target of a model is the mean latent CLS' of rated example nodules (Eq. 3) taken from **that model's
own training fold** (:func:`concept_targets`; the definitions and groups are data,
:mod:`lidc_cdam.data.lidc.concepts`), so no model sees its test nodules. :func:`latents_of` and
:func:`concept_vectors` are its steps (the cohort evaluation calls them on planes it has already read).
:class:`ConceptResolver` checks the names and the example folder once, computes each model's vectors once
(keyed by the checkpoint's fingerprint), and names the task whose models explain them (the malignancy models
where loaded, else the first task's). ``explain-ct --concept`` and the viewer's "concept: ..." targets both use it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lidc_cdam.ct.checkpoint import MALIGNANCY, LoadedModel
from lidc_cdam.ct.errors import CTError
from lidc_cdam.data.lidc.concepts import (
    ConceptError,
    ConceptSet,
    concept_groups,
    read_concept_definitions,
    training_part,
)
from lidc_cdam.data.lidc.nodule_inputs import checkpoint_input_settings, load_planes, plane_inputs, read_data_table
from lidc_cdam.explain.targets import SIMILARITIES, Concept
from lidc_cdam.models.demo_weights import SHIPPED, load_shipped
from lidc_cdam.models.loading import load_model
from lidc_cdam.models.vit import ViTModel

logger = logging.getLogger(__name__)

#: how a concept is listed among the targets (viewer) and named in outputs
CONCEPT_PREFIX = "concept: "


class ConceptResolver:
    """``resolver(model)`` -> the model's concept targets for ``names`` from the rated nodules under ``data``
    (a preprocess or phantoms folder: ``nodules.csv`` + ``crops/``). Falsy when no concept is asked for."""

    def __init__(self, names: Sequence[str] = (), data: str | Path | None = None):
        self.names = tuple(dict.fromkeys(str(n) for n in names))
        self.data = Path(data).expanduser() if data is not None else None
        self._vectors: dict[str, list] = {}
        if not self.names:
            return
        try:
            known = checked_definitions()
            for name in self.names:
                known.definition(name)
        except ConceptError as err:
            raise CTError(str(err)) from None
        if self.data is None:
            raise CTError("concepts need rated example nodules: a preprocess or phantoms folder with nodules.csv "
                          "and crops/ (explain-ct: --concept-data DIR; viewer: 'Concept examples')")
        if not (self.data / "nodules.csv").is_file():
            raise CTError(f"{self.data}: no nodules.csv here; concept examples are a preprocess or phantoms folder "
                          "(nodules.csv + crops/)")

    def __bool__(self) -> bool:
        return bool(self.names)

    @staticmethod
    def available() -> list[str]:
        """The names of the committed concept definitions."""
        return list(read_concept_definitions().names())

    @staticmethod
    def task(models: Sequence[LoadedModel]) -> str:
        """The task whose models explain the concepts: malignancy where loaded, else the first model's."""
        tasks = [m.task for m in models]
        return MALIGNANCY if MALIGNANCY in tasks else (tasks[0] if tasks else MALIGNANCY)

    def __call__(self, model: LoadedModel) -> list[Any]:
        if model.fingerprint not in self._vectors:
            try:
                self._vectors[model.fingerprint] = concept_targets(model.model, self.data, names=list(self.names))
            except ConceptError as err:
                raise CTError(f"concepts for {model.path.name}: {err}") from None
        return self._vectors[model.fingerprint]

    def for_explain(self) -> dict[str, Any]:
        """The keyword arguments of :func:`lidc_cdam.ct.ensemble.explain_tasks_steps` (none without concepts)."""
        return {"concepts": self} if self else {}


def checked_definitions(path: str | Path | None = None) -> ConceptSet:
    """The concept definitions (default: the committed ones), their similarity checked against Eq. 4's choices."""
    concepts = read_concept_definitions(path)
    if concepts.similarity not in SIMILARITIES:
        raise ConceptError(f"{concepts.source}: similarity {concepts.similarity!r} is not one of {SIMILARITIES}")
    return concepts


def concept_vectors(latents, table: pd.DataFrame, names: Sequence[str], concepts: ConceptSet | None = None,
                    *, similarity: str | None = None, strict: bool = True) -> list:
    """:class:`~lidc_cdam.Concept` s from the latents ``[n, D]`` of ``table``'s rows (already the training
    part): Eq. 3's mean over each ``high`` group, minus the ``low`` group's mean for contrasts. A group
    below ``min_examples`` raises :class:`ConceptError` (``strict``) or drops that concept."""
    concepts = concepts or checked_definitions()
    out = []
    for name in names:
        high, low = concept_groups(table, name, concepts)
        sizes = [int(high.sum())] + ([int(low.sum())] if low is not None else [])
        if min(sizes) < concepts.min_examples:
            message = (f"concept {name!r}: {' / '.join(map(str, sizes))} training example(s) "
                       f"({'high / low' if low is not None else 'high'}), fewer than min_examples = "
                       f"{concepts.min_examples} ({concepts.source})")
            if strict:
                raise ConceptError(message)
            logger.warning("skipping %s", message)
            continue
        vector = latents[high].mean(0)
        if low is not None:
            vector = vector - latents[low].mean(0)
        out.append(Concept(vector.detach().clone(), similarity=similarity or concepts.similarity, name=name))
    return out


def latents_of(model, inputs, batch_size: int = 256):
    """``model.latent`` of ``inputs`` ``[n, C, H, W]`` in eval mode, without gradients, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model.latent(chunk.to(device)) for chunk in inputs.split(batch_size)]).cpu()
    finally:
        model.train(was_training)


def concept_targets(checkpoint_or_model, data_root: str | Path, fold: int | None = None,
                    names: Sequence[str] | None = None, *, similarity: str | None = None,
                    folds: str | Path | pd.DataFrame | None = None, definitions: str | Path | None = None) -> list:
    """Concept targets (Eq. 3) for ``explain`` from the training-part nodules of ``data_root``.

    ``checkpoint_or_model``: a :class:`~lidc_cdam.ViTModel` trained with ``lidc-cdam train`` (its
    ``meta["input_stats"]`` builds the inputs), a checkpoint path, or a shipped model name
    (``"phantom-malignancy"``). ``fold``: the test fold whose training part gives the examples (default:
    the checkpoint's ``meta["fold"]``). ``names``: e.g. ``["spiculated", "round-contrast"]``; ``None`` gives
    every concept and contrast with enough examples (the others are skipped with a warning); a named
    concept with too few raises :class:`ConceptError`. ``similarity`` overrides the YAML's ``g`` (Eq. 4).

    >>> targets = concept_targets("phantom-malignancy", "phantoms/")      # doctest: +SKIP
    >>> explain(model, images, targets, method="cdam")                    # doctest: +SKIP
    """
    model = load_checkpoint_model(checkpoint_or_model)
    concepts = checked_definitions(definitions)
    if fold is None:
        fold = (model.meta or {}).get("fold")
        if fold is None:
            raise ConceptError("the model does not record its fold (meta['fold']): pass fold=")
    stats, size = checkpoint_input_settings(model)
    table = read_data_table(data_root, folds)
    train = training_part(table, int(fold)).reset_index(drop=True)
    if train.empty:
        raise ConceptError(f"{Path(data_root) / 'nodules.csv'}: no training-part nodules for fold {fold}")
    wanted = list(names) if names is not None else concepts.names()
    for name in wanted:
        concepts.definition(name)  # unknown names fail before any crop is read
    planes = load_planes(data_root, train, stats["view"])
    latents = latents_of(model, plane_inputs(planes.hu, stats, size))
    return concept_vectors(latents, train, wanted, concepts, similarity=similarity, strict=names is not None)


def load_checkpoint_model(checkpoint_or_model):
    """A :class:`ViTModel` from a model, a checkpoint path or a shipped model name."""
    if isinstance(checkpoint_or_model, ViTModel):
        return checkpoint_or_model
    if isinstance(checkpoint_or_model, str) and checkpoint_or_model in SHIPPED:
        return load_shipped(checkpoint_or_model)
    model = load_model(checkpoint_or_model)
    model.meta.setdefault("checkpoint_path", str(checkpoint_or_model))
    return model.eval()
