"""Importance estimators behind one interface: :func:`explain` returns an :class:`Attribution`.

- :mod:`.api` - :func:`explain` and the method registry (:data:`METHODS`, :func:`register`);
- :mod:`.targets` - what is explained: outputs by index or name, and :class:`Concept` (Eq. 3-4);
- :mod:`.attribution` - the maps and what is needed to read them;
- :mod:`.cdam` - CDAM, Smooth and Integrated CDAM (Eq. 2, 4-6);
- :mod:`.attention` - the attention map (Eq. 1);
- :mod:`.gradients` - Input x Grad, SmoothGrad, IntGrad;
- :mod:`.gradcam` - GradCAM for ViT;
- :mod:`.relevance` - relevance propagation and partial LRP.
"""

# importing a method module registers its methods in METHODS
from lidc_cdam.explain import attention as _attention  # noqa: F401
from lidc_cdam.explain import gradcam as _gradcam  # noqa: F401
from lidc_cdam.explain import gradients as _gradients  # noqa: F401
from lidc_cdam.explain import relevance as _relevance  # noqa: F401
from lidc_cdam.explain.api import METHODS, explain, register
from lidc_cdam.explain.attribution import Attribution
from lidc_cdam.explain.targets import Concept, TargetError

__all__ = ["METHODS", "Attribution", "Concept", "TargetError", "explain", "register"]
