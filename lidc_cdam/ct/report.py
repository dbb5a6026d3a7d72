"""A report page per explained point (PNG and PDF) from what ``lidc-cdam explain-ct`` writes.

:func:`write_point_report` draws one A4 page from a point's ``predictions.json`` entry, its ``crop.npz``
arrays and its ``maps.npz`` arrays: the crop's central slices in the lung window (W1500/L-600), one panel
per target with the signed CDAM over the CT (the project's diverging colormap centred on zero: orange =
evidence for a higher value, blue = counter-evidence; symmetric limits), the predictions with their
ensemble spread (sd, number of folds) and the radiologists' ratings where the caller knows them, the trust
flag per task, the padded share, the warnings about the scan and the crop (``warnings``), the models and their
checkpoints' SHA-256, and "Research use, not for
diagnostic use". Matplotlib only (no pyplot, no GUI: the figure is drawn with the Agg and PDF backends).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.inputs import CENTRE, VIEWS, slice_plane
from lidc_cdam.ct.volume import window_limits, window_text
from lidc_cdam.models.demo_weights import sha256_of, shipped_manifest
from lidc_cdam.models.provenance import phantom_warning, provenance_line, trust_warning
from lidc_cdam.viz import cdam_cmap, symmetric_limit

RESEARCH_USE = "Research use, not for diagnostic use"
UNLIKE = "unlike the training data"
NO_TRUST = "no training statistics"
PAGE = (8.27, 11.69)  # A4 portrait, inches
#: the LIDC-IDRI rating scales (the radiologists' units; diameter in mm)
SCALES = {"subtlety": "1-5", "calcification": "1-6", "sphericity": "1-5", "margin": "1-5", "lobulation": "1-5",
          "spiculation": "1-5", "texture": "1-5", "diameter_mm": "mm", "malignancy": "probability"}
RED, GREEN, GREY = "#b2182b", "#1b7837", "#666666"


# ------------------------------------------------------------------------------------------ text


def short_hash(path: str | Path) -> str | None:
    """The first 16 hex digits of a file's SHA-256 (None when it cannot be read)."""
    try:
        return sha256_of(path)[:16]
    except OSError:
        return None


def model_name(path: str | Path, sha256_16: str | None = None) -> str:
    """A checkpoint's name on the page: the shipped demo model's name when the file is one (same SHA-256 as
    the shipped manifest), else its folder and file name (``fold0/best.pt``)."""
    p = Path(path)
    if sha256_16:
        try:
            for name, info in shipped_manifest().items():
                if str(info.get("sha256", ""))[:16] == sha256_16:
                    return f"{p.name} (shipped {name})"
        except (OSError, ValueError):
            pass
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def trust_text(trust: Mapping[str, Any] | None) -> tuple[str, bool | None]:
    """``(text, flagged)`` of a task's trust flag in the library's words
    (:func:`lidc_cdam.models.provenance.trust_warning`): flagged None when no model carries training statistics."""
    if not trust:
        return NO_TRUST + " in the checkpoint(s): no trust flag", None
    return trust_warning({"threshold": 99.0, **trust}), bool(trust.get("unlike_training"))


