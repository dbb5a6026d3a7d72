"""Train the demo models with the project's own code and write them as the package's shipped weights.

A maintainer's job, run once and committed (training is not bit-identical across CPUs, so every
committed result is computed from these files, never from a model trained during a test run):

    python -m lidc_cdam.pipelines.ship_demo_weights --out lidc_cdam/models/weights

* ``digits-vit.pt``: :func:`lidc_cdam.train.digits.train_digits_vit` with the default config;
* ``phantom-malignancy.pt`` / ``phantom-biomarkers.pt``: the LIDC demo's two models, fold 0 of the
  phantoms of every nodule (``lidc-cdam demo --retrain`` runs the same training). ``--from-runs BIO MAL``
  ships fold 0 of two finished ``lidc-cdam train`` runs instead of training again; each run's config must be
  the preset's (:func:`check_preset_run`) and its phantoms those of the current render version:

      python -m lidc_cdam.pipelines.ship_demo_weights --out lidc_cdam/models/weights --only phantoms \
          --from-runs runs/tiny-bio runs/tiny-mal

Each file is a lidc-cdam checkpoint (tensors and plain values; loads with ``weights_only=True``),
and ``MANIFEST.json`` records its SHA-256, size, how it was trained and its test metrics.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def _entry(path: Path, trained: dict[str, Any], test_metrics: dict[str, Any], summary: str = "") -> dict[str, Any]:
    from lidc_cdam.models.demo_weights import sha256_of

    return {"file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size, "trained": trained,
            "test_metrics": test_metrics, "summary": summary}


def _strip(model) -> None:
    """Keep what a user of the model needs; drop run-local paths."""
    for key in ("checkpoint_path", "cache_path", "run_dir", "loaded_from"):
        model.meta.pop(key, None)


def ship_digits(out: Path, progress: bool) -> dict[str, Any]:
    from lidc_cdam.models.loading import save_checkpoint
    from lidc_cdam.train.digits import DigitsTrainConfig, train_digits_vit

    config = DigitsTrainConfig()
    model, report = train_digits_vit(config, progress=progress)
    _strip(model)
    path = save_checkpoint(model, out / "digits-vit.pt")
    trained = {"code": "lidc_cdam.train.digits.train_digits_vit", "config": config.to_dict(),
               "config_hash": config.hash(), "train_seconds": round(report["train_seconds"], 1)}
    return _entry(path, trained, report["test_metrics"])


#: config entries a finished run may differ in from its preset: where its data and starting backbone lay
RUN_LOCAL_KEYS = (("data", "root"), ("backbone", "checkpoint"), ("source_file",), ("folds",))


def _without_run_local(config: dict[str, Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(config, default=str))
    for keys in RUN_LOCAL_KEYS:
        parent = config
        for key in keys[:-1]:
            parent = parent.get(key, {})
        parent.pop(keys[-1], None)
    return config


def check_preset_run(run: Path, task: str) -> dict[str, Any]:
    """The fold-0 run of ``lidc-cdam train`` in ``run`` as :func:`trained_demo_models` returns it, after checking
    that it is the ``tiny-phantom-<task>`` preset (up to :data:`RUN_LOCAL_KEYS`) trained on phantoms of
    the current render version. Raises ValueError naming the file and what differs."""
    from lidc_cdam.data.lidc.phantom_render import RENDER_VERSION
    from lidc_cdam.resources import config_dir
    from lidc_cdam.train.config import load_train_config
    from lidc_cdam.train.cross_validation import fold_summary_markdown

    summary_file, checkpoint = run / "summary.json", run / "fold0" / "best.pt"
    for path in (summary_file, checkpoint, run / "fold0" / "result.json", run / "per_fold.csv"):
        if not path.is_file():
            raise ValueError(f"{path}: missing; is {run} a finished `lidc-cdam train` run with fold 0?")
    used = json.loads(summary_file.read_text())["config"]
    preset = load_train_config(config_dir("train") / f"tiny-phantom-{task}.yaml").to_dict()
    used_core, preset_core = _without_run_local(used), _without_run_local(preset)
    if used_core != preset_core:
        differ = sorted(key for key in set(used_core) | set(preset_core) if used_core.get(key) != preset_core.get(key))
        raise ValueError(f"{summary_file}: not the tiny-phantom-{task} preset (differs in {', '.join(differ)}); "
                         "train with the preset, or change the preset first")
    phantoms = Path(used["data"]["root"]) / "summary.json"
    settings = json.loads(phantoms.read_text()).get("settings", {}) if phantoms.is_file() else {}
    if settings.get("render_version") != RENDER_VERSION:
        raise ValueError(f"{phantoms}: the run's phantoms are render version {settings.get('render_version')}, "
                         f"not the current {RENDER_VERSION}")
    return {"config": used, "checkpoint": checkpoint, "summary": fold_summary_markdown(run, 0)}


def check_same_fold_start(finished: dict[str, dict[str, Any]]) -> None:
    """The malignancy run must have started from the shipped biomarker run's fold 0 (as :func:`trained_demo_models`
    trains them), so that the pair's provenance is one chain."""
    start = finished["malignancy"]["config"]["backbone"].get("checkpoint") or ""
    start_path = Path(start.replace("{fold}", "0"))
    if not start or start_path.resolve() != Path(finished["biomarkers"]["checkpoint"]).resolve():
        raise ValueError(f"the malignancy run started from {start or 'scratch'!r}, not from the biomarker run's "
                         f"{finished['biomarkers']['checkpoint']}")


