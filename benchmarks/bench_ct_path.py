"""The CT path on the real chest CT fixture (``tests/data/lung1``): what issue "One CT path" asks to measure.

    python benchmarks/bench_ct_path.py variants   # storage variant -> crop, prediction and map-peak differences
    python benchmarks/bench_ct_path.py pm-size    # a Parametric Map's size per map: whole series vs the crop's grid
    python benchmarks/bench_ct_path.py memory     # peak RSS of explain-ct for 1 and 200 points (one process each)

Each writes ``benchmarks/results/ct-path/<part>.txt`` (and prints it). The models are the shipped phantom models
(trained on phantoms, not CT: the predictions mean nothing on real CT; here only their equality across storage
orders, the file sizes and the memory are measured).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "lung1" / "lung1_thorax.nrrd"
LABEL = ROOT / "tests" / "data" / "lung1" / "lung1_thorax_label.nrrd"
RESULTS = ROOT / "benchmarks" / "results" / "ct-path"
NIFTI = {"NIfTI RAS": "RAS", "NIfTI LAS (dcm2niix)": "LAS", "NIfTI x and z reversed": "RPI",
         "NIfTI coronal (L, S, P)": "LSP", "NIfTI sagittal (P, I, R)": "PIR"}
DICOM = {"DICOM axial": "LPS", "DICOM rows + columns reversed": "RAS", "DICOM slices head to feet": "LPI"}


def nodule_centre() -> np.ndarray:
    label = sitk.ReadImage(str(LABEL))
    idx = np.argwhere(sitk.GetArrayFromImage(label) > 0).mean(0)[::-1]
    return np.asarray(label.TransformContinuousIndexToPhysicalPoint(idx.tolist()))


def checkpoints() -> list[Path]:
    from lidc_cdam.models.demo_weights import shipped_checkpoint

    return [shipped_checkpoint("phantom-malignancy"), shipped_checkpoint("phantom-biomarkers")]


def write_dicom_series(image: sitk.Image, folder: Path) -> Path:
    from lidc_cdam.ct import CTVolume
    from lidc_cdam.ct.synthetic import write_dicom

    vol = CTVolume(sitk.GetArrayFromImage(image).astype(np.int16), image.GetSpacing(), image.GetOrigin(),
                   image.GetDirection(), name="lung1")
    return write_dicom(vol, folder, "LUNG1")


def variants(tmp: Path) -> str:
    from lidc_cdam.ct import read_ct
    from lidc_cdam.ct.point import explain_point

    image = sitk.ReadImage(str(FIXTURE))
    files = {"NRRD (LPS, the fixture)": FIXTURE}
    for name, code in NIFTI.items():
        files[name] = tmp / f"{code}.nii.gz"
        sitk.WriteImage(sitk.DICOMOrient(image, code), str(files[name]))
    for name, code in DICOM.items():
        files[name] = write_dicom_series(sitk.DICOMOrient(image, code), tmp / f"dicom-{code}")
    centre = nodule_centre()
    results = {name: explain_point(read_ct(path), centre, checkpoints(), slices="all") for name, path in files.items()}
    ref = results["NRRD (LPS, the fixture)"]
    lines = ["storage variant | voxel order (direction columns) | max crop diff (HU) | max prediction diff | "
             "max map-peak offset (mm) | view", "---|---|---|---|---|---"]
    for name, r in results.items():
        vol = read_ct(files[name])
        crop_diff = int(np.abs(r.crop.image.astype(int) - ref.crop.image.astype(int)).max())
        pred = max(abs(e.mean[t] - e0.mean[t]) for e, e0 in zip(r.ensembles, ref.ensembles, strict=True)
                   for t in e.targets)
        offset = 0.0
        for e, e0 in zip(r.ensembles, ref.ensembles, strict=True):
            for k in range(len(e.targets)):
                at = [(res.crop.crop["crop_to_world"] @ [*np.unravel_index(np.argmax(np.abs(m[k])), m[k].shape), 1])[:3]
                      for res, m in ((r, e.mean_maps), (ref, e0.mean_maps))]
                offset = max(offset, float(np.abs(at[0] - at[1]).max()))
        order = " ".join("".join("+-"[int(c[np.argmax(np.abs(c))] < 0)] + "xyz"[int(np.argmax(np.abs(c)))])
                         for c in vol.dmat.T)
        lines.append(f"{name} | {order} | {crop_diff} | {pred:.1e} | {offset:.2f} | {r.ensembles[0].view}")
    return "\n".join(lines)


def pm_size(tmp: Path) -> str:
    from lidc_cdam.ct import read_ct
    from lidc_cdam.ct.dicom_results import write_parametric_map
    from lidc_cdam.ct.placement import place_on_scan
    from lidc_cdam.ct.point import explain_point

    series = write_dicom_series(sitk.ReadImage(str(FIXTURE)), tmp / "dicom")
    vol = read_ct(series)
    result = explain_point(vol, nodule_centre(), checkpoints()[:1], slices="all")
    crop_map = result.ensembles[0].mean_maps[0]
    whole = write_parametric_map(vol, place_on_scan(crop_map, result.crop.crop, vol), "malignancy",
                                 tmp / "whole.dcm")
    crop = write_parametric_map(vol, crop_map, "malignancy", tmp / "crop.dcm", crop=result.crop.crop)
    big = 160 * 512 * 512 * 4 / 1e6
    return "\n".join([
        f"series: {vol.shape[0]} slices of {vol.shape[1]} x {vol.shape[2]} (the real CT fixture as DICOM)",
        f"Parametric Map on the whole series' grid (before): {whole.stat().st_size / 1e6:.2f} MB per map",
        f"Parametric Map on the crop's own grid (now):       {crop.stat().st_size / 1e6:.3f} MB per map",
        f"the whole-series map of 160 slices of 512 x 512 would be {big:.0f} MB of float32 pixels per map; "
        "the crop's map stays 32 x 32 x 32 whatever the series"])


def memory(tmp: Path, counts: tuple[int, ...] = (1, 200)) -> str:
    """One ``explain-ct`` process per count (points spread through the lungs), its peak RSS (``ru_maxrss``)."""
    from lidc_cdam.ct import read_ct

    vol = read_ct(FIXTURE)
    lung = np.argwhere((vol.hu < -500) & (vol.hu > -1000))  # z, y, x of lung voxels
    rng = np.random.default_rng(0)
    lines = ["points | peak RSS (MB) | wall (s)", "---|---|---"]
    peaks = {}
    for n in counts:
        picked = vol.index_to_world(lung[rng.choice(len(lung), n, replace=False)].astype(float))
        csv = tmp / f"points{n}.csv"
        csv.write_text("x,y,z\n" + "".join(f"{x:.2f},{y:.2f},{z:.2f}\n" for x, y, z in picked))
        code = ("import resource, sys; from lidc_cdam.pipelines.cli import main; rc = main(sys.argv[1:]); "
                "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, "explain-ct", str(FIXTURE), "--points", str(csv),
                               "--checkpoint", *map(str, checkpoints()), "--out", str(tmp / f"out{n}"),
                               "--slices", "centre", "--margin", "1"], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        peaks[n] = int(done.stdout.split("RSS")[-1]) / 1024
        lines.append(f"{n} | {peaks[n]:.0f} | {wall:.0f}")
    lines.append(f"ratio {counts[-1]} / {counts[0]} points: {peaks[counts[-1]] / peaks[counts[0]]:.2f} "
                 "(explain-ct --slices centre --margin 1, the two shipped models, 9 targets, every file written)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("variants", "pm-size", "memory"))
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 200])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        part = {"variants": variants, "pm-size": pm_size, "memory": lambda t: memory(t, tuple(args.counts))}
        text = part[args.part](Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.part}.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
