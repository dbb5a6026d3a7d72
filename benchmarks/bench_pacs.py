"""The PACS round trip on the real chest CT fixture (``tests/data/lung1``) against a real Orthanc on loopback.

    python benchmarks/bench_pacs.py [--repeats 3]

Starts Orthanc as the tests do (``tests/orthanc.py``: DICOMweb plugin, authentication on), uploads the fixture as a
48-slice DICOM series with fresh UIDs (STOW-RS), then per repeat: fetches it into an empty cache (WADO-RS), explains
the nodule's centre with the shipped phantom models (malignancy alone: 1 map; malignancy + biomarkers: 9 maps),
stores the Parametric Maps, the Segmentation and the SR by STOW-RS and by DIMSE C-STORE, and a second fetch from the
cache. Writes ``benchmarks/results/pacs/round-trip.txt``: fetch and store times (medians), bytes sent per point.
Loopback: the times are the client's and Orthanc's work, not a network's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "lung1"
RESULTS = ROOT / "benchmarks" / "results" / "pacs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pacs-"))
    os.environ["LIDC_CDAM_CACHE"] = str(tmp / "cache")
    sys.path.insert(0, str(ROOT / "tests"))
    from orthanc import USERS, start_orthanc, stop_orthanc

    from lidc_cdam.ct import pacs
    from lidc_cdam.ct.dicom_writer import write_ct_series
    from lidc_cdam.ct.outputs import explain_points
    from lidc_cdam.ct.read import read_ct
    from lidc_cdam.models.demo_weights import shipped_checkpoint

    srv = start_orthanc(tmp / "orthanc")
    os.environ["LIDC_CDAM_PACS_USER"], os.environ["LIDC_CDAM_PACS_PASSWORD"] = "lidc", USERS["lidc"]
    try:
        vol = read_ct(FIXTURE / "lung1_thorax.nrrd")
        label = read_ct(FIXTURE / "lung1_thorax_label.nrrd")
        point = vol.index_to_world(np.argwhere(label.hu > 0).mean(0))
        folder = write_ct_series(vol, tmp / "series", "LUNG1^BENCH", fresh_uids=True)
        server = pacs.connect(srv.dicomweb)
        upload = pacs.store_stow(server, sorted(folder.glob("*.dcm")))
        import pydicom

        study = str(pydicom.dcmread(folder / "0001.dcm", stop_before_pixels=True).StudyInstanceUID)
        models = {"1 map (phantom-malignancy)": [shipped_checkpoint("phantom-malignancy")],
                  "9 maps (phantom-malignancy + phantom-biomarkers)": [shipped_checkpoint("phantom-malignancy"),
                                                                       shipped_checkpoint("phantom-biomarkers")]}
        fetch_s, cached_s, fetched_mb = [], [], 0.0
        rows = []
        for name, ckpts in models.items():
            stow_s, scp_s, per_point, sr_bytes = [], [], 0, 0
            for r in range(args.repeats):
                root = tmp / f"cache-{name[:1]}-{r}"
                got = pacs.fetch_series(pacs.connect(srv.dicomweb), study, root=root)
                fetch_s.append(got.seconds)
                fetched_mb = got.bytes / 1e6
                again = pacs.fetch_series(pacs.connect(srv.dicomweb), study, root=root)
                assert again.from_cache
                cached_s.append(again.seconds)
                out = tmp / f"out-{name[:1]}-{r}"
                summary = explain_points(read_ct(got.folder), [("p01", point)], ckpts, out, slices="nodule",
                                         dicom=True, report=False, nifti=False, warn=lambda m: None)
                stow = pacs.send_results(out, summary=summary, stow=[pacs.connect(srv.dicomweb)])[0]
                scp = pacs.send_results(out, summary=summary, scp=[srv.scp])[0]
                stow_s.append(stow.seconds)
                scp_s.append(scp.seconds)
                per_point = sum(f.bytes for f in stow.files if f.path.startswith("p01/"))
                sr_bytes = sum(f.bytes for f in stow.files if not f.path.startswith("p01/"))
            rows.append(f"{name}: per point {per_point / 1e6:.3f} MB (Parametric Maps + Segmentation), SR "
                        f"{sr_bytes / 1e6:.3f} MB per run; store STOW-RS {statistics.median(stow_s):.2f} s, "
                        f"DIMSE C-STORE {statistics.median(scp_s):.2f} s (medians of {args.repeats})")
        text = "\n".join([
            "PACS round trip on loopback, Orthanc 1.10 (tests/orthanc.py), the lung1 fixture as 48 CT slices",
            f"date: {time.strftime('%Y-%m-%d')}, machine: {os.cpu_count()} CPU cores (shared)",
            f"upload (STOW-RS, 48 instances, {sum(f.bytes for f in upload.files) / 1e6:.1f} MB): "
            f"{upload.seconds:.2f} s",
            f"fetch (WADO-RS into an empty cache, 48 instances, {fetched_mb:.1f} MB): median "
            f"{statistics.median(fetch_s):.2f} s (min {min(fetch_s):.2f}, max {max(fetch_s):.2f}, n={len(fetch_s)})",
            "fetch again (complete in the cache: one QIDO-RS query choosing the series, no WADO-RS): median "
            f"{1000 * statistics.median(cached_s):.1f} ms",
            *rows, ""])
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "round-trip.txt").write_text(text)
        print(text)
    finally:
        stop_orthanc(srv)


if __name__ == "__main__":
    main()
