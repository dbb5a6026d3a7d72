"""The CDAM widget's state and actions, without Qt: the scan, the models, the points, what is explained, export.

:class:`CdamController` holds what the dock widget shows and does everything through :mod:`lidc_cdam.ct`:
reading a scan (:func:`~lidc_cdam.ct.read.read_ct`), loading checkpoints, the table nodules, the concept targets
(the one :class:`~lidc_cdam.ct.concepts.ConceptResolver`), the crops and maps of points or nodules (a generator
of progress steps, so a GUI runs it in a worker and can stop it between batches), the warnings (the volume's,
the crop's, the trust and padding flags of :mod:`lidc_cdam.ct.outputs`) and the export of a point's files as
``explain-ct`` writes them (:func:`~lidc_cdam.ct.outputs.write_point` in a
:class:`~lidc_cdam.ct.run_folder.RunFolder`). No napari, Qt or magicgui import: it is tested on its own.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lidc_cdam.viewer._overlays import META_KEY

from lidc_cdam.ct.concepts import CONCEPT_PREFIX, ConceptResolver
from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.volume import CTVolume

#: files the open dialog offers (a DICOM series is a folder; these are single files)
SCAN_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_FILTER = " ".join(f"*{s}" for s in SCAN_SUFFIXES)

Job = tuple[str, Any]  # (label, LPS point (x, y, z) mm or a NoduleRef)


@dataclass
class Explained:
    """One crop explained: what was clicked or picked, the crop, one ensemble per task, and what to warn about."""

    label: str
    crop: dict[str, Any]
    ensembles: list[Any]  # EnsembleResult
    ratings: dict[str, Any] = field(default_factory=dict)  # the nodule table's row (radiologists), if any
    padded_share: float = 0.0
    point_crop: Any = None  # the PointCrop (a table nodule: its crop as one)
    warnings: list[str] = field(default_factory=list)  # the volume's, the crop's, trust and padding

    @property
    def cached(self) -> bool:
        return all(e.cached for e in self.ensembles)

    @property
    def stem(self) -> str:
        """The label without its coordinates (``P1``, a nodule id)."""
        return self.label.split(" (")[0]


def volume_from_layer(layer: Any) -> CTVolume:
    """The CT volume behind an image layer: the reader's, else built from the layer's data, scale and translate
    (an axial grid)."""
    meta = (layer.metadata or {}).get(META_KEY, {})
    if isinstance(meta.get("volume"), CTVolume):
        return meta["volume"]
    data = np.asarray(layer.data)
    if data.ndim != 3:
        raise CTError(f"layer {layer.name!r} is not a 3D volume (shape {data.shape})")
    return CTVolume(data, tuple(float(s) for s in layer.scale[::-1]), tuple(float(t) for t in layer.translate[::-1]),
                    name=layer.name, meta={"patient_id": meta.get("patient_id", "")})


def path_or_none(value: Any) -> Path | None:
    """A chosen path, None for an empty choice (magicgui gives ``.`` for none)."""
    if value is None or str(value) in ("", "."):
        return None
    return Path(value)


def describe(volume: CTVolume) -> str:
    return (f"{volume.name}: {volume.shape[0]} slices of {volume.shape[1]} x {volume.shape[2]}, "
            f"spacing {tuple(round(s, 3) for s in volume.spacing)} mm")


def _cache_folder() -> Path | None:
    try:
        from lidc_cdam.cache import cache_dir

        return cache_dir() / "viewer" / "maps"
    except OSError:
        return None


def _numeric(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def phantom_warnings(ensembles: Sequence[Any]) -> list[str]:
    """The phantom-trained models' warning (:func:`lidc_cdam.models.provenance.phantom_warning`), once."""
    from lidc_cdam.ct.ensemble import as_loaded
    from lidc_cdam.models.provenance import training_data

    models = [as_loaded(c).model for e in ensembles for c in e.checkpoints]
    warning = training_data(models)["phantom_warning"] if models else None
    return [f"the model(s) {warning}"] if warning else []


