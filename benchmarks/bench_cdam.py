"""Time of CDAM, Smooth and Integrated CDAM as a ratio to one plain forward pass, same run.

For random-weight ``vit_small_patch16_224`` and ``vit_small_patch8_224`` at 224 px, 1 and 9
targets, this prints ``time(method) / time(model(x))`` for lidc-cdam and for a naive
implementation (a hook on ``blocks[-1].norm1``, a full forward and ``.backward()`` per target
and per noise draw / path point). Naive Smooth / Integrated runs ``--naive-points`` points and
is scaled to ``n`` and K targets to K x one target (each is an identical, independent full
pass): such figures are marked ``*``.

``--families dinov3 eva02 pe swag hf-vit hf-dinov2-reg monai3d-32 monai3d-96 ...`` (or ``all``) adds one row per
backbone family and method (random weights at ``--image-size``; the 3D MONAI ViTs on 32^3 and 96^3 volumes; the
``hf-*`` families need the ``hf`` extra): lidc-cdam's ratio to one forward of the same model, for the implementation
``explain`` picks (``cls_row`` or the closed form over the pooled ``rows``) and for the ``reference`` path
(autograd through the real last block), with Smooth and Integrated CDAM at ``--n`` points. ``--models``
with no names skips the default rows.

``--device cuda`` times on a GPU (the clocks are read after ``torch.cuda.synchronize()``);
``--amp bf16`` runs both implementations and the forward pass under bf16 autocast. The sanity
check against the naive map always runs in float32 (exact on the CPU; on CUDA its relative error
is reported, as TF32 convolutions and other kernels differ slightly).
``benchmarks/device_check.sh`` runs this on CUDA in float32 and bf16.

    python benchmarks/bench_cdam.py [--models vit_small_patch16_224] [--repeats 3] [--out FILE]
    python benchmarks/bench_cdam.py --device cuda --amp bf16 --out cdam_bf16.json
    python benchmarks/bench_cdam.py --models --families all --image-size 224 --out families.json
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import timm
import torch
from _timing import AMP_CHOICES, autocast, environment, resolve_device, timed

from lidc_cdam import ViTModel, explain
from lidc_cdam.explain.cdam import cls_row_applies, fast_path_applies

#: one model per backbone family: (how to build it at an image size, what it stands for)
FAMILIES = {
    "timm-vit": (lambda s: ViTModel.from_timm("vit_small_patch16_224", img_size=s, num_classes=1000),
                 "timm VisionTransformer ViT-S/16, CLS"),
    "timm-vit-avg": (lambda s: ViTModel.from_timm("vit_small_patch16_224", img_size=s, num_classes=1000,
                                                  global_pool="avg", class_token=False, fc_norm=True),
                     "timm VisionTransformer ViT-S/16, average pooling"),
    "dinov3": (lambda s: ViTModel.from_timm("vit_small_patch16_dinov3", img_size=s, num_classes=1000,
                                            global_pool="token"), "timm Eva DINOv3 S/16, CLS + 4 registers, RoPE"),
    "dinov3-avg": (lambda s: ViTModel.from_timm("vit_small_patch16_dinov3", img_size=s, num_classes=1000),
                   "timm Eva DINOv3 S/16, average pooling (timm's default)"),
    "eva02": (lambda s: ViTModel.from_timm("eva02_small_patch14_224", img_size=s, num_classes=1000),
              "timm Eva EVA-02 S/14, RoPE, SwiGLU, average pooling"),
    "pe": (lambda s: ViTModel.from_timm("vit_pe_core_small_patch16_384", img_size=s, num_classes=1000),
           "timm Eva PE core S/16, RoPE, attention pooling"),
    "swag": (lambda s: ViTModel.from_torchvision("vit_b_16", image_size=s), "torchvision ViT-B/16 (SWAG's class)"),
    "hf-vit": (lambda s: hf_model("ViTForImageClassification", s, patch_size=16, intermediate_size=1536),
               "transformers ViTForImageClassification S/16, CLS"),
    "hf-dinov2-reg": (lambda s: hf_model("Dinov2WithRegistersModel", s, patch_size=14, num_register_tokens=4),
                      "transformers Dinov2WithRegistersModel S/14 + linear head on CLS', 4 registers"),
    # 3D: the volume size is fixed (--image-size is ignored)
    "monai3d-32": (lambda s: monai_model(32, 8), "MONAI ViT 3D, ViT-S widths, 32^3 volume, 8^3 patches (64 tokens)"),
    "monai3d-96": (lambda s: monai_model(96, 16), "MONAI ViT 3D, ViT-S widths, 96^3 volume, 16^3 patches (216 tokens)"),
}


def hf_model(class_name: str, size: int, **config) -> ViTModel:
    """A random transformers model with ViT-S widths from its config (the ``hf`` extra); base models get a
    1000-way linear head on CLS'."""
    import transformers

    from lidc_cdam.models.heads import LinearHead

    cls = getattr(transformers, class_name)
    backbone = cls(cls.config_class(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=size,
                                    num_labels=1000, qkv_bias=True, **config))
    return ViTModel(backbone, None if hasattr(backbone, "classifier") else LinearHead(384, 1000))


