"""The trained demo models that ship inside the package (``lidc_cdam/models/weights/``).

Three tiny ViTs, trained once with the project's own code and committed so that every machine
explains and evaluates with the same numbers (training is not bit-identical across CPUs):

* ``digits-vit``: the two-digit image model (:mod:`lidc_cdam.train.digits`, default config);
* ``phantom-malignancy`` and ``phantom-biomarkers``: the LIDC demo's models, trained on fold 0 of
  the phantom nodules of the first 120 scans (``pipelines/configs/train/tiny-phantom-*.yaml``,
  phantoms are NOT CT).

``weights/MANIFEST.json`` records each file's SHA-256 and size, how it was trained and its test
metrics; a file whose hash differs is refused. ``lidc-cdam demo --retrain`` trains the models
afresh with the same code, and ``python -m lidc_cdam.pipelines.ship_demo_weights`` rewrites the
shipped files and their manifest (a maintainer's job).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from lidc_cdam.io import sha256_of
from lidc_cdam.models.loading import CheckpointError, load_model
from lidc_cdam.models.vit import ViTModel
from lidc_cdam.resources import weights_path

#: shipped model name -> file name under ``lidc_cdam/models/weights/``
SHIPPED: dict[str, str] = {
    "digits-vit": "digits-vit.pt",
    "phantom-malignancy": "phantom-malignancy.pt",
    "phantom-biomarkers": "phantom-biomarkers.pt",
}
MANIFEST = "MANIFEST.json"


@cache
def shipped_manifest() -> dict[str, Any]:
    """``MANIFEST.json``: per model ``file``, ``sha256``, ``bytes``, ``trained`` (how) and ``test_metrics``."""
    return json.loads(weights_path(MANIFEST).read_text())


def shipped_checkpoint(name: str) -> Path:
    """The verified path of a shipped model file (its SHA-256 must equal the manifest's)."""
    if name not in SHIPPED:
        raise KeyError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
    path = weights_path(SHIPPED[name])
    entry = shipped_manifest().get(name)
    if entry is None:
        raise CheckpointError(f"{path}: not listed in the shipped {MANIFEST}")
    actual = sha256_of(path)
    if actual != entry["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 {actual} differs from the recorded {entry['sha256']} "
                              "(a damaged or replaced file); reinstall lidc-cdam or run with --retrain")
    return path


def load_shipped(name: str) -> ViTModel:
    """A shipped demo model, loaded (``weights_only=True``) after its hash is checked; in eval mode."""
    path = shipped_checkpoint(name)
    model = load_model(path)
    model.meta.setdefault("shipped", name)
    model.meta["checkpoint_path"] = str(path)
    return model.eval()
