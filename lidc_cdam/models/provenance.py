"""What a model was trained on (its provenance), and the texts every result shows about it and its trust flag.

Every checkpoint the training engine writes carries ``meta["provenance"]`` (:func:`training_provenance`):

* ``kind``: ``"phantom"`` (synthetic phantoms rendered from annotations, not CT), ``"lidc-idri"`` (CT crops of
  LIDC-IDRI) or ``"other"``;
* ``nodule_table_sha256``: the SHA-256 of the nodule table the crops came from (``nodules.csv``);
* ``counts``: nodules per fold part (``train``, ``val``, ``test``), ``fold`` and ``preset`` (the training
  config's name);
* ``code_version`` (the package's version and, where known, its git commit) and ``date`` (UTC, ISO 8601).

The output code calls :func:`training_data` (the ``training_data`` entry of ``predictions.json``),
:func:`provenance_line` (one line of text), :func:`phantom_warning` (the red line of a phantom-trained model,
:data:`PHANTOM_WARNING`) and :func:`trust_explanation` (the trust flag with its percentile, its threshold and
its measured rates from the committed evaluation, :func:`trust_rates`).
"""

from __future__ import annotations

import datetime as _dt
import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

from lidc_cdam import __version__
from lidc_cdam.io import sha256_of
from lidc_cdam.resources import weights_path

KINDS = ("phantom", "lidc-idri", "other")
PHANTOM_WARNING = "trained on synthetic phantoms, not CT: its predictions on real CT mean nothing"
#: the committed evaluation of the trust flag, shipped beside the weights (``benchmarks/trust_eval.py``)
TRUST_RATES = "TRUST_RATES.json"


#: a file's SHA-256 (:func:`lidc_cdam.io.sha256_of`)
file_sha256 = sha256_of


@cache
def code_version() -> str:
    """``"lidc-cdam <version>"`` and, in a git checkout, ``"+g<commit>"`` (with ``".dirty"`` for changes)."""
    text = f"lidc-cdam {__version__}"
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return text
    return f"{text}+g{commit}{'.dirty' if dirty else ''}" if commit else text


def data_kind(info: dict[str, Any]) -> str:
    """The kind of training data from a fold's ``info`` (:class:`lidc_cdam.train.engine.FoldData`): an explicit
    ``kind``, else ``"phantom"`` when marked as phantoms, ``"lidc-idri"`` for crops of LIDC-IDRI, else ``"other"``."""
    kind = info.get("kind")
    if kind in KINDS:
        return str(kind)
    if info.get("phantom"):
        return "phantom"
    if info.get("source") == "lidc":
        return "lidc-idri"
    return "other"


def training_provenance(info: dict[str, Any], *, fold: int | None, preset: str | None,
                        date: str | None = None) -> dict[str, Any]:
    """``meta["provenance"]`` of a checkpoint from its fold's ``info`` (``root``, ``sizes``, ``phantom`` /
    ``kind``, ``nodule_table_sha256``; plain values only)."""
    table = info.get("nodule_table_sha256")
    root = info.get("root")
    if table is None and root and (Path(root) / "nodules.csv").is_file():
        table = file_sha256(Path(root) / "nodules.csv")
    sizes = info.get("sizes") or {}
    return {
        "kind": data_kind(info),
        "nodule_table_sha256": table,
        "counts": {k: int(v) for k, v in sizes.items()},
        "fold": None if fold is None else int(fold),
        "preset": preset,
        "code_version": code_version(),
        "date": date or _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
    }


def provenance_of(model_or_meta: Any) -> dict[str, Any] | None:
    """A model's (or a checkpoint meta's) ``provenance``, or None for a checkpoint without one."""
    meta = model_or_meta if isinstance(model_or_meta, dict) else getattr(model_or_meta, "meta", {}) or {}
    if "provenance" in meta and "kind" in (meta["provenance"] or {}):
        return meta["provenance"]
    return meta if "kind" in meta and "code_version" in meta else None


def training_data(models: Any) -> dict[str, Any]:
    """The ``training_data`` entry of ``predictions.json`` for one model or several (a list: the fold models of
    one or more tasks): ``{"kind", "phantom_warning", "models": [provenance or {"kind": "other",
    "unknown": True}, ...]}``. ``kind`` is the models' common kind (``"mixed"`` when they differ,
    ``"unknown"`` when none says); ``phantom_warning`` is :data:`PHANTOM_WARNING` when any model is
    phantom-trained, else None."""
    items = list(models) if isinstance(models, list | tuple) else [models]
    per = []
    for m in items:
        p = provenance_of(m)
        per.append(dict(p) if p else {"kind": "other", "unknown": True})
    kinds = {p["kind"] for p in per if not p.get("unknown")}
    kind = kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "unknown")
    phantom = any(p["kind"] == "phantom" for p in per)
    return {"kind": kind, "phantom_warning": PHANTOM_WARNING if phantom else None, "models": per}


