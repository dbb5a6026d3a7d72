"""The model files: reading them safely, finding the state dict in one, writing lidc-cdam checkpoints, and
rebuilding a model of a given class from any of them.

What a family's backbone is built from (a saved spec) and how its plain state dict is recognised and read belong to
its adapter (:mod:`lidc_cdam.models.backbones`, the one registry of families); this module only asks the registry.
Nothing here imports :mod:`lidc_cdam.models.vit`: the model class comes in as an argument, so that
:class:`~lidc_cdam.models.vit.ViTModel`'s constructors (``from_checkpoint``, ``from_timm``, ``save``) and
the functions of :mod:`lidc_cdam.models.loading` (the public entry points, which bind ``ViTModel``) both
build on this module without importing each other. The formats understood are listed in
:mod:`lidc_cdam.models.loading`.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from lidc_cdam.io import save_torch
from lidc_cdam.models.backbones import (
    DEFAULT_BUILD_FAMILY,
    adapter_for_state_dict,
    adapter_type,
    build_backbone,
    builder_for,
)
from lidc_cdam.models.backbones.base import UNDERSTOOD, CheckpointError, first_line
from lidc_cdam.models.backbones.timm_vit import create_timm_model
from lidc_cdam.models.heads import LinearHead, build_head
from lidc_cdam.models.onnx_import import OnnxImportError, timm_backbone_from_onnx

M = TypeVar("M", bound=nn.Module)

CHECKPOINT_FORMAT = "lidc-cdam-checkpoint"
CHECKPOINT_VERSION = 1

#: Plain-data classes allowed when unpickling: DINO training checkpoints store their ``args``.
_SAFE_GLOBALS = [argparse.Namespace]

#: Keys under which checkpoints nest their state dict, in order of preference.
_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict", "model_state_dict")


#: globals a plain torch.save of tensors and containers pickles (what torch's weights-only reader allows)
_PLAIN_GLOBALS = re.compile(r"^(torch\.|collections\.OrderedDict$|argparse\.Namespace$|_codecs\.encode$)")
_MAX_PICKLE_OPS = 2_000_000


def pickled_globals(path: str | os.PathLike) -> list[str]:
    """The globals (``module.name``) the pickles of a checkpoint would import, in order, without running any:
    read with :mod:`pickletools` from a zip checkpoint's ``data.pkl`` or a legacy file's leading pickles."""
    path = Path(path)
    streams: list[io.BufferedIOBase] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                streams = [io.BytesIO(zf.read(n)) for n in zf.namelist() if n.endswith("data.pkl")]
        else:
            with open(path, "rb") as fh:
                streams = [io.BytesIO(fh.read(64 << 20))]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found: list[str] = []
    for stream in streams:
        strings: list[str | None] = []  # values pushed, strings only (None for anything else)
        memo: dict[int, str | None] = {}
        ops = 0
        for _ in range(8):  # a legacy file is several pickles in a row, then raw storage bytes
            try:
                for op, arg, _pos in pickletools.genops(stream):
                    ops += 1
                    if ops > _MAX_PICKLE_OPS:
                        return list(dict.fromkeys(found))
                    name = op.name
                    if name in ("GLOBAL", "INST"):
                        found.append(".".join(str(arg).split(" ", 1)))
                    elif name == "STACK_GLOBAL" and len(strings) >= 2 and None not in strings[-2:]:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif name == "MEMOIZE":
                        memo[len(memo)] = strings[-1] if strings else None
                    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[int(arg)] = strings[-1] if strings else None
                    elif name in ("GET", "BINGET", "LONG_BINGET"):
                        strings.append(memo.get(int(arg)))
                    elif isinstance(arg, str) and ("UNICODE" in name or "STRING" in name):
                        strings.append(str(arg))
                    elif op.stack_after:
                        strings.append(None)
            except Exception:  # the end of the pickles, or garbage: what was found so far
                break
    return list(dict.fromkeys(found))


def _read_error(path: Path, err: BaseException) -> CheckpointError:
    """What torch's refusal (or failure) to read ``path`` means for the user: code carried, or not a checkpoint.
    torch's own text (which suggests loading unsafely) is never passed on."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    named = list(dict.fromkeys(re.findall(r"GLOBAL\s+([\w.]+)", text)))  # what torch refused
    code = [g for g in pickled_globals(path) if not _PLAIN_GLOBALS.match(g)] or named
    if code:
        shown = ", ".join(code[:3]) + (" ..." if len(code) > 3 else "")
        return CheckpointError(
            f"{path}: refused for safety: the file carries code (pickled Python objects; loading it would "
            f"import {shown}), and a checkpoint is read only when it holds tensors and plain values. "
            "Re-save the weights where the file was made, e.g. torch.save(model.state_dict(), path).")
    if isinstance(err, pickle.UnpicklingError):  # a bad opcode: garbage, or a pickle torch.save did not write
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
        detail_text = (detail.group(1) if detail else first_line(err)).split(" was not an allowed")[0].strip()
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint, corrupted or not written by "
                               f"torch.save ({detail_text})")
    first = first_line(err)
    if "weights_only" in first or "Weights only" in first:
        first = "unreadable pickle data"
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupted "
                           f"({err.__class__.__name__}: {first})")


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file and say what to do.

    ``.safetensors`` files are read with ``safetensors``; ``argparse.Namespace`` (the ``args`` in
    DINO training checkpoints) is the only class allowed besides tensors and plain containers. A file that
    carries code (pickled Python objects) is refused naming what it would import (:func:`pickled_globals`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({err.__class__.__name__}: {err})"
            ) from None
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # then refused: said below
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused (code), truncated, garbage, not a torch file
        raise _read_error(path, err) from None


