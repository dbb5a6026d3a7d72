"""Seconds per image of the full metric set, per method, against its lower bound (same run).

The metrics of one image need forward passes only: MIF and LIF curves for the map of c1 and the
map of c2 (``2 x P x 2``, P perturbation levels) per method, and the box passes (``S x n + 1``,
shared by all methods). The lower bound is that number times one forward pass of an image inside
a batch of the size the metrics use (64 for boxes, 40 for the curves of two maps). Explanation
time is reported beside it, and a summary: images per minute (explanations of all methods plus
the full metric set) and the ratio of the metrics' time to the whole lower bound.

``--device cuda`` runs on a GPU (clocks read after ``torch.cuda.synchronize()``), ``--amp bf16``
under bf16 autocast. ``--config paper-imagenet`` takes the methods with their options and the
metric settings (box sizes, boxes, blur) from that preset in ``pipelines/configs/``; flags given
explicitly win. ``--source skimage`` uses scikit-image's bundled photographs instead of noise,
``--source digits`` generated two-digit images (X_multi-like, no extra package), ``--source auto``
the photographs where scikit-image is installed, else the digits. Under ``--amp bf16`` the metric
values are not meaningful (bf16 maps; box changes below float32's round-off floor): the JSON and the
printout label such a run "timing only".
The paper's size (ViT-S/8, 224 px, 27 box sizes x 100 boxes, 20 levels, ten methods) is a GPU
job: ``benchmarks/device_check.sh`` runs it.

    python benchmarks/bench_evaluate.py                      # the demo ViT, 64 px, docs/method.md's settings
    python benchmarks/bench_evaluate.py --model vit_small_patch16_224 --n-boxes 10 --images 1
    python benchmarks/bench_evaluate.py --device cuda --model vit_small_patch8_224 --config paper-imagenet \
        --source skimage --images 4 --out evaluate.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from _timing import AMP_CHOICES, autocast, environment, resolve_device, synchronize, timed

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

#: what a bf16 run's metric values are worth (bf16 maps; box changes below the float32 round-off floor)
TIMING_ONLY = "timing only: under bf16 the metric values are not meaningful"

#: scikit-image's bundled RGB photographs (no download needed)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")


def resolve_source(source: str) -> str:
    """``auto``: ``skimage`` where scikit-image imports (it is not a dependency of lidc-cdam), else ``digits``."""
    if source != "auto":
        return source
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return "digits"
    return "skimage"


def sample_images(source: str, n: int, size: int) -> torch.Tensor:
    """``n`` images ``[n, 3, size, size]``: Gaussian noise (``random``), scikit-image's photographs
    (``skimage``: centre-cropped square, resized, ImageNet-normalised, cycled when ``n`` is larger) or
    generated two-digit images (``digits``: two coloured objects each, as X_multi's images have)."""
    if source == "random":
        return torch.randn(n, 3, size, size)
    if source == "digits":
        from lidc_cdam.data.multi_digits import make_multi_digits

        return make_multi_digits(n, split="test", seed=1, size=size, scale=max(1, min(12, (size - 2) // 16)),
                                 colour=True).images
    import skimage.data

    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    images = []
    for i in range(n):
        photo = torch.from_numpy(getattr(skimage.data, SKIMAGE_PHOTOS[i % len(SKIMAGE_PHOTOS)])()).float() / 255
        photo = photo.permute(2, 0, 1)[:3]
        h, w = photo.shape[-2:]
        side = min(h, w)
        photo = photo[:, (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        photo = F.interpolate(photo[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        images.append((photo - mean) / std)
    return torch.stack(images)


def load_preset(name: str | None) -> dict[str, Any]:
    """A benchmark preset (``pipelines/configs/<name>.yaml``, or a YAML path) as a mapping; ``{}`` for None."""
    if name is None:
        return {}
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / f"{name}.yaml"
    return yaml.safe_load(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="'demo' (the cached digits ViT) or a timm name (random)")
    parser.add_argument("--config", help="take methods, options and metric settings from this preset (or YAML file)")
    parser.add_argument("--methods", nargs="+", help="default: the preset's methods, else all")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224, help="side in px of the timm models' inputs")
    parser.add_argument("--source", choices=("random", "skimage", "digits", "auto"), default="random",
                        help="timm models' images (auto: skimage where installed, else digits)")
    parser.add_argument("--box-sizes", nargs="+", type=int, help="box sides in patch units (default: 1..27)")
    parser.add_argument("--n-boxes", type=int, help="boxes per size (default: the preset's, else 100)")
    parser.add_argument("--blur-sigma", type=float, help="default: the preset's, else 14 (4 for the demo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--forward-repeats", type=int, default=15, help="timed batched forwards for the lower bound")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none", help="bf16: models under bf16 autocast")
    parser.add_argument("--out", type=Path, help="also write the rows and the summary as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    args.source = resolve_source(args.source)
    preset = load_preset(args.config)
    preset_metrics = preset.get("metrics") or {}
    if preset.get("methods"):
        method_options = {m: dict(o or {}) for m, o in preset["methods"].items()}
    else:
        method_options = {m: {"seed": 0} if "seed" in METHODS[m].defaults else {} for m in METHODS}
    args.methods = args.methods or list(method_options)
    for m in args.methods:
        method_options.setdefault(m, {"seed": 0} if "seed" in METHODS[m].defaults else {})
    args.n_boxes = args.n_boxes or int(preset_metrics.get("n_boxes", 100))
    box_sizes = args.box_sizes or list(preset_metrics.get("box_sizes", range(1, 28)))
    if args.model == "demo":
        from lidc_cdam.data.multi_digits import make_multi_digits
        from lidc_cdam.train.digits import DigitsTrainConfig, load_or_train_demo_model

        model = load_or_train_demo_model(progress=False).eval()
        data = make_multi_digits(args.images, split="test", seed=1, **DigitsTrainConfig().data_kwargs())
        images, classes, sigma = data.images, data.classes, 4.0
    else:
        import timm

        kwargs = {} if args.image_size == 224 else {"img_size": args.image_size}
        model = ViTModel(timm.create_model(args.model, pretrained=False, num_classes=1000, **kwargs)).eval()
        images = sample_images(args.source, args.images, args.image_size)
        classes, sigma = torch.tensor([[1, 2]] * args.images), float(preset_metrics.get("blur_sigma", 14.0))
    sigma = args.blur_sigma or sigma
    model, images = model.to(device), images.to(device)
    H, W = images.shape[-2:]
    patch = int(model.patch_size[0])
    sizes = [s for s in box_sizes if s * patch < min(H, W)]  # every box smaller than the image (docs/method.md)
    if len(sizes) < len(box_sizes):
        print(f"box sizes {[s for s in box_sizes if s not in sizes]} would cover the {H}x{W} images at patch "
              f"{patch}: timing sizes {sizes}")

    def clock() -> float:
        """``time.perf_counter()`` after the device's queued work is done."""
        synchronize(device)
        return time.perf_counter()

    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast(device, args.amp):
            return model(x).float()

    def forward_per_image(batch_size: int) -> float:
        """Median seconds per image of a batched forward pass (after warm-up calls)."""
        batch = images[:1].expand(batch_size, -1, -1, -1).contiguous()
        for _ in range(min(3, args.forward_repeats)):
            score(batch)
        return timed(lambda: score(batch), args.forward_repeats, device) / batch_size

    forward = forward_per_image(64)  # the box passes run in batches of 64
    curve_forward = forward_per_image(2 * len(PERCENTS))  # MIF (or LIF) of two maps: one batch of 40
    blurred = gaussian_blur(images, sigma)
    generator = torch.Generator().manual_seed(0)

    start = clock()
    all_masks, changes, scales = [], [], []
    for i in range(len(images)):
        corners = sample_boxes((H, W), patch, sizes, args.n_boxes, generator)
        all_masks.append(box_masks(corners, sizes, patch, (H, W)).to(device))
        change, scale = box_output_changes(score, images[i], blurred[i], all_masks[-1], int(classes[i, 0]),
                                           return_scale=True)
        changes.append(change)
        scales.append(scale)
    box_seconds = (clock() - start) / len(images)
    box_forwards = len(sizes) * args.n_boxes + 1

    rows = []
    print(f"model {args.model}, {H}x{W} px, patch {patch}, {len(images)} images; one batched forward = "
          f"{forward * 1e3:.2f} ms/image (batch 64), {curve_forward * 1e3:.2f} ms/image (batch {2 * len(PERCENTS)})")
    print(f"shared box passes: {box_forwards} forwards, {box_seconds:.2f} s/image, "
          f"ratio to lower bound {box_seconds / (box_forwards * forward):.2f}")
    print(f"{'method':24s} {'explain s/img':>13s} {'metrics s/img':>13s} {'forwards':>8s} {'lower bound s':>13s} "
          f"{'ratio':>6s}")
    for method in args.methods:
        options = method_options[method]
        start = clock()
        with autocast(device, args.amp):
            attribution = explain(model, images, classes, method=method, **options)
        explain_seconds = (clock() - start) / len(images)
        maps, native = attribution.upsample("nearest").detach().float(), attribution.maps.detach().float()
        start = clock()
        for i in range(len(images)):
            perturbation_curves(score, images[i], blurred[i], maps[i], [int(classes[i, 0])] * 2)
            box_sensitivity(maps[i], all_masks[i], changes[i], output_scale=scales[i])
            compactness(native[i])
        metric_seconds = (clock() - start) / len(images)
        forwards = 2 * len(PERCENTS) * 2
        bound = forwards * curve_forward
        rows.append({"model": args.model, "method": method, "explain_s": explain_seconds, "metrics_s": metric_seconds,
                     "forwards": forwards, "lower_bound_s": bound, "ratio": metric_seconds / bound,
                     "box_s": box_seconds, "box_forwards": box_forwards, "forward_s": forward})
        print(f"{method:24s} {explain_seconds:13.3f} {metric_seconds:13.3f} {forwards:8d} {bound:13.3f} "
              f"{metric_seconds / bound:6.2f}")
    total = box_seconds + sum(r["explain_s"] + r["metrics_s"] for r in rows)
    print(f"all {len(rows)} methods, full metric set: {total:.2f} s/image")
    summary = summarise(rows, total, box_seconds, box_forwards, forward)
    summary.update(model=args.model, device=str(device), amp=args.amp, image_size=int(H), patch=patch,
                   images=len(images), source=args.source if args.model != "demo" else "demo",
                   config=args.config, methods=list(args.methods), box_sizes=sizes, n_boxes=args.n_boxes,
                   percents=len(PERCENTS), forward_s_batch64=forward, forward_s_curve_batch=curve_forward,
                   metric_values=TIMING_ONLY if args.amp == "bf16" else "valid")
    print(f"{summary['images_per_minute']:.1f} images/min (explanations + metrics, {len(rows)} methods); "
          f"metrics {summary['metrics_s_per_image']:.2f} s/image = {summary['ratio_to_lower_bound']:.2f} x the "
          f"lower bound {summary['lower_bound_s_per_image']:.2f} s ({summary['forwards_per_image']} forwards)")
    if args.amp == "bf16":
        print(f"bf16: {TIMING_ONLY}")
    if args.out:
        result = {"environment": environment(device), "summary": summary, "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def summarise(rows: list[dict], total: float, box_seconds: float, box_forwards: int, forward: float) -> dict:
    """Per image: the metrics' forward passes and their lower bound (box passes at batch 64, curves at
    the curve batch), seconds for the metrics and for explanations + metrics, images per minute."""
    metrics = box_seconds + sum(r["metrics_s"] for r in rows)
    bound = box_forwards * forward + sum(r["lower_bound_s"] for r in rows)
    return {"forwards_per_image": box_forwards + sum(r["forwards"] for r in rows),
            "lower_bound_s_per_image": bound, "metrics_s_per_image": metrics,
            "explain_s_per_image": sum(r["explain_s"] for r in rows), "total_s_per_image": total,
            "images_per_minute": 60 / total, "metrics_images_per_minute": 60 / metrics,
            "lower_bound_images_per_minute": 60 / bound, "ratio_to_lower_bound": metrics / bound,
            "ratio_total_to_lower_bound": total / bound}


if __name__ == "__main__":
    main()