def ship_phantom_models(out: Path, progress: bool, runs: dict[str, Path] | None = None) -> dict[str, dict[str, Any]]:
    """Train both phantom models (fold 0 of the phantoms of every nodule, :func:`trained_demo_models`), or take
    them from finished preset ``runs`` (task -> run folder, :func:`check_preset_run`), and ship them: their
    provenance and trust flag come from the training itself."""
    from lidc_cdam.pipelines.demo_lidc import DEMO_SCANS, TASKS, demo_phantoms, trained_demo_models

    from lidc_cdam.models.loading import load_model, save_checkpoint

    if runs is None:
        finished = trained_demo_models(demo_phantoms(progress, DEMO_SCANS), progress)
    else:
        finished = {task: check_preset_run(runs[task], task) for task in TASKS}
        check_same_fold_start(finished)
    entries = {}
    for task, run in finished.items():
        model = load_model(run["checkpoint"])
        _strip(model)
        path = save_checkpoint(model, out / f"phantom-{task}.pt")
        result = json.loads((Path(run["checkpoint"]).parent / "result.json").read_text())
        code = ("lidc_cdam.pipelines.demo_lidc.trained_demo_models" if runs is None else
                "lidc-cdam train (the preset, fold 0; shipped with ship_demo_weights --from-runs)")
        trained = {"code": code,
                   "config": f"pipelines/configs/train/tiny-phantom-{task}.yaml", "folds": [0],
                   "phantom_scans": DEMO_SCANS or "all", "train_seconds": round(result["seconds"], 1),
                   "note": "phantoms rendered from LIDC annotations, every biomarker a rendered cause: NOT CT",
                   "trust": "meta['trust']: version 3 (lidc_cdam.models.domain_trust), fitted by the trainer on the "
                            "fold 0 training crops; meta['provenance']: written by the trainer"}
        metrics = {"fold": 0, "best_epoch": model.meta.get("epoch"), "val_metrics": model.meta.get("val_metrics"),
                   "test_metrics": result.get("test_metrics"), "train_size": result["train_size"],
                   "val_size": result["val_size"]}
        entries[f"phantom-{task}"] = _entry(path, trained, metrics, run["summary"])
    return entries


