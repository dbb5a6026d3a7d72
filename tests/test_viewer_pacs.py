"""The viewer's PACS panel against a real Orthanc (tests/orthanc.py), under Xvfb: search, open (the series fetched
into the cache with progress), click at the nodule, send the results (Parametric Maps, Segmentation, SR) back by
STOW-RS; the server then holds them in the same study. Also the Qt-free actions' refusals."""

from __future__ import annotations

import numpy as np
import pytest
from orthanc import orthanc  # noqa: F401  (the fixture)
from test_pacs import ENV, LUNG1, upload
from test_viewer_napari import WAIT_MS, make_widget

from lidc_cdam.ct.errors import CTError
from lidc_cdam.ct.read import read_ct
from lidc_cdam.models.demo_weights import shipped_checkpoint


@pytest.fixture(scope="module")
def credentials():
    mp = pytest.MonkeyPatch()
    for name in ENV:
        mp.delenv(name, raising=False)
    from orthanc import USERS

    mp.setenv("LIDC_CDAM_PACS_USER", "lidc")
    mp.setenv("LIDC_CDAM_PACS_PASSWORD", USERS["lidc"])
    yield
    mp.undo()


@pytest.fixture(scope="module")
def study(orthanc, credentials, tmp_path_factory):  # noqa: F811
    return upload(orthanc, tmp_path_factory.mktemp("viewer-lung1"), "LUNG1-VIEWER")


def test_actions_refuse_without_a_url_or_a_scan():
    from lidc_cdam.viewer._controller import CdamController
    from lidc_cdam.viewer._pacs import PacsActions

    actions = PacsActions(CdamController())
    with pytest.raises(CTError, match="DICOMweb URL"):
        actions.search("")
    with pytest.raises(CTError, match="no PACS to send to"):
        actions.send()


def test_search_open_click_send(make_napari_viewer, qtbot, orthanc, study, credentials, tmp_path,  # noqa: F811
                                monkeypatch):
    monkeypatch.setenv("LIDC_CDAM_CACHE", str(tmp_path / "cache"))
    viewer = make_napari_viewer(show=False)
    widget = make_widget(viewer)
    widget.pacs_url.value = orthanc.dicomweb
    widget.pacs_patient.value = "LUNG1-VIEWER"
    rows = widget.pacs.search()
    assert [r.series_uid for r in rows] == [study["series"]] and "series found" in widget.status.value
    assert widget.pacs_table.data.to_list()[0][0] == "LUNG1-VIEWER"
    worker = widget.pacs.open()
    qtbot.waitUntil(lambda: widget.volume is not None and widget.volume.shape == (48, 305, 260), timeout=WAIT_MS)
    assert widget.progress.value == 100 and "from the PACS" in widget.status.value
    assert worker is not None and widget.volume.meta["pacs"]["series_instance_uid"] == study["series"]
    widget.load_checkpoints([shipped_checkpoint("phantom-malignancy")], block=True)
    widget.targets.value = ["malignancy"]
    label = read_ct(LUNG1 / "lung1_thorax_label.nrrd")
    nodule = label.index_to_world(np.argwhere(label.hu > 0).mean(0))  # LPS mm (x, y, z)
    widget.add_point(nodule[::-1], block=True)
    assert set(widget.overlays) == {"malignancy"}
    assert "trained on synthetic phantoms" in widget.training.value
    before = len(orthanc.get(f"/studies/{_orthanc_id(orthanc, study['study'])}/instances"))
    reports = widget.pacs.send()
    assert reports and not reports[0].failed and len(reports[0].stored) == 3  # PM, SEG, SR
    after = orthanc.get(f"/studies/{_orthanc_id(orthanc, study['study'])}/instances")
    assert len(after) == before + 3
    modalities = {orthanc.get(f"/instances/{i['ID']}/simplified-tags").get("Modality") for i in after}
    assert {"CT", "SEG", "SR"} <= modalities
    if _wanted_screenshot():
        viewer.window.resize(1900, 1250)
        viewer.screenshot(canvas_only=False)
        viewer.screenshot(str(_wanted_screenshot()), canvas_only=False)


def _orthanc_id(orthanc, study_uid: str) -> str:  # noqa: F811
    import requests
    from orthanc import USERS

    found = requests.post(f"{orthanc.http}/tools/lookup", data=study_uid, auth=("lidc", USERS["lidc"]), timeout=10)
    found.raise_for_status()
    return next(item["ID"] for item in found.json() if item["Type"] == "Study")


def _wanted_screenshot():
    """``LIDC_CDAM_SCREENSHOT=docs/viewer-pacs.png pytest tests/test_viewer_pacs.py`` writes the docs' screenshot."""
    import os
    from pathlib import Path

    target = os.environ.get("LIDC_CDAM_SCREENSHOT")
    return Path(target) if target else None
