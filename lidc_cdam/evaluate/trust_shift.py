"""How well the trust flag catches a real change of domain: real CT against models trained on phantoms.

The out-of-domain side is crops of a real chest CT (the test fixture ``tests/data/lung1``, pyradiomics' lung1):
its labelled nodule and :data:`N_POINTS` points drawn at random (seeded) in the lung (HU below -400 at the point)
and in soft tissue (HU in [-100, 150]: mediastinum and chest wall). The in-domain side is the held-out test part
of the fold the model was trained on (crops it never saw, of the same kind as its training crops).

For each model and each method of the flag (``"latent"``: version 1, :mod:`lidc_cdam.models.trust`, the
latent's Mahalanobis distance; ``"domain"``: version 2 or 3, :mod:`lidc_cdam.models.domain_trust`), the scores give
the AUROC (real CT = positive), the share of real-CT crops flagged, the share of held-out crops flagged, and
whether the nodule is flagged. :func:`evaluate_models` returns them as plain values, per-crop rows for the
committed table and histogram.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidc_cdam.ct.inputs import CENTRE, VOLUME, model_inputs, volume_input
from lidc_cdam.ct.point import crop_at_point
from lidc_cdam.ct.volume import CTVolume
from lidc_cdam.data.lidc.crops import ct_image, read_crop
from lidc_cdam.data.lidc.folds import read_folds, split
from lidc_cdam.models import domain_trust
from lidc_cdam.models.domain_trust import is_domain_stats
from lidc_cdam.models.trust import model_latents, trust_percentile

N_POINTS = 240
LUNG_HU = -400.0
SOFT_HU = (-100.0, 150.0)
METHODS = ("latent", "domain")


@dataclass
class CropSet:
    """Crops ``[N, 32, 32, 32]`` HU with a kind per crop (``nodule``, ``lung``, ``soft tissue``, ``held-out``)."""

    crops: list[np.ndarray]
    kinds: list[str]
    ids: list[str] = field(default_factory=list)


def read_fixture(image: str | Path, label: str | Path) -> tuple[Any, np.ndarray]:
    """The real CT fixture as a :class:`lidc_cdam.ct.volume.CTVolume` and its label ``[z, y, x]``."""
    import SimpleITK as sitk

    im = sitk.ReadImage(str(image))
    hu = sitk.GetArrayFromImage(im).astype(np.float32)
    volume = CTVolume(hu, tuple(im.GetSpacing()), tuple(im.GetOrigin()), tuple(im.GetDirection()),
                      name=Path(image).name)
    return volume, sitk.GetArrayFromImage(sitk.ReadImage(str(label)))


def real_ct_points(volume: Any, label: np.ndarray, n: int = N_POINTS, seed: int = 0
                   ) -> list[tuple[np.ndarray, str]]:
    """The label's centroid (``"nodule"``) and ``n`` random points (patient mm, LPS) whose crop lies within the
    volume in-plane: ``"lung"`` (HU < -400, not outside the body: > -990) or ``"soft tissue"``."""
    rng = np.random.default_rng(seed)
    hu = volume.hu
    centre = np.argwhere(label > 0).mean(0)
    points = [(volume.index_to_world(centre[None])[0], "nodule")]
    spacing = np.asarray(volume.spacing, dtype=float)  # x, y, z
    margin = np.ceil(16.0 / spacing).astype(int)
    lo = np.array([min(3, hu.shape[0] - 1), margin[1], margin[0]])
    hi = np.array([hu.shape[0] - 3, hu.shape[1] - margin[1], hu.shape[2] - margin[0]])
    while len(points) < n + 1:
        z, y, x = (int(rng.integers(a, b)) for a, b in zip(lo, hi, strict=True))
        v = float(hu[z, y, x])
        if -990.0 < v < LUNG_HU:
            kind = "lung"
        elif SOFT_HU[0] < v < SOFT_HU[1]:
            kind = "soft tissue"
        else:
            continue
        points.append((volume.index_to_world(np.array([[z, y, x]], dtype=float))[0], kind))
    return points


def real_ct_crops(volume: Any, points: Sequence[tuple[np.ndarray, str]]) -> CropSet:
    """The 32 mm crops at the points (:func:`lidc_cdam.ct.point.crop_at_point`, as the CT path makes them)."""
    image = ct_image(volume.hu, volume.geometry())
    crops = [np.asarray(crop_at_point(volume, p, image=image).image, dtype=np.float32) for p, _ in points]
    ids = [f"{kind} ({', '.join(f'{c:.1f}' for c in p)})" for p, kind in points]
    return CropSet(crops, [kind for _, kind in points], ids)


def fold_crops(folder: str | Path, fold: int = 0, part: str = "test", folds: str | Path | None = None) -> CropSet:
    """The crops of one part (``train``, ``val``, ``test``) of ``fold`` among a data folder's nodules, with the
    committed folds table (or ``folds``), as ``lidc-cdam train`` splits them."""
    import pandas as pd

    folder = Path(folder)
    nodules = pd.read_csv(folder / "nodules.csv").set_index("nodule_id")
    table = read_folds(*(() if folds is None else (folds,)))
    ids = split(table[table["nodule_id"].isin(set(nodules.index))], int(fold))[part]
    crops = [np.asarray(read_crop(folder / nodules.loc[i, "crop_path"])["image"], dtype=np.float32) for i in ids]
    return CropSet(crops, ["held-out" if part == "test" else part] * len(crops), list(ids))


def method_stats(model: Any, method: str) -> dict[str, Any] | None:
    """A model's statistics of one method: ``"domain"`` (version 2 or 3, ``meta["trust"]``) or ``"latent"``
    (version 1: ``meta["trust_latent"]``, or ``meta["trust"]`` of an older checkpoint)."""
    meta = model.meta
    stats = [s for s in (meta.get("trust"), meta.get("trust_latent")) if s]
    want = [s for s in stats if is_domain_stats(s) == (method == "domain")]
    return want[0] if want else None


@torch.no_grad()
def percentiles(model: Any, crops: CropSet, method: str) -> np.ndarray:
    """Each crop's trust percentile under one method (as :func:`lidc_cdam.ct.ensemble.crop_trust` computes it)."""
    stats = method_stats(model, method)
    if stats is None:
        raise ValueError(f"the model carries no statistics of the {method!r} trust method")
    input_stats = model.meta["input_stats"]
    view = str(input_stats.get("view", "axial"))
    size = int(input_stats.get("image_size") or model.default_image_size[0])
    out = []
    for crop in crops.crops:
        if method == "domain":
            x = domain_trust.crop_inputs(crop, view, input_stats, size, stats.get("offsets", domain_trust.OFFSETS))
            out.append(float(domain_trust.crop_percentile(stats, domain_trust.input_features(model, x))[0]))
        else:
            x = volume_input(crop, input_stats, size) if view == VOLUME else model_inputs(
                crop, view, [CENTRE], input_stats, size)
            out.append(float(trust_percentile(stats, model_latents(model, x))[0]))
    return np.asarray(out)