def training_data_lines(entry: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """``(provenance lines, red line or None)`` from a point's ``training_data`` (or the run's, as
    :func:`lidc_cdam.models.provenance.training_data` gives it): one line per distinct provenance."""
    data = entry.get("training_data")
    if not data:
        return [], None
    lines = list(dict.fromkeys(provenance_line(None if m.get("unknown") else m) for m in data.get("models", [])))
    return lines, phantom_warning(data)


def trust_state(entry: Mapping[str, Any]) -> str:
    """The point's trust state in a few words: ``unlike the training data``, ``like the training data`` or
    ``no training statistics`` (the most cautious over its tasks)."""
    flags = [trust_text(t.get("trust"))[1] for t in entry.get("tasks", [])]
    if any(f is True for f in flags):
        return UNLIKE
    if any(f is False for f in flags):
        return "like the training data"
    return NO_TRUST


def title_text(entry: Mapping[str, Any]) -> str:
    return f"lidc-cdam explain-ct report: point {entry['id']} ({trust_state(entry)})"


def _fmt_rating(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str):
        values = [float(v) for v in value]
        if not values:
            return "-"
        return f"{np.median(values):.3g} ({', '.join(f'{v:g}' for v in values)})"
    try:
        return f"{float(value):.3g}"
    except (TypeError, ValueError):
        return str(value)


def _shown(target: str, mean: float) -> str:
    if target == "malignancy":
        return f"p = {mean:.3f}"
    if target == "diameter_mm":
        return f"{mean:.1f} mm"
    scale = SCALES.get(target)
    return f"{mean:.2f} ({scale})" if scale else f"{mean:.3g}"


def prediction_rows(entry: Mapping[str, Any], ratings: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """One row per target: ``target`` (the map's file stem), ``prediction`` (malignancy as a probability,
    biomarkers in rating units, diameter in mm), ``sd`` (over the folds), ``n`` (folds), ``ratings`` (the
    radiologists', where ``ratings`` gives them by stem or target name)."""
    rows = []
    ratings = ratings or {}
    for task in entry.get("tasks", []):
        for target in task["targets"]:
            stem = task.get("maps", {}).get(target, target)
            mean, sd, n = float(task["mean"][target]), float(task["sd"][target]), int(task["n_models"])
            rows.append({"target": stem, "prediction": _shown(target, mean), "sd": f"{sd:.3f}" if n > 1 else "-",
                         "n": str(n), "ratings": _fmt_rating(ratings.get(stem, ratings.get(target)))})
    return rows


def table_lines(rows: list[dict[str, str]]) -> list[str]:
    """The predictions as fixed-width lines (a header and one line per target)."""
    cols = {"target": "target", "prediction": "prediction", "sd": "sd", "n": "folds", "ratings": "radiologists"}
    widths = {c: max(len(h), *(len(r[c]) for r in rows)) if rows else len(h) for c, h in cols.items()}
    line = lambda r: "  ".join(f"{r[c]:<{widths[c]}}" for c in cols)  # noqa: E731
    return [line(cols), *(line(r) for r in rows)]


# ------------------------------------------------------------------------------------------ images


def _plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    return np.asarray(slice_plane(np.asarray(volume), view, index), dtype=float)


def _superior_up(crop: Mapping[str, Any]) -> bool:
    """Whether the crop's z axis (first array axis) runs towards the head (LPS +z): then coronal and sagittal
    planes are drawn with the first row at the bottom, so that superior is up."""
    to_world = crop.get("crop_to_world")
    return to_world is None or float(np.asarray(to_world, dtype=float)[2, 0]) >= 0


def _show_ct(ax, plane: np.ndarray, origin: str) -> None:
    lo, hi = window_limits("lung")
    ax.imshow(plane, cmap="gray", vmin=lo, vmax=hi, origin=origin, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _mark_centre(ax, n: int) -> None:
    """Short ticks at the edges pointing at the crop centre (the point), leaving the centre itself free."""
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    c, k = (n - 1) / 2.0, n * 0.14
    for a, b in ((-0.5, -0.5 + k), (n - 0.5 - k, n - 0.5)):
        ax.plot([a, b], [c, c], color="#ffd400", linewidth=1.2)
        ax.plot([c, c], [a, b], color="#ffd400", linewidth=1.2)
    ax.set_xlim(xlim)
    ax.set_ylim(ylim)


def _overlay(ax, ct: np.ndarray, signed: np.ndarray, origin: str, cmap, lim: float):
    """CT in grey, the signed map over it: colour from the diverging map, opacity growing with |map|
    (0 is transparent, so the anatomy stays visible)."""
    from matplotlib.colors import Normalize

    _show_ct(ax, ct, origin)
    norm = Normalize(-lim, lim)
    rgba = cmap(norm(signed))
    rgba[..., 3] = 0.9 * np.clip(np.abs(signed) / lim, 0, 1) ** 0.7
    ax.imshow(rgba, origin=origin, interpolation="nearest")
    return norm


# ------------------------------------------------------------------------------------------ page


def _plain_text() -> dict[str, Any]:
    """Text properties without ligatures (matplotlib >= 3.11 shapes text: "fi" would become one glyph, and the
    PDF's text would no longer contain the words as typed)."""
    from matplotlib.text import Text

    return {"fontfeatures": ("-liga", "-clig")} if hasattr(Text, "set_fontfeatures") else {}


def _save(fig, path: Path, fmt: str, metadata: dict[str, str]) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.{fmt}")
    try:
        fig.savefig(tmp, format=fmt, dpi=110, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_point_report(point_entry: Mapping[str, Any], crop: Mapping[str, Any], maps: Mapping[str, Any],
                       out_dir: str | Path, *, ratings: Mapping[str, Any] | None = None,
                       model_names: Mapping[str, str] | None = None,
                       checkpoint_hashes: Mapping[str, str | None] | None = None,
                       series: str | None = None, name: str = "report") -> tuple[Path, Path]:
    """Draw a point's report page and write ``<out_dir>/report.png`` and ``report.pdf`` (``name`` the stem).

    ``point_entry`` is the point's ``predictions.json`` dict, ``crop`` the ``crop.npz`` arrays (``image`` HU
    ``[z, y, x]``, ``padded``, ``crop_to_world``), ``maps`` the ``maps.npz`` arrays (the mean map ``[32, 32, 32]``
    per target stem). ``ratings`` (optional) are the radiologists' ratings per target (a number or a list of
    the readers' ratings). ``model_names`` and ``checkpoint_hashes`` map each checkpoint path of
    ``point_entry["tasks"][*]["checkpoints"]`` to its name on the page and its SHA-256 (the first 16 hex digits
    are shown; computed from the file when not given). Returns ``(png_path, pdf_path)``."""
    import textwrap

    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entry = point_entry
    pid = str(entry["id"])
    view = str(entry.get("view") or "axial")
    view = view if view in VIEWS else "axial"  # a 3D model's map is a volume: shown in the axial plane
    method = str(entry.get("method") or "cdam")
    image = np.asarray(crop["image"], dtype=float)
    padded = np.asarray(crop.get("padded", np.zeros(image.shape, np.uint8))).astype(bool)
    n = image.shape[0]
    centre = CENTRE if n == 32 else n // 2
    up = _superior_up(crop)
    origin_of = {"axial": "upper", "coronal": "lower" if up else "upper", "sagittal": "lower" if up else "upper"}
    cmap = cdam_cmap()
    W, H = PAGE
    fig = Figure(figsize=PAGE)
    fig.patch.set_facecolor("white")
    plain = _plain_text()
    mono = {"family": "DejaVu Sans Mono", "linespacing": 1.3}

    def box(left_in: float, top_in: float, w_in: float, h_in: float):
        """Axes at a position in inches from the page's top left corner."""
        return fig.add_axes((left_in / W, 1 - (top_in + h_in) / H, w_in / W, h_in / H))

    def text(x_in: float, y_in: float, s: str, **kw):
        """Text anchored (top left unless va / ha say otherwise) at inches from the page's top left corner."""
        kw.setdefault("va", "top")
        kw.setdefault("ha", "left")
        return fig.text(x_in / W, 1 - y_in / H, s, **plain, **kw)

    margin = 0.45
    line_h = 0.13  # inches per line of 6.5-7 pt text at linespacing 1.3
    # ---- header
    y = 0.32
    text(margin, y, title_text(entry), fontsize=12.5, fontweight="bold")
    y += 0.4
    text(W / 2, y, RESEARCH_USE.upper(), fontsize=12, fontweight="bold", color="white", ha="center",
         bbox={"boxstyle": "square,pad=0.35", "facecolor": RED, "edgecolor": RED})
    y += 0.45
    world = ", ".join(f"{float(v):.1f}" for v in entry.get("world_lps_mm", []))
    index = ", ".join(f"{float(v):.1f}" for v in entry.get("index_ijk", []))
    series_text = series if not series or len(series) <= 120 else "..." + series[-117:]
    info = [f"Series: {series_text}" if series else None,
            f"Point {pid}: ({world}) mm, DICOM LPS; voxel index (i, j, k) = ({index})",
            f"Crop: {entry.get('crop_size_mm', 32)} mm at 1 mm centred on the point (yellow ticks), lung window "
            f"{window_text('lung')}; maps: {method} along the {view} view"]
    for line in filter(None, info):
        text(margin, y, line, fontsize=7)
        y += 0.15

    # ---- CT planes (left) and the predictions (right)
    y += 0.1
    ct_size, gap = 1.25, 0.1
    for c, plane_view in enumerate(("axial", "coronal", "sagittal")):
        ax = box(margin + c * (ct_size + gap), y + 0.2, ct_size, ct_size)
        _show_ct(ax, _plane(image, plane_view, centre), origin_of[plane_view])
        pad = _plane(padded, plane_view, centre)
        if pad.any() and not pad.all():
            xlim, ylim = ax.get_xlim(), ax.get_ylim()
            ax.contour(pad, levels=[0.5], colors="#ffd400", linewidths=0.8, linestyles="--")
            ax.set_xlim(xlim)
            ax.set_ylim(ylim)
        _mark_centre(ax, n)
        ax.set_title(plane_view, fontsize=7.5, pad=3, **plain)
    x_table = margin + 3 * (ct_size + gap) + 0.12
    rows = prediction_rows(entry, ratings)
    text(x_table, y, "Predictions", fontsize=8.5, fontweight="bold")
    lines = table_lines(rows)
    text(x_table, y + 0.22, "\n".join(lines), fontsize=6.3, **mono)
    y_note = y + 0.22 + line_h * len(lines) + 0.05
    table_note = textwrap.wrap("ensemble mean, sd over the folds (ddof 0); malignancy as a probability, "
                               "biomarkers in the radiologists' rating units", int((W - margin - x_table) / 0.05))
    text(x_table, y_note, "\n".join(table_note), fontsize=6, color=GREY, linespacing=1.25)
    y_note += 0.11 * len(table_note)
    y = max(y + 0.2 + ct_size, y_note) + 0.22

    # ---- the input check: trust per task, padded share
    text(margin, y, "Input check", fontsize=8.5, fontweight="bold")
    y += 0.2
    provenance, red_line = training_data_lines(entry)
    if red_line:
        text(margin, y, f"The model was {red_line}", fontsize=7.5, color=RED, fontweight="bold")
        y += 0.17
    for k, line in enumerate(provenance):
        text(margin, y, "training data:" if k == 0 else "", fontsize=7)
        text(margin + 1.3, y, textwrap.shorten(line, 150), fontsize=6.5)
        y += 0.15
    for task in entry.get("tasks", []):
        msg, flagged = trust_text(task.get("trust"))
        msg, _, measured = msg.partition("; this flag ")
        color = RED if flagged else (GREY if flagged is None else GREEN)
        text(margin, y, f"{task['task']} model(s):", fontsize=7)
        text(margin + 1.3, y, msg, fontsize=7, color=color, fontweight="bold" if flagged else "normal")
        y += 0.16
        if measured:
            text(margin + 1.3, y, f"the flag {measured} (committed evaluation)", fontsize=6.3, color=GREY)
            y += 0.15
    share = float(entry.get("padded_share") or 0.0)
    if share > 0:
        text(margin, y, "crop:", fontsize=7)
        text(margin + 1.3, y, f"{100 * share:.1f}% of the crop lies outside the scan (padded with -1000 HU; dashed "
                              "outline)", fontsize=7, color="#b35806")
        y += 0.16
    for warning in entry.get("warnings") or []:  # about the scan and the crop (the reader's, an oblique grid...)
        text(margin, y, "scan:", fontsize=7)
        lines = textwrap.wrap(str(warning), 110)[:3]
        text(margin + 1.3, y, "\n".join(lines), fontsize=7, color="#b35806", linespacing=1.25)
        y += 0.16 + 0.11 * (len(lines) - 1)
    notes = [t["trust"]["note"] for t in entry.get("tasks", []) if t.get("trust") and t["trust"].get("note")]
    trust_note = notes[0] if notes else "percentile of the crop among the training crops' own Mahalanobis distances"
    text(margin, y, f"trust: {trust_note} (the largest over the folds)", fontsize=6, color=GREY)
    y += 0.25

    # ---- footer (drawn from the bottom up): models and hashes, notes
    hashes = dict(checkpoint_hashes or {})
    model_lines = []
    for task in entry.get("tasks", []):
        for ckpt in task.get("checkpoints", []):
            digest = hashes[ckpt] if ckpt in hashes else short_hash(ckpt)
            label = (model_names or {}).get(ckpt) or model_name(ckpt, digest[:16] if digest else None)
            model_lines.append(f"{task['task']:<10}  {digest[:16] if digest else 'unreadable file':<16}  {label}")
    columns = 2 if len(model_lines) > 4 else 1
    per_column = math.ceil(len(model_lines) / columns)
    notes = (f"Maps: {method} of the {view} slice through the point (crop slice {centre}), the mean over the "
             "folds for an ensemble; orange = evidence for the target (a higher probability or rating), blue = "
             "counter-evidence; each panel scaled on its own to +-max|map| of the slice shown (colour bar), 0 "
             f"transparent. {RESEARCH_USE}: the maps show what the models used, not where disease is.")
    note_lines = textwrap.wrap(notes, 135)
    footer_h = 0.2 + line_h * per_column + 0.1 + 0.12 * len(note_lines) + 0.35
    yf = H - footer_h
    text(margin, yf, "Models (task, first 16 hex digits of the checkpoint's SHA-256, checkpoint)", fontsize=8,
         fontweight="bold")
    yf += 0.2
    for c in range(columns):
        chunk = model_lines[c * per_column:(c + 1) * per_column]
        text(margin + c * (W - 2 * margin) / 2, yf, "\n".join(chunk), fontsize=6.5, **mono)
    yf += line_h * per_column + 0.1
    text(margin, yf, "\n".join(note_lines), fontsize=6.3, color="#333333", linespacing=1.25)
    text(W - margin, H - 0.2, f"{RESEARCH_USE} | lidc-cdam explain-ct | point {pid}", fontsize=7, color=RED,
         ha="right", va="bottom")

    # ---- one map panel per target
    text(margin, y, f"CDAM per target: the {view} slice through the point", fontsize=8.5, fontweight="bold")
    y += 0.2
    panels = []
    for task in entry.get("tasks", []):
        for target in task["targets"]:
            sd = f" \u00b1 {float(task['sd'][target]):.2g}" if int(task["n_models"]) > 1 else ""
            panels.append((task.get("maps", {}).get(target, target), _shown(target, float(task["mean"][target])) + sd))
    cols = 3 if len(panels) <= 9 else 4
    nrows = max(1, math.ceil(len(panels) / cols))
    cell_w = (W - 2 * margin) / cols
    title_h = 0.22
    size = max(0.5, min(cell_w - 0.75, (H - footer_h - 0.1 - y) / nrows - title_h - 0.08))
    x0 = margin + (cell_w - size - 0.6) / 2  # centre the panel and its colour bar in the cell
    ct_plane = _plane(image, view, centre)
    for k, (stem, shown) in enumerate(panels):
        r, c = divmod(k, cols)
        left, top = x0 + c * cell_w, y + r * (size + title_h + 0.08) + title_h
        ax = box(left, top, size, size)
        if stem in maps:
            signed = _plane(np.asarray(maps[stem]), view, centre)
            lim = symmetric_limit(signed)
            norm = _overlay(ax, ct_plane, signed, origin_of[view], cmap, lim)
            cax = box(left + size + 0.06, top + 0.1 * size, 0.07, 0.8 * size)
            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, ticks=[-lim, 0, lim])
            bar.ax.set_yticklabels([f"{-lim:.2g}", "0", f"{lim:.2g}"])
            bar.ax.tick_params(labelsize=5.5, length=2, pad=1)
        else:
            _show_ct(ax, ct_plane, origin_of[view])
            ax.text(0.5, 0.5, "no map", transform=ax.transAxes, ha="center", va="center", color="white",
                    fontsize=8, bbox={"facecolor": "black", "edgecolor": "none", "alpha": 0.7}, **plain)
        ax.set_title(f"{stem}: {shown}", fontsize=7.5, pad=3, **plain)

    title = title_text(entry)
    png = _save(fig, out_dir / f"{name}.png", "png",
                {"Title": title, "Description": RESEARCH_USE, "Software": "lidc-cdam explain-ct"})
    pdf = _save(fig, out_dir / f"{name}.pdf", "pdf", {"Title": title, "Subject": RESEARCH_USE,
                                                      "Creator": "lidc-cdam explain-ct"})
    return png, pdf
