"""`lidc-cdam linear-probe`: train the ImageNet linear classifier on a frozen ViT (docs/method.md, "Data").

Linear(embed_dim, 1000) on CLS' of a frozen backbone (the paper: DINO ViT-S/8), RandomResizedCrop +
horizontal flip, Adam lr 3e-4, batch 128, 10 epochs, on a training folder with one sub-folder per synset.
The backbone comes from a local file (--backbone: an official DINO/DINOv2 file or a lidc-cdam checkpoint)
or a timm name (--model, with --checkpoint PATH or --pretrained). Writes a lidc-cdam checkpoint (--out)
that `lidc-cdam explain --checkpoint` loads, and a JSON report beside it. Example:

  lidc-cdam linear-probe --backbone dino_deitsmall8_pretrain.pth --train imagenet/train \\
      --val imagenet/val --out dino_vits8_linear.pt
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lidc_cdam.io import write_json
from lidc_cdam.models.loading import from_timm, load_model, save_checkpoint
from lidc_cdam.models.vit import ViTModel
from lidc_cdam.train.linear_probe import LinearProbeConfig, train_linear_probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--train", type=Path, required=True, help="training images, one folder per synset")
    data.add_argument("--val", type=Path, help="validation images, one folder per synset (top-1 is reported)")
    data.add_argument("--classes", choices=("imagenet", "folders"), default="imagenet",
                      help="'imagenet': the 1000 ImageNet-1k classes in timm's order (default); "
                           "'folders': only the class folders present")
    data.add_argument("--max-per-class", type=int, help="use at most N training images per class")
    data.add_argument("--skip-unreadable", action="store_true",
                      help="skip (and report) unreadable images instead of stopping")
    src = parser.add_argument_group("backbone (give --backbone, or --model with --checkpoint/--pretrained)")
    src.add_argument("--backbone", type=Path, help="local model file: official DINO/DINOv2 or lidc-cdam checkpoint")
    src.add_argument("--arch", help="timm model name for --backbone files whose architecture cannot be inferred")
    src.add_argument("--model", help="timm model name, e.g. vit_small_patch8_224.dino")
    src.add_argument("--checkpoint", type=Path, help="weights for --model")
    src.add_argument("--pretrained", action="store_true", help="download timm's weights for --model")
    opt = parser.add_argument_group("training (defaults: the paper's)")
    defaults = LinearProbeConfig()
    opt.add_argument("--epochs", type=int, default=defaults.epochs)
    opt.add_argument("--batch-size", type=int, default=defaults.batch_size)
    opt.add_argument("--lr", type=float, default=defaults.lr)
    opt.add_argument("--no-augment", action="store_true",
                     help="no RandomResizedCrop/flip: resize to the input size as for evaluation")
    opt.add_argument("--cache-features", action="store_true",
                     help="with --no-augment: compute the backbone's features once, train the head on them")
    opt.add_argument("--image-size", type=int, help="input size (default: the backbone's)")
    opt.add_argument("--seed", type=int, default=defaults.seed)
    opt.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="data loading processes (default: min(8, CPUs))")
    opt.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', ...")
    opt.add_argument("--amp", action="store_true", help="bfloat16 autocast for the frozen backbone")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (a .json report goes beside)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_backbone(args: argparse.Namespace) -> ViTModel:
    if (args.backbone is None) == (args.model is None):
        raise SystemExit("error: give --backbone PATH or --model NAME (not both)")
    if args.backbone is not None:
        if args.checkpoint is not None or args.pretrained:
            raise SystemExit("error: --checkpoint/--pretrained go with --model, not --backbone")
        return load_model(args.backbone, arch=args.arch)
    if args.checkpoint is None and not args.pretrained:
        raise SystemExit(f"error: --model {args.model} has no weights: add --checkpoint PATH or --pretrained")
    return from_timm(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.out.suffix == ".json":
        raise SystemExit("error: --out names the checkpoint (e.g. probe.pt); the JSON report goes beside it")
    if args.cache_features and not args.no_augment:
        raise SystemExit("error: --cache-features needs --no-augment (augmented crops differ every epoch)")
    backbone = load_backbone(args)
    config = LinearProbeConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment=not args.no_augment,
        cache_features=args.cache_features, image_size=args.image_size, seed=args.seed,
        num_workers=args.num_workers, device=args.device, amp=args.amp,
        on_error="skip" if args.skip_unreadable else "raise", max_per_class=args.max_per_class,
    )
    model, report = train_linear_probe(backbone, args.train, config, val_root=args.val, classes=args.classes,
                                       progress=not args.quiet)
    source = str(args.backbone or args.checkpoint or f"timm:{args.model}")
    save_checkpoint(model, args.out, meta={"backbone_source": source})
    summary = {"checkpoint": str(args.out), "backbone": source, "config": config.to_dict(), **report}
    write_json(args.out.with_suffix(".json"), summary)
    top1 = f", val top-1 {report['val_top1']:.4f} on {report['val_images']} images" if report["val_top1"] is not None \
        else ""
    print(f"linear probe: {report['train_images']} training images, {len(report['classes'])} classes, "
          f"final epoch loss {report['epoch_losses'][-1]:.4f}{top1}; skipped {len(report['skipped'])}; "
          f"checkpoint {args.out}")
    return summary
