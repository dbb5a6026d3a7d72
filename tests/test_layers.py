"""Imports only go downward: every import of the library's own modules (at the top of a module or inside a
function) respects ``lidc_cdam.LAYERS`` (the order written in ``lidc_cdam/__init__.py``'s docstring)."""

from __future__ import annotations

import ast
from pathlib import Path

import lidc_cdam

ROOT = Path(__file__).resolve().parents[1]
#: source folders and the package names they install as (pyproject's package-dir)
SOURCES = {"lidc_cdam": "lidc_cdam", "pipelines": "lidc_cdam.pipelines", "viewer": "lidc_cdam.viewer"}
RANK = {package: rank for rank, layer in enumerate(lidc_cdam.LAYERS) for package in layer}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imported(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every ``lidc_cdam`` import in the file, relative imports resolved; ``from lidc_cdam
    import x`` names ``lidc_cdam.x`` where ``x`` is a subpackage or module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            if base == "lidc_cdam":  # a subpackage / module by name, else a name the root package re-exports
                out += [(node.lineno, f"lidc_cdam.{a.name}" if (ROOT / "lidc_cdam" / a.name).exists()
                         or (ROOT / "lidc_cdam" / f"{a.name}.py").exists() or a.name == "__version__"
                         else "lidc_cdam") for a in node.names]
            else:
                out.append((node.lineno, base))
    return [(line, name) for line, name in out if name == "lidc_cdam" or name.startswith("lidc_cdam.")]


def package_of(module: str) -> str | None:
    """The layer package of a module: ``lidc_cdam.ct.maps`` -> ``ct``; the root package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_layer():
    packages = {package_of(m) for m in modules()} - {None}
    assert packages <= set(RANK), f"packages without a layer in lidc_cdam.LAYERS: {sorted(packages - set(RANK))}"


def test_imports_only_go_downward():
    wrong = []
    for module, path in modules().items():
        source = package_of(module)
        for line, name in imported(module, path):
            if name == "lidc_cdam.__version__":
                continue  # the root's constant, readable everywhere
            target = package_of(name)
            if target is None:  # the root package re-exports models + explain: only pipelines may use it
                if source not in (None, "pipelines"):
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} imports the root package lidc_cdam")
                continue
            if source is None or target == source or RANK.get(target) == RANK.get(source) == 0:
                continue  # the first layer's plain modules may use each other
            if target not in RANK:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {name} is in no layer")
            elif RANK[target] >= RANK[source]:
                how = "a package of its own layer" if RANK[target] == RANK[source] else "a higher layer"
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module} ({source}) imports {name} ({target}, {how})")
    assert not wrong, "imports against lidc_cdam.LAYERS:\n" + "\n".join(wrong)


def test_the_check_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from lidc_cdam.ct import read_ct\n    from ..explain import explain\n")
    names = [name for _, name in imported("lidc_cdam.models.probe", path)]
    assert names == ["lidc_cdam.ct", "lidc_cdam.explain"]
