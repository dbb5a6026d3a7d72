"""Seconds per image of the full metric set, per method, against its lower bound (same run).

The metrics of one image need forward passes only: MIF and LIF curves for the map of c1 and the
map of c2 (``2 x P x 2``, P perturbation levels) per method, and the box passes (``S x n + 1``,
shared by all methods). The lower bound is that number times one forward pass of an image inside
a batch of the size the metrics use (64 for boxes, 40 for the curves of two maps). Explanation
time is reported beside it.

    python benchmarks/bench_evaluate.py                      # the demo ViT, 64 px, SPEC settings
    python benchmarks/bench_evaluate.py --model vit_small_patch16_224 --n-boxes 10 --images 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _timing import timed

from lidc_cdam import METHODS, ViTModel, explain
from lidc_cdam.evaluate.perturbation import (
    PERCENTS,
    box_masks,
    box_output_changes,
    box_sensitivity,
    compactness,
    gaussian_blur,
    perturbation_curves,
    sample_boxes,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="'demo' (the cached digits ViT) or a timm name (random)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--n-boxes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "demo":
        from lidc_cdam.data.multi_digits import make_multi_digits
        from lidc_cdam.train.digits import DigitsTrainConfig, load_or_train_demo_model

        model = load_or_train_demo_model(progress=False).eval()
        data = make_multi_digits(args.images, split="test", seed=1, **DigitsTrainConfig().data_kwargs())
        images, classes, sigma = data.images, data.classes, 4.0
    else:
        import timm

        model = ViTModel(timm.create_model(args.model, pretrained=False, num_classes=1000)).eval()
        images = torch.randn(args.images, 3, 224, 224)
        classes, sigma = torch.tensor([[1, 2]] * args.images), 14.0
    H, W = images.shape[-2:]
    patch = int(model.patch_size[0])
    sizes = [s for s in range(1, 28) if s * patch <= min(H, W)]

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def forward_per_image(batch_size: int) -> float:
        """Median seconds per image of a batched forward pass (after warm-up calls)."""
        batch = images[:1].expand(batch_size, -1, -1, -1).contiguous()
        for _ in range(3):
            score(batch)
        return timed(lambda: score(batch), 15) / batch_size

    forward = forward_per_image(64)  # the box passes run in batches of 64
    curve_forward = forward_per_image(2 * len(PERCENTS))  # MIF (or LIF) of two maps: one batch of 40
    blurred = gaussian_blur(images, sigma)
    generator = torch.Generator().manual_seed(0)

    start = time.perf_counter()
    all_masks, changes = [], []
    for i in range(len(images)):
        corners = sample_boxes((H, W), patch, sizes, args.n_boxes, generator)
        all_masks.append(box_masks(corners, sizes, patch, (H, W)))
        changes.append(box_output_changes(score, images[i], blurred[i], all_masks[-1], int(classes[i, 0])))
    box_seconds = (time.perf_counter() - start) / len(images)
    box_forwards = len(sizes) * args.n_boxes + 1

    rows = []
    print(f"model {args.model}, {H}x{W} px, patch {patch}, {len(images)} images; one batched forward = "
          f"{forward * 1e3:.2f} ms/image (batch 64), {curve_forward * 1e3:.2f} ms/image (batch {2 * len(PERCENTS)})")
    print(f"shared box passes: {box_forwards} forwards, {box_seconds:.2f} s/image, "
          f"ratio to lower bound {box_seconds / (box_forwards * forward):.2f}")
    print(f"{'method':24s} {'explain s/img':>13s} {'metrics s/img':>13s} {'forwards':>8s} {'lower bound s':>13s} "
          f"{'ratio':>6s}")
    for method in args.methods:
        options = {"seed": 0} if "seed" in METHODS[method].defaults else {}
        start = time.perf_counter()
        attribution = explain(model, images, classes, method=method, **options)
        explain_seconds = (time.perf_counter() - start) / len(images)
        maps, native = attribution.upsample("nearest").detach(), attribution.maps.detach()
        start = time.perf_counter()
        for i in range(len(images)):
            perturbation_curves(score, images[i], blurred[i], maps[i], [int(classes[i, 0])] * 2)
            box_sensitivity(maps[i], all_masks[i], changes[i])
            compactness(native[i])
        metric_seconds = (time.perf_counter() - start) / len(images)
        forwards = 2 * len(PERCENTS) * 2
        bound = forwards * curve_forward
        rows.append({"model": args.model, "method": method, "explain_s": explain_seconds, "metrics_s": metric_seconds,
                     "forwards": forwards, "lower_bound_s": bound, "ratio": metric_seconds / bound,
                     "box_s": box_seconds, "box_forwards": box_forwards, "forward_s": forward})
        print(f"{method:24s} {explain_seconds:13.3f} {metric_seconds:13.3f} {forwards:8d} {bound:13.3f} "
              f"{metric_seconds / bound:6.2f}")
    total = box_seconds + sum(r["explain_s"] + r["metrics_s"] for r in rows)
    print(f"all {len(rows)} methods, full metric set: {total:.2f} s/image")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
