"""Importance estimators behind one interface: :func:`explain` returns an :class:`Attribution`."""

from lidc_cdam.explain import attention as _attention  # noqa: F401  (registers "attention")
from lidc_cdam.explain.api import METHODS, explain, register
from lidc_cdam.explain.attribution import Attribution
from lidc_cdam.explain.targets import Concept, TargetError

__all__ = ["METHODS", "Attribution", "Concept", "TargetError", "explain", "register"]
