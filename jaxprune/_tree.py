"""Path-addressed helpers for parameter and mask pytrees."""

from __future__ import annotations

from typing import Any, Callable

import jax

from jaxserve import weights

PyTree = Any


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath: tuple) -> str:
  """Formats a JAX key path as ``"layers_0/self_attn/q_proj/kernel"``."""
  return "/".join(_key_str(k) for k in keypath)


def _is_none(x: Any) -> bool:
  return x is None or weights.is_typed(x)


def leaves_with_paths(tree: PyTree, *, keep_none: bool = False) -> list[tuple[str, Any]]:
  """Returns ``[(path, leaf)]`` in tree-flatten order (None leaves kept if asked; typed weight
  leaves of :mod:`jaxserve.weights` are single leaves)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_none if keep_none else weights.is_typed)
  return [(path_str(p), leaf) for p, leaf in flat]


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
  """``jax.tree.map`` whose function also gets the leaf's path string first.

  None leaves of ``tree`` are passed to ``fn`` as ``None`` (not skipped); typed weight leaves whole.
  """
  return jax.tree_util.tree_map_with_path(
      lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest, is_leaf=_is_none)


def structure_diff(a: PyTree, b: PyTree) -> str | None:
  """Describes how two trees' key paths differ, or None when they agree."""
  pa = {p for p, _ in leaves_with_paths(a, keep_none=True)}
  pb = {p for p, _ in leaves_with_paths(b, keep_none=True)}
  if pa == pb:
    return None
  only_a, only_b = sorted(pa - pb), sorted(pb - pa)
  parts = []
  if only_a:
    parts.append(f"only in the first: {only_a[:4]}{' ...' if len(only_a) > 4 else ''}")
  if only_b:
    parts.append(f"only in the second: {only_b[:4]}{' ...' if len(only_b) > 4 else ''}")
  return "; ".join(parts)
