"""Per-slice (2.5D) CDAM maps of one nodule, placed back on the CT's voxel grid. No napari or Qt here.

For a nodule's 32 mm crop (:mod:`lidc_cdam.data.lidc.crops`) and a model trained by ``lidc-cdam train``:

1. every slice ``s`` of the crop along the chosen view (all 32, or those where the consensus mask is
   non-empty +- a margin) becomes a model input exactly as :func:`lidc_cdam.data.lidc.datasets.transforms`
   builds the central one (HU clipped, 3 channels, bilinear resize, ``(HU - mean) / std`` with the
   checkpoint's ``meta["input_stats"]``);
2. the slices are explained in batches (:func:`lidc_cdam.explain.explain`: CDAM, Smooth CDAM, Integrated
   CDAM or the attention map), each map (raw signed token scores) is resized bilinearly to the 32 x 32
   crop plane and put at index ``s`` along the view axis: a ``[K, 32, 32, 32]`` map in crop coordinates;
3. :func:`place_on_scan` resamples it (SimpleITK, linear) from the crop's 1 mm grid to the scan's grid,
   zero outside the crop: an array of exactly the CT's shape, shown with the CT layer's scale/translate.

The predictions shown beside the maps are the model's outputs on the central slice (index 16, what it
was trained and evaluated on): malignancy as a probability, biomarkers in rating units (``target_stats``).
:class:`MapCache` keeps computed crop maps in memory and on disk (keyed by checkpoint and crop file
contents, method, view, slices and targets).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lidc_cdam.viewer.volume import CTVolume, ViewerError

from lidc_cdam.data.lidc.crops import CROP

VIEWS = {"axial": 0, "coronal": 1, "sagittal": 2}
CENTRE = 16
#: label in the widget -> lidc_cdam.explain method name
METHODS = {"CDAM": "cdam", "Smooth CDAM": "smooth-cdam", "Integrated CDAM": "integrated-cdam",
           "Attention map": "attention"}
SIGNED = {"cdam": True, "smooth-cdam": True, "integrated-cdam": True, "attention": False}
MALIGNANCY = "malignancy"
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------ models


@dataclass
class LoadedModel:
    """A checked checkpoint: the model, its targets (display names) and input statistics."""

    path: Path
    model: Any
    targets: list[str]  # "malignancy" or biomarker names, in output order
    input_stats: dict[str, Any]
    target_stats: dict[str, Any] | None
    fingerprint: str

    @property
    def task(self) -> str:
        return "malignancy" if self.targets == [MALIGNANCY] else "biomarkers"

    @property
    def image_size(self) -> int:
        size = self.input_stats.get("image_size") or self.model.default_image_size[0]
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def view(self) -> str:
        return str(self.input_stats.get("view", "axial"))


def file_fingerprint(path: str | Path) -> str:
    """sha256 (16 hex digits) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def check_model(model: Any, source: str = "checkpoint") -> tuple[list[str], dict[str, Any], dict[str, Any] | None]:
    """``(targets, input_stats, target_stats)`` of an LIDC model; :class:`ViewerError` when the checkpoint
    was trained for another task or lacks the input statistics needed to build its input."""
    from lidc_cdam.data.lidc.nodules import BIOMARKERS

    names = list(model.output_names or [])
    task = getattr(model, "task", None)
    if task == "classification" and names == ["malignant"]:
        targets = [MALIGNANCY]
    elif task == "regression" and names and set(names) <= set(BIOMARKERS):
        targets = names
    else:
        what = f"task {task!r}, {model.num_outputs} output(s)" + (f" named {names[:5]}" if names else "")
        raise ViewerError(
            f"{source}: a checkpoint for another task ({what}); the viewer needs an LIDC-IDRI model from "
            "`lidc-cdam train`: malignancy (one output 'malignant') or the eight biomarkers")
    stats = dict(model.meta.get("input_stats") or {})
    if "mean" not in stats or "std" not in stats:
        raise ViewerError(f"{source}: no input statistics (meta['input_stats'] with 'mean' and 'std' of the "
                          "training crops' HU), so the model input cannot be built as in training")
    target_stats = model.meta.get("target_stats") if targets != [MALIGNANCY] else None
    return targets, stats, target_stats


