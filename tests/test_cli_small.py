"""Small truths of the `lidc-cdam` command: its version."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lidc_cdam.pipelines import cli

import lidc_cdam


def test_version_flag_prints_the_installed_version(capsys):
    assert cli.main(["--version"]) == 0  # answered before the jobs are imported
    assert capsys.readouterr().out == f"lidc-cdam {importlib.metadata.version('lidc-cdam')}\n"
    with pytest.raises(SystemExit) as exit_info:  # the parser's flag, after other options
        cli.main(["-v", "--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"lidc-cdam {importlib.metadata.version('lidc-cdam')}\n"


def test_version_falls_back_to_the_package_when_not_installed(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.package_version() == lidc_cdam.__version__


@pytest.mark.slow
def test_the_console_script_prints_the_version():
    script = Path(sys.executable).with_name("lidc-cdam")
    command = [str(script)] if script.exists() else [shutil.which("lidc-cdam") or "lidc-cdam"]
    result = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"lidc-cdam {importlib.metadata.version('lidc-cdam')}"
