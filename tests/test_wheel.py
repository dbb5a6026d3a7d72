"""A real package: the wheel carries everything the library reads at run time, and the installed
wheel (not editable) runs `lidc-cdam demo` from a folder outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("lidc_cdam", "pipelines", "viewer", "data_manifest", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the package sources (no build isolation: offline)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(work / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = (work / "dist").glob("lidc_cdam-*.whl")
    return path


def test_wheel_carries_the_run_time_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [
        "lidc_cdam/data_manifest/lidc_nodules.csv", "lidc_cdam/data_manifest/lidc_folds.csv",
        "lidc_cdam/data_manifest/imagenet_xval.csv", "lidc_cdam/data_manifest/imagenet_xmulti.csv",
        "lidc_cdam/data_manifest/lidc_concepts.yaml", "lidc_cdam/data_manifest/lidc_concept_counts.csv",
        "lidc_cdam/pipelines/configs/offline-multi-object.yaml", "lidc_cdam/pipelines/configs/paper-imagenet.yaml",
        "lidc_cdam/pipelines/configs/real-photos.yaml", "lidc_cdam/models/weights/real-photos-probe.pt",
        "lidc_cdam/pipelines/configs/train/tiny-phantom-malignancy.yaml", "lidc_cdam/viewer/napari.yaml",
        "lidc_cdam/models/weights/MANIFEST.json", "lidc_cdam/models/weights/digits-vit.pt",
        "lidc_cdam/models/weights/phantom-malignancy.pt", "lidc_cdam/models/weights/phantom-biomarkers.pt",
        "lidc_cdam/ct/__init__.py", "lidc_cdam/ct/maps.py", "lidc_cdam/viewer/_widget.py",
    ]
    assert not [n for n in expected if n not in names]
    assert not [n for n in names if n.startswith(("data_manifest/", "pipelines/", "viewer/", "tests/"))]


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    """A fresh venv that sees the already-installed dependencies (a ``.pth`` line to this environment's
    site-packages, whose own ``.pth`` files, the editable install among them, are not processed), the
    wheel installed into it, then ``lidc-cdam demo`` from a folder outside the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "LIDC_CDAM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import lidc_cdam; print(lidc_cdam.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed wheel, not the checkout
    version = subprocess.run([str(venv / "bin" / "lidc-cdam"), "--version"], cwd=elsewhere, capture_output=True,
                             text=True, env=env, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("lidc-cdam "), version.stderr[-2000:]
    demo = subprocess.run([str(venv / "bin" / "lidc-cdam"), "demo", "--out", "demo", "--nodules", "2"],
                          cwd=elsewhere, capture_output=True, text=True, env=env, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "NOT CT" in demo.stdout
    assert len(list((elsewhere / "demo" / "figures").glob("*.png"))) == 3  # two test nodules and the what-if
    digits = subprocess.run([str(venv / "bin" / "lidc-cdam"), "demo", "--digits", "--out", "digits", "--images",
                             "2"], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=600)
    assert digits.returncode == 0, digits.stderr[-3000:]
    assert not (tmp_path / "cache" / "models").exists()  # the shipped model, nothing trained
