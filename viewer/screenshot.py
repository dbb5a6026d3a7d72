"""The docs screenshot ``docs/viewer.png``: napari with the CDAM widget on the synthetic scan.

    xvfb-run -a python -m lidc_cdam.viewer.screenshot --out docs/viewer.png [--checkpoint best.pt ...]

Without ``--checkpoint`` a tiny *random* model is used (the maps then mean nothing; the window says so in
the layer name). The docs image is made with the two shipped demo models:
``--checkpoint lidc_cdam/models/weights/phantom-malignancy.pt``
``--checkpoint lidc_cdam/models/weights/phantom-biomarkers.pt``.
Needs a display: run it under ``xvfb-run -a`` on a headless machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lidc_cdam.viewer._guard import prepare_torch


def make_screenshot(out: str | Path, checkpoints: list[str] | None = None, nodule: str = "SYNTHETIC-0001_n02",
                    method: str = "CDAM", size: tuple[int, int] = (1500, 950), canvas_only: bool = False) -> Path:
    prepare_torch()
    from lidc_cdam.viewer.app import open_viewer

    tmp = None
    if not checkpoints:
        from lidc_cdam.ct.testing import tiny_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="lidc-cdam-screenshot-")
        checkpoints = [str(tiny_checkpoint(Path(tmp.name) / "random-tiny-model.pt", img_size=64))]
    viewer, widget = open_viewer("synthetic", checkpoint=checkpoints, nodule=nodule, method=method, show=False)
    try:
        viewer.window._qt_window.resize(*size)
        if "nodule contours" in viewer.layers:
            viewer.layers["nodule contours"].opacity = 0.6
        viewer.screenshot(canvas_only=False)  # the off-screen canvas renders only after one window grab
        widget._focus(_crop(widget), widget.view.value)  # again, for the resized canvas
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(out), canvas_only=canvas_only, flash=False)
    finally:
        viewer.close()
        if tmp is not None:
            tmp.cleanup()
    return out


def _crop(widget):
    from lidc_cdam.ct.crop import read_crop

    return read_crop(widget.nodule.value.crop_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/viewer.png")
    parser.add_argument("--checkpoint", action="append", help="a best.pt (repeat for several models)")
    parser.add_argument("--nodule", default="SYNTHETIC-0001_n02")
    parser.add_argument("--method", default="CDAM", choices=["CDAM", "Smooth CDAM", "Integrated CDAM",
                                                             "Attention map"])
    parser.add_argument("--canvas-only", action="store_true")
    args = parser.parse_args(argv)
    path = make_screenshot(args.out, args.checkpoint, args.nodule, args.method, canvas_only=args.canvas_only)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
