"""An output folder of the CT path that loses nothing: checked before any work, written point by point, resumable.

- :func:`point_ids` - the points' ids made safe as file names; a collision (two ids, or an id and one of the run's
  own files) is a :class:`~lidc_cdam.ct.errors.CTError` naming them;
- :class:`RunFolder` - ``--out``: refused before any work when it is a file or not writable; a point is written into
  a hidden partial folder and moved into place when complete, so a killed run leaves whole points or none; the
  manifest (``manifest.json``) lists every file written per point and the settings they were computed with, and
  is rewritten (atomically) after each point. A rerun with the same settings skips the complete points (same
  result); a point of other settings or coordinates is recomputed; point folders of an earlier run that the new
  run does not have (stale) are removed, and said so. Folders the manifest does not list are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidc_cdam.ct.errors import CTError
from lidc_cdam.io import write_json

MANIFEST = "manifest.json"
#: files a run writes at its root: no point may be named so
RUN_FILES = ("manifest.json", "summary.json", "predictions.csv", "dicom_sr.dcm", "pacs_store.json")
FORMAT = 1
PARTIAL = ".partial-"


def safe_name(raw: Any) -> str:
    """An id as a file name: letters, digits, ``.``, ``_``, ``-`` kept, anything else ``_``; no leading dot."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(raw)).strip("._")


def point_ids(raw: Sequence[Any]) -> list[str]:
    """Safe, unique point ids (``p01``, ``p02``... for missing ones); :class:`CTError` naming any collision."""
    ids = [safe_name(r) if r is not None and safe_name(r) else f"p{n + 1:02d}" for n, r in enumerate(raw)]
    seen: dict[str, list[str]] = {}
    for given, pid in zip(raw, ids, strict=True):
        seen.setdefault(pid.lower(), []).append(str(given) if given is not None else pid)
    clashes = {k: v for k, v in seen.items() if len(v) > 1}
    if clashes:
        listed = "; ".join(f"{', '.join(repr(g) for g in v)} -> {k!r}" for k, v in clashes.items())
        raise CTError(f"point ids must be unique (as file names, ignoring case): {listed}")
    reserved = [pid for pid in ids if pid.lower() in RUN_FILES or pid.lower() == "dicom"]
    if reserved:
        raise CTError(f"point id(s) {reserved} are names of the run's own files; choose other ids")
    return ids


class RunFolder:
    """``root`` made ready for a run of ``settings`` (a JSON-able dict: what the points are computed with)."""

    def __init__(self, root: str | Path, settings: dict[str, Any]):
        self.root = Path(root).expanduser()
        self.settings = json.loads(json.dumps(settings, default=str))
        if self.root.exists() and not self.root.is_dir():
            raise CTError(f"{self.root}: --out is a file, not a folder")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise CTError(f"{self.root}: cannot write results here ({err.strerror or err})") from None
        for leftover in self.root.glob(f".*{PARTIAL}*"):  # points a killed run did not finish
            shutil.rmtree(leftover, ignore_errors=True)
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.is_file():
            return {"format": FORMAT, "points": {}, "run_files": []}
        try:
            data = json.loads(path.read_text())
            if not isinstance(data.get("points"), dict):
                raise ValueError("no 'points'")
        except (OSError, ValueError) as err:
            raise CTError(f"{path}: not a readable manifest of an earlier run ({err}); choose another --out or "
                          "remove it") from None
        data.setdefault("run_files", [])
        return data

    def save(self) -> None:
        self.manifest["format"] = FORMAT
        write_json(self.root / MANIFEST, self.manifest)

    # ---------------------------------------------------------------------------------- resume

    def complete(self, pid: str, world: np.ndarray) -> dict[str, Any] | None:
        """The ``predictions.json`` entry of a point an earlier run finished with these settings at this point,
        with every listed file present; else None."""
        known = self.manifest["points"].get(pid)
        if not known or known.get("settings") != self.settings:
            return None
        if not np.allclose(known.get("world_lps_mm", [np.nan] * 3), world, atol=1e-6):
            return None
        folder = self.root / pid
        if not all((folder / f).is_file() for f in known.get("files", [])):
            return None
        try:
            return json.loads((folder / "predictions.json").read_text())
        except (OSError, ValueError):
            return None

    def remove_stale(self, pids: Sequence[str]) -> list[str]:
        """Remove the point folders an earlier run wrote (the manifest lists them) that this run does not have."""
        stale = [p for p in self.manifest["points"] if p not in set(pids)]
        for pid in stale:
            shutil.rmtree(self.root / pid, ignore_errors=True)
            del self.manifest["points"][pid]
        if stale:
            self.save()
        return stale

    # ---------------------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def point(self, pid: str, world: np.ndarray) -> Iterator[Path]:
        """A partial folder to write one point into; on success it replaces ``root/pid`` and the manifest records
        its files; on failure it is removed and ``root/pid`` stays as it was."""
        partial = Path(tempfile.mkdtemp(prefix=f".{pid}{PARTIAL}", dir=self.root))
        try:
            yield partial
            files = sorted(str(p.relative_to(partial)) for p in partial.rglob("*") if p.is_file())
            final = self.root / pid
            old = None
            if final.exists():
                old = final.with_name(f".{pid}{PARTIAL}old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(partial, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self.manifest["points"][pid] = {"settings": self.settings, "world_lps_mm": [float(v) for v in world],
                                            "files": files}
            self.save()
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)

    def record(self, *names: str) -> None:
        """Files at the run's root (summary, table, SR) in the manifest."""
        self.manifest["run_files"] = sorted(set(self.manifest["run_files"]) | set(names))
        self.manifest["run_settings"] = self.settings
        self.save()
