"""lidc-cdam: class-discriminative attention maps (CDAM) for Vision Transformers.

>>> from lidc_cdam import ViTModel, Concept, explain
>>> attr = explain(ViTModel(timm_model), images, targets=[3, 5], method="cdam")

The method, its numbers and its choices: ``docs/method.md``.

Layers. A module imports only from its own package and from the layers below it (:data:`LAYERS`, lowest first;
packages in one layer do not import each other;
the first layer's plain modules may), at the top of a module or inside a function alike
(``tests/test_layers.py`` checks every import)::

    io, resources, cache, device, distributed, config_overrides, viz    plain helpers, no model, no data
      -> data          LIDC-IDRI (pylidc, crops, folds, the model-input contract), phantoms, ImageNet subsets
      -> models        ViTModel, backbone families, checkpoints, provenance, the trust statistics
      -> explain       the ten methods, on the models' split
      -> ct | train    any CT: point -> every file written  |  MONAI training, cross-validation
      -> evaluate      perturbation metrics, the benchmark runner, the LIDC cohort
      -> viewer        the napari plugin (``lidc_cdam.viewer``)
      -> pipelines     the ``lidc-cdam`` command (``lidc_cdam.pipelines``)

This package itself re-exports the public API of ``models`` and ``explain``; below ``pipelines`` it is
imported only for :data:`__version__`.
"""

__version__ = "0.1.0"  # first: modules imported below may read it

from lidc_cdam.explain import METHODS, Attribution, Concept, TargetError, explain
from lidc_cdam.models import ModelInputError, ViTModel

__all__ = ["LAYERS", "METHODS", "Attribution", "Concept", "ModelInputError", "TargetError", "ViTModel", "explain"]

#: the import order of the library's packages, lowest first (see the module docstring)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("io", "resources", "cache", "device", "distributed", "config_overrides", "viz"),
    ("data",),
    ("models",),
    ("explain",),
    ("ct", "train"),
    ("evaluate",),
    ("viewer",),
    ("pipelines",),
)
