"""No import cycles between the library's modules (the ``lidc_cdam/`` source folder), read with ``ast``; and
no GUI in the library: nothing under ``lidc_cdam/`` imports the napari plugin (``lidc_cdam.viewer``), napari or
a Qt binding, and :mod:`lidc_cdam.ct` imports where napari and Qt cannot be imported.

Every ``import`` statement counts, at module level or inside a function (a function-local import only
postpones a cycle to run time). ``import a.b.c`` / ``from a.b import c`` is an edge to module ``a.b.c`` when
it exists, else (``c`` a name) to ``a.b``; the parent packages whose ``__init__`` Python runs on the way are
not edges (``lidc_cdam/__init__.py`` re-exports the public API, so every module would close a cycle with it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lidc_cdam

ROOT = Path(lidc_cdam.__file__).resolve().parent

#: Cycles allowed for now, each a sorted tuple of module names with the reason (none at present).
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}

#: GUI packages (napari, Qt bindings and what is built on them) the library must not import
GUI = ("napari", "npe2", "magicgui", "vispy", "qtpy", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6")



def imported_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved against ``package``)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])

def library_modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """``{module name: (file, is package)}`` for every ``.py`` file under ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """``{module: the library modules it imports}``, imports anywhere in the file."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                source = imported_module(node, package)
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        graph[name].add(f"{source}.{alias.name}")
                    elif source in modules:
                        graph[name].add(source)
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe(cycle: tuple[str, ...], graph: dict[str, set[str]]) -> str:
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & set(cycle)))}" for m in cycle)


def test_the_library_has_no_import_cycles():
    graph = import_graph(library_modules())
    new = [c for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(describe(c, graph) for c in new)


def test_the_cycle_finder_sees_function_local_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .c import g\n")
    (pkg / "sub" / "c.py").write_text("def g():\n    from ..a import f\n")
    graph = import_graph(library_modules(pkg))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph) == [("pkg.a", "pkg.sub.b", "pkg.sub.c")]


def test_moved_names_are_still_importable_from_where_they_were():
    from lidc_cdam.data.lidc.phantom_render import render_phantom
    from lidc_cdam.data.lidc.phantoms import PHANTOM_NOTE, build_phantoms, phantom_geometry  # noqa: F401
    from lidc_cdam.data.lidc.phantoms import render_phantom as reexported
    from lidc_cdam.models import checkpoint_format
    from lidc_cdam.models.loading import (  # noqa: F401
        CheckpointError,
        PretrainedWeightsUnavailable,
        build_backbone,
        extract_state_dict,
        from_timm,
        infer_vit_kwargs,
        load_model,
        model_from_payload,
        read_checkpoint,
        save_checkpoint,
    )

    assert reexported is render_phantom
    assert CheckpointError is checkpoint_format.CheckpointError and save_checkpoint is checkpoint_format.save_checkpoint


def imported_names(modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """``{module: every name it imports}`` (absolute; ``from a import b`` gives ``a`` and ``a.b``), anywhere in
    the file."""
    out: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = imported_module(node, package)
                names.add(source)
                names.update(f"{source}.{alias.name}" for alias in node.names)
        out[name] = names
    return out


def gui_imports(modules: dict[str, tuple[Path, bool]]) -> dict[str, list[str]]:
    """``{module: the GUI packages or lidc_cdam.viewer modules it imports}`` for the modules that do."""
    found = {}
    for name, names in imported_names(modules).items():
        bad = sorted(n for n in names if n.split(".")[0] in GUI or n == "lidc_cdam.viewer"
                     or n.startswith("lidc_cdam.viewer."))
        if bad:
            found[name] = bad
    return found


def test_the_library_imports_neither_the_viewer_nor_a_gui_toolkit():
    assert not gui_imports(library_modules()), gui_imports(library_modules())


def test_the_gui_import_finder_sees_relative_and_function_local_imports(tmp_path):
    pkg = tmp_path / "lidc_cdam"
    (pkg / "ct").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ct" / "__init__.py").write_text("def f():\n    from .. import viewer\n")
    (pkg / "ct" / "a.py").write_text("def g():\n    import qtpy.QtCore\n")
    (pkg / "ct" / "b.py").write_text("import numpy\nfrom lidc_cdam.ct import a\n")
    found = gui_imports(library_modules(pkg))
    assert found == {"lidc_cdam.ct": ["lidc_cdam.viewer"], "lidc_cdam.ct.a": ["qtpy.QtCore"]}


#: run in a fresh interpreter: napari and Qt cannot be imported, then every module of lidc_cdam.ct is
BLOCKED_IMPORT = """
import importlib, pkgutil, sys

GUI = {gui!r}


class NoGui:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in GUI:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, NoGui)
import lidc_cdam.ct

names = [m.name for m in pkgutil.walk_packages(lidc_cdam.ct.__path__, "lidc_cdam.ct.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in GUI or m.startswith("lidc_cdam.viewer"))
assert not loaded, loaded
print(len(names), "modules")
"""


@pytest.mark.slow
def test_lidc_cdam_ct_imports_without_napari_or_qt():
    """The CT package imports in an interpreter where napari and the Qt bindings cannot be imported."""
    code = BLOCKED_IMPORT.format(gui=GUI)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert int(out.stdout.split()[0]) >= 10  # every module of lidc_cdam.ct was imported