_models: dict[tuple[str, int, int], LoadedModel] = {}
_models_lock = threading.Lock()


def load_checked_model(path: str | Path) -> LoadedModel:
    """Load (weights only) and check a checkpoint; kept in memory while the file does not change."""
    from lidc_cdam.models.loading import CheckpointError, load_model

    path = Path(path).expanduser()
    if not path.is_file():
        raise ViewerError(f"{path}: no such checkpoint file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _models_lock:
        if key in _models:
            return _models[key]
    try:
        model = load_model(path)
    except CheckpointError as err:
        raise ViewerError(str(err)) from None
    targets, stats, target_stats = check_model(model, str(path))
    loaded = LoadedModel(path, model.eval(), targets, stats, target_stats, file_fingerprint(path))
    with _models_lock:
        _models[key] = loaded
    return loaded


# ------------------------------------------------------------------------------------------ nodules


@dataclass(eq=False)
class NoduleRef:
    """One nodule of a preprocessed folder (``nodules.csv`` + ``crops/``) whose crop lies in a scan."""

    nodule_id: str
    crop_path: Path
    centre_world: np.ndarray  # (x, y, z) mm, the crop's centre
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.nodule_id


def read_crop(path: str | Path) -> dict[str, Any]:
    from lidc_cdam.data.lidc.crops import read_crop as _read

    try:
        return _read(path)
    except (OSError, ValueError, KeyError) as err:
        raise ViewerError(f"{path}: not a readable crop file ({err})") from None


def crop_centre_world(crop: dict[str, Any]) -> np.ndarray:
    c = (CROP - 1) / 2.0
    return (np.asarray(crop["crop_to_world"], dtype=float) @ np.array([c, c, c, 1.0]))[:3]


def list_nodules(crops_dir: str | Path, volume: CTVolume | None = None) -> list[NoduleRef]:
    """Nodules of ``crops_dir`` (an output folder of ``lidc-cdam preprocess`` / ``phantoms``, or of
    :func:`~lidc_cdam.viewer.synthetic.write_synthetic`) whose crops were cut from ``volume``'s grid
    (all of them when ``volume`` is None). Raises :class:`ViewerError` for a folder without crops."""
    import pandas as pd

    root = Path(crops_dir).expanduser()
    table = root / "nodules.csv"
    if table.is_file():
        frame = pd.read_csv(table)
        if "crop_path" not in frame.columns:
            raise ViewerError(f"{table}: no crop_path column (an annotations-only table?): run "
                              "`lidc-cdam preprocess --lidc-root DIR --out DIR` to make crops")
        rows = frame.to_dict("records")
    elif (root / "crops").is_dir():
        rows = [{"nodule_id": p.stem, "crop_path": f"crops/{p.name}"} for p in sorted((root / "crops").glob("*.npz"))]
    else:
        raise ViewerError(f"{root}: no nodules.csv and no crops/ folder: choose the output folder of "
                          "`lidc-cdam preprocess` (or `lidc-cdam phantoms`)")
    patient = (volume.meta.get("patient_id") or "") if volume is not None else ""
    out = []
    for row in rows:
        path = root / str(row["crop_path"])
        if not path.is_file():
            continue
        if patient and "patient_id" in row and str(row["patient_id"]) not in ("", "nan", patient):
            continue
        with np.load(path, allow_pickle=False) as crop:
            if volume is not None and not volume.same_grid(crop["scan_spacing"], crop["scan_origin"],
                                                           crop["scan_shape"]):
                continue
            centre = crop_centre_world({"crop_to_world": crop["crop_to_world"]})
        out.append(NoduleRef(str(row["nodule_id"]), path, centre, row))
    return out


def nodule_at(nodules: Sequence[NoduleRef], world_xyz: np.ndarray, max_mm: float = CROP / 2) -> NoduleRef | None:
    """The nodule whose crop centre is nearest to a point (within ``max_mm``), else None."""
    if not nodules:
        return None
    dist = [float(np.linalg.norm(n.centre_world - np.asarray(world_xyz, dtype=float))) for n in nodules]
    best = int(np.argmin(dist))
    return nodules[best] if dist[best] <= max_mm else None


# ------------------------------------------------------------------------------------------ inputs


def slice_plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """Slice ``index`` of a ``[z, y, x]`` crop along ``view`` (as ``SliceViewd``)."""
    return np.take(volume, index, axis=VIEWS[view])


def slices_for(mask: np.ndarray, view: str, mode: str = "nodule", margin: int = 3) -> list[int]:
    """Which crop slices to explain: ``"all"`` 32, or ``"nodule"``: where the mask is non-empty +- margin
    (always including the centre)."""
    if mode == "all":
        return list(range(mask.shape[VIEWS[view]]))
    if mode != "nodule":
        raise ValueError(f"slices must be 'nodule' or 'all', got {mode!r}")
    axes = tuple(a for a in range(3) if a != VIEWS[view])
    present = np.flatnonzero(np.asarray(mask).any(axis=axes))
    n = mask.shape[VIEWS[view]]
    lo, hi = (int(present.min()), int(present.max())) if present.size else (CENTRE, CENTRE)
    lo, hi = min(lo, CENTRE), max(hi, CENTRE)
    return list(range(max(0, lo - margin), min(n, hi + margin + 1)))


def model_inputs(crop_hu: np.ndarray, view: str, indices: Sequence[int], stats: dict[str, Any], size: int):
    """``[len(indices), 3, size, size]`` float32 tensor: each slice as the training transforms build it."""
    import torch
    import torch.nn.functional as F

    lo, hi = stats.get("hu_clip") or (-1000, 400)
    vol = np.clip(np.asarray(crop_hu, dtype=np.float32), lo, hi)
    planes = np.stack([slice_plane(vol, view, int(i)) for i in indices])[:, None]
    x = torch.from_numpy(np.ascontiguousarray(planes)).repeat(1, 3, 1, 1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - float(stats["mean"])) / float(stats["std"])


# ------------------------------------------------------------------------------------------ computing


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

    def limit(self, k: int) -> float:
        """Symmetric colour limit of map ``k`` (max |value|, 1 when all zero)."""
        m = float(np.abs(self.maps[k]).max()) if self.maps.size else 0.0
        return m if m > 0 else 1.0

    def scaled(self, k: int, scale: str = "slice") -> tuple[np.ndarray, float]:
        """Map ``k`` for display and its symmetric limit: ``"nodule"`` the raw scores (one limit for all
        slices), ``"slice"`` each slice's map divided by its own max |value| (as the paper scales each
        map on its own; limit 1)."""
        if scale == "nodule":
            return self.maps[k], self.limit(k)
        if scale != "slice":
            raise ValueError(f"scale must be 'slice' or 'nodule', got {scale!r}")
        axis = VIEWS[self.view]
        others = tuple(a for a in range(3) if a != axis)
        peak = np.abs(self.maps[k]).max(axis=others, keepdims=True)
        return np.divide(self.maps[k], peak, out=np.zeros_like(self.maps[k]), where=peak > 0), 1.0


def predictions(loaded: LoadedModel, logits: np.ndarray) -> dict[str, float]:
    """Model outputs on the central slice in the units a radiologist reads."""
    out: dict[str, float] = {}
    if loaded.targets == [MALIGNANCY]:
        out[MALIGNANCY] = float(1.0 / (1.0 + np.exp(-float(logits[0]))))
        return out
    ts = loaded.target_stats or {}
    names = list(ts.get("names") or [])
    for k, name in enumerate(loaded.targets):
        value = float(logits[k])
        if name in names:
            j = names.index(name)
            value = value * float(ts["std"][j]) + float(ts["mean"][j])
        out[name] = value
    return out


def compute_steps(request: MapRequest) -> Generator[tuple[int, int], None, MapResult]:
    """:func:`compute_maps` as a generator: yields ``(slices done, total)`` after each batch (a worker
    thread reports them as progress and can stop between batches) and returns the :class:`MapResult`."""
    import torch
    import torch.nn.functional as F

    from lidc_cdam.explain import explain

    start = time.perf_counter()
    if request.view not in VIEWS:
        raise ViewerError(f"view must be one of {list(VIEWS)}, got {request.view!r}")
    if request.method not in SIGNED:
        raise ViewerError(f"method must be one of {list(SIGNED)}, got {request.method!r}")
    loaded = load_checked_model(request.checkpoint)
    missing = [t for t in request.targets if t not in loaded.targets]
    if missing or not request.targets:
        raise ViewerError(f"{loaded.path.name} explains {loaded.targets}, not {missing or 'nothing'}")
    crop = read_crop(request.crop_path)
    if tuple(crop["image"].shape) != (CROP, CROP, CROP):
        raise ViewerError(f"{request.crop_path}: crop of shape {crop['image'].shape}, expected {(CROP,) * 3}")
    indices = slices_for(crop["mask"], request.view, request.slices, request.margin)
    out_index = [loaded.targets.index(t) for t in request.targets]
    names = ["malignant"] if loaded.targets == [MALIGNANCY] else loaded.targets
    target_names = [names[i] for i in out_index]
    maps = np.zeros((len(out_index), CROP, CROP, CROP), dtype=np.float32)
    axis = VIEWS[request.view]
    size = loaded.image_size
    model = loaded.model
    yield 0, len(indices)
    with torch.no_grad():
        central = model(model_inputs(crop["image"], request.view, [CENTRE], loaded.input_stats, size))[0].numpy()
    done = 0
    for b in range(0, len(indices), request.batch):
        chunk = indices[b : b + request.batch]
        x = model_inputs(crop["image"], request.view, chunk, loaded.input_stats, size)
        attr = explain(model, x, targets=target_names, method=request.method, **request.options())
        planes = F.interpolate(attr.maps.detach().float(), size=(CROP, CROP), mode="bilinear",
                               align_corners=False).numpy()  # [B, K, 32, 32]
        for j, s in enumerate(chunk):
            index: list[Any] = [slice(None)] * 3
            index[axis] = s
            maps[(slice(None), *index)] = planes[j]
        done += len(chunk)
        yield done, len(indices)
    return MapResult(maps, list(request.targets), request.method, request.view, indices,
                     predictions(loaded, central), SIGNED[request.method], str(crop.get("nodule_id", "")),
                     time.perf_counter() - start)


def compute_maps(request: MapRequest, progress: Callable[[int, int], None] | None = None) -> MapResult:
    """The ``[K, 32, 32, 32]`` crop maps of one nodule (see the module docstring); ``progress(done, total)``
    is called after each batch of slices."""
    return _drain(compute_steps(request), progress)


# ------------------------------------------------------------------------------------------ cache


class MapCache:
    """Crop maps by request, in memory (LRU, ``size`` entries) and, with ``folder``, as ``.npz`` files
    keyed by the checkpoint's and crop's content hashes (so an edited file is recomputed)."""

    def __init__(self, folder: str | Path | None = None, size: int = 32):
        self.folder = Path(folder) if folder is not None else None
        self.size = size
        self._mem: OrderedDict[str, MapResult] = OrderedDict()
        self._lock = threading.Lock()

    def key(self, request: MapRequest) -> str:
        model = load_checked_model(request.checkpoint)
        parts = {**request.__dict__, "checkpoint": model.fingerprint,
                 "crop_path": file_fingerprint(request.crop_path), "batch": None, "version": CACHE_VERSION}
        if request.method not in ("smooth-cdam", "integrated-cdam"):
            parts["n"] = None
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]

    def get(self, request: MapRequest) -> MapResult | None:
        key = self.key(request)
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                return self._mem[key]
        if self.folder is not None and (self.folder / f"{key}.npz").is_file():
            try:
                with np.load(self.folder / f"{key}.npz", allow_pickle=False) as data:
                    info = json.loads(str(data["info"]))
                    result = MapResult(data["maps"], **info)
            except (OSError, ValueError, KeyError, TypeError):
                return None
            self._remember(key, result)
            return result
        return None

    def put(self, request: MapRequest, result: MapResult) -> None:
        key = self.key(request)
        self._remember(key, result)
        if self.folder is not None:
            from lidc_cdam.io import write_npz

            info = {k: v for k, v in result.__dict__.items() if k not in ("maps", "cached")}
            write_npz(self.folder / f"{key}.npz", maps=result.maps.astype(np.float32),
                      info=np.array(json.dumps(info)))

    def _remember(self, key: str, result: MapResult) -> None:
        with self._lock:
            self._mem[key] = result
            self._mem.move_to_end(key)
            while len(self._mem) > self.size:
                self._mem.popitem(last=False)


