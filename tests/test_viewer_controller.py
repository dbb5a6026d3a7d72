"""The viewer's Qt-free controller (no napari, Qt or magicgui): a point of the synthetic scan explained, its warnings,
refusals, and its export through the library's one output path; and the size of the viewer's modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.point import InvalidVoxels
from lidc_cdam.ct.testing import synthetic, tiny_checkpoint

VIEWER = Path(__file__).resolve().parents[1] / "viewer"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("models") / "malignancy.pt")


@pytest.fixture(scope="module")
def nodule_lps():
    """LPS (x, y, z) mm of the second phantom nodule's crop centre."""
    import lidc_cdam.ct as M

    scan = M.read_ct(synthetic()["dicom"])
    return np.asarray(M.crop_centre_world(M.read_crop(M.list_nodules(synthetic()["crops_dir"], scan)[1].crop_path)))


def controller_with(volume, checkpoint):
    from lidc_cdam.viewer._controller import CdamController

    from lidc_cdam.ct.cache import MapCache

    c = CdamController(MapCache(None))
    c.set_volume(volume)
    loaded, errors = c.load([checkpoint])
    assert not errors
    assert c.set_models(loaded) == "malignancy (1 fold)"
    return c


def test_the_controller_imports_no_gui_toolkit():
    code = ("import sys, lidc_cdam.viewer._controller; "
            "bad = [m for m in ('napari', 'qtpy', 'PyQt6', 'magicgui') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_no_viewer_module_over_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in VIEWER.glob("*.py")}
    assert sizes and max(sizes.values()) <= 400, sizes


def test_a_point_explained_warned_and_exported(tmp_path, checkpoint, nodule_lps):
    import SimpleITK as sitk

    import lidc_cdam.ct as M

    volume = M.read_ct(synthetic()["dicom"])
    volume.meta["warnings"] = ["two slices at one position: the later kept"]
    c = controller_with(volume, checkpoint)
    assert c.set_volume(volume) == ["two slices at one position: the later kept"]
    assert c.target_choices()[0] == "malignancy" and "concept: spiculated" in c.target_choices()
    with pytest.raises(CTError, match="no point to explain"):
        c.plan(["malignancy"], [])
    with pytest.raises(CTError, match="is outside the volume"):
        c.plan(["malignancy"], [("far", [900.0, 900.0, 900.0])])
    with pytest.raises(CTError, match="concepts need rated example nodules"):
        c.plan(["malignancy", "concept: round"], [("P1", nodule_lps)])

    explained = c.explain(["malignancy"], [("P1 (x, y, z) mm", nodule_lps)], slices="nodule")
    assert c.explained is explained and explained.stem == "P1"
    (ens,) = explained.ensembles
    ref = M.explain_point(volume, nodule_lps, [checkpoint], slices="nodule")
    np.testing.assert_allclose(ens.mean_maps[0], ref.ensembles[0].mean_maps[0], rtol=1e-5, atol=1e-7)
    assert explained.warnings[0] == "two slices at one position: the later kept"  # the volume's, kept

    written = c.export(tmp_path / "out")
    names = {p.name for p in written}
    assert {"malignancy.nii.gz", "predictions.json", "crop.npz", "maps.npz", "report.png", "report.pdf"} <= names
    folder = tmp_path / "out" / "P1"
    entry = json.loads((folder / "predictions.json").read_text())
    assert entry["id"] == "P1" and entry["given_as"] == "lps_mm"
    assert "two slices at one position: the later kept" in entry["warnings"]
    img = sitk.ReadImage(str(folder / "malignancy.nii.gz"))
    assert img.GetSize() == volume.shape[::-1]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), M.place_on_scan(ens.mean_maps[0], explained.crop,
                                                                                volume))
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_trust_and_padding_warnings_reach_the_result(checkpoint):
    import lidc_cdam.ct as M

    volume = M.read_ct(synthetic()["dicom"])
    c = controller_with(volume, checkpoint)
    lo = volume.index_to_world(np.zeros(3))  # the first voxel's centre: most of the crop lies outside
    explained = c.explain(["malignancy"], [("P9 (corner)", lo)])
    assert explained.padded_share > 0.5
    assert any(w.startswith("P9: the crop crosses the volume's edge") for w in explained.warnings)


def test_nan_voxels_in_the_crop_are_refused(checkpoint, nodule_lps):
    import lidc_cdam.ct as M

    volume = M.read_ct(synthetic()["dicom"])
    invalid = np.zeros(volume.shape, dtype=bool)
    k, j, i = np.round(volume.world_to_index(nodule_lps)).astype(int)
    invalid[k, j, i] = invalid[k, j + 1, i] = True
    volume.invalid = invalid
    c = controller_with(volume, checkpoint)
    with pytest.raises(InvalidVoxels, match="2 voxel"):
        c.explain(["malignancy"], [("P1", nodule_lps)])
    assert c.explained is None
