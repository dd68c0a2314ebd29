"""Small helpers over parameter trees (nested dicts and lists of arrays)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from metapeft.backend import mx, utils

Path = tuple  # keys (str) and list indices (int) from the root


def merge(base: Any, overlay: Any) -> Any:
    """``base`` with ``overlay``'s entries added or replacing, recursively (lists merge index by index)."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        return {k: merge(base[k], overlay[k]) if k in base and k in overlay else overlay.get(k, base.get(k))
                for k in {**base, **overlay}}
    if isinstance(base, list) and isinstance(overlay, list):
        return [merge(b, o) for b, o in zip(base, overlay)] + base[len(overlay):]
    return overlay


def set_in(tree: dict, path: Path, value: Any) -> dict:
    """Put ``value`` at ``path`` in ``tree``, creating dicts and lists (padded with empty dicts) on the way."""
    node = tree
    for key, next_key in zip(path[:-1], path[1:]):
        child = [] if isinstance(next_key, int) else {}
        if isinstance(key, int):
            node.extend({} for _ in range(key + 1 - len(node)))
            if not node[key]:
                node[key] = child
        else:
            node.setdefault(key, child)
        node = node[key]
    if isinstance(path[-1], int):
        node.extend({} for _ in range(path[-1] + 1 - len(node)))
    node[path[-1]] = value
    return tree


def get_in(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def linear_layers(tree: Any, path: Path = ()) -> Iterator[tuple[Path, dict]]:
    """Every linear layer (a dict holding a 2-D ``weight``) with its path."""
    if isinstance(tree, dict):
        if isinstance(tree.get("weight"), mx.array) and tree["weight"].ndim == 2:
            yield path, tree
            return
        for key, child in tree.items():
            yield from linear_layers(child, (*path, key))
    elif isinstance(tree, list):
        for index, child in enumerate(tree):
            yield from linear_layers(child, (*path, index))


def map_with_path(fn: Callable[[Path, Any], Any], tree: Any, path: Path = ()) -> Any:
    """``tree`` with every leaf replaced by ``fn(its path, the leaf)`` (a checkpoint's arrays read into a model's
    tree by their names)."""
    if isinstance(tree, list):
        return [map_with_path(fn, child, (*path, i)) for i, child in enumerate(tree)]
    if isinstance(tree, dict):
        return {k: map_with_path(fn, v, (*path, k)) for k, v in tree.items()}
    return fn(path, tree)


def leaves_with_paths(tree: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every leaf of ``tree`` with its path (a model's tree written under a checkpoint's names)."""
    if isinstance(tree, list):
        for index, child in enumerate(tree):
            yield from leaves_with_paths(child, (*path, index))
    elif isinstance(tree, dict):
        for key, child in tree.items():
            yield from leaves_with_paths(child, (*path, key))
    else:
        yield path, tree


def path_name(path: Path) -> str:
    return ".".join(str(k) for k in path)


def count(tree: Any) -> int:
    return sum(v.size for _, v in utils.tree_flatten(tree))


def nbytes(tree: Any) -> int:
    return sum(v.nbytes for _, v in utils.tree_flatten(tree))


def without_key(tree: Any, key: str) -> Any:
    """``tree`` without any dict entry named ``key``, at any depth."""
    if isinstance(tree, dict):
        return {k: without_key(v, key) for k, v in tree.items() if k != key}
    if isinstance(tree, list):
        return [without_key(v, key) for v in tree]
    return tree


def paths_holding(tree: Any, key: str, path: Path = ()) -> list[Path]:
    """The paths of the dicts in ``tree`` that hold ``key`` (e.g. every layer carrying an AdaLoRA mask)."""
    if isinstance(tree, dict):
        if key in tree:
            return [path]
        return [p for k, child in tree.items() for p in paths_holding(child, key, (*path, k))]
    if isinstance(tree, list):
        return [p for i, child in enumerate(tree) for p in paths_holding(child, key, (*path, i))]
    return []
