"""The LIDC cohort evaluation, its files: the output folder's check against another run's, each part's rows
(written atomically, the ``.json`` last as its done-marker), the concept vectors, and at the end the merged tables,
the cached randomisation check and the report (:mod:`lidc_cdam.evaluate.cohort_report`), and on phantoms the
ground-truth test of the per-target maps (:mod:`lidc_cdam.evaluate.cause_report`, ``OUT/causes/`` by default)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lidc_cdam.evaluate.cause_report import cause_rows, example_nodule, has_causes, write_cause_report
from lidc_cdam.evaluate.cohort_compute import cause_example, randomization_rows
from lidc_cdam.evaluate.cohort_plan import CohortError, CohortModel, CohortSettings
from lidc_cdam.evaluate.cohort_report import write_cohort_report
from lidc_cdam.evaluate.runner import write_parquet
from lidc_cdam.explain.targets import Concept
from lidc_cdam.io import atomic_write, save_torch, write_json


def check_out(out: Path, print_: str, restart: bool) -> None:
    run_file = out / "run.json"
    if run_file.exists() and not restart:
        previous = json.loads(run_file.read_text()).get("fingerprint")
        if previous != print_:
            raise CohortError(f"{run_file}: holds results of another run (fingerprint {previous}, now {print_}: other "
                              "checkpoints, data, folds or settings); use another --out or --restart")
    if restart and (out / "parts").exists():
        shutil.rmtree(out / "parts")
    if restart or not run_file.exists():
        # the randomisation check is cached beside the parts; one without this run's run.json (a committed folder's,
        # or another run's) describes other models
        (out / "randomization.csv").unlink(missing_ok=True)


def save_concepts(path: Path, vectors: dict[str, list[Concept]]) -> Path:
    """The concept vectors of a run (``{"fold<k>/<model>": [Concept]}``) as plain tensors (``concepts.pt``)."""
    payload = {key: {"names": [c.name for c in cs], "similarity": [c.similarity for c in cs],
                     "vectors": torch.stack([c.vector.float().cpu() for c in cs]) if cs else torch.zeros(0)}
               for key, cs in vectors.items()}
    return save_torch(path, payload)


def write_part(folder: Path, part: int, metrics: list[dict[str, Any]], correlations: list[dict[str, Any]],
               info: dict[str, Any]) -> None:
    """One part's rows, then its ``.json`` (timing, nodules): the marker that the part is done."""
    write_parquet(pd.DataFrame(metrics), folder / f"part_{part:05d}.metrics.parquet")
    write_parquet(pd.DataFrame(correlations), folder / f"part_{part:05d}.correlations.parquet")
    write_json(folder / f"part_{part:05d}.json", info)


def merge_parts(out: Path, plan: dict[int, list[CohortModel]]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Metric rows, correlation rows and the timing rows (one per part and model) of every finished part."""
    metrics, correlations, timing = [], [], []
    for fold in plan:
        folder = out / "parts" / f"fold{fold}"
        for marker in sorted(folder.glob("part_*.json")):
            stem = marker.name[: -len(".json")]
            metrics.append(pd.read_parquet(folder / f"{stem}.metrics.parquet"))
            correlations.append(pd.read_parquet(folder / f"{stem}.correlations.parquet"))
            info = json.loads(marker.read_text())
            for name, t in info["models"].items():
                timing.append({"fold": fold, "part": stem, "model": name, "nodules": info["nodules"],
                               "targets": t["targets"], "forward_seconds": t["forward_seconds"],
                               "explain_seconds": sum(t["explain_seconds"].values()),
                               **{f"explain_seconds_{m}": s for m, s in t["explain_seconds"].items()},
                               "evaluate_seconds": t["evaluate_seconds"],
                               "evaluate_forward_images": t["evaluate_forward_images"],
                               "per_image_forward_seconds": t["per_image_forward_seconds"]})

    def cat(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    return cat(metrics), cat(correlations), pd.DataFrame(timing)


def randomization_check(out: Path, plan: dict[int, list[CohortModel]], table: pd.DataFrame, data_root: Path,
                        settings: CohortSettings, device: torch.device, fixed: dict[str, list[Concept]] | None = None,
                        fixed_source: str = "") -> pd.DataFrame | None:
    """:func:`~lidc_cdam.evaluate.cohort_compute.randomization_rows`, cached in ``randomization.csv``."""
    path = out / "randomization.csv"
    if settings.randomization_nodules < 1:
        return None
    if path.exists():
        return pd.read_csv(path)
    frame = randomization_rows(plan, table, data_root, settings, device, fixed, fixed_source)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return frame


def finish(out: Path, plan: dict[int, list[CohortModel]], table: pd.DataFrame, settings: CohortSettings,
           device: torch.device, fixed: dict[str, list[Concept]] | None = None, fixed_source: str = "",
           causes_out: Path | None = None) -> dict[str, Any]:
    """Merge the parts, run the randomisation check, write the tables and figures; where the crops carry cause
    regions, the cause report into ``causes_out`` (default ``out / "causes"``)."""
    metrics, correlations, timing = merge_parts(out, plan)
    for name, frame in (("metrics", metrics), ("correlations", correlations), ("timing", timing)):
        write_parquet(frame, out / f"{name}.parquet")
        atomic_write(out / f"{name}.csv", lambda tmp, frame=frame: frame.to_csv(tmp, index=False))
    run = json.loads((out / "run.json").read_text())
    randomization = randomization_check(out, plan, table, Path(run["data"]), settings, device, fixed, fixed_source)
    summary = write_cohort_report(out, metrics, correlations, timing, randomization, run)
    if has_causes(metrics):
        summary["causes"] = cause_report(Path(causes_out or out / "causes"), metrics, plan, table, settings, device,
                                         run)
    return summary


def cause_report(folder: Path, metrics: pd.DataFrame, plan: dict[int, list[CohortModel]], table: pd.DataFrame,
                 settings: CohortSettings, device: torch.device, run: dict[str, Any]) -> dict[str, Any]:
    """The cause report, its figure's maps recomputed on the nodule with the most cause regions."""
    rows = cause_rows(metrics)
    nodule = example_nodule(rows)
    example = None
    if nodule is not None:
        fold = int(rows.loc[rows["nodule_id"] == nodule, "fold"].iloc[0])
        models = [cm for cm in plan[fold] if cm.name in set(rows["model"])]
        example = cause_example(models, Path(run["data"]), table, nodule, settings, device)
    return write_cause_report(folder, metrics, run, example)