def cached_steps(request: MapRequest, cache: MapCache | None) -> Generator[tuple[int, int], None, MapResult]:
    """:func:`compute_steps` through ``cache`` (a hit is returned at once, with ``cached=True``)."""
    if cache is not None:
        start = time.perf_counter()
        hit = cache.get(request)
        if hit is not None:
            return MapResult(**{**hit.__dict__, "cached": True, "seconds": time.perf_counter() - start})
    result = yield from compute_steps(request)
    if cache is not None:
        cache.put(request, result)
    return result


def cached_compute(request: MapRequest, cache: MapCache | None,
                   progress: Callable[[int, int], None] | None = None) -> MapResult:
    """:func:`compute_maps` through ``cache`` (a hit is returned with ``cached=True``)."""
    return _drain(cached_steps(request, cache), progress)


def _drain(steps, progress: Callable[[int, int], None] | None) -> MapResult:
    """Run a step generator to its result, reporting ``(done, total)`` after each step."""
    while True:
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress:
            progress(done, total)


# ------------------------------------------------------------------------------------------ placing


def crop_box_on_scan(crop: dict[str, Any], volume: CTVolume, pad: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(start, stop)`` (z, y, x) of the scan voxels the crop covers (+ ``pad``), clipped to the scan."""
    corners = np.array([[a, b, c, 1.0] for a in (0, CROP - 1) for b in (0, CROP - 1) for c in (0, CROP - 1)])
    world = (np.asarray(crop["crop_to_world"], dtype=float) @ corners.T).T[:, :3]
    idx = volume.world_to_index(world)
    start = np.maximum(np.floor(idx.min(0)).astype(int) - pad, 0)
    stop = np.minimum(np.ceil(idx.max(0)).astype(int) + pad + 1, np.array(volume.shape))
    return start, stop


def place_on_scan(crop_map: np.ndarray, crop: dict[str, Any], volume: CTVolume, linear: bool = True,
                  dtype=np.float32) -> np.ndarray:
    """A ``[32, 32, 32]`` array on the crop's 1 mm grid resampled onto ``volume``'s grid (SimpleITK, linear
    or nearest), zero outside the crop: an array of the CT's shape (only the crop's block is touched)."""
    import SimpleITK as sitk

    src = sitk.GetImageFromArray(np.ascontiguousarray(crop_map, dtype=np.float32 if linear else np.uint8))
    to_world = np.asarray(crop["crop_to_world"], dtype=float)
    src.SetOrigin(to_world[:3, 3].tolist())
    src.SetSpacing([float(s) for s in np.asarray(crop.get("spacing", (1.0, 1.0, 1.0)), dtype=float)])
    # columns of crop_to_world act on (z, y, x): the image axes (x, y, z) are its columns 2, 1, 0
    src.SetDirection((to_world[:3, [2, 1, 0]] / np.asarray(src.GetSpacing())).ravel().tolist())
    out = np.zeros(volume.shape, dtype=dtype)
    start, stop = crop_box_on_scan(crop, volume)
    if (stop <= start).any():
        return out
    origin = volume.index_to_world(start.astype(float))
    ref_size = [int(v) for v in (stop - start)[::-1]]
    block = sitk.Resample(src, ref_size, sitk.Transform(), sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                          origin.tolist(), [float(s) for s in volume.spacing], [float(d) for d in volume.direction],
                          0.0, src.GetPixelID())
    out[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = sitk.GetArrayFromImage(block)
    return out


def nodule_labels(nodules: Sequence[NoduleRef], volume: CTVolume) -> np.ndarray:
    """Labels ``[z, y, x]`` (uint8, nodule k -> k + 1) from the crops' consensus masks on the scan's grid."""
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for n, nod in enumerate(nodules, start=1):
        crop = read_crop(nod.crop_path)
        placed = place_on_scan(crop["mask"].astype(np.uint8), crop, volume, linear=False, dtype=np.uint8)
        labels[placed > 0] = n
    return labels


def export_nifti(array_zyx: np.ndarray, volume: CTVolume, path: str | Path) -> Path:
    """An array on the scan's grid as NIfTI (SimpleITK writes the scan's geometry; opens aligned with the
    CT in 3D Slicer or ITK-SNAP)."""
    import SimpleITK as sitk

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume.to_sitk(array_zyx), str(path), useCompression=True)
    return path
