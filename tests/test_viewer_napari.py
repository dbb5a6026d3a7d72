"""The napari plugin under Xvfb (pytest-xvfb): npe2 manifest, reader, sample data, the CDAM widget, overlays,
screenshots, bad input. Uses napari's ``make_napari_viewer`` (show=False) and pytest-qt's ``qtbot``."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

napari = pytest.importorskip("napari")
if not os.environ.get("DISPLAY") and shutil.which("Xvfb") is None:  # pragma: no cover - depends on the machine
    pytest.skip("no display and no Xvfb: install xvfb (see .ci/run) to test the napari plugin",
                allow_module_level=True)

from lidc_cdam.ct.crop import read_crop  # noqa: E402
from lidc_cdam.ct.placement import place_on_scan  # noqa: E402
from lidc_cdam.ct.synthetic import ORIGIN, SHAPE, SPACING  # noqa: E402
from lidc_cdam.ct.testing import BIOMARKERS, digits_checkpoint, synthetic, tiny_checkpoint  # noqa: E402

WAIT_MS = 60_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("models") / "malignancy.pt")


@pytest.fixture(scope="module")
def biomarker_checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("models") / "biomarkers.pt", task="biomarkers", seed=1)


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer(show=False)


def make_widget(viewer):
    from lidc_cdam.viewer._widget import CdamWidget

    widget = CdamWidget(viewer)
    viewer.window.add_dock_widget(widget, name="CDAM")
    return widget


def open_synthetic(viewer):
    layers = viewer.open_sample("lidc-cdam", "synthetic-chest")
    return layers[0]


def colour_pixels(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of orange (evidence) and blue (counter-evidence) pixels of an RGBA screenshot."""
    r, b = img[..., 0].astype(int), img[..., 2].astype(int)
    orange = (r - b > 60) & (r > 120)
    blue = (b - r > 60) & (b > 90)
    return orange, blue


def test_manifest_is_registered():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("lidc-cdam")
    assert {c.id for c in manifest.contributions.commands} >= {
        "lidc-cdam.get_reader", "lidc-cdam.synthetic_chest", "lidc-cdam.cdam_widget"}
    assert manifest.contributions.widgets and manifest.contributions.sample_data


def test_reader_through_napari(viewer):
    folder = synthetic()["dicom"]
    layers = viewer.open(str(folder), plugin="lidc-cdam")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.data.shape == SHAPE
    np.testing.assert_allclose(layer.scale, SPACING[::-1])
    np.testing.assert_allclose(layer.translate, ORIGIN[::-1])
    assert layer.data.min() == -1000 and layer.data.dtype == np.int16
    assert tuple(layer.contrast_limits) == (-1350.0, 150.0)  # lung window
    # world coordinates are patient mm: voxel (z, y, x) -> origin + spacing * index
    np.testing.assert_allclose(layer.data_to_world([10, 20, 30]),
                               np.array(ORIGIN[::-1]) + np.array(SPACING[::-1]) * [10, 20, 30])


def test_reader_declines_a_folder_without_dicom(tmp_path):
    from lidc_cdam.viewer._reader import get_reader

    (tmp_path / "notes.txt").write_text("not DICOM")
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(synthetic()["dicom"])) is not None


def test_widget_computes_an_overlay_on_the_nodule(viewer, qtbot, checkpoint):
    ct = open_synthetic(viewer)
    widget = make_widget(viewer)
    assert widget.ct_layer.value is ct
    assert [n.nodule_id for n in widget.nodules] == [f"SYNTHETIC-0001_n0{k}" for k in (1, 2, 3)]
    assert "nodule contours" in viewer.layers and viewer.layers["nodule contours"].data.max() == 3
    widget.checkpoints.value = [checkpoint]
    qtbot.waitUntil(lambda: widget.targets.choices[:1] == ("malignancy",), timeout=WAIT_MS)
    assert all(c.startswith("concept: ") for c in widget.targets.choices[1:])  # then the concepts
    widget.nodule.value = widget.nodules[1]
    worker = widget.compute()
    assert worker is not None
    qtbot.waitUntil(lambda: bool(widget.overlays), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget.compute_button.enabled, timeout=WAIT_MS)
    overlay = widget.overlays["malignancy"]
    # on the crop's 1 mm grid, placed in the scan's world (patient mm) by the crop's own affine
    crop = read_crop(widget.nodule.value.crop_path)
    assert overlay.data.shape == (32, 32, 32)
    for index in ([0, 0, 0], [31, 5, 17], [16, 16, 16]):
        world_xyz = (np.asarray(crop["crop_to_world"]) @ np.array([*index, 1.0]))[:3]
        np.testing.assert_allclose(overlay.data_to_world(index), world_xyz[::-1], atol=1e-9)
    lim = overlay.contrast_limits
    assert tuple(lim) == (-1.0, 1.0)  # symmetric around zero; by default each slice's map scaled on its own
    assert 0.9 < np.abs(overlay.data).max() <= 1.0 + 1e-6
    assert overlay.colormap.map(np.array([0.5]))[0, 3] == 0  # transparent centre
    assert overlay.colorbar.visible
    # on the scan's grid, the non-zero voxels sit on the nodule: inside its crop, covering its consensus mask
    labels = viewer.layers["nodule contours"].data
    on_scan = place_on_scan(overlay.data, crop, widget.volume)
    nz = np.argwhere(on_scan != 0)
    centre = np.argwhere(labels == 2).mean(0)
    half = 16.5 / np.asarray(ct.scale)
    assert (np.abs(nz - centre) <= half + 1).all()
    assert (on_scan[labels == 2] != 0).mean() > 0.5
    # the slider is on the nodule and the predictions are shown
    assert abs(viewer.dims.point[0] - (ORIGIN[2] + SPACING[2] * centre[0])) < 2 * SPACING[2]
    assert "malignancy: p = " in widget.predictions.value
    assert widget.progress.value == 100 and widget.last_seconds is not None
    # a second compute of the same request comes from the cache
    widget.compute()
    qtbot.waitUntil(lambda: "(cached)" in widget.status.value, timeout=WAIT_MS)


