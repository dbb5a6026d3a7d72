"""Importance estimators behind one interface: :func:`explain` returns an :class:`Attribution`."""

# importing a method module registers its methods in METHODS
from lidc_cdam.explain import attention as _attention  # noqa: F401
from lidc_cdam.explain import gradcam as _gradcam  # noqa: F401
from lidc_cdam.explain import gradients as _gradients  # noqa: F401
from lidc_cdam.explain import relevance as _relevance  # noqa: F401
from lidc_cdam.explain.api import METHODS, explain, register
from lidc_cdam.explain.attribution import Attribution
from lidc_cdam.explain.targets import Concept, TargetError

__all__ = ["METHODS", "Attribution", "Concept", "TargetError", "explain", "register"]
