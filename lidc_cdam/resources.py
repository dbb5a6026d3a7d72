"""Files that ship inside the package, found with :mod:`importlib.resources` (never via source paths).

* :func:`manifest_path`: the committed manifests (``data_manifest/`` in the source tree, the
  ``lidc_cdam.data_manifest`` package once installed): the LIDC nodule table and folds, the ImageNet
  X_val / X_multi lists, the paper's tables.
* :func:`config_dir`: the YAML presets of the benchmark and training jobs (``pipelines/configs/``).
* :func:`weights_path`: the trained demo models (``lidc_cdam/models/weights/``).
"""

from __future__ import annotations

import shutil
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from lidc_cdam import __version__
from lidc_cdam.cache import cache_dir

MANIFESTS = "lidc_cdam.data_manifest"
CONFIGS = "lidc_cdam.pipelines"
WEIGHTS = "lidc_cdam.models"


def _on_disk(item: Traversable, what: str) -> Path:
    """``item`` as a real path; a resource inside a zip is copied into the cache once."""
    if not item.is_file() and not item.is_dir():
        raise FileNotFoundError(f"{what}: not shipped with this installation of lidc-cdam ({item})")
    if isinstance(item, Path):
        return item
    target = cache_dir() / "resources" / str(__version__) / what
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with resources.as_file(item) as path:
            (shutil.copytree if path.is_dir() else shutil.copyfile)(path, target)
    return target


def manifest_path(name: str) -> Path:
    """A committed manifest by file name, e.g. ``manifest_path("lidc_folds.csv")``."""
    return _on_disk(resources.files(MANIFESTS).joinpath(name), f"data_manifest/{name}")


def config_dir(*parts: str) -> Path:
    """The shipped config folder (``config_dir("train")`` for the training presets)."""
    item = resources.files(CONFIGS).joinpath("configs", *parts)
    return _on_disk(item, "/".join(("configs", *parts)))


def weights_path(name: str) -> Path:
    """A shipped demo model file by name (see :mod:`lidc_cdam.models.demo_weights`)."""
    return _on_disk(resources.files(WEIGHTS).joinpath("weights", name), f"weights/{name}")
