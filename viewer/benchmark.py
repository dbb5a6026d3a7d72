"""Seconds from "Compute" to the overlay in napari, on the synthetic scan (all 32 slices by default).

    xvfb-run -a python -m lidc_cdam.viewer.benchmark [--threads 1] [--models tiny vit-s16] [--method CDAM]

Random models: ``tiny`` (32 px, 8 px patches, 2 blocks of width 32) and ``vit-s16`` (ViT-S/16 at 224 px).
Prints one line per model: first compute, repeat (cache hit: memory), and a fresh widget (cache on disk).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lidc_cdam.viewer._guard import prepare_torch


def _checkpoint(kind: str, folder: Path) -> Path:
    import torch

    from lidc_cdam.ct.testing import STATS, tiny_checkpoint
    from lidc_cdam.models.loading import save_checkpoint
    from lidc_cdam.models.vit import ViTModel

    if kind == "tiny":
        return tiny_checkpoint(folder / "tiny.pt")
    torch.manual_seed(0)
    model = ViTModel.from_config({"num_classes": 0}, timm_name="vit_small_patch16_224", head_outputs=1,
                                 task="classification", output_names=["malignant"],
                                 meta={"input_stats": {**STATS, "image_size": 224}})
    return save_checkpoint(model, folder / "vit-s16.pt")


def run(models: list[str], method: str = "CDAM", slices: str = "all 32 slices", threads: int = 1) -> list[dict]:
    prepare_torch()
    import napari
    import torch
    from lidc_cdam.viewer._widget import CdamWidget

    from lidc_cdam.ct.cache import MapCache

    torch.set_num_threads(threads)
    out = []
    with tempfile.TemporaryDirectory(prefix="lidc-cdam-bench-") as tmp:
        for kind in models:
            ck = _checkpoint(kind, Path(tmp))
            viewer = napari.Viewer(show=False)
            try:
                widget = CdamWidget(viewer)
                widget.cache = MapCache(Path(tmp) / f"cache-{kind}")
                viewer.open_sample("lidc-cdam", "synthetic-chest")
                widget.load_checkpoints([ck], block=True)
                widget.nodule.value = widget.nodules[1]
                widget.method.value = method
                widget.slices.value = slices
                widget.compute(block=True)
                first = widget.last_seconds
                widget.compute(block=True)
                repeat = widget.last_seconds
                widget.cache = MapCache(Path(tmp) / f"cache-{kind}")  # a new session: the maps come from disk
                t = time.perf_counter()
                widget.compute(block=True)
                disk = time.perf_counter() - t
                out.append({"model": kind, "method": method, "slices": len(widget.results[0].slices),
                            "first_s": first, "repeat_s": repeat, "disk_cache_s": disk, "threads": threads})
            finally:
                viewer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vit-s16"], choices=["tiny", "vit-s16"])
    parser.add_argument("--method", default="CDAM")
    parser.add_argument("--slices", default="all 32 slices", choices=["all 32 slices", "nodule +- 3 slices"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for row in run(args.models, args.method, args.slices, args.threads):
        print(f"{row['model']:8s} {row['method']:16s} {row['slices']:2d} slices, {row['threads']} thread(s): "
              f"compute -> overlay {row['first_s']:.2f} s, repeat (memory cache) {row['repeat_s']:.3f} s, "
              f"new session (disk cache) {row['disk_cache_s']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
