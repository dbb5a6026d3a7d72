"""Per-slice (2.5D) CDAM maps of one nodule's crop, for several targets of one checkpoint.

For a nodule's 32 mm crop (:mod:`lidc_cdam.data.lidc.crops`) and a model trained by ``lidc-cdam train``:

1. every slice ``s`` of the crop along the chosen view (all 32, or those where the consensus mask is
   non-empty +- a margin) becomes a model input exactly as :func:`lidc_cdam.data.lidc.datasets.transforms`
   builds the central one (:mod:`lidc_cdam.ct.inputs`);
2. the slices are explained in batches (:func:`lidc_cdam.explain.explain`: CDAM, Smooth CDAM, Integrated
   CDAM or the attention map), each map (raw signed token scores) is resized bilinearly to the 32 x 32
   crop plane and put at index ``s`` along the view axis: a ``[K, 32, 32, 32]`` map in crop coordinates;
3. :func:`lidc_cdam.ct.placement.place_on_scan` resamples it from the crop's 1 mm grid to the scan's grid.

The predictions returned with the maps are the model's outputs on the central slice (index 16, what it
was trained and evaluated on): malignancy as a probability, biomarkers in rating units (``target_stats``).
The outputs of every explained slice come with them (``slice_predictions``), read from the explainer's own
forward pass (:attr:`lidc_cdam.explain.Attribution.latents`): CDAM needs no second pass for predictions, nor
for the trust flag (the central slice's latent, ``central_latent``).
:mod:`lidc_cdam.ct.cache` keeps computed maps in memory and on disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lidc_cdam.ct.checkpoint import MALIGNANCY, LoadedModel, load_checked_model, predictions
from lidc_cdam.ct.crop import CROP, read_crop
from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.inputs import CENTRE, VIEWS, VOLUME, model_inputs, slices_for, volume_input
from lidc_cdam.explain import explain
from lidc_cdam.models.domain_trust import features_of, recording_trunk

#: label in the widget -> lidc_cdam.explain method name
METHODS = {"CDAM": "cdam", "Smooth CDAM": "smooth-cdam", "Integrated CDAM": "integrated-cdam",
           "Attention map": "attention"}
SIGNED = {"cdam": True, "smooth-cdam": True, "integrated-cdam": True, "attention": False}


@dataclass(frozen=True)
class MapRequest:
    """What to compute for one nodule (hashable: the cache key)."""

    checkpoint: str
    crop_path: str
    targets: tuple[str, ...]
    method: str = "cdam"
    view: str = "axial"
    slices: str = "nodule"
    margin: int = 3
    n: int = 50  # samples of Smooth / Integrated CDAM
    batch: int = 8

    def options(self) -> dict[str, Any]:
        return {"n": self.n} if self.method in ("smooth-cdam", "integrated-cdam") else {}


@dataclass
class MapResult:
    """Maps ``[K, 32, 32, 32]`` in crop coordinates (zero on slices not explained) and what they mean."""

    maps: np.ndarray
    targets: list[str]
    method: str
    view: str
    slices: list[int]
    predictions: dict[str, float]  # on the central slice: malignancy probability, biomarkers in rating units
    signed: bool
    nodule_id: str
    seconds: float
    cached: bool = False
    #: the predictions on each explained slice, in the order of ``slices``
    slice_predictions: list[dict[str, float]] | None = None
    #: the central slice's latent ``l`` (for the trust flag), float32 ``[D]``
    central_latent: np.ndarray | None = None
    #: the trust flag's features (:mod:`lidc_cdam.models.domain_trust`) of the explained slices, from the
    #: explainer's own pass: slice index -> float32 ``[D]``
    trust_features: dict[int, np.ndarray] | None = None

    def predictions_at(self, index: int) -> dict[str, float] | None:
        """The predictions on crop slice ``index`` along the view, None where it was not explained."""
        if self.slice_predictions is None or index not in self.slices:
            return None
        return self.slice_predictions[self.slices.index(index)]

    def limit(self, k: int) -> float:
        """Symmetric colour limit of map ``k`` (max |value|, 1 when all zero)."""
        m = float(np.abs(self.maps[k]).max()) if self.maps.size else 0.0
        return m if m > 0 else 1.0

    def scaled(self, k: int, scale: str = "slice") -> tuple[np.ndarray, float]:
        """Map ``k`` for display and its symmetric limit (:func:`display_scaled`)."""
        return display_scaled(self.maps[k], self.view, scale)


def display_scaled(crop_map: np.ndarray, view: str, scale: str = "slice") -> tuple[np.ndarray, float]:
    """A ``[32, 32, 32]`` crop map for display and its symmetric colour limit: ``"nodule"`` the raw scores (one
    limit, max |value|, for all slices; 1 when all zero), ``"slice"`` each slice along ``view`` divided by its own
    max |value| (as the paper scales each map on its own; limit 1); a 3D map (view ``"3d"``) is one map, divided
    by its max |value|."""
    if scale == "nodule":
        peak = float(np.abs(crop_map).max()) if crop_map.size else 0.0
        return crop_map, peak if peak > 0 else 1.0
    if scale != "slice":
        raise ValueError(f"scale must be 'slice' or 'nodule', got {scale!r}")
    if view == VOLUME:  # a 3D map is one map: one scale
        data, limit = display_scaled(crop_map, view, "nodule")
        return data / limit, 1.0
    others = tuple(a for a in range(3) if a != VIEWS[view])
    peak = np.abs(crop_map).max(axis=others, keepdims=True)
    return np.divide(crop_map, peak, out=np.zeros_like(crop_map), where=peak > 0), 1.0


def compute_steps(request: MapRequest) -> Generator[tuple[int, int], None, MapResult]:
    """:func:`compute_maps` as a generator: yields ``(slices done, total)`` after each batch (a worker
    thread reports them as progress and can stop between batches) and returns the :class:`MapResult`."""
    start = time.perf_counter()
    check_request(request.method, request.view)
    loaded = load_checked_model(request.checkpoint)
    crop = read_crop(request.crop_path)
    result = yield from crop_steps(loaded, crop, request.targets, request.method, request.view, request.slices,
                                   request.margin, request.options(), request.batch, where=request.crop_path)
    result.seconds = time.perf_counter() - start
    return result


def check_request(method: str, view: str) -> None:
    """:class:`CTError` for an unknown view or method."""
    if view not in VIEWS and view != VOLUME:
        raise CTError(f"view must be one of {[*VIEWS, VOLUME]}, got {view!r}")
    if method not in SIGNED:
        raise CTError(f"method must be one of {list(SIGNED)}, got {method!r}")


def target_name(target: Any) -> str:
    """A target's name: an output name as it is, a concept (:class:`lidc_cdam.Concept`) by its ``name``."""
    return target if isinstance(target, str) else str(target.name)