def rates(model: Any, method: str, in_domain: np.ndarray, real: np.ndarray, real_kinds: Sequence[str]
          ) -> dict[str, Any]:
    """AUROC (real CT positive; ties count half) and the shares flagged above the method's threshold."""
    from sklearn.metrics import roc_auc_score

    threshold = float(method_stats(model, method)["threshold"])
    kinds = np.asarray(real_kinds)
    y = np.r_[np.zeros(len(in_domain)), np.ones(len(real))]
    row = {"method": method, "threshold": threshold,
           "auroc": float(roc_auc_score(y, np.r_[in_domain, real])),
           "in_domain_flagged": float((in_domain > threshold).mean()),
           "real_ct_flagged": float((real > threshold).mean()),
           "n_in_domain": len(in_domain), "n_real_ct": len(real)}
    for kind in ("lung", "soft tissue"):
        row[f"{kind.replace(' ', '_')}_flagged"] = float((real[kinds == kind] > threshold).mean())
    nodule = real[kinds == "nodule"]
    row["nodule_percentile"] = float(nodule[0]) if len(nodule) else None
    row["nodule_flagged"] = bool(nodule[0] > threshold) if len(nodule) else None
    return row


def evaluate_models(models: dict[str, Any], in_domain: dict[str, CropSet] | CropSet, real: CropSet
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(summary rows, per-crop rows)`` for every model (name -> loaded ViTModel) and both methods.
    ``in_domain``: one crop set for all models or one per model."""
    summary, per_crop = [], []
    for name, model in models.items():
        held = in_domain[name] if isinstance(in_domain, dict) else in_domain
        for method in METHODS:
            if method_stats(model, method) is None:
                continue
            p_in, p_real = percentiles(model, held, method), percentiles(model, real, method)
            summary.append({"model": name, **rates(model, method, p_in, p_real, real.kinds)})
            for crops, values in ((held, p_in), (real, p_real)):
                per_crop += [{"model": name, "method": method, "side": "real CT" if crops is real else "held-out",
                              "kind": k, "crop": i, "percentile": round(float(v), 4)}
                             for k, i, v in zip(crops.kinds, crops.ids or [""] * len(values), values, strict=True)]
    return summary, per_crop


def pooled(summary: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method, the shares flagged pooled over the models (weighted by crop counts) and the lowest AUROC."""
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        rows = [r for r in summary if r["method"] == method]
        if not rows:
            continue
        n_in, n_real = sum(r["n_in_domain"] for r in rows), sum(r["n_real_ct"] for r in rows)
        out[method] = {
            "in_domain_flagged": sum(r["in_domain_flagged"] * r["n_in_domain"] for r in rows) / n_in,
            "real_ct_flagged": sum(r["real_ct_flagged"] * r["n_real_ct"] for r in rows) / n_real,
            "min_auroc": min(r["auroc"] for r in rows),
        }
    return out


def histogram_figure(per_crop: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Histograms of the percentiles (held-out vs real CT), one panel per model and method, with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(r["model"], r["method"]) for r in summary]
    models = list(dict.fromkeys(m for m, _ in keys))
    fig, axes = plt.subplots(len(models), len(METHODS), figsize=(4.2 * len(METHODS), 2.8 * len(models)),
                             squeeze=False)
    bins = np.linspace(0, 100, 41)
    for i, model in enumerate(models):
        for j, method in enumerate(METHODS):
            ax = axes[i][j]
            row = next((r for r in summary if r["model"] == model and r["method"] == method), None)
            if row is None:
                ax.axis("off")
                continue
            for side, colour in (("held-out", "tab:blue"), ("real CT", "tab:red")):
                values = [c["percentile"] for c in per_crop if c["model"] == model and c["method"] == method
                          and c["side"] == side]
                ax.hist(values, bins=bins, color=colour, alpha=0.6, density=True, label=f"{side} ({len(values)})")
            ax.axvline(row["threshold"], color="k", lw=1, ls="--")
            ax.set_title(f"{model}, {method}: AUROC {row['auroc']:.3f}\n"
                         f"flagged: real {100 * row['real_ct_flagged']:.0f} %, held-out "
                         f"{100 * row['in_domain_flagged']:.0f} %", fontsize=9)
            ax.set_xlabel("trust percentile")
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
