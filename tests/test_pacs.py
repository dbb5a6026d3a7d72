"""The radiologist's PACS against a real Orthanc (tests/orthanc.py): the real chest CT fixture uploaded with fresh
UIDs (STOW-RS), found (QIDO-RS), fetched into the cache (WADO-RS) and explained, its Parametric Map, Segmentation and
SR stored back (STOW-RS, and DIMSE C-STORE to Orthanc's DICOM port) and read back with highdicom; the cache, resume
and cancel; every failure (server down, wrong password, unknown study, a user without write rights, a timeout) is
exit 2 with a clear message, nothing half-written and no credential shown."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from lidc_cdam.pipelines.cli import main
from orthanc import USERS, free_port, orthanc  # noqa: F401  (the fixture)

from lidc_cdam.ct import pacs
from lidc_cdam.ct.dicom_writer import write_ct_series
from lidc_cdam.ct.pacs import client as pacs_client
from lidc_cdam.ct.read import read_ct
from lidc_cdam.models.demo_weights import shipped_checkpoint

LUNG1 = Path(__file__).parent / "data" / "lung1"
ENV = ("LIDC_CDAM_PACS_USER", "LIDC_CDAM_PACS_PASSWORD", "LIDC_CDAM_PACS_TOKEN", "NETRC")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def no_secret_in(*texts: str, folder: Path | None = None) -> None:
    secrets = [*USERS.values(), "wrong-password-x1"]
    for text in texts:
        assert not any(s in text for s in secrets)
    if folder is not None:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(s.encode() in data for s in secrets), path


@pytest.fixture(scope="module")
def as_user():
    """Credentials in the environment (as a user sets them); returns a function to switch users."""
    mp = pytest.MonkeyPatch()
    for name in ENV:
        mp.delenv(name, raising=False)

    def use(user: str | None, password: str | None = None) -> None:
        if user is None:
            mp.delenv("LIDC_CDAM_PACS_USER", raising=False)
            mp.delenv("LIDC_CDAM_PACS_PASSWORD", raising=False)
            return
        mp.setenv("LIDC_CDAM_PACS_USER", user)
        mp.setenv("LIDC_CDAM_PACS_PASSWORD", password or USERS[user])

    use("lidc")
    yield use
    mp.undo()


@pytest.fixture
def lidc(as_user):
    as_user("lidc")
    yield
    as_user("lidc")


def upload(orthanc, folder: Path, patient: str) -> dict[str, str]:  # noqa: F811
    vol = read_ct(LUNG1 / "lung1_thorax.nrrd")
    write_ct_series(vol, folder, patient, fresh_uids=True, study_date="20240115", accession=f"ACC-{patient}",
                    study_description="chest CT (lung1, pyradiomics)", series_description="lung1 thorax")
    server = pacs.connect(orthanc.dicomweb)
    report = pacs.store_stow(server, sorted(folder.glob("*.dcm")))
    assert len(report.stored) == 48 and not report.failed
    first = pydicom.dcmread(folder / "0001.dcm", stop_before_pixels=True)
    return {"study": first.StudyInstanceUID, "series": first.SeriesInstanceUID, "patient": patient,
            "upload_seconds": report.seconds}


@pytest.fixture(scope="module")
def nodule() -> list[str]:
    """The labelled nodule's centre (patient mm, LPS) as --point arguments."""
    vol, label = read_ct(LUNG1 / "lung1_thorax.nrrd"), read_ct(LUNG1 / "lung1_thorax_label.nrrd")
    return [f"{v:.3f}" for v in vol.index_to_world(np.argwhere(label.hu > 0).mean(0))]


@pytest.fixture(scope="module")
def study(orthanc, as_user, tmp_path_factory):  # noqa: F811
    return upload(orthanc, tmp_path_factory.mktemp("lung1-dicom"), "LUNG1-PACS")