def explain_targets(loaded: LoadedModel, x: Any, targets: Sequence[Any], method: str,
                    options: dict[str, Any] | None) -> tuple[Any, Any, dict[str, Any]]:
    """Maps ``[B, K, *grid]`` of the outputs and concepts in ``targets`` (outputs by name, concepts as
    :class:`lidc_cdam.Concept`; Eq. 2 and Eq. 4), the images' latents ``[B, D]`` and each concept's similarity
    ``g(l, l_c)`` per image. Outputs and concepts are explained in two calls when both are asked for."""
    import torch

    names = ["malignant"] if loaded.targets == [MALIGNANCY] else loaded.targets
    outputs = [names[loaded.targets.index(t)] for t in targets if isinstance(t, str)]
    concepts = [t for t in targets if not isinstance(t, str)]
    parts: dict[bool, Any] = {}
    latents, similarity = None, {}
    if outputs:
        parts[True] = explain(loaded.model, x, targets=outputs, method=method, **(options or {}))
        latents = parts[True].latents
    if concepts:
        parts[False] = explain(loaded.model, x, targets=concepts, method=method, **(options or {}))
        latents = latents if latents is not None else parts[False].latents
        if parts[False].scores is not None:
            similarity = {c.name: parts[False].scores[:, k].detach().float() for k, c in enumerate(concepts)}
    if latents is None:  # methods without the latents of their own pass (the attention map)
        with torch.no_grad():
            latents = loaded.model.latent(x)
    count = {True: 0, False: 0}
    rows = []
    for t in targets:  # the maps in the order asked
        kind = isinstance(t, str)
        rows.append(parts[kind].maps[:, count[kind]])
        count[kind] += 1
    return torch.stack(rows, 1).detach().float(), latents, similarity


def _with_concepts(values: dict[str, float], similarity: dict[str, Any], j: int) -> dict[str, float]:
    return {**values, **{name: float(v[j]) for name, v in similarity.items()}}


