"""CT work without a GUI: a scan in patient millimetres, a nodule's crop, model inputs, CDAM maps on the scan.

The napari plugin (:mod:`lidc_cdam.viewer`) is a thin layer over this package; nothing here imports napari or
Qt. From reading a scan to a map on its grid:

- :mod:`.errors` - :class:`CTError`, bad input as a clear message;
- :mod:`.volume` - :class:`CTVolume` (HU ``[z, y, x]``, spacing / origin / direction, index <-> patient mm,
  the layer ``scale`` / ``translate`` / ``rotate`` a viewer needs), :func:`read_dicom_folder` (a DICOM series
  through SimpleITK), :func:`read_lidc_scan` (an LIDC-IDRI scan through pylidc, with consensus labels),
  window presets;
- :mod:`.read` - any CT in: :func:`read_ct` (a DICOM series folder, a DICOM file, a NIfTI, NRRD or MetaImage
  file; refusals as :class:`SeriesRefused`) and :func:`list_series`, over :mod:`.series` (the series of a
  folder from their headers, one chosen), :mod:`.dicom_reader` (one series decoded and checked, compressed
  transfer syntaxes through pydicom + pylibjpeg), :mod:`.image_file` (NIfTI, NRRD, MetaImage through
  SimpleITK, headers checked first; NIfTI RAS -> LPS) and :mod:`.values` (HU int16, NaN / inf voxels masked,
  implausible values warned about);
- :mod:`.crop` - a nodule's 32 mm crop at 1 mm (cut by :mod:`lidc_cdam.data.lidc.crops`) read back, its centre
  in patient mm;
- :mod:`.nodules` - the nodules of a preprocessed folder whose crops lie in a scan, the nodule at a point;
- :mod:`.checkpoint` - a checked LIDC checkpoint (targets, recorded input statistics) and its predictions in
  rating units;
- :mod:`.inputs` - model inputs of a crop's slices, as the training transforms build them;
- :mod:`.maps` - the 2.5D maps of a crop (every slice along a view explained) for several targets;
- :mod:`.point` - explain at a point of any CT: :func:`crop_at_point` (the 32 mm crop at 1 mm around a point in
  patient mm or a voxel index (i, j, k), on the patient's axes whatever the file's voxel order, cut as the
  preprocessing cuts a nodule's, padded with -1000 HU, the padded share reported; a point outside the volume
  refused as :class:`PointOutside`, NaN voxels in the crop as :class:`InvalidVoxels`) and :func:`explain_point`;
- :mod:`.outputs` - the one route from points to every file written (:func:`explain_points`: crops, maps,
  predictions, NIfTI, report, DICOM results, streaming point by point), over :mod:`.run_folder` (a checked output
  folder: atomic point folders, the manifest, resume, stale folders, safe unique ids) and :mod:`.concepts` (the
  one concept resolver: each fold model's concepts from its own training fold);
- :mod:`.ensemble` - fold ensembles: checkpoints grouped by task, mean prediction and sd, mean map and the sign
  agreement per target;
- :mod:`.cache` - computed maps in memory and on disk;
- :mod:`.placement` - crop-grid arrays (maps, masks) resampled onto the scan's grid;
- :mod:`.export` - arrays on the scan's grid as NIfTI (atomically);
- :mod:`.dicom_results` - results for a PACS through highdicom: a CDAM as a Parametric Map, the explained region
  as a Segmentation (on the whole series or a crop's own grid), predictions / spread / trust flag as a TID 1500
  Structured Report, on the source series' Frame of Reference;
- :mod:`.report` - a report page per point (PNG and PDF); :mod:`.parametric_map` - a Parametric Map read back
  onto its grid (the viewer's overlays);
- :mod:`.pacs` - a PACS: find studies (QIDO-RS), fetch a series into the cache (WADO-RS: progress, cancel,
  resume), store the DICOM results (STOW-RS, DIMSE C-STORE); credentials from the environment, never shown;
- :mod:`.dicom_writer` - a volume written as a CT DICOM series (exact geometry; fresh UIDs on request);
- :mod:`.synthetic` - a synthetic chest scan with phantom nodules (DICOM series, crops, nodule table): **not CT**;
- :mod:`.testing` - tiny random checkpoints for tests and the viewer's screenshot and benchmark.

>>> volume = read_ct("LIDC-IDRI-0078/")  # or read_dicom_folder (SimpleITK), read_ct("scan.nii.gz")
>>> nodule = list_nodules("preprocessed/", volume)[0]
>>> result = compute_maps(MapRequest("best.pt", str(nodule.crop_path), ("malignancy",)))
>>> overlay = place_on_scan(result.maps[0], read_crop(nodule.crop_path), volume)  # the CT's shape
>>> at = explain_point(volume, (-75.0, -35.0, -205.0), ["fold0.pt", "fold1.pt", "fold2.pt"])  # LPS mm
>>> at.ensembles[0].mean, at.ensembles[0].sd, at.on_scan(at.ensembles[0].agreement[0], volume)
"""

from lidc_cdam.ct.cache import MapCache, cached_compute, cached_steps
from lidc_cdam.ct.checkpoint import MALIGNANCY, LoadedModel, load_checked_model, predictions
from lidc_cdam.ct.concepts import ConceptResolver
from lidc_cdam.ct.crop import CROP, crop_centre_world, read_crop
from lidc_cdam.ct.ensemble import EnsembleResult, explain_crop, explain_tasks_steps, group_checkpoints
from lidc_cdam.ct.errors import CTError, SeriesRefused
from lidc_cdam.ct.export import export_nifti
from lidc_cdam.ct.inputs import CENTRE, VIEWS, model_inputs, slices_for
from lidc_cdam.ct.maps import METHODS, SIGNED, MapRequest, MapResult, compute_maps, compute_steps
from lidc_cdam.ct.nodules import NoduleRef, list_nodules, nodule_at
from lidc_cdam.ct.outputs import explain_points
from lidc_cdam.ct.placement import nodule_labels, place_on_scan
from lidc_cdam.ct.point import (
    InvalidVoxels,
    PointCrop,
    PointOutside,
    PointResult,
    crop_at_point,
    explain_point,
    explain_point_steps,
)
from lidc_cdam.ct.read import list_series, read_ct
from lidc_cdam.ct.series import SeriesInfo
from lidc_cdam.ct.volume import WINDOWS, CTVolume, read_dicom_folder, read_lidc_scan, window_limits

__all__ = [
    "CENTRE",
    "CROP",
    "MALIGNANCY",
    "METHODS",
    "SIGNED",
    "VIEWS",
    "WINDOWS",
    "CTError",
    "CTVolume",
    "ConceptResolver",
    "EnsembleResult",
    "InvalidVoxels",
    "LoadedModel",
    "MapCache",
    "MapRequest",
    "MapResult",
    "NoduleRef",
    "PointCrop",
    "PointOutside",
    "PointResult",
    "SeriesInfo",
    "SeriesRefused",
    "cached_compute",
    "cached_steps",
    "compute_maps",
    "compute_steps",
    "crop_at_point",
    "crop_centre_world",
    "explain_crop",
    "explain_point",
    "explain_point_steps",
    "explain_points",
    "explain_tasks_steps",
    "export_nifti",
    "group_checkpoints",
    "list_nodules",
    "list_series",
    "load_checked_model",
    "model_inputs",
    "nodule_at",
    "nodule_labels",
    "place_on_scan",
    "predictions",
    "read_crop",
    "read_ct",
    "read_dicom_folder",
    "read_lidc_scan",
    "slices_for",
    "window_limits",
]
