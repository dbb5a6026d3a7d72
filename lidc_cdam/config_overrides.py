"""Reading the YAML configs of the benchmark and training jobs, and their ``--set key.sub=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_yaml_config(path: str | Path, overrides: list[str] | None, error: type[Exception]) -> dict[str, Any]:
    """A config file as a mapping with ``overrides`` applied; problems raise ``error`` naming the file."""
    file = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{file}: no such config file") from None
    except yaml.YAMLError as err:
        raise error(f"{file}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise error(f"{file}: expected a mapping at the top level")
    for assignment in overrides or []:
        apply_override(data, assignment, file, error)
    return data


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