def crop_steps(loaded: LoadedModel, crop: dict[str, Any], targets: Sequence[Any], method: str = "cdam",
               view: str = "axial", slices: str = "nodule", margin: int = 3, options: dict[str, Any] | None = None,
               batch: int = 8, where: object = "crop") -> Generator[tuple[int, int], None, MapResult]:
    """The maps of a crop in memory (a dict with ``image`` ``[32, 32, 32]`` HU and ``mask``, as
    :func:`~lidc_cdam.ct.crop.read_crop` or :func:`lidc_cdam.ct.point.crop_at_point` give it) for a loaded
    checkpoint: what :func:`compute_steps` runs after reading the files. ``targets`` are output names and
    concepts (:class:`lidc_cdam.Concept`, Eq. 4: their similarity joins the predictions)."""
    import torch
    import torch.nn.functional as F

    start = time.perf_counter()
    check_request(method, view)
    missing = [t for t in targets if isinstance(t, str) and t not in loaded.targets]
    if missing or not targets:
        raise CTError(f"{loaded.path.name} explains {loaded.targets}, not {missing or 'nothing'}")
    if tuple(crop["image"].shape) != (CROP, CROP, CROP):
        raise CTError(f"{where}: crop of shape {crop['image'].shape}, expected {(CROP,) * 3}")
    if (view == VOLUME) != (loaded.view == VOLUME):
        raise CTError(f"{loaded.path.name} was trained on the {loaded.view!r} view; it cannot explain {view!r}")
    if view == VOLUME:
        return (yield from volume_steps(loaded, crop, targets, method, options, start))
    indices = slices_for(crop["mask"], view, slices, margin)
    maps = np.zeros((len(targets), CROP, CROP, CROP), dtype=np.float32)
    axis = VIEWS[view]
    size = loaded.image_size
    model = loaded.model
    values: dict[int, dict[str, float]] = {}  # slice -> predictions (outputs in rating units, concept similarity)
    latents: dict[int, np.ndarray] = {}
    trust_features: dict[int, np.ndarray] = {}
    yield 0, len(indices)
    done = 0
    for b in range(0, len(indices), batch):
        chunk = indices[b : b + batch]
        x = model_inputs(crop["image"], view, chunk, loaded.input_stats, size).to(loaded.device, non_blocking=True)
        with recording_trunk(model) as records:  # the trust flag's features from this pass
            token_maps, lat, similarity = explain_targets(loaded, x, targets, method, options)
        feats = features_of(records, x)
        if feats is not None:
            trust_features.update({s: feats[j].cpu().numpy() for j, s in enumerate(chunk)})
        with torch.no_grad():
            out = model.head(lat)
        for j, s in enumerate(chunk):
            values[s] = _with_concepts(predictions(loaded, out[j].float().cpu().numpy()), similarity, j)
            latents[s] = lat[j].float().cpu().numpy()
        planes = F.interpolate(token_maps, size=(CROP, CROP), mode="bilinear",
                               align_corners=False).cpu().numpy()  # [B, K, 32, 32]
        for j, s in enumerate(chunk):
            index: list[Any] = [slice(None)] * 3
            index[axis] = s
            maps[(slice(None), *index)] = planes[j]
        done += len(chunk)
        yield done, len(indices)
    if CENTRE not in values:  # the central slice was not explained: one pass for its predictions
        x = model_inputs(crop["image"], view, [CENTRE], loaded.input_stats, size).to(loaded.device)
        with torch.no_grad():
            lat = model.latent(x)
            similarity = {c.name: c.score(lat).float() for c in targets if not isinstance(c, str)}
            head = model.head(lat)[0].float().cpu().numpy()
            values[CENTRE] = _with_concepts(predictions(loaded, head), similarity, 0)
        latents[CENTRE] = lat[0].float().cpu().numpy()
    return MapResult(maps, [target_name(t) for t in targets], method, view, indices, values[CENTRE],
                     SIGNED[method], str(crop.get("nodule_id", "")), time.perf_counter() - start,
                     slice_predictions=[values[s] for s in indices], central_latent=latents[CENTRE],
                     trust_features=trust_features or None)


def volume_steps(loaded: LoadedModel, crop: dict[str, Any], targets: Sequence[str], method: str,
                 options: dict[str, Any] | None, start: float) -> Generator[tuple[int, int], None, MapResult]:
    """A 3D checkpoint on the whole crop: one pass, the ``[K, gz, gy, gx]`` token maps upsampled trilinearly to the
    crop's ``[32, 32, 32]`` grid (no 2.5D stack: ``slices`` lists all 32, there are no per-slice predictions)."""
    import torch
    import torch.nn.functional as F

    yield 0, 1
    x = volume_input(crop["image"], loaded.input_stats, loaded.image_size).to(loaded.device)
    with recording_trunk(loaded.model) as records:  # the trust flag's features from this pass
        token_maps, latent, similarity = explain_targets(loaded, x, targets, method, options)
    feats = features_of(records, x)
    with torch.no_grad():
        out = loaded.model.head(latent)[0].float().cpu().numpy()
    maps = F.interpolate(token_maps, size=(CROP,) * 3, mode="trilinear", align_corners=False)[0].cpu().numpy()
    yield 1, 1
    return MapResult(maps.astype(np.float32), [target_name(t) for t in targets], method, VOLUME, list(range(CROP)),
                     _with_concepts(predictions(loaded, out), similarity, 0), SIGNED[method],
                     str(crop.get("nodule_id", "")),
                     time.perf_counter() - start, slice_predictions=None,
                     central_latent=latent[0].float().cpu().numpy(),
                     trust_features=None if feats is None else {CENTRE: feats[0].cpu().numpy()})


def compute_maps(request: MapRequest, progress: Callable[[int, int], None] | None = None) -> MapResult:
    """The ``[K, 32, 32, 32]`` crop maps of one nodule (see the module docstring); ``progress(done, total)``
    is called after each batch of slices."""
    return drain(compute_steps(request), progress)


def relay(steps: Generator[tuple[int, int], None, Any], part: int, parts: int
          ) -> Generator[tuple[int, int], None, Any]:
    """Part ``part`` of ``parts`` equal parts of a longer job: relays the step generator's ``(done, total)`` as
    ``(part * total + done, parts * total)`` and returns its result (``result = yield from relay(...)``)."""
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        total = max(total, 1)
        yield part * total + done, parts * total


def drain(steps, progress: Callable[[int, int], None] | None) -> MapResult:
    """Run a step generator to its result, reporting ``(done, total)`` after each step."""
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress:
            progress(done, total)
