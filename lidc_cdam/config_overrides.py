"""``--set key.sub=value`` overrides for the YAML configs of the benchmark and training jobs."""

from __future__ import annotations

from typing import Any

import yaml


def apply_override(data: dict[str, Any], assignment: str, file: str, error: type[Exception] = ValueError) -> None:
    """Set ``a.b.c=value`` (value parsed as YAML) in a config mapping; list items by name or index."""
    if "=" not in assignment:
        raise error(f"--set {assignment!r}: expected key.sub=value")
    key, raw = assignment.split("=", 1)
    node: Any = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = _list_item(node, part, key, file, error) if isinstance(node, list) else node.setdefault(part, {})
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _list_item(items: list[Any], part: str, key: str, file: str, error: type[Exception]) -> Any:
    """``image_sets.xval`` or ``image_sets.0``: an item by name or index."""
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    if part.isdigit() and int(part) < len(items):
        return items[int(part)]
    raise error(f"{file}: --set {key}: no item {part!r}")
