"""Crops in patient axes (:meth:`lidc_cdam.data.lidc.crops.Geometry.patient_grid`): the same anatomy stored in any
voxel order gives the same crop, predictions, map peak and view; standard axial crops do not change.

The storage variants are made from the real chest CT fixture (``tests/data/lung1``, pyradiomics 2.2.0's
``lung1``): its NRRD, DICOM series written from it (rows, columns and slices in either order), and NIfTI in
RAS, LAS and permuted (coronal, sagittal) voxel orders; the point is the labelled nodule's centroid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from lidc_cdam.ct import CTVolume, read_ct
from lidc_cdam.ct.point import PointOutside, crop_at_point, explain_point
from lidc_cdam.ct.synthetic import write_dicom
from lidc_cdam.data.lidc.crops import Geometry
from lidc_cdam.models.demo_weights import shipped_checkpoint

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "lung1" / "lung1_thorax.nrrd"
LABEL = DATA / "lung1" / "lung1_thorax_label.nrrd"
#: NIfTI voxel orders (SimpleITK's DICOMOrient codes: the direction each index axis runs to)
NIFTI_ORDERS = {"RAS (as most NIfTI)": "RAS", "LAS (as dcm2niix)": "LAS", "x and z reversed": "RPI",
                "coronal (L, S, P)": "LSP", "sagittal (P, I, R)": "PIR"}
#: DICOM series: (row direction, column direction, slice order) as DICOMOrient codes
DICOM_ORDERS = {"DICOM (standard axial)": "LPS", "DICOM, rows and columns reversed": "RAS",
                "DICOM, slices head to feet": "LPI"}


def volume_of(image: sitk.Image, name: str) -> CTVolume:
    return CTVolume(sitk.GetArrayFromImage(image).astype(np.int16), tuple(image.GetSpacing()),
                    tuple(image.GetOrigin()), tuple(image.GetDirection()), name=name)


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[str, CTVolume]:
    """Every storage variant, read back through :func:`read_ct` from the files a user would have."""
    root = tmp_path_factory.mktemp("variants")
    image = sitk.ReadImage(str(FIXTURE))
    out = {"NRRD (LPS)": read_ct(FIXTURE)}
    for what, code in NIFTI_ORDERS.items():
        path = root / f"{code}.nii.gz"
        sitk.WriteImage(sitk.DICOMOrient(image, code), str(path))
        out[f"NIfTI {what}"] = read_ct(path)
    for what, code in DICOM_ORDERS.items():
        folder = write_dicom(volume_of(sitk.DICOMOrient(image, code), "lung1"), root / f"dicom-{code}", "LUNG1")
        out[what] = read_ct(folder)
    return out


@pytest.fixture(scope="module")
def nodule_centre() -> np.ndarray:
    """The labelled nodule's centroid in patient mm (LPS)."""
    label = sitk.ReadImage(str(LABEL))
    idx = np.argwhere(sitk.GetArrayFromImage(label) > 0).mean(0)[::-1]  # x, y, z index
    return np.asarray(label.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


def test_the_variants_really_differ_in_storage(variants):
    directions = {tuple(np.round(v.direction, 3)) for v in variants.values()}
    assert len(directions) >= 6, directions
    shapes = {v.shape for v in variants.values()}
    assert len(shapes) >= 3  # permuted axes


def test_every_storage_order_gives_the_same_crop(variants, nodule_centre):
    ref = crop_at_point(variants["NRRD (LPS)"], nodule_centre)
    assert ref.padded_share == 0.0 and ref.image.max() > 0  # a solid nodule, inside the scan
    for name, volume in variants.items():
        pc = crop_at_point(volume, nodule_centre)
        diff = np.abs(pc.image.astype(int) - ref.image.astype(int))
        assert diff.max() <= 1 and diff.mean() < 1e-3, (name, diff.max(), diff.mean())
        np.testing.assert_allclose(pc.crop["crop_to_world"], ref.crop["crop_to_world"], atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(pc.crop["direction"], np.eye(3))
        assert not pc.warnings, (name, pc.warnings)


def test_every_storage_order_gives_the_same_predictions_peak_and_view(variants, nodule_centre):
    checkpoints = [shipped_checkpoint("phantom-malignancy"), shipped_checkpoint("phantom-biomarkers")]
    results = {name: explain_point(v, nodule_centre, checkpoints, slices="nodule", margin=1)
               for name, v in variants.items()}
    ref = results["NRRD (LPS)"]
    for name, result in results.items():
        for e, e0 in zip(result.ensembles, ref.ensembles, strict=True):
            assert e.view == e0.view and e.targets == e0.targets, name
            for t in e.targets:
                assert abs(e.mean[t] - e0.mean[t]) <= 1e-5, (name, t, e.mean[t], e0.mean[t])
            for k in range(len(e.targets)):
                peak = np.unravel_index(np.argmax(np.abs(e.mean_maps[k])), e.mean_maps[k].shape)
                peak0 = np.unravel_index(np.argmax(np.abs(e0.mean_maps[k])), e0.mean_maps[k].shape)
                to_world, to_world0 = result.crop.crop["crop_to_world"], ref.crop.crop["crop_to_world"]
                at = (to_world @ [*peak, 1.0])[:3]
                at0 = (to_world0 @ [*peak0, 1.0])[:3]
                assert np.abs(at - at0).max() <= 0.5, (name, e.targets[k], at, at0)  # half a 1 mm voxel


def test_committed_standard_axial_crops_do_not_change():
    """Phantom, synthetic-scan and point crops as the code before the patient grid cut them
    (``tests/data/crops/make_reference.py`` wrote them then): the same arrays now (for phantoms, whose pixels
    now render every biomarker's cause, the same geometry)."""
    import runpy

    crops_now = runpy.run_path(str(DATA / "crops" / "make_reference.py"))["crops_now"]
    before, now = np.load(DATA / "crops" / "before_patient_axes.npz"), crops_now()
    assert set(now) <= set(before.files) and len(now) > 20
    assert not {k for k in before.files if not k.startswith("phantom/")} - set(now)  # all but phantom pixels
    for key in now:
        np.testing.assert_array_equal(now[key], before[key], err_msg=key)


def test_patient_grid_of_flipped_and_permuted_geometry():
    """The grid is anchored at the LPS-lowest corner of the voxel centres, whatever the storage order."""
    g = Geometry((0.7, 0.8, 2.5), (10.0, 20.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (40, 100, 120))
    grid = g.patient_grid()
    assert grid.origin == (10.0, 20.0, 30.0) and grid.shape_zyx == g.resampled_shape_zyx()
    # the same box stored with x reversed and y, z swapped
    far_x = 10.0 + 119 * 0.7
    flipped = Geometry((0.7, 2.5, 0.8), (far_x, 20.0, 30.0), (-1, 0, 0, 0, 0, 1, 0, 1, 0), (100, 40, 120))
    fg = flipped.patient_grid()
    np.testing.assert_allclose(fg.origin, grid.origin, atol=1e-9)
    assert fg.shape_zyx == grid.shape_zyx and fg.direction == grid.direction


def test_oblique_scan_is_resampled_and_said_so():
    angle = np.radians(20.0)
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    vol = CTVolume(np.full((40, 64, 64), -800, np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction, name="obl")
    centre = vol.index_to_world(np.array([20.0, 32.0, 32.0]))
    pc = crop_at_point(vol, centre)
    assert any("oblique" in w for w in pc.warnings)
    assert pc.padded_share < 0.05 and (pc.image[~pc.padded] == -800).all()


def test_point_given_in_ras_gets_a_hint(variants, nodule_centre):
    volume = variants["NRRD (LPS)"]
    ras = nodule_centre * np.array([-1.0, -1.0, 1.0])
    with pytest.raises(PointOutside, match="RAS mirror"):
        crop_at_point(volume, ras)
