"""Seconds from a click on the scan to the overlays, and their ratio to the forward passes that work needs.

    xvfb-run -a python -m lidc_cdam.viewer.benchmark [--model vit-s16] [--folds 1] [--threads 2] [--repeats 3]

The scenario of the issue "Any chest CT": the synthetic chest scan in the widget's point mode; a click on a
phantom nodule explains malignancy and the eight biomarkers (one checkpoint per task, or ``--folds`` per task:
a fold ensemble) with CDAM on 7 slices (the point's centre +- 3), ViT-S/16 at 224 px, on 2 CPU threads.
Random weights: the time does not depend on them.

Reported, each the median of ``--repeats`` clicks after a warm-up click (a fresh in-memory cache each time, so
nothing is reused):

- ``forward_s``: the forward passes the work needs, measured in the same run: each checkpoint on its 7 slices
  (one batch of 7);
- ``click_s``: click -> overlays in the widget (the crop cut at the point, the 2.5D inputs, CDAM of every
  target of every checkpoint with the per-slice predictions and the trust latent from the same passes, the
  9 overlay layers updated in place, the predictions panel); ``first_click_s`` is the first click of a new
  viewer (9 layers created);
- ``explain_s``: the library alone (:func:`lidc_cdam.ct.explain_tasks_steps` on the crop), no napari;
- ``ratio`` = ``click_s / forward_s`` (goal <= 1.5) and ``explain_ratio`` = ``explain_s / forward_s``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lidc_cdam.viewer._guard import prepare_torch

MODELS = {"tiny": None, "vit-s16": "vit_small_patch16_224"}


def _checkpoints(kind: str, folder: Path, folds: int) -> list[Path]:
    """``folds`` random checkpoints per task (malignancy: 1 logit; biomarkers: 8 outputs) of model ``kind``."""
    import torch

    from lidc_cdam.ct.testing import BIOMARKERS, STATS, tiny_checkpoint
    from lidc_cdam.models.loading import save_checkpoint
    from lidc_cdam.models.vit import ViTModel

    out = []
    for task in ("malignancy", "biomarkers"):
        for k in range(folds):
            path = folder / f"{kind}-{task}-fold{k}.pt"
            if MODELS[kind] is None:
                out.append(tiny_checkpoint(path, task=task, seed=k))
                continue
            torch.manual_seed(k)
            heads = ({"head_outputs": 1, "task": "classification", "output_names": ["malignant"]}
                     if task == "malignancy" else
                     {"head_outputs": 8, "task": "regression", "output_names": BIOMARKERS})
            meta: dict[str, Any] = {"input_stats": {**STATS, "image_size": 224}, "task": task}
            if task == "biomarkers":
                meta["target_stats"] = {"names": BIOMARKERS, "mean": [3.0] * 7 + [10.0], "std": [1.0] * 7 + [5.0]}
            model = ViTModel.from_config({"num_classes": 0}, timm_name=MODELS[kind], meta=meta, **heads)
            out.append(save_checkpoint(model, path))
    return out


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(model: str = "vit-s16", folds: int = 1, threads: int = 2, repeats: int = 3) -> dict[str, Any]:
    prepare_torch()
    import napari
    import numpy as np
    import torch
    from lidc_cdam.viewer._widget import CdamWidget

    from lidc_cdam import ct
    from lidc_cdam.ct.cache import MapCache
    from lidc_cdam.ct.inputs import CENTRE, model_inputs
    from lidc_cdam.ct.testing import synthetic

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="lidc-cdam-bench-") as tmp:
        paths = _checkpoints(model, Path(tmp), folds)
        loaded = [ct.load_checked_model(p) for p in paths]
        scan = ct.read_ct(synthetic()["dicom"])
        centre = ct.crop_centre_world(ct.read_crop(ct.list_nodules(synthetic()["crops_dir"], scan)[1].crop_path))
        crop = ct.crop_at_point(scan, centre).crop
        slices = list(range(CENTRE - 3, CENTRE + 4))
        inputs = [model_inputs(crop["image"], m.view, slices, m.input_stats, m.image_size) for m in loaded]

        def forwards():
            with torch.no_grad():
                for m, x in zip(loaded, inputs, strict=True):
                    m.model(x)

        def explain_only():
            steps = ct.explain_tasks_steps(loaded, crop, None, slices="nodule", cache=MapCache(None))
            while True:
                try:
                    next(steps)
                except StopIteration:
                    return

        forward_s = _median(forwards, repeats)
        explain_s = _median(explain_only, repeats)
        viewer = napari.Viewer(show=False)
        try:
            widget = CdamWidget(viewer)
            widget.add_ct(scan)
            widget.load_checkpoints(paths, block=True)
            widget.targets.value = list(widget.models)  # the 9 outputs, no concept
            world = np.asarray(centre, dtype=float)[::-1]

            def click():
                widget.cache = MapCache(None)  # nothing reused between clicks
                widget.add_point(world, block=True)
                if len(widget.overlays) != 9:
                    raise RuntimeError(f"expected 9 overlays, got {list(widget.overlays)}: {widget.status.value}")
                return widget.last_seconds

            first = click()
            clicks = [click() for _ in range(repeats)]
        finally:
            viewer.close()
    click_s = statistics.median(clicks)
    return {"model": model, "image_size": loaded[0].image_size, "folds_per_task": folds, "checkpoints": len(paths),
            "targets": 9, "slices": len(slices), "threads": threads, "repeats": repeats,
            "forward_s": forward_s, "explain_s": explain_s, "first_click_s": first, "click_s": click_s,
            "ratio": click_s / forward_s, "explain_ratio": explain_s / forward_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit-s16", choices=list(MODELS))
    parser.add_argument("--folds", type=int, nargs="+", default=[1], help="checkpoints per task (e.g. 1 5)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = []
    for folds in args.folds:
        row = run(args.model, folds, args.threads, args.repeats)
        rows.append(row)
        print(f"{row['model']} {row['image_size']} px, {row['checkpoints']} checkpoint(s) ({folds} per task), "
              f"9 targets x {row['slices']} slices, {row['threads']} threads: click -> overlays {row['click_s']:.2f} s "
              f"(first click {row['first_click_s']:.2f} s), forward passes {row['forward_s']:.2f} s, "
              f"ratio {row['ratio']:.2f} (library alone {row['explain_s']:.2f} s, {row['explain_ratio']:.2f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
