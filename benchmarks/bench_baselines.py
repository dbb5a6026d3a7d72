"""Time per image of every importance estimator, as a ratio to one plain forward pass (same run).

Random-weight timm ViTs at 224 px on this machine's CPU; one image, one target (and ``--targets``
more); SmoothGrad, IntGrad, Smooth and Integrated CDAM with n = 50.

    python benchmarks/bench_baselines.py [--models vit_small_patch16_224] [--repeats 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import timm
import torch
from _timing import timed

from lidc_cdam import METHODS, ViTModel, explain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--targets", nargs="+", type=int, default=[1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{'model':24s} {'method':24s} {'K':>2s} {'s/image':>8s} {'ratio to forward':>17s}")
    for name in args.models:
        model = ViTModel(timm.create_model(name, pretrained=False, num_classes=1000))
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            forward = timed(partial(model, x), max(3, args.repeats))
        for method in args.methods:
            options = {"seed": 0} if "seed" in METHODS[method].defaults else {}
            for k in args.targets:
                seconds = timed(partial(explain, model, x, list(range(k)), method=method, **options), args.repeats)
                rows.append({"model": name, "method": method, "targets": k, "seconds": seconds,
                             "forward_seconds": forward, "ratio": seconds / forward})
                print(f"{name:24s} {method:24s} {k:2d} {seconds:8.3f} {seconds / forward:17.2f}", flush=True)
        print(f"{name}: one forward = {forward * 1000:.0f} ms")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
