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
from lidc_cdam.data.images import (
    ImageReadError,
    list_images,
    load_image,
    model_normalization,
)
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
    parser.add_argument("--method", default="cdam", choices=sorted(METHODS), help="importance estimator")
    parser.add_argument("--concept-images", type=Path,
                        help="folder of example images: explain similarity to their mean latent (Eq. 3-4)")
    parser.add_argument("--concept-name", default="concept")
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = load_cli_model(args.model, args.checkpoint, args.pretrained)
    mean, std = model_normalization(model)
    size = (args.image_size[0], args.image_size[-1]) if args.image_size else model.default_image_size
    options = {k: getattr(args, k) for k in METHOD_OPTIONS if getattr(args, k) is not None}
    unknown = set(options) - set(METHODS[args.method].defaults)
    if unknown:
        raise SystemExit(f"error: --{'/--'.join(sorted(unknown))} do not apply to --method {args.method}")

    targets: Any = parse_targets(args.target)
    if args.concept_images is not None:
        if targets is not None:
            raise SystemExit("error: give either --target or --concept-images, not both")
        examples = torch.stack([load_image(p, size, mean, std) for p in list_images(args.concept_images)])
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

    out: Path = args.out
    maps, scores, names, attention, kind = [], [], [], [], "tokens"
    show_attention = model.backbone.has_class_token and args.method != "attention"
    for start in tqdm(range(0, len(files), args.batch_size), desc=f"{args.method}", unit="batch",
                      disable=not sys.stderr.isatty()):
        batch = torch.stack(tensors[start : start + args.batch_size])
        attr = explain(model, batch, targets, method=args.method, **options)
        maps.append(attr.maps.detach().cpu())
        kind = attr.kind
        scores.append(attr.scores.cpu() if attr.scores is not None else torch.full(attr.maps.shape[:2], np.nan))
        names.extend(attr.target_names)
        if show_attention:
            attention.append(explain(model, batch, [0] if model.num_outputs else targets,
                                     method="attention").maps[:, 0].cpu())
    maps_t, scores_t = torch.cat(maps), torch.cat(scores)

    figures = []
    if not args.no_figures:
        for i, path in enumerate(tqdm(files, desc="figures", unit="img", disable=not sys.stderr.isatty())):
            cols = [("attention map", attention[i // args.batch_size][i % args.batch_size].numpy(), False)] \
                if show_attention else []
            cols += [(f"{args.method}: {names[i][k]}", maps_t[i, k].numpy(), args.method != "attention")
                     for k in range(maps_t.shape[1])]
            fig = plot_explanation_grid(to_display(tensors[i], mean, std), [(path.name, cols)],
                                        title=f"{path.name} ({args.method})")
            figures.append(str(save_figure(fig, out / "figures" / f"{i:04d}_{path.stem}.png")))

    write_npz(out / "maps.npz", maps=maps_t.numpy(), scores=scores_t.numpy(),
              target_names=np.array(names, dtype=str), files=np.array([str(f) for f in files]))
    summary = {
        "method": args.method,
        "options": {**METHODS[args.method].defaults, **options},
        "model": {"name": args.model, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                  "task": model.task, "image_size": list(size)},
        "maps": {"file": "maps.npz", "shape": list(maps_t.shape), "kind": kind,
                 "note": "raw signed scores per patch token (prefix tokens dropped) or pixel"},
        "images": [
            {"file": str(f), "targets": names[i], "target_values": scores_t[i].tolist(),
             "figure": figures[i] if figures else None}
            for i, f in enumerate(files)
        ],
        "skipped": skipped,
    }
    write_json(out / "summary.json", summary)
    print(f"explained {len(files)} image(s) with {args.method}; skipped {len(skipped)}; results in {out}/")
    return summary