class CdamController:
    """The viewer's state and actions (see the module docstring); every refusal is a :class:`CTError`."""

    def __init__(self, cache: Any = None):
        """``cache``: a :class:`~lidc_cdam.ct.cache.MapCache` (default: memory and the user's cache folder)."""
        from lidc_cdam.ct.cache import MapCache

        self.cache = cache if cache is not None else MapCache(_cache_folder())
        self.volume: CTVolume | None = None
        self.loaded: list[Any] = []  # every checkpoint (LoadedModel; fold ensembles: several per task)
        self.models: dict[str, Any] = {}  # target -> the first model explaining it
        self.nodules: list[Any] = []  # NoduleRef of the nodule table in this scan
        self.series: list[Any] = []  # SeriesInfo of the DICOM folder
        self.explained: Explained | None = None
        self._image: tuple[CTVolume, Any] | None = None  # (volume, its SimpleITK image): crops without re-copying
        self._concepts: dict[tuple[tuple[str, ...], str], ConceptResolver] = {}

    # ------------------------------------------------------------------ scan
    def list_series(self, folder: Path) -> list[Any]:
        from lidc_cdam.ct.read import list_series

        self.series = []
        self.series = list_series(folder)
        return self.series

    def default_series(self) -> str | None:
        """The UID of the series to open by default (the largest CT series)."""
        from lidc_cdam.ct.series import choose_series

        try:
            return choose_series(self.series).uid if self.series else None
        except CTError:
            return None

    @staticmethod
    def read(path: Path, series: str | int | None = None) -> CTVolume:
        """A scan (DICOM folder or file, NIfTI, NRRD, MHA / MHD where :func:`read_ct` reads them)."""
        from lidc_cdam.ct.read import read_ct

        return read_ct(path, series)

    def set_volume(self, volume: CTVolume | None) -> list[str]:
        """Make ``volume`` the scan explained; returns its warnings (:func:`~lidc_cdam.ct.outputs.volume_warnings`)."""
        from lidc_cdam.ct.outputs import volume_warnings

        if volume is not self.volume:
            self.volume, self._image = volume, None
        return volume_warnings(volume) if volume is not None else []

    def _sitk_image(self, volume: CTVolume) -> Any:
        if self._image is None or self._image[0] is not volume:
            from lidc_cdam.data.lidc.crops import ct_image

            self._image = (volume, ct_image(volume.hu, volume.geometry()))
        return self._image[1]

    # ------------------------------------------------------------------ models and nodules
    @staticmethod
    def load(files: Sequence[Path]) -> tuple[list[Any], list[str]]:
        """Load and check checkpoints: ``(loaded, errors)`` (may run in a worker thread)."""
        from lidc_cdam.ct.checkpoint import load_checked_model

        loaded, errors = [], []
        for f in files:
            try:
                loaded.append(load_checked_model(f))
            except CTError as err:
                errors.append(str(err))
        return loaded, errors

    def set_models(self, loaded: Sequence[Any]) -> str:
        """The loaded checkpoints; returns what they are (``malignancy (5 folds), ...``)."""
        from lidc_cdam.ct.ensemble import group_checkpoints

        self.loaded = list(loaded)
        self.models = {}
        for m in loaded:
            for t in m.targets:
                self.models.setdefault(t, m)
        try:
            groups = group_checkpoints(self.loaded) if self.loaded else {}
        except CTError:
            groups = {}
        return ", ".join(f"{g[0].task} ({len(g)} fold{'s' if len(g) > 1 else ''})" for g in groups.values())

    def target_choices(self) -> list[str]:
        """The loaded models' outputs, then the committed concepts (``concept: <name>``)."""
        if not self.models:
            return []
        return [*self.models, *(CONCEPT_PREFIX + name for name in ConceptResolver.available())]

    def load_nodules(self, folder: Path) -> list[Any]:
        """The nodules of a nodule table (``lidc-cdam preprocess``) whose crops lie in the scan."""
        from lidc_cdam.ct.nodules import list_nodules

        self.nodules = []
        if self.volume is None:
            return []
        self.nodules = list_nodules(folder, self.volume)
        return self.nodules

    def nodule_labels(self) -> np.ndarray:
        """The table nodules' consensus masks on the scan's grid (the reader's labels when it has them)."""
        from lidc_cdam.ct.placement import nodule_labels

        labels = self.volume.meta.get("labels")
        return labels if labels is not None else nodule_labels(self.nodules, self.volume)

    def nodule_at(self, world_xyz: Sequence[float]) -> Any:
        from lidc_cdam.ct.nodules import nodule_at

        return nodule_at(self.nodules, np.asarray(world_xyz, dtype=float))

    # ------------------------------------------------------------------ explaining
    def concepts(self, names: Sequence[str], data: Path | None) -> ConceptResolver:
        """The concept resolver for ``names`` and the rated examples under ``data`` (kept: its vectors too)."""
        key = (tuple(names), str(data))
        if key not in self._concepts:
            self._concepts[key] = ConceptResolver(names, data)
        return self._concepts[key]

    def check(self, chosen: Sequence[str]) -> None:
        """:class:`CTError` unless a scan is open and a target chosen."""
        if self.volume is None:
            raise CTError("open a CT first")
        if not self.loaded or not chosen:
            raise CTError("choose at least one target (load a checkpoint first)")

    def explain(self, chosen: Sequence[str], jobs: Sequence[Job], **settings: Any) -> Explained | None:
        """:meth:`plan` run in this thread; what it explained last becomes :attr:`explained`."""
        work = self.plan(chosen, jobs, **settings)
        while True:
            try:
                next(work)
            except StopIteration as stop:
                self.explained = stop.value or self.explained
                return stop.value

    def plan(self, chosen: Sequence[str], jobs: Sequence[Job], *, method: str = "cdam", view: str | None = None,
             slices: str = "nodule", margin: int = 3, samples: int = 50, concept_data: Path | None = None,
             device: Any = "auto") -> Generator[float, None, Explained | None]:
        """Check a request and return its work: a generator of progress fractions that returns the last job
        :class:`Explained`. ``chosen``: targets and ``concept: <name>`` entries; ``jobs``: (label, LPS point or
        NoduleRef). Every check (scan, targets, concepts, every point inside the scan, the device) runs here, before
        any work; the models run on ``device`` (:func:`lidc_cdam.device.resolve_device`)."""
        from lidc_cdam.ct.point import to_world
        from lidc_cdam.device import DeviceError, resolve_device

        try:
            where = resolve_device(device)
        except DeviceError as err:
            raise CTError(str(err)) from None

        self.check(chosen)
        volume = self.volume
        if not jobs:
            raise CTError("no point to explain: press 'Add points' and click on the scan")
        targets = [t for t in chosen if not t.startswith(CONCEPT_PREFIX)]
        concepts = self.concepts([t[len(CONCEPT_PREFIX):] for t in chosen if t.startswith(CONCEPT_PREFIX)],
                                 concept_data)
        for _, what in jobs:
            if not hasattr(what, "crop_path"):
                to_world(volume, what)
        concept_task = ConceptResolver.task(self.loaded)
        models = [m.to(where) for m in self.loaded
                  if set(m.targets) & set(targets) or (concepts and m.task == concept_task)]
        settings = {"method": method, "view": view, "slices": slices, "margin": margin,
                    "options": {"n": int(samples)} if method not in ("cdam", "attention") else None,
                    "cache": self.cache, "concept_task": concept_task, **concepts.for_explain()}
        return self._work(volume, list(jobs), models, targets, settings)

    def _work(self, volume: CTVolume, jobs: list[Job], models: list[Any], targets: list[str],
              settings: dict[str, Any]) -> Generator[float, None, Explained | None]:
        from lidc_cdam.ct.ensemble import explain_tasks_steps
        from lidc_cdam.ct.outputs import trust_warnings, volume_warnings
        from lidc_cdam.ct.point import PointResult

        shown = None
        for j, (label, what) in enumerate(jobs):
            pc, ratings = self._crop(volume, label, what)
            steps = explain_tasks_steps(models, pc.crop, targets, where=label, **settings)
            while True:
                try:
                    done, total = next(steps)
                except StopIteration as stop:
                    ensembles = stop.value
                    break
                yield (j + done / max(total, 1)) / len(jobs)
            warnings = [*volume_warnings(volume), *pc.warnings,
                        *trust_warnings(label.split(" (")[0], PointResult(pc, ensembles)), *phantom_warnings(ensembles)]
            shown = Explained(label, pc.crop, ensembles, ratings, pc.padded_share, pc, warnings)
        return shown

    def _crop(self, volume: CTVolume, label: str, what: Any) -> tuple[Any, dict[str, Any]]:
        """The crop of a job as a :class:`~lidc_cdam.ct.point.PointCrop` (a table nodule's: its stored crop,
        centred on its crop centre, nothing padded) and the radiologists' ratings."""
        from lidc_cdam.ct.crop import crop_centre_world, read_crop
        from lidc_cdam.ct.point import PointCrop, crop_at_point

        if hasattr(what, "crop_path"):
            crop = read_crop(what.crop_path)
            world = np.asarray(crop_centre_world(crop), dtype=float)
            padded = np.zeros(crop["image"].shape, dtype=bool)
            return PointCrop(world, volume.world_to_index(world)[::-1], crop, padded), dict(what.row)
        pc = crop_at_point(volume, np.asarray(what, dtype=float), image=self._sitk_image(volume),
                           point_id=label.split(" (")[0])
        return pc, {}

    # ------------------------------------------------------------------ export
    def export(self, folder: Path, dicom: bool = False) -> list[Path]:
        """The shown point's files as ``explain-ct`` writes them (:func:`~lidc_cdam.ct.outputs.write_point`:
        ``predictions.json``, the crop, the maps as ``.npz`` and as NIfTI on the scan's grid, the report; with
        ``dicom`` the Parametric Maps and Segmentation) in ``folder/<point>/``, and the run's files
        (:func:`~lidc_cdam.ct.outputs.finish_run`: ``predictions.csv``, ``summary.json``, with ``dicom`` the SR) of
        every point exported there, written atomically with the run's manifest; returns the point's files."""
        import json

        from lidc_cdam.ct.outputs import finish_run, point_entry, write_point
        from lidc_cdam.ct.point import PointResult
        from lidc_cdam.ct.run_folder import RunFolder, safe_name

        explained, volume = self.explained, self.volume
        if explained is None or volume is None:
            raise CTError("nothing to export: compute maps first")
        dicom_source = None
        if dicom:
            from lidc_cdam.ct.dicom_results import load_source_datasets

            dicom_source = load_source_datasets(volume)  # CTError when the scan was not read from DICOM
        pid = safe_name(explained.stem) or "point"
        pc = explained.point_crop
        result = PointResult(pc, explained.ensembles)
        method = explained.ensembles[0].method if explained.ensembles else "cdam"
        hashes = {str(m.path): m.fingerprint for m in self.loaded}
        entry = point_entry(pid, result, given=pc.point_world, given_as="lps_mm", method=method,
                            ratings=self._ratings(explained), warnings=explained.warnings)
        settings = {"volume": {"name": volume.name, "shape_zyx": list(volume.shape),
                               "series_instance_uid": volume.meta.get("series_instance_uid")},
                    "checkpoints": hashes, "method": method, "source": "viewer", "dicom": dicom}
        run = RunFolder(folder, settings)
        with run.point(pid, pc.point_world) as partial:
            write_point(partial, entry, result, volume, checkpoint_hashes=hashes, series_label=volume.name,
                        dicom_source=dicom_source)
        entries = [json.loads((run.root / p / "predictions.json").read_text()) for p in run.manifest["points"]
                   if (run.root / p / "predictions.json").is_file()]
        finish_run(run, entries, volume, trained_on=entry["training_data"], dicom_source=dicom_source,
                   summary={"source": "viewer", "method": method, "checkpoints": sorted(hashes)})
        return sorted(p for p in (run.root / pid).rglob("*") if p.is_file())

    @staticmethod
    def _ratings(explained: Explained) -> dict[str, float]:
        """The radiologists' ratings of the explained targets that the nodule table knows."""
        row = explained.ratings
        out = {}
        for ens in explained.ensembles:
            for t in ens.targets:
                v = _numeric(row.get("malignancy_median" if t == "malignancy" else t))
                if v is not None:
                    out[t] = v
        return out
