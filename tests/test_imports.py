"""No import cycles between the library's modules (the ``lidc_cdam/`` source folder), read with ``ast``.

Every ``import`` statement counts, at module level or inside a function (a function-local import only
postpones a cycle to run time). ``import a.b.c`` / ``from a.b import c`` is an edge to module ``a.b.c`` when
it exists, else (``c`` a name) to ``a.b``; the parent packages whose ``__init__`` Python runs on the way are
not edges (``lidc_cdam/__init__.py`` re-exports the public API, so every module would close a cycle with it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import lidc_cdam

ROOT = Path(lidc_cdam.__file__).resolve().parent

#: Cycles allowed for now, each a sorted tuple of module names with the reason (none at present).
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


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
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
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
