"""`lidc-cdam explain`: importance maps for image files, saved as arrays, JSON and figures."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lidc_cdam import METHODS, Concept, ViTModel, explain
from lidc_cdam.ct.concepts import concept_targets
from lidc_cdam.data.images import (
    ImageReadError,
    list_images,
    load_image,
    model_normalization,
)
from lidc_cdam.device import add_device_argument, resolve_device
from lidc_cdam.explain.api import default_targets
from lidc_cdam.io import write_json, write_npz
from lidc_cdam.viz import plot_explanation_grid, save_figure, to_display

log = logging.getLogger("lidc_cdam.explain")
METHOD_OPTIONS = ("n", "sigma", "space", "seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files or folders of images")
    src = parser.add_argument_group("model (give --model, --checkpoint, or both)")
    src.add_argument("--model", help="timm model name, e.g. vit_small_patch8_224.dino")
    src.add_argument("--checkpoint", type=Path,
                     help="local weights: a lidc-cdam checkpoint, an official DINO/DINOv2 file, "
                          "or (with --model) weights for that timm model")
    src.add_argument("--pretrained", action="store_true", help="download timm's weights for --model")
    parser.add_argument("--target", nargs="*", default=None,
                        help="output indices or names to explain (default: the predicted class)")
    parser.add_argument("--method", nargs="+", default=["cdam"], metavar="METHOD",
                        help=f"importance estimator(s), several for a side-by-side grid, or 'all' "
                             f"({', '.join(METHODS)})")
    parser.add_argument("--concept-images", type=Path,
                        help="folder of example images: explain similarity to their mean latent (Eq. 3-4)")
    parser.add_argument("--concept-name", default="concept")
    parser.add_argument("--concept", nargs="+", metavar="NAME",
                        help="radiological concepts of data_manifest/lidc_concepts.yaml (e.g. spiculated "
                             "round-contrast): mean latent of the rated training nodules of --concept-data (Eq. 3-4)")
    parser.add_argument("--concept-data", type=Path,
                        help="preprocess / phantoms folder whose training-part nodules define --concept")
    parser.add_argument("--fold", type=int, help="test fold whose training part defines --concept "
                                                 "(default: the checkpoint's meta['fold'])")
    parser.add_argument("--similarity", default="dot", choices=("dot", "cosine", "neg_l2"))
    parser.add_argument("--n", type=int, help="points for Smooth / Integrated CDAM (default 50)")
    parser.add_argument("--sigma", type=float, help="noise level for Smooth CDAM (default 0.05)")
    parser.add_argument("--space", choices=("block_input", "tokens"), help="where noise/path live")
    parser.add_argument("--seed", type=int, help="seed for Smooth CDAM's noise")
    parser.add_argument("--image-size", type=int, nargs="+", metavar=("H", "W"),
                        help="resize images to H [W] (default: the model's input size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("lidc-cdam-explain"), help="output folder")
    parser.add_argument("--no-figures", action="store_true", help="write arrays and JSON only")
    add_device_argument(parser)


def load_cli_model(name: str | None, checkpoint: Path | None, pretrained: bool) -> ViTModel:
    if name is None and checkpoint is None:
        raise SystemExit("error: give --model NAME and/or --checkpoint PATH")
    if name is None:
        return ViTModel.from_checkpoint(checkpoint)
    if checkpoint is None and not pretrained:
        raise SystemExit(
            f"error: --model {name} has no weights: add --pretrained to download timm's weights, or "
            "--checkpoint PATH for a local file"
        )
    return ViTModel.from_timm(name, pretrained=pretrained, checkpoint=checkpoint)


def expand_image_args(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        files.extend(list_images(p) if p.is_dir() else [p])
    return files


def parse_targets(raw: list[str] | None) -> list[int | str] | None:
    if not raw:
        return None
    return [int(t) if t.lstrip("-").isdigit() else t for t in raw]


def resolve_methods(requested: list[str]) -> list[str]:
    methods = list(METHODS) if requested == ["all"] else requested
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; available: {', '.join(METHODS)} or 'all'")
    return list(dict.fromkeys(methods))


def method_options(args: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, Any]]:
    """The options given on the command line, passed to each method that accepts them."""
    given = {k: getattr(args, k) for k in METHOD_OPTIONS if getattr(args, k) is not None}
    unused = set(given) - {k for m in methods for k in METHODS[m].defaults}
    if unused:
        raise SystemExit(f"error: --{'/--'.join(sorted(unused))} do not apply to {', '.join(methods)}")
    return {m: {k: v for k, v in given.items() if k in METHODS[m].defaults} for m in methods}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    model = load_cli_model(args.model, args.checkpoint, args.pretrained).to(device)
    mean, std = model_normalization(model)
    size = (args.image_size[0], args.image_size[-1]) if args.image_size else model.default_image_size
    methods = resolve_methods(args.method)
    options = method_options(args, methods)

    targets: Any = parse_targets(args.target)
    if sum(x is not None for x in (targets, args.concept_images, args.concept)) > 1:
        raise SystemExit("error: give one of --target, --concept-images and --concept")
    if args.concept is not None:
        if args.concept_data is None:
            raise SystemExit("error: --concept needs --concept-data DIR (the rated nodules that define it)")

        targets = concept_targets(model, args.concept_data, args.fold, args.concept, similarity=args.similarity)
    if args.concept_images is not None:
        examples = torch.stack([load_image(p, size, mean, std) for p in list_images(args.concept_images)]).to(device)
        targets = Concept.from_images(model, examples, similarity=args.similarity, name=args.concept_name)

    files, skipped, tensors = [], [], []
    for path in expand_image_args(args.images):
        try:
            tensors.append(load_image(path, size, mean, std))
            files.append(path)
        except ImageReadError as err:
            log.warning("skipping %s", err)
            skipped.append({"file": str(path), "reason": str(err)})
    if not files:
        raise SystemExit("error: none of the images could be read: " + "; ".join(s["reason"] for s in skipped))

    images = torch.stack(tensors)
    if targets is None:  # the predicted class, fixed once for every method (batch by batch on the device)
        found = [default_targets(model, images[i : i + args.batch_size].to(device))
                 for i in range(0, len(images), args.batch_size)]
        targets = torch.cat([t.cpu() for t in found]) if isinstance(found[0], torch.Tensor) else found[0]
    show_attention = model.has_class_token and "attention" not in methods
    panels = (["attention"] if show_attention else []) + methods
    maps: dict[str, list[torch.Tensor]] = {m: [] for m in panels}
    kinds: dict[str, str] = {}
    scores, names = [], []
    batches = range(0, len(files), args.batch_size)
    with tqdm(total=len(batches) * len(panels), desc="explaining", unit="map batch",
              disable=not sys.stderr.isatty()) as bar:
        for start in batches:
            batch = images[start : start + args.batch_size].to(device)
            batch_targets = (targets[start : start + args.batch_size].to(device) if isinstance(targets, torch.Tensor)
                             else targets)
            for method in panels:
                attr = explain(model, batch, batch_targets, method=method, **options.get(method, {}))
                maps[method].append(attr.maps.detach().cpu())
                kinds[method] = attr.kind
                if method == methods[0]:
                    names.extend(attr.target_names)
                    scores.append(attr.scores.cpu() if attr.scores is not None else
                                  torch.full(attr.maps.shape[:2], float("nan")))
                bar.update()
    stacked = {m: torch.cat(v) for m, v in maps.items()}
    scores_t = torch.cat(scores)

    out: Path = args.out
    figures = []
    if not args.no_figures:
        for i, path in enumerate(tqdm(files, desc="figures", unit="img", disable=not sys.stderr.isatty())):
            rows = [
                (f"target {names[i][k]}",
                 [(m, stacked[m][i, k].numpy(), METHODS[m].signed) for m in panels])
                for k in range(len(names[i]))
            ]
            fig = plot_explanation_grid(to_display(images[i], mean, std), rows, title=path.name)
            figures.append(str(save_figure(fig, out / "figures" / f"{i:04d}_{path.stem}.png")))

    write_npz(out / "maps.npz", **{f"maps_{m.replace('-', '_')}": v.numpy() for m, v in stacked.items()},
              scores=scores_t.numpy(), target_names=np.array(names, dtype=str),
              files=np.array([str(f) for f in files]))
    summary = {
        "methods": {m: {"options": {**METHODS[m].defaults, **options.get(m, {})}, "kind": kinds[m],
                        "array": f"maps_{m.replace('-', '_')}", "shape": list(stacked[m].shape)}
                    for m in panels},
        "model": {"name": args.model, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                  "task": model.task, "image_size": list(size)},
        "maps_note": "raw signed scores [image, target, h, w]: per patch token (prefix tokens dropped) or pixel",
        "images": [
            {"file": str(f), "targets": names[i], "target_values": scores_t[i].tolist(),
             "figure": figures[i] if figures else None}
            for i, f in enumerate(files)
        ],
        "skipped": skipped,
    }
    write_json(out / "summary.json", summary)
    print(f"explained {len(files)} image(s) with {', '.join(methods)}; skipped {len(skipped)}; results in {out}/")
    return summary
