"""Docs that match the code: every module and subpackage of a package is named in its ``__init__`` docstring."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted({p.parent for folder in ("lidc_cdam", "pipelines", "viewer")
                   for p in (ROOT / folder).rglob("__init__.py")})


def members(package: Path) -> list[str]:
    modules = [p.stem for p in package.glob("*.py") if p.stem != "__init__"]
    subpackages = [d.name for d in package.iterdir() if (d / "__init__.py").is_file()]
    return sorted(modules + subpackages)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_package_docstring_names_every_module(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    missing = [m for m in members(package) if not re.search(rf"(?<![\w-]){re.escape(m)}(?![\w-])", doc)]
    assert not missing, f"{package.relative_to(ROOT)}/__init__.py's docstring does not name: {', '.join(missing)}"
