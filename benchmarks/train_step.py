"""Steps per second of ViT fine-tuning: AdamW, cross-entropy, random data, with and without AMP.

A random-weight timm ViT (default ``vit_small_patch16_224``, a ``--num-classes`` head) takes
``--warmup`` steps that are not timed (cuDNN / cuBLAS autotuning, the allocator's first blocks,
AdamW's state), then ``--steps`` timed steps: ``zero_grad``, the forward pass and the loss under
``--amp`` (``bf16``: bf16 autocast, no gradient scaler needed; ``none``: float32), ``backward``,
``optimizer.step``. The clock is read after ``torch.cuda.synchronize()``. One batch is made once
on the device, so the figure is the model's, not a data loader's. Several ``--amp`` values are
timed one after the other, each on a fresh model and optimiser.
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
from _timing import AMP_CHOICES, autocast, environment, resolve_device, synchronize


def time_steps(args: argparse.Namespace, device: torch.device, amp: str) -> dict:
    """Timed training steps of one precision mode; returns one result row."""
    torch.manual_seed(0)
    kwargs = {} if args.image_size == 224 else {"img_size": args.image_size}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kwargs).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        optimizer.step()
        return loss.detach()

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
    row = {"model": args.model, "amp": amp, "device": str(device), "batch_size": args.batch_size,
           "image_size": args.image_size, "num_classes": args.num_classes, "optimizer": "AdamW",
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
    parser.add_argument("--num-classes", type=int, default=2, help="the fine-tuning head (LIDC tasks: 2)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--amp", nargs="+", choices=AMP_CHOICES, default=["bf16"])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the rows (and the environment) as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"{args.model}, {args.image_size} px, batch {args.batch_size}, AdamW, {args.warmup} warm-up + "
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
