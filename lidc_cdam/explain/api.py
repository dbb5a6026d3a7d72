"""`explain()`: one entry point for every importance estimator.

Each method is registered under a name with the options it accepts and their defaults
(docs/method.md). A method gets the wrapped model, the checked images and resolved targets and returns
an :class:`Attribution`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lidc_cdam.explain.attribution import Attribution
from lidc_cdam.explain.cdam import cdam_token_scores
from lidc_cdam.explain.targets import TargetSpec, resolve_targets
from lidc_cdam.models.vit import ViTModel

ExplainFn = Callable[..., Attribution]


@dataclass(frozen=True)
class Method:
    name: str
    run: ExplainFn
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    signed: bool = True  # False for maps that are >= 0 by construction (attention, GradCAM, RP)


METHODS: dict[str, Method] = {}


def register(
    name: str, defaults: dict[str, Any], description: str, *, signed: bool = True
) -> Callable[[ExplainFn], ExplainFn]:
    """Decorator adding an explainer to :data:`METHODS` under ``name``."""

    def wrap(fn: ExplainFn) -> ExplainFn:
        METHODS[name] = Method(name, fn, dict(defaults), description, signed)
        return fn

    return wrap


def _cdam_method(variant: str) -> ExplainFn:
    def run(model: ViTModel, images: torch.Tensor, spec: TargetSpec, **options: Any) -> Attribution:
        scores, values, latents = cdam_token_scores(model, images, spec, variant, **options)
        layout = model.layout(tuple(images.shape[2:]))
        return Attribution(
            maps=layout.patch_grid(scores),
            method=METHOD_NAMES[variant],
            kind="tokens",
            image_size=tuple(images.shape[2:]),
            target_names=spec.names,
            scores=values,
            options=options,
            latents=latents,
        )

    return run


METHOD_NAMES = {"vanilla": "cdam", "smooth": "smooth-cdam", "integrated": "integrated-cdam"}
register("cdam", {}, "CDAM, Eq. 2 / 4: T . dF/dT at the tokens entering the final attention")(
    _cdam_method("vanilla")
)
register(
    "smooth-cdam",
    {"n": 50, "sigma": 0.05, "space": "block_input", "seed": None},
    "Smooth CDAM, Eq. 5: CDAM averaged over n noisy token sets",
)(_cdam_method("smooth"))
register(
    "integrated-cdam",
    {"n": 50, "space": "tokens"},
    "Integrated CDAM, Eq. 6: path-integrated CDAM from the zero token baseline",
)(_cdam_method("integrated"))


def as_vit_model(model: nn.Module) -> ViTModel:
    """Wrap a bare timm ``VisionTransformer`` (keeping its head); pass a ``ViTModel`` through."""
    return model if isinstance(model, ViTModel) else ViTModel(model)


def default_targets(model: ViTModel, images: torch.Tensor) -> torch.Tensor | list[int]:
    """Top-1 class per image for classifiers; every output for regressors."""
    if model.task == "regression":
        return list(range(model.num_outputs))
    with torch.no_grad():
        return model(images).argmax(-1)


def explain(
    model: nn.Module,
    images: torch.Tensor,
    targets: Any = None,
    method: str = "cdam",
    **options: Any,
) -> Attribution:
    """Importance maps of ``images`` ``[B, C, H, W]`` for ``targets`` with ``method``.

    ``targets``: an output index or name, a list of them (the same for every image), a per-image
    list of lists or ``[B]`` / ``[B, K]`` tensor, or :class:`~lidc_cdam.Concept` (s). ``None``
    explains the predicted class (classifiers) or every output (regressors).
    ``options`` are the method's keyword arguments (see ``METHODS[method].defaults``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    spec_method = METHODS[method]
    extra = {"chunk_bytes", "implementation", "generator"}
    unknown = set(options) - set(spec_method.defaults) - extra
    if unknown:
        raise TypeError(
            f"{method} got unknown option(s) {sorted(unknown)}; it accepts {sorted(spec_method.defaults)}"
        )
    was_training = model.training
    vit = as_vit_model(model)
    images = vit.check_images(images)
    vit.eval()
    try:
        if targets is None:
            targets = default_targets(vit, images)
        spec = resolve_targets(vit, targets, images.shape[0])
        with torch.enable_grad():
            return spec_method.run(vit, images, spec, **{**spec_method.defaults, **options})
    finally:
        model.train(was_training)
