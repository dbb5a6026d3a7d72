"""Fine-tuning configuration (``pipelines/configs/train/<backbone>-<task>.yaml``): backbone, task,
data, optimisation (paper sections 5.1, 5.2, A.5.2; docs/method.md, "Data"), checked when read.

``--set key.sub=value`` overrides single values, as for the benchmark configs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lidc_cdam.config_overrides import read_yaml_config

TASKS = ("malignancy", "biomarkers")
LOSSES = ("bce", "huber", "mse")
SCHEDULES = ("none", "exponential", "cyclic")
VIEWS = ("axial", "coronal", "sagittal", "3d")  # "3d": the whole 32^3 crop, for a 3D backbone
ROTATIONS = ("quarter", "any")  # the training rotations (lidc_cdam.data.lidc.datasets.ROTATIONS)
BACKBONE_INITS = ("timm", "mimetic")  # a new timm ViT's attention weights (lidc_cdam.train.mimetic_init)


class TrainConfigError(ValueError):
    """A training config that cannot be run; the message names the file and the key."""


@dataclass
class BackboneConfig:
    """A timm ViT by name (``vit_small_patch8_224.dino``, ``deit_small_patch16_224``,
    ``vit_small_patch14_reg4_dinov2``...) with weights from a local ``checkpoint`` (our format, the
    official DINO / DINOv2 files, a timm state dict) or, online, ``pretrained: true``; or, without a
    name, a new ViT from ``timm_kwargs`` (tests, the demo); or a new MONAI ``ViT`` from ``monai_kwargs``
    (``classification=True`` implied; 3D with ``data.view: 3d``), trained from scratch (``random_init``)."""

    name: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    monai_kwargs: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False  # train from scratch (tests, the demo); otherwise weights are required
    drop_rate: float = 0.0  # dropout inside the backbone: token embeddings, attention / MLP projections
    drop_path_rate: float = 0.0
    init: str = "timm"  # a new timm ViT's attention: timm's random weights, or "mimetic" (train.mimetic_init)


@dataclass
class DataConfig:
    """Preprocessed nodules (``lidc-cdam preprocess`` or ``lidc-cdam phantoms`` output) and folds."""

    root: str = ""
    folds: str | None = None  # CSV nodule_id,fold; default: the root's folds.csv, else data_manifest/lidc_folds.csv
    view: str = "axial"  # or "3d": the whole crop as [1, S, S, S] (S = image_size), for a 3D backbone
    image_size: int = 224
    augment: bool = True  # random slice 14-18 and random in-plane rotations when training
    rotation: str = "quarter"  # "quarter": multiples of 90 degrees; "any": any angle and a mirror (ROTATIONS)
    variants: bool = False  # also train on the phantoms' training variants (lidc-cdam phantoms --variants K)
    num_workers: int = 0


@dataclass
class ScheduleConfig:
    """``exponential``: lr * gamma^epoch (the paper's alpha = 3e-4, beta = 0.95); ``cyclic``:
    torch's CyclicLR between ``base_lr`` and ``max_lr`` (stepped per iteration); ``none``."""

    type: str = "exponential"
    gamma: float = 0.95
    base_lr: float = 1e-5
    max_lr: float = 3e-4
    step_size_up: int = 200
    mode: str = "triangular2"


@dataclass
class TrainConfig:
    name: str
    task: str
    backbone: BackboneConfig
    data: DataConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: str | None = None  # default: bce (malignancy), huber (biomarkers)
    # biomarkers: a weight per target in the loss (default 1 each; the loss is the weighted mean over targets;
    # the best checkpoint is still the one of the plain mean validation MSE)
    target_weights: dict[str, float] = field(default_factory=dict)
    epochs: int = 50
    batch_size: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.0
    head_dropout: float = 0.0
    trainable_blocks: int | None = None  # fine-tune the last N blocks (+ final norm + head); None: all
    trainable_last_params: int | None = None  # the authors' variant: the last N parameter tensors
    early_stopping: int = 0  # patience in epochs (0: off)
    # True / "auto": bf16 autocast (fp16 + gradient scaler without bf16) on a GPU, float32 on the CPU;
    # "bf16", "fp16" (any device), "none" / False: float32
    amp: bool | str = True
    seed: int = 0
    folds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    max_train_batches: int | None = None  # cap per epoch (quick checks)
    source_file: str = ""

    @property
    def loss_name(self) -> str:
        return self.loss or ("bce" if self.task == "malignancy" else "huber")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_fold(self, fold: int) -> TrainConfig:
        """This config for one fold: ``{fold}`` in ``backbone.checkpoint`` becomes the fold's number, so that each
        fold starts from a backbone trained on that fold's own training part (the phantom malignancy model starts
        from the phantom biomarker model of the same fold)."""
        checkpoint = self.backbone.checkpoint
        if not checkpoint or "{fold}" not in checkpoint:
            return self
        return replace(self, backbone=replace(self.backbone, checkpoint=checkpoint.replace("{fold}", str(fold))))

    def fingerprint(self) -> str:
        data = self.to_dict()
        data.pop("source_file")
        data.pop("folds")
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def with_changes(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


def _section(cls: type, data: Any, where: str, file: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{file}: {where} must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise TrainConfigError(f"{file}: unknown key(s) {sorted(unknown)} in {where}; known: {sorted(known)}")
    return cls(**data)


def parse_folds(text: str | list[int]) -> list[int]:
    """``"0-4"``, ``"0,2"`` or a list: fold indices."""
    if isinstance(text, list):
        return [int(f) for f in text]
    folds: list[int] = []
    for part in str(text).split(","):
        lo, _, hi = part.partition("-")
        folds.extend(range(int(lo), int(hi or lo) + 1))
    return folds


def config_from_dict(data: dict[str, Any], file: str = "<config>") -> TrainConfig:
    data = dict(data)
    data.pop("description", None)
    for key in ("name", "task", "backbone", "data"):
        if key not in data:
            raise TrainConfigError(f"{file}: missing required key {key!r}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(data) - known
    if unknown:
        raise TrainConfigError(f"{file}: unknown top-level key(s) {sorted(unknown)}")
    config = TrainConfig(
        **{**data, "backbone": _section(BackboneConfig, data["backbone"], "backbone", file),
           "data": _section(DataConfig, data["data"], "data", file),
           "schedule": _section(ScheduleConfig, data.get("schedule"), "schedule", file),
           "folds": parse_folds(data.get("folds", [0, 1, 2, 3, 4])), "source_file": file})
    check(config)
    return config


def check(config: TrainConfig) -> None:
    file = config.source_file or "<config>"
    if config.task not in TASKS:
        raise TrainConfigError(f"{file}: task must be one of {TASKS}, got {config.task!r}")
    if config.loss_name not in LOSSES:
        raise TrainConfigError(f"{file}: loss must be one of {LOSSES}, got {config.loss!r}")
    if config.task == "malignancy" and config.loss_name != "bce":
        raise TrainConfigError(f"{file}: malignancy is binary: use loss bce")
    if config.target_weights:
        from lidc_cdam.data.lidc.nodules import BIOMARKERS

        unknown = sorted(set(config.target_weights) - set(BIOMARKERS))
        if config.task != "biomarkers" or unknown:
            raise TrainConfigError(f"{file}: target_weights weigh the biomarkers {list(BIOMARKERS)}"
                                   + (f"; unknown: {unknown}" if unknown else f", not task {config.task!r}"))
        if any(not float(w) > 0 for w in config.target_weights.values()):
            raise TrainConfigError(f"{file}: target_weights must be positive, got {config.target_weights}")
    if config.schedule.type not in SCHEDULES:
        raise TrainConfigError(f"{file}: schedule.type must be one of {SCHEDULES}")
    if config.data.view not in VIEWS:
        raise TrainConfigError(f"{file}: data.view must be one of {VIEWS}")
    if config.data.rotation not in ROTATIONS:
        raise TrainConfigError(f"{file}: data.rotation must be one of {ROTATIONS}, got {config.data.rotation!r}")
    if config.amp not in (True, False, "auto", "bf16", "fp16", "none"):
        raise TrainConfigError(f"{file}: amp must be true, false, auto, bf16, fp16 or none, got {config.amp!r}")
    if not (config.backbone.name or config.backbone.timm_kwargs or config.backbone.checkpoint
            or config.backbone.monai_kwargs):
        raise TrainConfigError(f"{file}: backbone needs a timm name, a checkpoint, timm_kwargs or monai_kwargs")
    b = config.backbone
    if b.monai_kwargs:
        _check_monai(config, file)
    elif config.data.view == "3d":
        raise TrainConfigError(f"{file}: data.view 3d needs a 3D backbone (backbone.monai_kwargs)")
    if b.name and not (b.checkpoint or b.pretrained or b.random_init):
        raise TrainConfigError(
            f"{file}: backbone {b.name} has no weights: set backbone.checkpoint=FILE (a local DINO / DINOv2 / "
            "timm file), or pretrained: true where the hub is reachable, or random_init: true to train from scratch")
    if b.init not in BACKBONE_INITS:
        raise TrainConfigError(f"{file}: backbone.init must be one of {list(BACKBONE_INITS)}, got {b.init!r}")
    if b.init == "mimetic" and (b.monai_kwargs or b.checkpoint or b.pretrained or not b.random_init):
        raise TrainConfigError(f"{file}: backbone.init mimetic initialises a new timm ViT trained from scratch: "
                               "it needs random_init: true and no checkpoint, pretrained weights or monai_kwargs")
    if config.trainable_blocks is not None and config.trainable_last_params is not None:
        raise TrainConfigError(f"{file}: give trainable_blocks or trainable_last_params, not both")
    if config.epochs < 1 or config.batch_size < 1:
        raise TrainConfigError(f"{file}: epochs and batch_size must be positive")
    if any(f not in range(5) for f in config.folds):
        raise TrainConfigError(f"{file}: folds are 0-4, got {config.folds}")


def _check_monai(config: TrainConfig, file: str) -> None:
    b = config.backbone
    if b.name or b.timm_kwargs or b.checkpoint or b.pretrained:
        raise TrainConfigError(f"{file}: backbone.monai_kwargs builds a new MONAI ViT: give no timm name, "
                               "timm_kwargs, checkpoint or pretrained with it")
    if not b.random_init:
        raise TrainConfigError(f"{file}: a MONAI ViT has no pretrained weights here: set backbone.random_init: true")
    if b.drop_path_rate:
        raise TrainConfigError(f"{file}: a MONAI ViT has no drop path: backbone.drop_path_rate must be 0")
    dims = int(b.monai_kwargs.get("spatial_dims", 3))
    if (dims == 3) != (config.data.view == "3d"):
        raise TrainConfigError(f"{file}: a {dims}D MONAI ViT needs data.view "
                               f"{'3d' if dims == 3 else 'axial, coronal or sagittal'}, got {config.data.view!r}")
    size = b.monai_kwargs.get("img_size")
    sizes = list(size) if isinstance(size, list | tuple) else [size] * dims
    if any(int(s) != config.data.image_size for s in sizes):
        raise TrainConfigError(f"{file}: backbone.monai_kwargs.img_size {size} does not match data.image_size "
                               f"{config.data.image_size}")
    if int(b.monai_kwargs.get("in_channels", 1)) != (1 if dims == 3 else 3):
        raise TrainConfigError(f"{file}: backbone.monai_kwargs.in_channels must be {1 if dims == 3 else 3} "
                               f"(the {'3d crop has 1 channel' if dims == 3 else 'slice is repeated to 3 channels'})")


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    file = str(path)
    data = read_yaml_config(path, overrides, TrainConfigError)
    try:
        return config_from_dict(data, file)
    except TypeError as err:
        raise TrainConfigError(f"{file}: {err}") from None
