"""Throughput of `lidc-cdam preprocess` on synthetic DICOM series with real scans' geometry.

Writes synthetic series (512 x 512 slices at the database's z positions) for the first ``--scans`` scans
with nodules, then times ``preprocess`` with 1 and 2 workers on fresh output folders: scans per minute,
the 2-worker speed-up, and the share of per-scan time in DICOM reading (pylidc's loader + checks),
annotation clustering / consensus masks, resampling + cropping, and writing.

    python benchmarks/bench_preprocess.py [--scans 6] [--workers 1 2] [--out FILE]

Run it alone on the machine (two busy workers on two cores stall when anything else runs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from lidc_cdam.data.lidc.nodules import read_nodule_table
    from lidc_cdam.data.lidc.preprocess import preprocess
    from lidc_cdam.data.lidc.pylidc_compat import import_pylidc
    from lidc_cdam.data.lidc.synthetic_dicom import write_series

    pl = import_pylidc()
    table = read_nodule_table()
    scan_ids = sorted(table["scan_id"].unique())[: args.scans]
    work = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    root = work / "LIDC-IDRI"
    slices = 0
    t = time.perf_counter()
    for sid in scan_ids:
        scan = pl.query(pl.Scan).filter(pl.Scan.id == int(sid)).one()
        write_series(scan, root)
        slices += len(scan.slice_zvals)
    print(f"wrote {len(scan_ids)} synthetic series ({slices} slices) in {time.perf_counter() - t:.1f} s")

    rows = []
    try:
        for workers in args.workers:
            out = work / f"out-{workers}"
            t = time.perf_counter()
            summary = preprocess(root, out, workers=workers, progress=False)
            wall = time.perf_counter() - t
            stages = {"read_s": 0.0, "annotations_s": 0.0, "resample_s": 0.0, "write_s": 0.0, "total_s": 0.0}
            for rec in (out / "scans").glob("*.json"):
                timing = json.loads(rec.read_text())["timing"]
                for k in stages:
                    stages[k] += timing.get(k, 0.0)
            share = {k[:-2]: stages[k] / stages["total_s"] for k in stages if k != "total_s"}
            rows.append({"workers": workers, "scans": len(scan_ids), "nodules": summary["nodules"],
                         "wall_s": wall, "scans_per_min": 60 * len(scan_ids) / wall, "share": share})
            print(f"workers={workers}: {wall:.1f} s, {rows[-1]['scans_per_min']:.1f} scans/min, "
                  f"{summary['nodules']} crops; per-scan time: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in share.items()))
        if len(rows) > 1:
            print(f"speed-up {rows[-1]['workers']} vs {rows[0]['workers']} workers: "
                  f"{rows[-1]['scans_per_min'] / rows[0]['scans_per_min']:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
