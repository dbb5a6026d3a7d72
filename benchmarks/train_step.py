"""Steps per second of the training engine's own step (``lidc_cdam.train.step.TrainStep``), random data.

A random-weight timm ViT (default ``vit_small_patch16_224``) as a :class:`~lidc_cdam.ViTModel` with a
``--num-classes`` linear head takes ``--warmup`` steps that are not timed (cuDNN / cuBLAS autotuning,
the allocator's first blocks, the optimiser's state), then ``--steps`` timed steps, each exactly what
``lidc-cdam train`` runs per iteration: the batch copied from pinned host memory (non-blocking, as
the engine's data loader delivers it; ``--on-device`` skips the copy), ``zero_grad``, the forward pass
under the engine's precision for ``--amp`` (``bf16``: bf16 autocast, no scaler; ``fp16``: fp16
autocast with a gradient scaler; ``none``: float32), the BCE loss in float32, ``backward``, Adam's
step. The clock is read after ``torch.cuda.synchronize()``. Several ``--amp`` values are timed one
after the other, each on a fresh model and optimiser.
``benchmarks/device_check.sh`` runs it at batch 64, 224 px, bf16 and float32.

    python benchmarks/train_step.py --device cuda [--batch-size 64] [--amp bf16 none] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
from _timing import environment, resolve_device, synchronize

from lidc_cdam import ViTModel
from lidc_cdam.models.heads import LinearHead
from lidc_cdam.train.engine import prepare_batch
from lidc_cdam.train.step import TrainStep, choose_precision

AMP_CHOICES = ("none", "bf16", "fp16")


def time_steps(args: argparse.Namespace, device: torch.device, amp: str) -> dict:
    """Timed training steps of one precision mode; returns one result row."""
    torch.manual_seed(0)
    kwargs = {} if args.image_size == 224 else {"img_size": args.image_size}
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0, **kwargs)
    model = ViTModel(backbone, LinearHead(backbone.embed_dim, args.num_classes)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    precision = choose_precision(amp, device)
    train_step = TrainStep(model, optimizer, torch.nn.BCEWithLogitsLoss(), precision)
    pin = device.type == "cuda"
    batch = {"image": torch.randn(args.batch_size, 3, args.image_size, args.image_size),
             "target": torch.randint(0, 2, (args.batch_size, args.num_classes)).float()}
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    if args.on_device:
        batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> torch.Tensor:
        x, y = prepare_batch(batch, device, non_blocking=pin)
        return train_step.step(x, y)[1]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    synchronize(device)
    seconds = time.perf_counter() - start
    last_loss = float(losses[-1])
    row = {"model": args.model, "amp": amp, "precision": precision.name, "device": str(device),
           "step": "lidc_cdam.train.step.TrainStep", "host_copy": not args.on_device, "batch_size": args.batch_size,
           "image_size": args.image_size, "num_classes": args.num_classes, "optimizer": "Adam",
           "warmup_steps": args.warmup, "steps": args.steps, "seconds": seconds,
           "steps_per_s": args.steps / seconds, "images_per_s": args.steps * args.batch_size / seconds,
           "ms_per_step": 1e3 * seconds / args.steps, "final_loss": last_loss, "loss_finite": math.isfinite(last_loss),
           "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=1, help="outputs of the head (malignancy: 1)")
    parser.add_argument("--on-device", action="store_true", help="the batch made on the device: no host copy")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--amp", nargs="+", choices=AMP_CHOICES, default=["bf16"])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the rows (and the environment) as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, the engine's step (Adam), "
          f"{args.warmup} warm-up + "
          f"{args.steps} timed steps on {device}")
    print(f"{'amp':5s} {'steps/s':>8s} {'images/s':>9s} {'ms/step':>8s} {'peak GiB':>8s} {'loss':>7s}")
    rows = []
    for amp in args.amp:
        row = time_steps(args, device, amp)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous mode's model and optimiser state are gone
        rows.append(row)
        peak = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        print(f"{amp:5s} {row['steps_per_s']:8.2f} {row['images_per_s']:9.1f} {row['ms_per_step']:8.1f} {peak:>8s} "
              f"{row['final_loss']:7.3f}", flush=True)
    if args.out:
        result = {"environment": environment(device), "rows": rows}
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
