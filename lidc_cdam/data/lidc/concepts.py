"""Radiological concepts from rated LIDC nodules: their definitions and example groups (paper Eq. 3-4).

This module is data only (which nodules are examples of which concept); the concept vectors, mean latents of
those examples, are computed by :mod:`lidc_cdam.ct.concepts` (:func:`~lidc_cdam.ct.concepts.concept_targets`).
The definitions are the committed ``data_manifest/lidc_concepts.yaml`` (:func:`read_concept_definitions`):
a concept is the plain mean latent (Eq. 3) of the training-part nodules whose rating passes ``high``
(e.g. spiculated: spiculation >= 4); ``<name>-contrast`` is mean latent(high) - mean latent(low). Only
the training part of a fold is used (neither its test nor its validation fold, as
:func:`lidc_cdam.data.lidc.folds.split` makes it): a nodule never explains itself.

* :func:`read_concept_definitions`, :func:`concept_groups`, :func:`training_part` - the definitions and groups;
* :func:`concept_counts` - the group sizes per fold (``data_manifest/lidc_concept_counts.csv`` holds them
  for the committed 862-nodule table; ``python -m lidc_cdam.data.lidc.concepts`` rewrites it).
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.data.lidc.folds import read_folds, split
from lidc_cdam.data.lidc.nodules import BIOMARKERS, read_nodule_table
from lidc_cdam.io import atomic_write
from lidc_cdam.resources import manifest_path

DEFINITIONS = "lidc_concepts.yaml"  # shipped in lidc_cdam.data_manifest
COUNTS = "lidc_concept_counts.csv"
CONTRAST = "-contrast"
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


class ConceptError(LidcError):
    """A concept that is unknown, badly defined, or has too few training examples in a fold."""


@dataclass(frozen=True)
class Rule:
    """``rating op value``, e.g. spiculation >= 4."""

    rating: str
    op: str
    value: float

    def select(self, table: pd.DataFrame) -> np.ndarray:
        """Bool per row; rows without the rating (NaN) are never selected."""
        values = pd.to_numeric(table[self.rating], errors="coerce").to_numpy(dtype=float)
        return _OPS[self.op](values, self.value) & np.isfinite(values)

    def __str__(self) -> str:
        return f"{self.rating} {self.op} {self.value:g}"


@dataclass(frozen=True)
class ConceptDefinition:
    """One radiological concept: the nodules whose rating passes ``high``; ``low`` for the contrast."""

    name: str
    high: Rule
    low: Rule
    description: str = ""


@dataclass(frozen=True)
class ConceptSet:
    """The committed definitions: concepts, Eq. 4's similarity and the minimum group size."""

    concepts: dict[str, ConceptDefinition]
    similarity: str
    min_examples: int
    source: str

    def names(self, contrasts: bool = True) -> list[str]:
        """Every concept name, each followed by its contrast (``spiculated``, ``spiculated-contrast``...)."""
        return [n for c in self.concepts for n in ((c, c + CONTRAST) if contrasts else (c,))]

    def definition(self, name: str) -> tuple[ConceptDefinition, bool]:
        """``(definition, is_contrast)`` of a concept name; :class:`ConceptError` for unknown names."""
        base, contrast = (name[: -len(CONTRAST)], True) if name.endswith(CONTRAST) else (name, False)
        if base not in self.concepts:
            raise ConceptError(f"unknown concept {name!r}; defined in {self.source}: {', '.join(self.names())}")
        return self.concepts[base], contrast


def _rule(text: Any, rating: str, where: str) -> Rule:
    parts = str(text).split()
    if len(parts) != 2 or parts[0] not in _OPS:
        raise ConceptError(f"{where}: expected '<op> <number>' with op one of {list(_OPS)}, got {text!r}")
    try:
        return Rule(rating, parts[0], float(parts[1]))
    except ValueError:
        raise ConceptError(f"{where}: {parts[1]!r} is not a number") from None


