"""Time of CDAM, Smooth and Integrated CDAM as a ratio to one plain forward pass, same run.

For random-weight ``vit_small_patch16_224`` and ``vit_small_patch8_224`` at 224 px, 1 and 9
targets, this prints ``time(method) / time(model(x))`` for lidc-cdam and for a naive
implementation (a hook on ``blocks[-1].norm1``, a full forward and ``.backward()`` per target
and per noise draw / path point). Naive Smooth / Integrated runs ``--naive-points`` points and
is scaled to ``n`` and K targets to K x one target (each is an identical, independent full
pass): such figures are marked ``*``.

    python benchmarks/bench_cdam.py [--models vit_small_patch16_224] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import timm
import torch
from _timing import timed

from lidc_cdam import ViTModel, explain

METHODS = [
    ("cdam", {}),
    ("smooth-cdam", {"n": 50, "sigma": 0.05, "seed": 0}),
    ("integrated-cdam", {"n": 50, "space": "tokens"}),
    ("integrated-cdam", {"n": 50, "space": "block_input"}),
]


def naive_cdam(model: ViTModel, x: torch.Tensor, target: int, method: str, options: dict, points: int) -> torch.Tensor:
    """Hooks + full backward, one target and one point at a time (what a first version does)."""
    blk = model.last_block
    maps = []
    gen = torch.Generator().manual_seed(0)
    space = options.get("space")
    n_points = 1 if method == "cdam" else points
    for k in range(1, n_points + 1):
        store: dict[str, torch.Tensor] = {}

        def pre_hook(module, args, k=k):
            (resid,) = args
            if method == "smooth-cdam":
                std = options["sigma"] * (resid.max() - resid.min())
                return (resid + std * torch.randn(resid.shape, generator=gen),)
            if method == "integrated-cdam" and space == "block_input":
                return (resid * k / options["n"],)
            return None

        def hook(module, args, out, k=k, store=store):
            if method == "integrated-cdam" and space == "tokens":
                store["base"] = out.detach()
                out = out * k / options["n"]
            out.retain_grad()
            store["tokens"] = out
            return out

        handles = [blk.register_forward_pre_hook(pre_hook), blk.norm1.register_forward_hook(hook)]
        try:
            model.zero_grad(set_to_none=True)
            model(x)[:, target].sum().backward()
        finally:
            for h in handles:
                h.remove()
        used = store.get("base", store["tokens"].detach())
        maps.append((used * store["tokens"].grad).sum(-1))
    return torch.stack(maps).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_small_patch8_224"])
    parser.add_argument("--targets", nargs="+", type=int, default=[1, 9])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-points", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    print(f"{'model':24s} {'method':34s} {'K':>2s} {'ours/fwd':>9s} {'naive/fwd':>10s} {'speed-up':>9s}")
    for name in args.models:
        model = ViTModel(timm.create_model(name, pretrained=False, num_classes=1000))
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            forward = timed(partial(model, x), args.repeats)
        # sanity: the naive implementation computes the same vanilla map
        ref = naive_cdam(model, x, 3, "cdam", {}, 1)[:, 1:].reshape(1, *model.layout().grid)
        torch.testing.assert_close(explain(model, x, [3]).maps[:, 0], ref, rtol=1e-3, atol=1e-5)
        for method, options in METHODS:
            label = method + "".join(f" {k}={v}" for k, v in options.items() if k in ("space",))
            points = 1 if method == "cdam" else args.naive_points
            # naive cost of one target: one full pass per point, scaled to the method's point count
            naive_one = timed(partial(naive_cdam, model, x, 0, method, options, points), args.repeats)
            naive_one *= num_points(method, options) / points
            for n_targets in args.targets:
                targets = list(range(n_targets))
                ours = timed(partial(explain, model, x, targets, method=method, **options), args.repeats)
                naive = naive_one * n_targets
                mark = "*" if method != "cdam" or n_targets > 1 else " "
                rows.append({"model": name, "method": label, "targets": n_targets, "forward_s": forward,
                             "ours_ratio": ours / forward, "naive_ratio": naive / forward,
                             "naive_extrapolated": mark == "*"})
                print(f"{name:24s} {label:34s} {n_targets:2d} {ours / forward:9.2f} {naive / forward:9.1f}{mark} "
                      f"{naive / ours:8.1f}x", flush=True)
        print(f"{name}: one forward = {forward * 1000:.0f} ms")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


def num_points(method: str, options: dict) -> int:
    """Points a method averages: 1 for CDAM, n - 1 for Integrated CDAM in block-input space."""
    if method == "cdam":
        return 1
    return options["n"] - int(method == "integrated-cdam" and options.get("space") == "block_input")


if __name__ == "__main__":
    main()
