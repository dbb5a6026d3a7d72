"""lidc-cdam: class-discriminative attention maps (CDAM) for Vision Transformers.

>>> from lidc_cdam import ViTModel, Concept, explain
>>> attr = explain(ViTModel(timm_model), images, targets=[3, 5], method="cdam")
"""

from lidc_cdam.explain import METHODS, Attribution, Concept, TargetError, explain
from lidc_cdam.models import ModelInputError, ViTModel

__all__ = ["METHODS", "Attribution", "Concept", "ModelInputError", "TargetError", "ViTModel", "explain"]
__version__ = "0.1.0"
