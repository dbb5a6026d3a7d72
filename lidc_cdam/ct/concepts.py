"""The one concept resolver of the CT path: radiological concepts (concept CDAM, Eq. 3-4) for the fold models.

A concept target of a model is the mean latent CLS' of rated example nodules (Eq. 3) taken from **that model's
own training fold** (:func:`lidc_cdam.data.lidc.concepts.concept_targets`), so no model sees its test nodules.
:class:`ConceptResolver` checks the names and the example folder once, computes each model's vectors once
(keyed by the checkpoint's fingerprint), and names the task whose models explain them (the malignancy models
where loaded, else the first task's). ``explain-ct --concept`` and the viewer's "concept: ..." targets both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lidc_cdam.ct.checkpoint import MALIGNANCY, LoadedModel
from lidc_cdam.ct.errors import CTError

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
        from lidc_cdam.data.lidc.concepts import ConceptError, read_concept_definitions

        try:
            definitions = read_concept_definitions()
            for name in self.names:
                definitions.definition(name)
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
        from lidc_cdam.data.lidc.concepts import read_concept_definitions

        return list(read_concept_definitions().names())

    @staticmethod
    def task(models: Sequence[LoadedModel]) -> str:
        """The task whose models explain the concepts: malignancy where loaded, else the first model's."""
        tasks = [m.task for m in models]
        return MALIGNANCY if MALIGNANCY in tasks else (tasks[0] if tasks else MALIGNANCY)

    def __call__(self, model: LoadedModel) -> list[Any]:
        from lidc_cdam.data.lidc.concepts import ConceptError, concept_targets

        if model.fingerprint not in self._vectors:
            try:
                self._vectors[model.fingerprint] = concept_targets(model.model, self.data, names=list(self.names))
            except ConceptError as err:
                raise CTError(f"concepts for {model.path.name}: {err}") from None
        return self._vectors[model.fingerprint]

    def for_explain(self) -> dict[str, Any]:
        """The keyword arguments of :func:`lidc_cdam.ct.ensemble.explain_tasks_steps` (none without concepts)."""
        return {"concepts": self} if self else {}