def provenance_line(provenance: dict[str, Any] | None) -> str:
    """One line: ``"trained on synthetic phantoms (fold 0 of tiny-phantom-malignancy: 133 train / 36 val / 49
    test nodules, table 1a2b3c4d5e6f), lidc-cdam 0.1.0, 2026-12-02"``."""
    if not provenance:
        return "training data unknown (the checkpoint does not say what it was trained on)"
    what = {"phantom": "synthetic phantoms", "lidc-idri": "LIDC-IDRI CT"}.get(provenance.get("kind"), "other data")
    counts = provenance.get("counts") or {}
    parts = " / ".join(f"{counts[k]} {k}" for k in ("train", "val", "test") if k in counts)
    where = []
    if provenance.get("fold") is not None:
        where.append(f"fold {provenance['fold']}" + (f" of {provenance['preset']}" if provenance.get("preset") else ""))
    elif provenance.get("preset"):
        where.append(str(provenance["preset"]))
    if parts:
        where.append(f"{parts} nodules")
    if provenance.get("nodule_table_sha256"):
        where.append(f"table {str(provenance['nodule_table_sha256'])[:12]}")
    detail = f" ({', '.join(where)})" if where else ""
    date = str(provenance.get("date") or "")[:10]
    tail = ", ".join(x for x in (provenance.get("code_version"), date) if x)
    return f"trained on {what}{detail}" + (f", {tail}" if tail else "")


def phantom_warning(provenance_or_data: dict[str, Any] | None) -> str | None:
    """:data:`PHANTOM_WARNING` for a phantom-trained model (a provenance dict or :func:`training_data`'s), else
    None. Shown on any scan: red in the report and the viewer, on stderr for the CLI."""
    if not provenance_or_data:
        return None
    if "phantom_warning" in provenance_or_data:
        return provenance_or_data["phantom_warning"]
    return PHANTOM_WARNING if provenance_or_data.get("kind") == "phantom" else None


@cache
def trust_rates() -> dict[str, Any]:
    """The committed evaluation of the trust flag (shipped as ``lidc_cdam/models/weights/TRUST_RATES.json``):
    per shipped model and method, AUROC and the shares flagged; ``{}`` when not shipped."""
    try:
        return json.loads(weights_path(TRUST_RATES).read_text())
    except (FileNotFoundError, OSError, ValueError):
        return {}


def measured_rates(method: str = "domain") -> tuple[float, float] | None:
    """``(share of unseen training-like crops flagged, share of real-CT crops flagged)`` of the flag's method
    (``"domain"``: version 3, ``"latent"``: version 1), pooled over the shipped models of the committed
    evaluation; None when not shipped."""
    pooled = (trust_rates().get("pooled") or {}).get(method)
    if not pooled:
        return None
    return float(pooled["in_domain_flagged"]), float(pooled["real_ct_flagged"])


def rates_text(trust: dict[str, Any] | None) -> str | None:
    """``"flags 2 % of unseen training-like crops, 90 % of real-CT crops"``: the measured rates of the method of
    a trust flag (:func:`lidc_cdam.ct.ensemble.crop_trust`'s dict; version 1 without a ``version``), or None when
    the evaluation is not shipped."""
    if not trust:
        return None
    rates = measured_rates("domain" if int(trust.get("version", 1)) >= 2 else "latent")
    if rates is None:
        return None
    return (f"flags {100 * rates[0]:.0f} % of unseen training-like crops, "
            f"{100 * rates[1]:.0f} % of real-CT crops")


def trust_explanation(trust: dict[str, Any] | None) -> str | None:
    """The trust flag in words, with the percentile, the threshold and the measured rates:
    ``"unlike the training data: 99.9th percentile of the training crops' distances (flagged above the
    97.5th); this flag flags 2 % of unseen training-like crops, 94 % of real-CT crops"``. ``trust`` is
    :func:`lidc_cdam.ct.ensemble.crop_trust`'s dict; None without one."""
    if not trust:
        return None
    p, threshold = float(trust["percentile"]), float(trust["threshold"])
    verdict = "unlike the training data" if trust.get("unlike_training") else "like the training data"
    text = (f"{verdict}: {_ordinal(p)} percentile of the training crops' distances "
            f"(flagged above the {_ordinal(threshold)})")
    rates = rates_text(trust)
    return f"{text}; this flag {rates}" if rates else text


def _ordinal(value: float) -> str:
    number = f"{value:.1f}".rstrip("0").rstrip(".")
    if "." in number:
        return f"{number}th"
    n = int(number)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


#: what a flagged prediction asks of its reader, wherever the flag is shown (report, the command's warnings, viewer)
TRUST_CAUTION = "treat the predictions with caution"


def trust_warning(trust: dict[str, Any] | None) -> str | None:
    """:func:`trust_explanation`, with :data:`TRUST_CAUTION` after the verdict (before the measured rates) when the
    crop is flagged: the one wording of the trust flag in the report, the command's warnings and the viewer."""
    text = trust_explanation(trust)
    if text is None or not trust.get("unlike_training"):
        return text
    verdict, sep, rates = text.partition("; this flag ")
    return f"{verdict}: {TRUST_CAUTION}{sep}{rates}"