def _save_payload(payload: dict[str, Any], path: Path, before: dict[str, torch.Tensor]) -> None:
    from lidc_cdam.io import save_torch

    after = payload["state_dict"]
    if set(after) != set(before) or any(not torch.equal(after[k], before[k]) for k in before):
        raise RuntimeError(f"{path}: the weights would change; refusing")
    save_torch(path, payload)


def refit_trust(out: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Refit the phantom models' trust flag (``meta["trust"]``, the current version of
    :mod:`lidc_cdam.models.domain_trust`) on their fold-0 training crops of the demo's phantoms; everything
    else in the files (weights, provenance, ``meta["trust_latent"]``) unchanged. Returns the manifest changes."""
    from lidc_cdam.pipelines.demo_lidc import DEMO_SCANS, demo_phantoms

    from lidc_cdam.evaluate.trust_shift import fold_crops
    from lidc_cdam.models.demo_weights import sha256_of
    from lidc_cdam.models.domain_trust import fit_from_crops
    from lidc_cdam.models.loading import load_model

    train = fold_crops(demo_phantoms(progress, DEMO_SCANS), 0, "train")
    changes: dict[str, dict[str, Any]] = {}
    for name in ("phantom-malignancy", "phantom-biomarkers"):
        path = out / f"{name}.pt"
        payload = torch.load(path, map_location="cpu", weights_only=True)
        before = {k: v.clone() for k, v in payload["state_dict"].items()}
        meta = payload["meta"]
        meta["trust"] = fit_from_crops(load_model(path), train.crops, meta["input_stats"])
        meta["trust"]["data"] = {"phantom_scans": DEMO_SCANS or "all", "fold": 0, "part": "train"}
        _save_payload(payload, path, before)
        changes[name] = {"sha256": sha256_of(path), "bytes": path.stat().st_size}
    return changes


def main(argv: list[str] | None = None) -> int:
    from lidc_cdam.io import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the weights folder (lidc_cdam/models/weights)")
    parser.add_argument("--only", choices=("digits", "phantoms"), help="rebuild one family, keep the other's entries")
    parser.add_argument("--from-runs", nargs=2, type=Path, metavar=("BIOMARKER_RUN", "MALIGNANCY_RUN"),
                        help="ship fold 0 of these finished preset runs (`lidc-cdam train --out`) instead of training")
    parser.add_argument("--refit-trust", action="store_true",
                        help="no training: refit the phantom models' trust flag (the current version) in --out, "
                             "weights and provenance unchanged, and re-record their SHA-256")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_file = args.out / "MANIFEST.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    progress = sys.stderr.isatty()
    if args.refit_trust:
        from lidc_cdam.models.domain_trust import TRUST_VERSION

        for name, change in refit_trust(args.out, progress).items():
            manifest[name].update(change)
            manifest[name].setdefault("trained", {})["trust"] = (
                f"meta['trust']: version {TRUST_VERSION} (lidc_cdam.models.domain_trust), fitted afterwards "
                "(ship_demo_weights --refit-trust) on the fold 0 training crops of the same phantoms; "
                "meta['trust_latent']: the version-1 statistics (lidc_cdam.models.trust); weights unchanged")
        write_json(manifest_file, dict(sorted(manifest.items())))
        return 0
    if args.only in (None, "digits"):
        manifest["digits-vit"] = ship_digits(args.out, progress)
    if args.only in (None, "phantoms"):
        runs = dict(zip(("biomarkers", "malignancy"), args.from_runs, strict=True)) if args.from_runs else None
        manifest.update(ship_phantom_models(args.out, progress, runs))
    for entry in manifest.values():
        entry.setdefault("trained", {}).update(
            {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()})
    write_json(manifest_file, dict(sorted(manifest.items())))
    for name, entry in sorted(manifest.items()):
        print(f"{name:20s} {entry['bytes'] / 1e6:6.2f} MB  sha256 {entry['sha256'][:16]}...  {entry['test_metrics']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