def monai_model(side: int, patch: int) -> ViTModel:
    """A random MONAI 3D ViT with ViT-S widths and a 1000-way linear head on CLS'."""
    return ViTModel.from_monai(in_channels=1, img_size=(side,) * 3, patch_size=(patch,) * 3, hidden_size=384,
                               mlp_dim=1536, num_layers=12, num_heads=6, qkv_bias=True, head_outputs=1000)


def methods(n: int = 50) -> list[tuple[str, dict]]:
    """The timed explainers; ``n`` points for Smooth and Integrated CDAM (50 in the paper)."""
    return [
        ("cdam", {}),
        ("smooth-cdam", {"n": n, "sigma": 0.05, "seed": 0}),
        ("integrated-cdam", {"n": n, "space": "tokens"}),
        ("integrated-cdam", {"n": n, "space": "block_input"}),
    ]


def naive_cdam(model: ViTModel, x: torch.Tensor, target: int, method: str, options: dict, points: int) -> torch.Tensor:
    """Hooks + full backward, one target and one point at a time (what a first version does)."""
    blk = model.last_block
    maps = []
    gen = torch.Generator(device=x.device).manual_seed(0)
    space = options.get("space")
    n_points = 1 if method == "cdam" else points
    for k in range(1, n_points + 1):
        store: dict[str, torch.Tensor] = {}

        def pre_hook(module, args, k=k):
            (resid,) = args
            if method == "smooth-cdam":
                std = options["sigma"] * (resid.max() - resid.min())
                noise = torch.randn(resid.shape, generator=gen, device=resid.device, dtype=resid.dtype)
                return (resid + std * noise,)
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
    parser.add_argument("--models", nargs="*", default=["vit_small_patch16_224", "vit_small_patch8_224"])
    parser.add_argument("--families", nargs="+", default=[], choices=[*FAMILIES, "all"],
                        help="also time one model per backbone family (ours and the reference path)")
    parser.add_argument("--targets", nargs="+", type=int, default=[1, 9])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-points", type=int, default=3)
    parser.add_argument("--n", type=int, default=50, help="points of Smooth / Integrated CDAM")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--amp", choices=AMP_CHOICES, default="none", help="bf16: time under bf16 autocast")
    parser.add_argument("--image-size", type=int, default=224, help="input side in px (timm img_size)")
    parser.add_argument("--out", type=Path, help="also write the rows (and the environment) as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    size = args.image_size
    rows, checks = [], {}
    print(f"device {device}, amp {args.amp}, {size} px")
    print(f"{'model':24s} {'method':34s} {'K':>2s} {'ours/fwd':>9s} {'naive/fwd':>10s} {'speed-up':>9s}")
    for name in args.models:
        kwargs = {} if size == 224 else {"img_size": size}
        model = ViTModel(timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)).to(device)
        # 3D: the model's volume; 2D: --image-size, down to a multiple of the patch (DINOv2's 14 px)
        spatial = model.default_image_size if len(model.patch_size) == 3 else tuple(size - size % p
                                                                                    for p in model.patch_size)
        x = torch.randn(1, model.in_chans, *spatial, device=device)
        # sanity (float32): the naive implementation computes the same vanilla map
        ref = naive_cdam(model, x, 3, "cdam", {}, 1)[:, 1:].reshape(1, *model.layout((size, size)).grid)
        ours_map = explain(model, x, [3]).maps[:, 0]
        if device.type == "cpu":
            torch.testing.assert_close(ours_map, ref, rtol=1e-3, atol=1e-5)
        checks[name] = ((ours_map - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()
        print(f"{name}: CDAM vs naive, max |difference| / max |naive| = {checks[name]:.1e} (float32)")
        if checks[name] > 1e-2:
            print(f"WARNING: {name}: CDAM differs from the naive implementation by {checks[name]:.1e}")
        with torch.no_grad(), autocast(device, args.amp):
            forward = timed(partial(model, x), args.repeats, device)
        for method, options in methods(args.n):
            label = method + "".join(f" {k}={v}" for k, v in options.items() if k in ("space",))
            points = 1 if method == "cdam" else args.naive_points
            # naive cost of one target: one full pass per point, scaled to the method's point count
            with autocast(device, args.amp):
                naive_one = timed(partial(naive_cdam, model, x, 0, method, options, points), args.repeats, device)
            naive_one *= num_points(method, options) / points
            for n_targets in args.targets:
                targets = list(range(n_targets))
                with autocast(device, args.amp):
                    ours = timed(partial(explain, model, x, targets, method=method, **options), args.repeats, device)
                naive = naive_one * n_targets
                mark = "*" if method != "cdam" or n_targets > 1 else " "
                rows.append({"model": name, "method": label, "targets": n_targets, "device": str(device),
                             "amp": args.amp, "image_size": size, "forward_s": forward, "ours_s": ours,
                             "ours_ratio": ours / forward, "naive_ratio": naive / forward,
                             "naive_extrapolated": mark == "*"})
                print(f"{name:24s} {label:34s} {n_targets:2d} {ours / forward:9.2f} {naive / forward:9.1f}{mark} "
                      f"{naive / ours:8.1f}x", flush=True)
        print(f"{name}: one forward = {forward * 1000:.0f} ms")
    family_rows = time_families(args, device) if args.families else []
    if args.out:
        result = {"environment": environment(device), "device": str(device), "amp": args.amp, "image_size": size,
                  "check_rel_error": checks, "rows": rows}
        if family_rows:
            result["family_rows"] = family_rows
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def time_families(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One row per family, method and target count: ``time / time(model(x))`` for the implementation ``explain``
    picks and for the reference path, same run."""
    size, rows = args.image_size, []
    names = list(FAMILIES) if "all" in args.families else args.families
    print(f"\n{'family':14s} {'method':34s} {'K':>2s} {'path':>9s} {'ours/fwd':>9s} {'ref/fwd':>8s} {'speed-up':>9s}")
    for name in names:
        build, what = FAMILIES[name]
        model = build(size).to(device).eval()
        with torch.no_grad():  # torchvision starts from a zero head (every map 0): random logits instead
            for layer in model.head.modules():
                if isinstance(layer, torch.nn.Linear) and not layer.weight.any():
                    torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
        # 3D: the model's volume; 2D: --image-size, down to a multiple of the patch (DINOv2's 14 px)
        spatial = model.default_image_size if len(model.patch_size) == 3 else tuple(size - size % p
                                                                                    for p in model.patch_size)
        x = torch.randn(1, model.in_chans, *spatial, device=device)
        path = "cls_row" if cls_row_applies(model) else "rows" if fast_path_applies(model) else "reference"
        # sanity (float32): the closed form computes the reference path's map
        ours_map = explain(model, x, [3]).maps
        ref_map = explain(model, x, [3], implementation="reference").maps
        rel = ((ours_map - ref_map).abs().max() / ref_map.abs().max().clamp(min=1e-12)).item()
        print(f"{name}: {what}; {path} vs reference, max |difference| / max |reference| = {rel:.1e} (float32)")
        with torch.no_grad(), autocast(device, args.amp):
            forward = timed(partial(model, x), args.repeats, device)
        for method, options in methods(args.n)[:3]:
            label = method + "".join(f" {k}={v}" for k, v in options.items() if k in ("space",))
            for n_targets in args.targets:
                call = partial(explain, model, x, list(range(n_targets)), method=method, **options)
                with autocast(device, args.amp):
                    ours = timed(call, args.repeats, device)
                    ref = ours if path == "reference" else timed(partial(call, implementation="reference"),
                                                                 args.repeats, device)
                rows.append({"family": name, "model": what, "method": label, "targets": n_targets, "path": path,
                             "device": str(device), "amp": args.amp, "image_size": list(spatial),
                             "forward_s": forward, "ours_s": ours, "ours_ratio": ours / forward,
                             "reference_ratio": ref / forward,
                             "check_rel_error": rel})
                print(f"{name:14s} {label:34s} {n_targets:2d} {path:>9s} {ours / forward:9.2f} {ref / forward:8.2f} "
                      f"{ref / ours:8.1f}x", flush=True)
        print(f"{name}: one forward = {forward * 1000:.1f} ms")
    return rows


def num_points(method: str, options: dict) -> int:
    """Points a method averages: 1 for CDAM, n - 1 for Integrated CDAM in block-input space."""
    if method == "cdam":
        return 1
    return options["n"] - int(method == "integrated-cdam" and options.get("space") == "block_input")


if __name__ == "__main__":
    main()
