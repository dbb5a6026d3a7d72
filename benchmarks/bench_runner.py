"""Images per minute of the real benchmark runner (``lidc-cdam benchmark``), not a stand-in.

A random ViT (default ViT-S/8, 224 px, a 10-output head) is saved as a checkpoint; a config takes the
methods with their options and the metric settings from a preset (default ``paper-imagenet``: ten
methods, 27 box sizes x 100 boxes, 20 levels) and replaces its image sets by ``--images`` generated
two-digit images (two objects each with masks, as X_multi's images have two labelled objects).
:func:`lidc_cdam.evaluate.runner.run_benchmark` then runs it into a temporary folder on ``--device``:
the parts (explanations, every metric, localisation, written as parquet) are timed from their own
records, the randomisation check is skipped. ``benchmarks/device_check.sh`` runs it on the GPU.

    python benchmarks/bench_runner.py --device cuda --images 4 --out runner.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _timing import environment, resolve_device
from bench_evaluate import load_preset

from lidc_cdam import ViTModel
from lidc_cdam.evaluate.benchmark_config import load_config
from lidc_cdam.evaluate.runner import run_benchmark
from lidc_cdam.models.loading import save_checkpoint

MODELS = {"vit_small_patch8_224": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
          "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
          "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)}


def write_config(folder: Path, args: argparse.Namespace) -> Path:
    """The checkpoint and the config file of the timed run."""
    torch.manual_seed(0)
    model = ViTModel.from_config(dict(img_size=args.image_size, num_classes=0, **MODELS[args.model]), head_outputs=10)
    save_checkpoint(model, folder / "model.pt")
    preset = load_preset(args.config)
    metrics = dict(preset.get("metrics") or {})
    patch = MODELS[args.model]["patch_size"]
    metrics["box_sizes"] = [s for s in (args.box_sizes or metrics.get("box_sizes", range(1, 28)))
                            if s * patch < args.image_size]
    if args.n_boxes:
        metrics["n_boxes"] = args.n_boxes
    methods = preset.get("methods") or {"cdam": {}}
    if args.methods:
        methods = {m: methods.get(m, {}) for m in args.methods}
    config = {"name": "bench-runner", "model": {"source": "checkpoint", "checkpoint": str(folder / "model.pt")},
              "image_sets": [{"name": "digits", "source": "multi-digits", "n": args.images, "seed": 1,
                              "split": "test", "targets": "labels"}],
              "methods": methods, "metrics": metrics, "randomization": {"images": 0},
              "batch_images": args.batch_images}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="vit_small_patch8_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--config", default="paper-imagenet", help="preset (or YAML) for methods and metrics")
    parser.add_argument("--methods", nargs="+", help="default: the preset's")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-images", type=int, default=2, help="images per part")
    parser.add_argument("--box-sizes", nargs="+", type=int)
    parser.add_argument("--n-boxes", type=int)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the summary as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = load_config(write_config(folder, args))
        start = time.perf_counter()
        run_benchmark(config, folder / "out", progress=False, device=device)
        total = time.perf_counter() - start
        parts = [json.loads(p.read_text()) for p in sorted((folder / "out" / "parts" / "digits").glob("part_*.json"))]
    part_seconds = sum(p["seconds"] for p in parts)
    images = sum(len(p["images"]) for p in parts)
    summary = {"model": args.model, "device": str(device), "image_size": args.image_size, "images": images,
               "parts": len(parts), "batch_images": args.batch_images, "methods": list(config.methods),
               "box_sizes": list(config.metrics.box_sizes), "n_boxes": config.metrics.n_boxes,
               "percents": len(config.metrics.percents), "parts_s": part_seconds, "total_s": total,
               "s_per_image": part_seconds / images, "images_per_minute": 60 * images / part_seconds}
    print(f"runner: {summary['images_per_minute']:.1f} images/min ({images} images, {len(config.methods)} methods, "
          f"{len(config.metrics.box_sizes)}x{config.metrics.n_boxes} boxes) on {device}; "
          f"{summary['s_per_image']:.2f} s/image in the parts, {total:.1f} s in all")
    if args.out:
        args.out.write_text(json.dumps({"environment": environment(device), "summary": summary,
                                        "rows": [{k: p[k] for k in ("images", "seconds")} for p in parts]},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
