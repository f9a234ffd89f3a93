"""One walker over the nested structures denoiser calls take and return (dicts, lists, tuples, outputs)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


def map_tree(tree: Any, fn: Callable[[str, Any], Any], prefix: str = "") -> Any:
    """``tree`` rebuilt with every leaf replaced by ``fn(path, leaf)``.

    Containers are mappings (diffusers outputs included), lists and tuples (named tuples included); they
    keep their type, other mappings become dicts. A leaf's path is ``prefix`` followed by ``.<key>`` or
    ``.<index>`` per level. Leaves are visited in order, so ``fn`` may also collect them.
    """
    if isinstance(tree, Mapping):
        items = {k: map_tree(v, fn, f"{prefix}.{k}") for k, v in tree.items()}
        if dataclasses.is_dataclass(tree):  # a diffusers output: a dict with a dataclass constructor
            return type(tree)(**items)
        return type(tree)(items) if isinstance(tree, dict) else items
    if isinstance(tree, list | tuple):
        values = [map_tree(v, fn, f"{prefix}.{i}") for i, v in enumerate(tree)]
        if isinstance(tree, list):
            return values
        return type(tree)(*values) if hasattr(tree, "_fields") else tuple(values)
    return fn(prefix, tree)


def leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of ``tree`` with its path (see :func:`map_tree`), in order."""
    found: list[tuple[str, Any]] = []
    map_tree(tree, lambda path, leaf: found.append((path, leaf)), prefix)
    return found