def save_checkpoint(
    model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (a :class:`~lidc_cdam.models.vit.ViTModel`: weights + everything needed to rebuild it)
    atomically to ``path``.

    The file holds only tensors and plain Python values, so it loads with ``weights_only=True``.
    """
    if not model.build:
        raise ValueError(
            "this ViTModel does not know how to rebuild its backbone: create it with "
            "ViTModel.from_timm(...) / from_config(...), or pass "
            "build={'timm_name': ..., 'timm_kwargs': {...}}"
        )
    head = model.head.config() if isinstance(model.head, LinearHead) else None
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "backbone": dict(model.build),
        "head": head,
        "task": model.task,
        "output_names": model.output_names,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": {**model.meta, **(meta or {})},
    }
    return save_torch(path, payload)


def build_model_from_payload(model_cls: type[M], payload: dict[str, Any], source: str = "checkpoint") -> M:
    """Rebuild a ``model_cls`` (:class:`~lidc_cdam.models.vit.ViTModel`) from a loaded lidc-cdam checkpoint
    dictionary."""
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{source}: written by a newer lidc-cdam (format version {payload['version']})"
        )
    backbone = build_backbone(payload["backbone"])
    model = model_cls(
        backbone,
        build_head(payload.get("head")),
        task=payload.get("task", "classification"),
        output_names=payload.get("output_names"),
        build=payload["backbone"],
        meta=payload.get("meta") or {},
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{source}: weights do not fit the architecture it names: {err}"
        ) from None
    return model.eval()


def is_lidc_cdam_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


# --------------------------------------------------------------------------- state dicts
def extract_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, Any], str]:
    """The backbone state dict inside a loaded file, with timm key names, and the format name.

    Unwraps our format (``state_dict``), DINO training checkpoints (``teacher``, else
    ``student``) and ``model`` / ``state_dict`` wrappers; strips ``module.`` (DDP) and keeps only
    ``backbone.*`` keys when there are any (dropping e.g. the DINO projection head). DINOv2 keys
    are left for timm's ``checkpoint_filter_fn`` to convert.
    """
    fmt = "timm"
    if is_lidc_cdam_checkpoint(obj):
        obj, fmt = obj.get("state_dict"), "lidc-cdam"
    for _ in range(3):
        if not isinstance(obj, dict) or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        if key in ("teacher", "student"):
            fmt = f"dino-training ({key})"
        obj = obj[key]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
        raise CheckpointError(f"{source}: no state dict found (a {kind}{keys}); {UNDERSTOOD}")

    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if "blocks.0.0.norm1.weight" in sd:  # DINOv2 "block chunks": blocks.{chunk}.{i}.*
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    if "mask_token" in sd:
        fmt = "dinov2"
    elif fmt == "timm" and "patch_embed.proj.weight" in sd and "head.weight" not in sd:
        fmt = "dino/timm backbone"
    return sd, fmt


def _load_into(backbone: nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """The family's state-dict filter (timm's ``checkpoint_filter_fn``: DINOv2 conversion, pos-embed
    resampling; unchanged for torchvision), then a strict load."""
    try:
        filtered = adapter_type(backbone).filter_state_dict(dict(state_dict), backbone)
    except Exception as err:
        raise CheckpointError(
            f"{source}: the weights cannot be converted for this model "
            f"({err.__class__.__name__}: {first_line(err)})"
        ) from None
    try:
        backbone.load_state_dict(filtered, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{source}: the weights do not fit the model: {err}. Pass arch='<timm model name>' "
            "and/or timm keyword arguments (e.g. img_size=, num_heads=) matching the file."
        ) from None


def _with_weights(model: M, checkpoint: str | os.PathLike | None) -> M:
    """``model`` with the backbone weights of a local file, if given (any format :func:`extract_state_dict` finds)."""
    if checkpoint is not None:
        source = str(checkpoint)
        state_dict, fmt = extract_state_dict(read_checkpoint(checkpoint), source)
        _load_into(model.backbone, state_dict, source)
        fmt = adapter_type(model.backbone).state_dict_format or fmt
        model.meta.update({"loaded_from": source, "source_format": fmt})
    return model.eval()


def model_from_torchvision(model_cls: type[M], name: str, /, *, checkpoint: str | os.PathLike | None = None,
                           **kwargs: Any) -> M:
    """``torchvision.models.get_model(name, weights=None, **kwargs)`` as a ``model_cls``, with the weights of
    a local state-dict ``checkpoint`` if given (read with ``weights_only=True``). No downloads."""
    build = {"family": "torchvision", "torchvision_name": name, "torchvision_kwargs": dict(kwargs)}
    return _with_weights(model_cls(build_backbone(build), build=build), checkpoint)


# --------------------------------------------------------------------------- models of a given class
def load_model_file(model_cls: type[M], path: str | os.PathLike, /, *, arch: str | None = None,
                    **timm_kwargs: Any) -> M:
    """Load a model file as a ``model_cls`` (:class:`~lidc_cdam.models.vit.ViTModel`): a lidc-cdam checkpoint,
    an official DINO / DINOv2 backbone, a DINO training checkpoint (teacher), a timm ViT state dict or a
    torchvision ViT state dict (SWAG). Read with ``weights_only=True``; :func:`lidc_cdam.models.loading.load_model`
    is this for ``ViTModel``.

    For files without an architecture it is inferred from the tensor shapes; ``arch`` (a timm model
    name, or a torchvision builder such as ``vit_b_16`` for torchvision files) overrides the inference and
    ``timm_kwargs`` (e.g. ``num_heads=``, ``img_size=``, ``dynamic_img_size=True``; torchvision's names for
    torchvision files) override single arguments. Backbone-only files give a
    ``task="features"`` model that :func:`save_checkpoint` can re-save.
    """
    source = str(path)
    if Path(path).suffix.lower() == ".onnx":  # a Hugging Face ViT / DINOv2 exported to ONNX
        if arch is not None:
            raise CheckpointError(f"{source}: an ONNX file gives its own architecture; arch= does not apply")
        return model_from_onnx(model_cls, path, **timm_kwargs)
    obj = read_checkpoint(path)
    if is_lidc_cdam_checkpoint(obj):
        if arch is not None or timm_kwargs:
            saved = dict(obj.get("backbone") or {})
            builder = builder_for(saved.get("family", DEFAULT_BUILD_FAMILY))
            obj = {**obj, "backbone": builder.override_spec(saved, arch, timm_kwargs)}
        try:
            return build_model_from_payload(model_cls, obj, source=source)
        except KeyError as err:
            raise CheckpointError(f"{source}: incomplete lidc-cdam checkpoint (no {err})") from None

    state_dict, fmt = extract_state_dict(obj, source)
    family = adapter_for_state_dict(state_dict)
    if family is None:
        if arch is None:
            raise CheckpointError(f"{source}: not a Vision Transformer state dict (no "
                                  f"'patch_embed.proj.weight'); {UNDERSTOOD}")
        family = builder_for(DEFAULT_BUILD_FAMILY)  # a timm name for a file of unknown keys
    build = family.spec_from_state_dict(state_dict, arch, timm_kwargs, source)
    backbone = build_backbone(build)
    model = model_cls(
        backbone,
        task="features" if getattr(backbone, "num_classes", 1) == 0 else "classification",
        build=build,
        meta={"loaded_from": source, "source_format": family.state_dict_format or fmt},
    )
    _load_into(model.backbone, state_dict, source)
    return model.eval()


def model_from_timm(
    model_cls: type[M],
    name: str,
    /,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> M:
    """``timm.create_model(name, pretrained=..., **kwargs)`` as a ``model_cls``
    (:class:`~lidc_cdam.models.vit.ViTModel`; :func:`lidc_cdam.models.loading.from_timm` binds it).

    With ``checkpoint`` the weights come from that local file instead of the network (our format,
    a DINO / DINOv2 file or a timm state dict, converted with timm's ``checkpoint_filter_fn``).
    Without network access ``pretrained=True`` raises :class:`PretrainedWeightsUnavailable`.
    """
    backbone = create_timm_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    model = model_cls(
        backbone,
        task="features" if getattr(backbone, "num_classes", 1) == 0 else "classification",
        build={"timm_name": name, "timm_kwargs": dict(kwargs)},
    )
    return _with_weights(model, checkpoint)


def model_from_onnx(model_cls: type[M], path: str | os.PathLike, /, *, image_size: int | tuple[int, int] | None = None,
                    num_heads: int | None = None, **kwargs: Any) -> M:
    """A Hugging Face ViT / DINOv2 exported to ONNX as a feature model (``task="features"``) on a timm
    ``VisionTransformer`` (:mod:`lidc_cdam.models.onnx_import`); ``kwargs`` go to ``model_cls``."""
    try:
        backbone, build, read = timm_backbone_from_onnx(path, image_size=image_size, num_heads=num_heads)
    except OnnxImportError as err:
        raise CheckpointError(str(err)) from None
    meta = {"loaded_from": str(path), "source_format": f"onnx ({read.family}, transformers)",
            "onnx_unused_initializers": len(read.unused), **dict(kwargs.pop("meta", None) or {})}
    kwargs.setdefault("task", "features")
    return model_cls(backbone, build=build, meta=meta, **kwargs)
