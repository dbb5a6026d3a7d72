"""The model-file formats: reading files safely, finding the state dict, inferring the architecture,
building backbones, writing lidc-cdam checkpoints, and rebuilding a model of a given class.

Nothing here imports :mod:`lidc_cdam.models.vit`: the model class comes in as an argument, so that
:class:`~lidc_cdam.models.vit.ViTModel`'s constructors (``from_checkpoint``, ``from_timm``, ``save``) and
the functions of :mod:`lidc_cdam.models.loading` (the public entry points, which bind ``ViTModel``) both
build on this module without importing each other. The formats understood are listed in
:mod:`lidc_cdam.models.loading`.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from lidc_cdam.models.backbones import adapter_type
from lidc_cdam.models.heads import LinearHead, build_head

M = TypeVar("M", bound=nn.Module)

CHECKPOINT_FORMAT = "lidc-cdam-checkpoint"
CHECKPOINT_VERSION = 1

#: ``num_heads`` of the standard ViT widths (Ti, S, B, L, g); other widths need ``num_heads=``.
NUM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}

#: Plain-data classes allowed when unpickling: DINO training checkpoints store their ``args``.
_SAFE_GLOBALS = [argparse.Namespace]

#: Keys under which checkpoints nest their state dict, in order of preference.
_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict", "model_state_dict")

_UNDERSTOOD = (
    "understood formats: lidc-cdam checkpoints (ViTModel.save), official DINO backbones and DINO "
    "training checkpoints ('teacher'/'student'), official DINOv2 backbones, timm "
    "VisionTransformer state dicts (optionally under 'model' or 'state_dict') and torchvision "
    "VisionTransformer state dicts (e.g. the SWAG weights)"
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unsafe, unknown format, wrong shapes)."""


class PretrainedWeightsUnavailable(CheckpointError):
    """``pretrained=True`` weights could not be fetched (offline); pass a local file instead."""


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else ""


#: globals a plain torch.save of tensors and containers pickles (what torch's weights-only reader allows)
_PLAIN_GLOBALS = re.compile(r"^(torch\.|collections\.OrderedDict$|argparse\.Namespace$|_codecs\.encode$)")
_MAX_PICKLE_OPS = 2_000_000


def pickled_globals(path: str | os.PathLike) -> list[str]:
    """The globals (``module.name``) the pickles of a checkpoint would import, in order, without running any:
    read with :mod:`pickletools` from a zip checkpoint's ``data.pkl`` or a legacy file's leading pickles."""
    import io
    import pickletools
    import zipfile

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
        detail_text = (detail.group(1) if detail else _first_line(err)).split(" was not an allowed")[0].strip()
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint, corrupted or not written by "
                               f"torch.save ({detail_text})")
    first = _first_line(err)
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


def build_backbone(build: dict[str, Any]) -> nn.Module:
    """A randomly initialised backbone from ``{"timm_name": name | None, "timm_kwargs": {...}}`` (timm; without
    a name a ``VisionTransformer``) or ``{"family": "torchvision", "torchvision_name": name | None,
    "torchvision_kwargs": {...}}`` (a torchvision builder such as ``vit_b_16``; without a name the class),
    ``{"family": "monai", "monai_kwargs": {...}}`` (MONAI's ``ViT``) or ``{"family": "transformers",
    "transformers_class": name, "transformers_config": {...}}`` (a Hugging Face ViT / DINOv2 from its config).
    A timm build may add ``"layer_norm_eps"``: the epsilon of every ``LayerNorm`` (an imported ViT's own)."""
    if build.get("family") == "monai":
        from lidc_cdam.models.backbones.monai_vit import build_monai_vit

        return build_monai_vit(dict(build.get("monai_kwargs") or {}))
    if build.get("family") == "transformers":
        from lidc_cdam.models.backbones.hf_vit import build_hf_backbone

        return build_hf_backbone(build["transformers_class"], dict(build.get("transformers_config") or {}))
    if build.get("family") == "torchvision":
        import torchvision

        kwargs = dict(build.get("torchvision_kwargs") or {})
        name = build.get("torchvision_name")
        if name:
            return torchvision.models.get_model(name, weights=None, **kwargs)
        return torchvision.models.VisionTransformer(**kwargs)
    kwargs = dict(build.get("timm_kwargs") or {})
    name = build.get("timm_name")
    backbone = timm.create_model(name, pretrained=False, **kwargs) if name else VisionTransformer(**kwargs)
    eps = build.get("layer_norm_eps")
    if eps is not None:  # a ViT imported from elsewhere (e.g. ONNX, transformers' 1e-12): every LayerNorm's epsilon
        for module in backbone.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(eps)
    return backbone


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
        raise CheckpointError(f"{source}: no state dict found (a {kind}{keys}); {_UNDERSTOOD}")

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
            f"({err.__class__.__name__}: {_first_line(err)})"
        ) from None
    try:
        backbone.load_state_dict(filtered, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{source}: the weights do not fit the model: {err}. Pass arch='<timm model name>' "
            "and/or timm keyword arguments (e.g. img_size=, num_heads=) matching the file."
        ) from None


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