def parse_concept_definitions(data: Any, source: str) -> ConceptSet:
    """A :class:`ConceptSet` from the YAML mapping; :class:`ConceptError` naming ``source`` when malformed."""
    if not isinstance(data, dict) or not isinstance(data.get("concepts"), dict) or not data["concepts"]:
        raise ConceptError(f"{source}: expected a mapping with a non-empty 'concepts' mapping")
    similarity = str(data.get("similarity", "dot"))  # checked where the concepts are made (lidc_cdam.ct.concepts)
    concepts = {}
    for name, spec in data["concepts"].items():
        where = f"{source}: concept {name!r}"
        if not isinstance(spec, dict) or not {"rating", "high", "low"} <= set(spec):
            raise ConceptError(f"{where}: needs 'rating', 'high' and 'low'")
        if name.endswith(CONTRAST):
            raise ConceptError(f"{where}: names ending in {CONTRAST!r} are reserved for the contrasts")
        rating = str(spec["rating"])
        if rating not in BIOMARKERS:
            raise ConceptError(f"{where}: rating {rating!r} is not one of {list(BIOMARKERS)}")
        concepts[str(name)] = ConceptDefinition(str(name), _rule(spec["high"], rating, f"{where} high"),
                                                _rule(spec["low"], rating, f"{where} low"),
                                                str(spec.get("description", "")))
    return ConceptSet(concepts, similarity, int(data.get("min_examples", 1)), source)


@cache
def _read(path: str, mtime: float) -> ConceptSet:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConceptError(f"{path}: cannot read the concept definitions ({err})") from None
    return parse_concept_definitions(data, path)


def read_concept_definitions(path: str | Path | None = None) -> ConceptSet:
    """The concept definitions (default: the committed ``data_manifest/lidc_concepts.yaml``)."""
    if path is None:
        path = manifest_path(DEFINITIONS)
    path = str(path)
    if not os.path.isfile(path):
        raise ConceptError(f"{path}: no such concept definitions file")
    return _read(path, os.path.getmtime(path))


def training_part(table: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The rows of ``table`` (with a ``fold`` column) in the training part of test fold ``fold``: not the
    test fold, not its validation fold (the next one), as :func:`lidc_cdam.data.lidc.folds.split`."""
    ids = set(split(table[["nodule_id", "fold"]], fold)["train"])
    return table[table["nodule_id"].isin(ids)]


def concept_groups(table: pd.DataFrame, name: str, concepts: ConceptSet | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Bool masks over ``table``'s rows: the examples of ``name`` (``high``) and, for a contrast, the
    ``low`` group (else ``None``)."""
    concepts = concepts or read_concept_definitions()
    definition, contrast = concepts.definition(name)
    return definition.high.select(table), (definition.low.select(table) if contrast else None)


def concept_counts(nodules: pd.DataFrame | None = None, folds: pd.DataFrame | None = None,
                   concepts: ConceptSet | None = None) -> pd.DataFrame:
    """Per concept and test fold: training-part size and the ``high`` / ``low`` group sizes, and whether the
    concept and its contrast have ``min_examples`` in each group. Default: the committed nodule table
    and folds (the real 862 LIDC-IDRI nodules)."""
    concepts = concepts or read_concept_definitions()
    nodules = read_nodule_table() if nodules is None else nodules
    folds = read_folds() if folds is None else folds
    table = nodules.drop(columns=["fold"], errors="ignore").merge(folds[["nodule_id", "fold"]], on="nodule_id")
    rows = []
    for fold in range(int(table["fold"].max()) + 1):
        train = training_part(table, fold)
        for name, definition in concepts.concepts.items():
            high, low = int(definition.high.select(train).sum()), int(definition.low.select(train).sum())
            rows.append({"concept": name, "rule": str(definition.high), "contrast_low": str(definition.low),
                         "fold": fold, "n_train": len(train), "n_high": high, "n_low": low,
                         "available": high >= concepts.min_examples,
                         "contrast_available": min(high, low) >= concepts.min_examples})
    return pd.DataFrame(rows)


def write_concept_counts(path: str | Path) -> Path:
    """Write :func:`concept_counts` of the committed table and folds (``data_manifest/lidc_concept_counts.csv``)."""
    counts = concept_counts()
    return atomic_write(path, lambda tmp: counts.to_csv(tmp, index=False, lineterminator="\n"))


if __name__ == "__main__":
    import sys

    # default: the committed table where the package finds its manifests (the checkout, for an editable install)
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else manifest_path(COUNTS)
    print(write_concept_counts(target))
