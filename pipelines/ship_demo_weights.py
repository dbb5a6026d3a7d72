"""Train the demo models with the project's own code and write them as the package's shipped weights.

A maintainer's job, run once and committed (training is not bit-identical across CPUs, so every
committed result is computed from these files, never from a model trained during a test run):

    python -m lidc_cdam.pipelines.ship_demo_weights --out lidc_cdam/models/weights

* ``digits-vit.pt``: :func:`lidc_cdam.train.digits.train_digits_vit` with the default config;
* ``phantom-malignancy.pt`` / ``phantom-biomarkers.pt``: the LIDC demo's two models, fold 0 of the
  phantoms of every nodule (``lidc-cdam demo --retrain`` runs the same training).

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


def ship_phantom_models(out: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Train both phantom models (fold 0 of the phantoms of every nodule, :func:`trained_demo_models`) and
    ship them: their provenance and trust flag come from the training itself."""
    from lidc_cdam.pipelines.demo_lidc import DEMO_SCANS, demo_phantoms, trained_demo_models

    from lidc_cdam.models.loading import load_model, save_checkpoint

    phantoms = demo_phantoms(progress, DEMO_SCANS)
    entries = {}
    for task, run in trained_demo_models(phantoms, progress).items():
        model = load_model(run["checkpoint"])
        _strip(model)
        path = save_checkpoint(model, out / f"phantom-{task}.pt")
        result = json.loads((Path(run["checkpoint"]).parent / "result.json").read_text())
        trained = {"code": "lidc_cdam.pipelines.demo_lidc.trained_demo_models",
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
    from lidc_cdam.io import atomic_write

    after = payload["state_dict"]
    if set(after) != set(before) or any(not torch.equal(after[k], before[k]) for k in before):
        raise RuntimeError(f"{path}: the weights would change; refusing")
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


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
        manifest.update(ship_phantom_models(args.out, progress))
    for entry in manifest.values():
        entry.setdefault("trained", {}).update(
            {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()})
    write_json(manifest_file, dict(sorted(manifest.items())))
    for name, entry in sorted(manifest.items()):
        print(f"{name:20s} {entry['bytes'] / 1e6:6.2f} MB  sha256 {entry['sha256'][:16]}...  {entry['test_metrics']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