def infer_vit_kwargs(
    state_dict: dict[str, Any], num_heads: int | None = None, source: str = "checkpoint"
) -> tuple[str | None, dict[str, Any]]:
    """``(timm_name, VisionTransformer kwargs)`` that fit a backbone state dict, from its shapes.

    ``timm_name`` is ``None`` (build ``VisionTransformer(**kwargs)``) except for DINOv2 SwiGLU
    (giant) files, whose MLP type only a timm model name can name.
    """
    sd = state_dict
    proj = sd.get("patch_embed.proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.ndim != 4:
        raise CheckpointError(f"{source}: no conv patch embedding 'patch_embed.proj.weight'; "
                              f"pass arch='<timm model name>'. {_UNDERSTOOD}")
    embed_dim, in_chans, ph, pw = (int(s) for s in proj.shape)
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise CheckpointError(f"{source}: transformer blocks 'blocks.<i>.*' missing or not "
                              f"numbered 0..depth-1 (found {sorted(blocks)[:8]})")
    if num_heads is None:
        if embed_dim not in NUM_HEADS:
            raise CheckpointError(
                f"{source}: cannot infer the number of attention heads for width {embed_dim} "
                f"(known widths: {NUM_HEADS}); pass num_heads=... or arch='<timm model name>'"
            )
        num_heads = NUM_HEADS[embed_dim]

    dinov2 = "mask_token" in sd
    reg = sd.get("register_tokens", sd.get("reg_token"))
    reg_tokens = int(reg.shape[1]) if isinstance(reg, torch.Tensor) else 0
    class_token = "cls_token" in sd
    kwargs: dict[str, Any] = {
        "patch_size": ph if ph == pw else (ph, pw),
        "in_chans": in_chans,
        "embed_dim": embed_dim,
        "depth": len(blocks),
        "num_heads": num_heads,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
    }
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if "blocks.0.mlp.fc1.weight" in sd:
        kwargs["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    if "blocks.0.ls1.gamma" in sd:
        kwargs["init_values"] = 1e-5  # any value: the gammas are loaded
    if "blocks.0.attn.q_norm.weight" in sd:
        kwargs["qk_norm"] = True
    if "norm_pre.weight" in sd:
        kwargs["pre_norm"] = True
    if not class_token:
        kwargs["class_token"] = False
        kwargs["global_pool"] = "avg"
    if "fc_norm.weight" in sd:
        kwargs["global_pool"], kwargs["fc_norm"] = "avg", True
    elif not class_token:
        kwargs["fc_norm"] = False
    if reg_tokens:
        kwargs["reg_tokens"] = reg_tokens

    pos = sd.get("pos_embed")
    if not isinstance(pos, torch.Tensor):
        kwargs["pos_embed"] = "none"
    else:
        length, prefix = int(pos.shape[1]), int(class_token) + reg_tokens
        if dinov2:  # CLS slot, no register slots; timm drops the CLS slot when there are registers
            layouts = [(bool(reg_tokens), length - int(class_token))]
        elif reg_tokens:  # DINOv2-style registers first (timm's *_reg*_dinov2 use no_embed_class)
            layouts = [(True, length), (False, length - prefix)]
        else:
            layouts = [(False, length - prefix), (True, length)]
        fits = [(flag, side) for flag, n in layouts if (side := _square_side(n)) is not None]
        if not fits:
            raise CheckpointError(f"{source}: cannot infer the image size from pos_embed of "
                                  f"{length} tokens; pass img_size=... or arch='<timm model name>'")
        no_embed_class, side = fits[0]
        if no_embed_class and prefix:
            kwargs["no_embed_class"] = True
        kwargs["img_size"] = side * ph if ph == pw else (side * ph, side * pw)

    if swiglu:
        name = "vit_giant_patch14_reg4_dinov2" if reg_tokens == 4 else "vit_giant_patch14_dinov2"
        return name, kwargs
    return None, kwargs


def is_torchvision_vit(state_dict: dict[str, Any]) -> bool:
    """Keys of a torchvision ``VisionTransformer`` (``conv_proj``, ``encoder.pos_embedding``, ``class_token``)."""
    return "encoder.pos_embedding" in state_dict and "class_token" in state_dict


def infer_torchvision_kwargs(
    state_dict: dict[str, Any], num_heads: int | None = None, source: str = "checkpoint"
) -> dict[str, Any]:
    """``torchvision.models.VisionTransformer`` keyword arguments that fit a state dict, from its shapes."""
    sd = state_dict
    proj = sd.get("conv_proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.ndim != 4:
        raise CheckpointError(f"{source}: torchvision ViT without a conv patch embedding 'conv_proj.weight' "
                              "(conv-stem models): pass arch='<torchvision builder name>'")
    hidden, _, patch, _ = (int(d) for d in proj.shape)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", k))}
    if not layers or layers != set(range(max(layers) + 1)):
        raise CheckpointError(f"{source}: encoder layers 'encoder.layers.encoder_layer_<i>.*' missing or not "
                              f"numbered 0..depth-1 (found {sorted(layers)[:8]})")
    if num_heads is None:
        if hidden not in NUM_HEADS:
            raise CheckpointError(f"{source}: cannot infer the number of attention heads for width {hidden}; "
                                  "pass num_heads=...")
        num_heads = NUM_HEADS[hidden]
    side = _square_side(int(sd["encoder.pos_embedding"].shape[1]) - 1)
    if side is None:
        raise CheckpointError(f"{source}: cannot infer the image size from encoder.pos_embedding; pass image_size=")
    first = "encoder.layers.encoder_layer_0.mlp."
    mlp = sd.get(first + "0.weight", sd.get(first + "linear_1.weight"))  # torchvision's MLP keys, new and legacy
    kwargs: dict[str, Any] = {
        "image_size": side * patch,
        "patch_size": patch,
        "num_layers": len(layers),
        "num_heads": num_heads,
        "hidden_dim": hidden,
        "mlp_dim": int(mlp.shape[0]),
        "num_classes": int(sd["heads.head.weight"].shape[0]) if "heads.head.weight" in sd else 1000,
    }
    if "heads.pre_logits.weight" in sd:
        kwargs["representation_size"] = int(sd["heads.pre_logits.weight"].shape[0])
    return kwargs


def _load_torchvision_file(model_cls: type[M], state_dict: dict[str, Any], source: str, arch: str | None,
                           kwargs: dict[str, Any]) -> M:
    inferred = infer_torchvision_kwargs(state_dict, kwargs.get("num_heads"), source)
    if arch is not None:  # a builder (vit_b_16...) fixes the architecture; size and classes come from the file
        inferred = {k: inferred[k] for k in ("image_size", "num_classes")}
    build = {"family": "torchvision", "torchvision_name": arch, "torchvision_kwargs": {**inferred, **kwargs}}
    backbone = build_backbone(build)
    model = model_cls(backbone, build=build, meta={"loaded_from": source, "source_format": "torchvision"})
    _load_into(model.backbone, state_dict, source)
    return model.eval()


def model_from_torchvision(model_cls: type[M], name: str, /, *, checkpoint: str | os.PathLike | None = None,
                           **kwargs: Any) -> M:
    """``torchvision.models.get_model(name, weights=None, **kwargs)`` as a ``model_cls``, with the weights of
    a local state-dict ``checkpoint`` if given (read with ``weights_only=True``). No downloads."""
    build = {"family": "torchvision", "torchvision_name": name, "torchvision_kwargs": dict(kwargs)}
    model = model_cls(build_backbone(build), build=build)
    if checkpoint is not None:
        source = str(checkpoint)
        state_dict, _ = extract_state_dict(read_checkpoint(checkpoint), source)
        _load_into(model.backbone, state_dict, source)
        model.meta.update({"loaded_from": source, "source_format": "torchvision"})
    return model.eval()


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
            prefix = saved.get("family") if saved.get("family") in ("torchvision", "monai") else "timm"
            build = {**saved, f"{prefix}_name": arch or saved.get(f"{prefix}_name"),
                     f"{prefix}_kwargs": {**(saved.get(f"{prefix}_kwargs") or {}), **timm_kwargs}}
            obj = {**obj, "backbone": build}
        try:
            return build_model_from_payload(model_cls, obj, source=source)
        except KeyError as err:
            raise CheckpointError(f"{source}: incomplete lidc-cdam checkpoint (no {err})") from None

    state_dict, fmt = extract_state_dict(obj, source)
    if is_torchvision_vit(state_dict):
        return _load_torchvision_file(model_cls, state_dict, source, arch, timm_kwargs)
    if arch is None and "patch_embed.proj.weight" not in state_dict:
        raise CheckpointError(f"{source}: not a Vision Transformer state dict (no "
                              f"'patch_embed.proj.weight'); {_UNDERSTOOD}")
    if arch is not None:
        kwargs = {"num_classes": int(state_dict["head.weight"].shape[0])
                  if "head.weight" in state_dict else 0, **timm_kwargs}
        name: str | None = arch
    else:
        name, kwargs = infer_vit_kwargs(state_dict, timm_kwargs.get("num_heads"), source)
        kwargs.update(timm_kwargs)
        if name is not None:
            kwargs.pop("mlp_ratio", None)  # SwiGLU: the timm model name sets it
    build = {"timm_name": name, "timm_kwargs": kwargs}
    backbone = build_backbone(build)
    model = model_cls(
        backbone,
        task="features" if backbone.num_classes == 0 else "classification",
        build=build,
        meta={"loaded_from": source, "source_format": fmt},
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
    download = pretrained and checkpoint is None
    try:
        backbone = timm.create_model(name, pretrained=download, **kwargs)
    except OSError as err:  # huggingface_hub / urllib errors are all OSErrors
        if not download:
            raise
        raise PretrainedWeightsUnavailable(
            f"could not get the pretrained weights of timm model {name!r} "
            f"({err.__class__.__name__}: {_first_line(err)}). Without network access, fetch the "
            f"weights file elsewhere and pass it: ViTModel.from_timm({name!r}, checkpoint=PATH), "
            f"or on the command line --model {name} --checkpoint PATH. (Set HF_HUB_OFFLINE=1 to "
            "fail at once instead of retrying the download.)"
        ) from err
    model = model_cls(
        backbone,
        task="features" if getattr(backbone, "num_classes", 1) == 0 else "classification",
        build={"timm_name": name, "timm_kwargs": dict(kwargs)},
    )
    if checkpoint is not None:
        source = str(checkpoint)
        state_dict, fmt = extract_state_dict(read_checkpoint(checkpoint), source)
        _load_into(model.backbone, state_dict, source)
        model.meta.update({"loaded_from": source, "source_format": fmt})
    return model.eval()


def model_from_onnx(model_cls: type[M], path: str | os.PathLike, /, *, image_size: int | tuple[int, int] | None = None,
                    num_heads: int | None = None, **kwargs: Any) -> M:
    """A Hugging Face ViT / DINOv2 exported to ONNX as a feature model (``task="features"``) on a timm
    ``VisionTransformer`` (:mod:`lidc_cdam.models.onnx_import`); ``kwargs`` go to ``model_cls``."""
    from lidc_cdam.models.onnx_import import OnnxImportError, timm_backbone_from_onnx

    try:
        backbone, build, read = timm_backbone_from_onnx(path, image_size=image_size, num_heads=num_heads)
    except OnnxImportError as err:
        raise CheckpointError(str(err)) from None
    meta = {"loaded_from": str(path), "source_format": f"onnx ({read.family}, transformers)",
            "onnx_unused_initializers": len(read.unused), **dict(kwargs.pop("meta", None) or {})}
    kwargs.setdefault("task", "features")
    return model_cls(backbone, build=build, meta=meta, **kwargs)