def test_several_targets_views_and_export(viewer, qtbot, biomarker_checkpoint, tmp_path):
    import SimpleITK as sitk

    open_synthetic(viewer)
    widget = make_widget(viewer)
    widget.load_checkpoints([biomarker_checkpoint], block=True)
    assert list(widget.targets.choices)[:8] == BIOMARKERS
    widget.targets.value = ["spiculation", "lobulation", "diameter_mm"]
    widget.view.value = "coronal"
    widget.method.value = "Attention map"
    widget.compute(block=True)
    assert list(widget.overlays) == ["lobulation", "spiculation", "diameter_mm"]  # the model's output order
    assert [layer.visible for layer in widget.overlays.values()] == [True, False, False]
    widget.shown.value = "diameter_mm"
    assert [layer.visible for layer in widget.overlays.values()] == [False, False, True]
    assert viewer.dims.order == (1, 0, 2)  # coronal plane displayed, the slider along y
    assert "diameter_mm: " in widget.predictions.value and "(radiologists 14.0)" in widget.predictions.value
    lo, hi = widget.overlays["spiculation"].contrast_limits
    assert lo == 0 and hi == 1  # attention is unsigned; each slice scaled on its own by default
    assert widget.results[0].targets == ["lobulation", "spiculation", "diameter_mm"]
    written = widget.export_nifti(tmp_path / "export")  # the point's files, as explain-ct writes them
    folder = tmp_path / "export" / "SYNTHETIC-0001_n01"
    niftis = sorted(p.name for p in written if p.name.endswith(".nii.gz"))
    assert niftis == ["diameter_mm.nii.gz", "lobulation.nii.gz", "spiculation.nii.gz"]
    entry = json.loads((folder / "predictions.json").read_text())
    assert entry["method"] == "attention" and entry["view"] == "coronal" and entry["ratings"]["diameter_mm"] == 14.0
    assert (folder / "report.png").is_file() and "wrote" in widget.status.value
    img = sitk.ReadImage(str(folder / "lobulation.nii.gz"))
    assert img.GetSize() == SHAPE[::-1]
    np.testing.assert_allclose(img.GetSpacing(), SPACING)
    np.testing.assert_allclose(img.GetOrigin(), ORIGIN)
    raw = place_on_scan(widget.results[0].mean_maps[1], read_crop(widget.nodules[0].crop_path), widget.volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), raw)  # raw scores, not the display scaling
    png = widget.save_png(tmp_path / "view.png")
    assert png.stat().st_size > 1000
    widget.set_window("mediastinum")
    assert tuple(widget.ct_layer.value.contrast_limits) == (-160.0, 240.0)


def test_screenshot_shows_orange_and_blue_at_the_nodule(viewer, checkpoint):
    open_synthetic(viewer)
    widget = make_widget(viewer)
    widget.load_checkpoints([checkpoint], block=True)
    widget.nodule.value = widget.nodules[0]
    widget.opacity.value = 1.0
    viewer.layers["nodule contours"].visible = False
    before = viewer.screenshot(canvas_only=False)  # makes the off-screen canvas render
    assert before.size
    plain = viewer.screenshot(canvas_only=True)
    orange, blue = colour_pixels(plain)
    assert not orange.any() and not blue.any()  # a grey CT alone
    widget.compute(block=True)
    img = viewer.screenshot(canvas_only=True)
    orange, blue = colour_pixels(img)
    assert orange.sum() > 20 and blue.sum() > 20
    # the camera is centred on the nodule: coloured pixels sit around the canvas centre
    h, w = img.shape[:2]
    ys, xs = np.nonzero(orange | blue)
    assert abs(ys.mean() - h / 2) < h / 4 and abs(xs.mean() - w / 2) < w / 4
    # and they are where the CT shows the nodule (within the crop around it)
    assert np.ptp(ys) < h * 0.8 and np.ptp(xs) < w * 0.8


