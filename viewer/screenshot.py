"""The docs screenshots: napari with the CDAM widget on the synthetic scan, or on the real chest CT fixture.

    xvfb-run -a python -m lidc_cdam.viewer.screenshot --out docs/viewer.png [--checkpoint best.pt ...]
    xvfb-run -a python -m lidc_cdam.viewer.screenshot --out docs/viewer-points.png --point X Y Z ... (point mode)
    xvfb-run -a python -m lidc_cdam.viewer.screenshot --real-ct --out docs/viewer-real-ct.png

``--real-ct``: ``tests/data/lung1/lung1_thorax.nrrd`` (a real chest CT, pyradiomics' lung1, BSD-3-Clause), a point
at the centroid of its nodule label (drawn as a green outline), explained by the two shipped phantom models
(unless ``--checkpoint``). Phantom models on a real CT: the maps show what these small models learned.

Without ``--checkpoint`` a tiny *random* model is used (the maps then mean nothing; the window says so in
the layer name). The docs images are made with the two shipped demo models
(``--checkpoint lidc_cdam/models/weights/phantom-malignancy.pt``
``--checkpoint lidc_cdam/models/weights/phantom-biomarkers.pt``) and, for the ensemble view, five folds trained
on the phantoms; ``viewer/README.md`` lists the commands. With ``--point`` (patient mm, LPS; repeat) the widget
is in point mode and explains the last point; ``--models`` picks the ensemble view. Needs a display: run it
under ``xvfb-run -a`` on a headless machine.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from lidc_cdam.viewer._guard import prepare_torch

LUNG1 = Path(__file__).resolve().parents[1] / "tests" / "data" / "lung1"


def read_lung1() -> tuple[Any, list[float], np.ndarray]:
    """The real chest CT fixture (NRRD, through :func:`lidc_cdam.ct.read_ct`), the LPS mm of its nodule label's
    centroid, and the label on the CT's grid."""
    import SimpleITK as sitk

    from lidc_cdam.ct.read import read_ct

    volume = read_ct(LUNG1 / "lung1_thorax.nrrd")
    volume.name = "CT lung1 (pyradiomics: a real chest CT)"
    label = sitk.ReadImage(str(LUNG1 / "lung1_thorax_label.nrrd"))
    mask = sitk.GetArrayFromImage(label) > 0
    centroid = np.argwhere(mask).mean(0)[::-1]  # (i, j, k)
    return volume, list(label.TransformContinuousIndexToPhysicalPoint(centroid.tolist())), mask


def make_real_ct_screenshot(out: str | Path = "docs/viewer-real-ct.png", checkpoints: list[str] | None = None,
                            size: tuple[int, int] = (1900, 1150)) -> Path:
    """``docs/viewer-real-ct.png``: the real chest CT, a point at its nodule's centroid, the shipped phantom models."""
    prepare_torch()
    from lidc_cdam.models.demo_weights import shipped_checkpoint

    volume, point, mask = read_lung1()
    checkpoints = checkpoints or [str(shipped_checkpoint("phantom-malignancy")),
                                  str(shipped_checkpoint("phantom-biomarkers"))]
    return make_screenshot(out, checkpoints, size=size, points=[point], scan=volume, label=mask)


def make_screenshot(out: str | Path, checkpoints: list[str] | None = None, nodule: str = "SYNTHETIC-0001_n02",
                    method: str = "CDAM", size: tuple[int, int] = (1500, 950), canvas_only: bool = False,
                    points: list[list[float]] | None = None, models_shown: str | None = None,
                    shown: str | None = None, scan: Any = None, label: np.ndarray | None = None) -> Path:
    """A screenshot of the viewer on ``scan`` (a CTVolume or path; default the synthetic scan) at a table nodule
    or at ``points`` (LPS mm); ``label`` (on the scan's grid) is drawn as a green outline."""
    prepare_torch()
    from lidc_cdam.viewer.app import open_viewer

    tmp = None
    if not checkpoints:
        from lidc_cdam.ct.testing import tiny_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="lidc-cdam-screenshot-")
        checkpoints = [str(tiny_checkpoint(Path(tmp.name) / "random-tiny-model.pt", img_size=64))]
    if scan is None and not points:
        scan = "synthetic"
    elif scan is None:  # point mode needs no nodule table: the scan alone
        from lidc_cdam.ct.read import read_ct
        from lidc_cdam.ct.testing import synthetic

        scan = read_ct(synthetic()["dicom"])
        scan.name = "CT synthetic chest (phantom nodules, not CT)"
    viewer, widget = open_viewer(scan, checkpoint=checkpoints, nodule=None if points else nodule,
                                 method=method, show=False, points=points, models_shown=models_shown)
    try:
        viewer.window._qt_window.resize(*size)
        if label is not None:
            layer = viewer.add_labels(label.astype(np.uint8), name="nodule label (reference)", opacity=0.7,
                                      **widget.volume.layer_kwargs())
            layer.contour = 1
            with contextlib.suppress(Exception):  # napari >= 0.5
                from napari.utils.colormaps import DirectLabelColormap

                layer.colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "#39ff14"})
            viewer.layers.selection.active = widget.overlays[widget.shown.value]
        if shown is not None:
            widget.shown.value = shown
        if "nodule contours" in viewer.layers:
            viewer.layers["nodule contours"].opacity = 0.6
        viewer.screenshot(canvas_only=False)  # the off-screen canvas renders only after one window grab
        widget.focus(widget.explained.crop, widget.view.value)  # again, for the resized canvas
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(out), canvas_only=canvas_only, flash=False)
    finally:
        viewer.close()
        if tmp is not None:
            tmp.cleanup()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/viewer.png")
    parser.add_argument("--checkpoint", action="append", help="a best.pt (repeat for several models or folds)")
    parser.add_argument("--nodule", default="SYNTHETIC-0001_n02")
    parser.add_argument("--point", nargs=3, type=float, action="append", metavar=("X", "Y", "Z"),
                        help="point mode: a point in patient mm (LPS); repeat; the last one is explained")
    parser.add_argument("--models", dest="models_shown",
                        help="fold ensembles: 'ensemble mean', 'sign agreement of the folds' or 'fold k'")
    parser.add_argument("--show", dest="shown", help="the target whose overlay is visible")
    parser.add_argument("--method", default="CDAM", choices=["CDAM", "Smooth CDAM", "Integrated CDAM",
                                                             "Attention map"])
    parser.add_argument("--canvas-only", action="store_true")
    parser.add_argument("--real-ct", action="store_true",
                        help="the real chest CT fixture (tests/data/lung1), a point at its nodule, the shipped models")
    args = parser.parse_args(argv)
    if args.real_ct:
        print(make_real_ct_screenshot(args.out, args.checkpoint))
        return 0
    path = make_screenshot(args.out, args.checkpoint, args.nodule, args.method, canvas_only=args.canvas_only,
                           points=args.point, models_shown=args.models_shown, shown=args.shown)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