def explain_args(orthanc, study, nodule, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["explain-ct", "--dicomweb", orthanc.dicomweb, "--study", study["study"], "--point", *nodule,
            "--checkpoint", str(shipped_checkpoint("phantom-malignancy")), "--slices", "centre", "--out", str(out),
            "--dicom", *extra]


@pytest.fixture(scope="module")
def first_run(orthanc, study, nodule, as_user, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("first") / "out"
    code, stdout, stderr = run_cli(explain_args(orthanc, study, nodule, out, "--store"))
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out}


# ------------------------------------------------------------------------------------------ no server needed


def test_credentials_come_from_the_environment_and_never_show(monkeypatch, tmp_path):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    url = "https://pacs.example.org/dicom-web"
    assert pacs_client.credentials(url) == (None, "none")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.example.org login nina password netrc-secret-1\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    auth, where = pacs_client.credentials(url)
    assert where == "netrc" and "netrc-secret-1" not in repr(auth)
    monkeypatch.setenv("LIDC_CDAM_PACS_USER", "nina")
    with pytest.raises(pacs.PacsError, match="LIDC_CDAM_PACS_PASSWORD is not set"):
        pacs_client.credentials(url)
    monkeypatch.setenv("LIDC_CDAM_PACS_PASSWORD", "env-secret-2")
    auth, where = pacs_client.credentials(url)
    assert where == "LIDC_CDAM_PACS_USER" and "env-secret-2" not in repr(auth)
    monkeypatch.setenv("LIDC_CDAM_PACS_TOKEN", "token-secret-3")
    server = pacs.connect(url)
    assert server.auth_source == "LIDC_CDAM_PACS_TOKEN" and server.client._session.verify is True
    assert "token-secret-3" not in repr(server) + repr(server.client._session.auth)
    import requests

    request = requests.Request("GET", url + "/studies", auth=server.client._session.auth).prepare()
    assert request.headers["Authorization"] == "Bearer token-secret-3"
    assert pacs.connect(url, insecure=True).client._session.verify is False
    with pytest.raises(pacs.PacsError, match="carries credentials") as err:
        pacs.connect("https://nina:url-secret-4@pacs.example.org/dicom-web")
    assert "url-secret-4" not in str(err.value)
    assert pacs.public_url("https://pacs.example.org:8443/dicom-web/?x=1") == "https://pacs.example.org:8443/dicom-web"
    with pytest.raises(pacs.PacsError, match="not a DICOMweb URL"):
        pacs.connect("ftp://pacs.example.org")


def test_arguments_are_checked_before_any_work(tmp_path):
    from lidc_cdam.ct.pacs.find import check_date_range
    from lidc_cdam.ct.pacs.store import parse_scp

    assert check_date_range("20240101-20241231") == "20240101-20241231"
    assert check_date_range("2024-01-31") == "20240131" and check_date_range("-20240101") == "-20240101"
    with pytest.raises(pacs.PacsError, match="YYYYMMDD"):
        check_date_range("January")
    assert parse_scp("ORTHANC@127.0.0.1:4242") == ("ORTHANC", "127.0.0.1", 4242)
    with pytest.raises(pacs.PacsError, match="AET@HOST:PORT"):
        parse_scp("127.0.0.1:4242")
    ckpt = str(shipped_checkpoint("phantom-malignancy"))
    cases = {
        ("--point", "0", "0", "0"): "no CT",
        ("--dicomweb", "http://127.0.0.1:9/dicom-web", "--point", "0", "0", "0"): "needs --study",
        ("--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2.3", "--point", "0", "0", "0", "--store"):
            "add --dicom",
        (str(tmp_path), "--point", "0", "0", "0", "--store", "--dicom"): "--store-to URL",
        (str(tmp_path), "--study", "1.2.3", "--point", "0", "0", "0"): "go with --dicomweb",
        ("--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2.3", "--point", "0", "0", "0", "--dicom",
         "--store-scp", "nonsense"): "AET@HOST:PORT",
    }
    for args, message in cases.items():
        code, _, err = run_cli(["explain-ct", *args, "--checkpoint", ckpt, "--out", str(tmp_path / "o")])
        assert code == 2 and message in err, (args, err)
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_server_that_never_answers_times_out(lidc):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        server = pacs.connect(f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web", timeout=0.5)
        with pytest.raises(pacs.PacsError, match=r"timed out"):
            list(pacs.find_studies(server))


# ------------------------------------------------------------------------------------------ against Orthanc


def test_find_lists_the_uploaded_study(orthanc, study, lidc):  # noqa: F811
    code, out, err = run_cli(["pacs", "find", "--dicomweb", orthanc.dicomweb, "--patient", study["patient"]])
    assert code == 0, err
    assert study["study"] in out and study["series"] in out and "2024-01-15" in out and "ACC-LUNG1-PACS" in out
    row = next(line for line in out.splitlines() if study["series"] in line)
    assert row.split()[:2] == ["CT", "48"] and "lung1 thorax" in row
    code, out, _ = run_cli(["pacs", "find", "--dicomweb", orthanc.dicomweb, "--accession", "ACC-LUNG1-PACS",
                            "--study-date", "20240101-20240131", "--modality", "CT", "--json"])
    found = json.loads(out)
    assert code == 0 and [s["uid"] for s in found] == [study["study"]]
    assert found[0]["series"][0]["n_instances"] == 48
    code, out, _ = run_cli(["pacs", "find", "--dicomweb", orthanc.dicomweb, "--study-date", "19990101-19991231"])
    assert code == 0 and out.strip() == "no studies found"


def test_fetch_explain_and_store_round_trip(orthanc, study, nodule, first_run, lidc):  # noqa: F811
    import highdicom as hd

    assert first_run["code"] == 0, first_run["stderr"]
    out = first_run["out"]
    assert "fetched 48 of 48 instances" in first_run["stdout"]
    assert "(STOW-RS): stored 3 of 3" in first_run["stdout"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pacs"]["url"] == orthanc.dicomweb and summary["pacs"]["series_instance_uid"] == study["series"]
    assert summary["volume"]["series_instance_uid"] == study["series"]
    no_secret_in(first_run["stdout"], first_run["stderr"], folder=out)
    record = json.loads((out / "pacs_store.json").read_text())["destinations"][0]
    assert record["n_stored"] == 3 and record["n_failed"] == 0
    local = {p.name: pydicom.dcmread(p) for p in [*(out / "p01" / "dicom").glob("*.dcm"), out / "dicom_sr.dcm"]}
    assert set(local) == {"cdam_malignancy_pm.dcm", "region_seg.dcm", "dicom_sr.dcm"}
    # a QIDO query finds the new instances in the same study
    server = pacs.connect(orthanc.dicomweb)
    listed = server.client.search_for_instances(study["study"], fields=["SOPInstanceUID", "SeriesInstanceUID"])
    on_server = {item["00080018"]["Value"][0] for item in listed}
    assert {ds.SOPInstanceUID for ds in local.values()} <= on_server and len(on_server) == 48 + 3
    # the SR (as the server has it) references the maps and the segmentation, and the source CT
    sr_local = local["dicom_sr.dcm"]
    sr = server.client.retrieve_instance(study["study"], sr_local.SeriesInstanceUID, sr_local.SOPInstanceUID)
    evidence = {ref.ReferencedSOPInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert {local["cdam_malignancy_pm.dcm"].SOPInstanceUID, local["region_seg.dcm"].SOPInstanceUID} <= evidence
    assert len(evidence) == 48 + 2
    # highdicom reads the map back from the server; its peak lies in the 32 mm box around the point
    pm_local = local["cdam_malignancy_pm.dcm"]
    pm = hd.pm.ParametricMap.from_dataset(
        server.client.retrieve_instance(study["study"], pm_local.SeriesInstanceUID, pm_local.SOPInstanceUID))
    np.testing.assert_array_equal(pm.pixel_array, pm_local.pixel_array)
    volume = pm.get_volume()
    peak = volume.map_indices_to_reference(np.array([np.unravel_index(int(np.argmax(volume.array)),
                                                                      volume.array.shape)]))[0]
    point = np.array([float(v) for v in nodule])
    assert np.all(np.abs(peak - point) <= 16.0), (peak, point)
    seg = hd.seg.Segmentation.from_dataset(
        server.client.retrieve_instance(study["study"], local["region_seg.dcm"].SeriesInstanceUID,
                                        local["region_seg.dcm"].SOPInstanceUID))
    assert seg.get_volume(combine_segments=True).array.sum() > 0


def test_second_run_uses_the_cache(orthanc, study, nodule, first_run, lidc, tmp_path, monkeypatch):  # noqa: F811
    cache = pacs.cached_series(study["series"])
    assert cache is not None
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    servers = []
    real_connect = pacs_client.connect

    def connect(*args, **kwargs):
        servers.append(real_connect(*args, **kwargs))
        return servers[-1]

    monkeypatch.setattr(pacs_client, "connect", connect)
    code, out, err = run_cli(explain_args(orthanc, study, nodule, tmp_path / "again"))
    assert code == 0, err
    assert "48 instances from the cache" in out
    assert servers and servers[0].counts["wado_requests"] == 0  # no second download
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    first = pd.read_csv(first_run["out"] / "predictions.csv")
    again = pd.read_csv(tmp_path / "again" / "predictions.csv")
    pd.testing.assert_frame_equal(first, again)
    np.testing.assert_array_equal(np.load(first_run["out"] / "p01" / "maps.npz")["malignancy"],
                                  np.load(tmp_path / "again" / "p01" / "maps.npz")["malignancy"])


def test_fetch_is_resumable_and_can_be_cancelled(orthanc, study, lidc, tmp_path):  # noqa: F811
    server = pacs.connect(orthanc.dicomweb)
    stop = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done >= 10:
            stop.set()

    with pytest.raises(pacs.FetchCancelled, match="cancelled after 10 of 48"):
        pacs.fetch_series(server, study["study"], study["series"], root=tmp_path, progress=progress, cancel=stop)
    folder = tmp_path / study["series"]
    assert len(list(folder.glob("*.dcm"))) == 10 and not (folder / "COMPLETE.json").exists()
    assert pacs.cached_series(study["series"], root=tmp_path) is None
    wado = server.counts["wado_requests"]
    got = pacs.fetch_series(server, study["study"], root=tmp_path)  # resumes; the largest CT series by default
    assert got.series == study["series"] and got.downloaded == 38 and got.instances == 48 and not got.from_cache
    assert server.counts["wado_requests"] - wado == 38
    marker = json.loads((folder / "COMPLETE.json").read_text())
    assert len(marker["instances"]) == 48 and marker["server"] == orthanc.dicomweb
    assert read_ct(folder).shape == (48, 305, 260)
    steps = pacs.fetch_steps(server, study["study"], study["series"], root=tmp_path)
    assert next(steps) == (48, 48)  # complete: answered from the cache
    with pytest.raises(StopIteration) as done:
        next(steps)
    assert done.value.value.from_cache and server.counts["wado_requests"] - wado == 38


@pytest.mark.parametrize("case", ["server down", "wrong password", "unknown study", "no credentials"])
def test_fetch_failures_exit_2_with_nothing_written(orthanc, study, nodule, as_user, lidc, tmp_path,  # noqa: F811
                                                    case):
    url, study_uid = orthanc.dicomweb, study["study"]
    if case == "server down":
        url = f"http://127.0.0.1:{free_port()}/dicom-web"
    elif case == "wrong password":
        as_user("lidc", "wrong-password-x1")
    elif case == "no credentials":
        as_user(None)
    else:
        study_uid = "1.2.826.0.1.3680043.8.498.1"
    out = tmp_path / "out"
    args = explain_args(orthanc, {**study, "study": study_uid}, nodule, out, "--store")
    args[args.index(orthanc.dicomweb)] = url
    code, stdout, err = run_cli(args)
    assert code == 2
    expected = {"server down": "cannot connect", "wrong password": "credentials (from LIDC_CDAM_PACS_USER) were "
                "refused", "unknown study": "no such study", "no credentials": "no credentials were given"}[case]
    assert expected in err and err.count("\n") == 1, err
    no_secret_in(stdout, err)
    assert not out.exists() or not any(out.iterdir())


def test_a_stow_refusal_exits_2_and_keeps_the_local_results(orthanc, study, nodule, first_run, as_user,  # noqa: F811
                                                            tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    (out / "pacs_store.json").unlink()
    as_user("reader")  # may read (the fetch works), may not store: Orthanc answers 403
    try:
        code, stdout, err = run_cli(explain_args(orthanc, study, nodule, out, "--store"))
    finally:
        as_user("lidc")
    assert code == 2
    assert "403 Forbidden" in err and "stored 0 of 3" in err and "NOT stored: p01/dicom/region_seg.dcm" in err
    assert "local copies are in" in err and "1 resumed" in stdout
    no_secret_in(stdout, err, folder=out)
    record = json.loads((out / "pacs_store.json").read_text())["destinations"][0]
    assert record["n_stored"] == 0 and record["n_failed"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert all((out / "p01" / f).is_file() for f in manifest["points"]["p01"]["files"])
    assert (out / "dicom_sr.dcm").is_file() and not list(out.rglob(".*partial*"))


def test_the_same_round_trip_by_dimse_c_store(orthanc, nodule, as_user, tmp_path):  # noqa: F811
    other = upload(orthanc, tmp_path / "dicom", "LUNG1-DIMSE")
    out = tmp_path / "out"
    code, stdout, err = run_cli(explain_args(orthanc, other, nodule, out, "--store-scp", orthanc.scp))
    assert code == 0, err
    assert f"{orthanc.scp} (DIMSE C-STORE): stored 3 of 3" in stdout
    server = pacs.connect(orthanc.dicomweb)
    modalities = {s.modality: s.n_instances for s in pacs.search_series(server, other["study"])}
    assert modalities == {"CT": 48, "OT": 1, "SEG": 1, "SR": 1}
    listed = server.client.search_for_instances(other["study"], fields=["SOPInstanceUID"])
    local = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
             for p in [*(out / "p01" / "dicom").glob("*.dcm"), out / "dicom_sr.dcm"]]
    assert set(local) <= {item["00080018"]["Value"][0] for item in listed}
    # a DICOM port where nothing listens: exit 2, saying nothing was stored
    code, stdout, err = run_cli(explain_args(orthanc, other, nodule, out, "--store-scp",
                                             f"ORTHANC@127.0.0.1:{free_port()}"))
    assert code == 2 and "cannot connect" in err and "stored 0 of 3" in err and "1 resumed" in stdout


def test_store_to_a_server_that_is_down_exits_2_saying_nothing_was_stored(orthanc, study, nodule,  # noqa: F811
                                                                           first_run, lidc, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    code, stdout, err = run_cli(explain_args(orthanc, study, nodule, out, "--store-to", down))
    assert code == 2 and "1 resumed" in stdout
    assert f"{down}: storing p01/dicom/region_seg.dcm (STOW-RS) failed: cannot connect" in err
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]  # warnings may come first
    assert f"{down} (STOW-RS): stored 0 of 3" in err and len(errors) == 1, err
    assert json.loads((out / "pacs_store.json").read_text())["destinations"][0]["n_failed"] == 3


def test_netrc_credentials_against_orthanc(orthanc, study, as_user, lidc, tmp_path, monkeypatch):  # noqa: F811
    as_user(None)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login lidc password {USERS['lidc']}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    code, out, err = run_cli(["pacs", "find", "--dicomweb", orthanc.dicomweb, "--patient", study["patient"]])
    assert code == 0 and study["series"] in out, err
    no_secret_in(out, err)