def test_nodule_under_cursor(viewer, checkpoint):
    open_synthetic(viewer)
    widget = make_widget(viewer)
    target = widget.nodules[2]
    viewer.cursor.position = tuple(target.centre_world[::-1] + 1.0)
    assert widget.nodule_under_cursor() is target and widget.nodule.value is target
    viewer.cursor.position = (ORIGIN[2], ORIGIN[1], ORIGIN[0])
    assert widget.nodule_under_cursor() is None and "no nodule" in widget.status.value


def test_bad_input_gives_clear_messages(viewer, qtbot, tmp_path):
    widget = make_widget(viewer)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no DICOM here")
    assert widget.open_scan(empty) is None
    assert "no DICOM files here" in widget.status.value and len(viewer.layers) == 0
    from test_ct_reading import write_series

    write_series(tmp_path / "mr", modality="MR")  # a real series, refused by read_ct: MR is not CT
    assert widget.open_scan(tmp_path / "mr") is None
    assert "modality MR, not CT" in widget.status.value and len(viewer.layers) == 0
    widget.compute()
    assert "open a CT first" in widget.status.value
    open_synthetic(viewer)
    widget.checkpoints.value = [digits_checkpoint(tmp_path / "digits.pt")]
    qtbot.waitUntil(lambda: "another task" in widget.status.value, timeout=WAIT_MS)
    assert widget.targets.choices == ()
    widget.compute()
    assert "choose at least one target" in widget.status.value
    widget.crops_dir.value = str(tmp_path)
    assert "no nodules.csv" in widget.status.value or "no nodule" in widget.status.value


def test_open_viewer_for_the_demo(make_napari_viewer, checkpoint, biomarker_checkpoint):
    from lidc_cdam.viewer import open_viewer

    viewer = make_napari_viewer(show=False)
    viewer, widget = open_viewer("synthetic", checkpoint=[checkpoint, biomarker_checkpoint],
                                 nodule="SYNTHETIC-0001_n02", targets=["malignancy", "spiculation"],
                                 show=False, viewer=viewer)
    assert set(widget.overlays) == {"malignancy", "spiculation"}
    assert len(widget.results) == 2
    text = widget.predictions.value
    assert "malignancy: p = " in text and "spiculation: " in text and "(radiologists: malignant)" in text


@pytest.mark.slow
def test_demo_viewer_opens_on_the_demo_models(make_napari_viewer, tmp_path):
    """`lidc-cdam demo --viewer`: the synthetic chest with both demo models, every target computed."""
    from lidc_cdam.pipelines.demo import open_demo_viewer
    from lidc_cdam.pipelines.demo_lidc import run_lidc_demo

    summary = run_lidc_demo(tmp_path / "demo", n_nodules=1, retrain=False, progress=False, n_scans=30)
    viewer = make_napari_viewer(show=False)
    viewer, widget = open_demo_viewer(summary, show=False, run=False, viewer=viewer)
    assert len(widget.models) == 9  # malignancy and the eight biomarkers
    assert len(widget.overlays) == 9 and "malignancy: p = " in widget.predictions.value


def test_status_line_shows_the_scans_and_the_crops_warnings(viewer, checkpoint):
    """The volume's warnings on opening (and after), a crop's padding warning, a crop of NaN voxels refused."""
    from lidc_cdam.ct.read import read_ct

    volume = read_ct(synthetic()["dicom"])
    volume.meta["warnings"] = ["most of the body reads below -1100 HU: is the rescale right?"]
    widget = make_widget(viewer)
    assert all(f"*{s}" in widget.scan_file.filter for s in (".nrrd", ".nhdr", ".mha", ".mhd", ".nii.gz", ".dcm"))
    widget.add_ct(volume)
    assert "Warning: most of the body reads below -1100 HU" in widget.status.value
    widget.load_checkpoints([checkpoint], block=True)
    corner = volume.index_to_world(np.zeros(3))[::-1]  # world (z, y, x) of the first voxel: the crop is mostly outside
    widget.add_point(corner, block=True)
    assert widget.overlays and "Warning: P1: the crop crosses the volume's edge" in widget.status.value
    assert "Warning: most of the body reads below -1100 HU" in widget.status.value
    invalid = np.zeros(volume.shape, dtype=bool)
    invalid[tuple(np.array(volume.shape) // 2)] = True
    volume.invalid = invalid
    widget.add_point(volume.index_to_world(np.array(volume.shape) // 2)[::-1], block=True)
    assert widget.status.value.startswith("Error: P2: 1 voxel(s)") and "NaN or infinite" in widget.status.value
    assert widget.explained.label.startswith("P1")  # what is shown stays
