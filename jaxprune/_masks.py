"""Mask pytrees: choose prunable leaves by path, apply masks, and measure sparsity."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import weights
from jaxprune._tree import leaves_with_paths, map_with_path, structure_diff
from jaxprune._validate import check_masks

PyTree = Any

# The 2-D projection kernels of the transformer blocks: q/k/v/o and gate/up/down.
DEFAULT_INCLUDE = r"(^|/)layers_\d+/(self_attn|mlp)/[^/]+_proj/kernel$"


def _is_selected(path: str, leaf: Any, include: str, exclude: str | None) -> bool:
  if leaf is None or not hasattr(leaf, "shape"):
    return False
  if include == DEFAULT_INCLUDE and len(leaf.shape) != 2:
    return False
  return re.search(include, path) is not None and (exclude is None or re.search(exclude, path) is None)


def prunable_paths(params: PyTree, *, include: str = DEFAULT_INCLUDE, exclude: str | None = None) -> list[str]:
  """Paths of the leaves a pruner may touch.

  Args:
    params: parameter pytree.
    include: regex searched in each leaf's path (``"layers_0/mlp/up_proj/kernel"``). The
      default selects the 2-D q/k/v/o and gate/up/down kernels of the transformer blocks
      (never embeddings, norms or the LM head).
    exclude: optional regex; matching paths are left out.

  Returns:
    The selected paths in tree-flatten order.
  """
  try:
    re.compile(include)
    if exclude is not None:
      re.compile(exclude)
  except re.error as e:
    raise ValueError(f"include/exclude must be valid regular expressions ({e})") from None
  return [p for p, x in leaves_with_paths(params) if _is_selected(p, x, include, exclude)]


def dense_masks(params: PyTree, *, include: str = DEFAULT_INCLUDE, exclude: str | None = None) -> PyTree:
  """All-True bool masks for the selected leaves, None elsewhere."""
  selected = set(prunable_paths(params, include=include, exclude=exclude))
  if not selected:
    raise ValueError(f"no parameter path matches include={include!r} (exclude={exclude!r})")
  return map_with_path(lambda p, x: jnp.ones(x.shape, bool) if p in selected else None, params)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the masked-out entries: ``where(mask, param, 0)`` leaf by leaf.

  Args:
    params: parameter pytree.
    masks: a pytree of the same structure whose leaves are bool arrays of the
      parameter's shape (True = keep), or None / True for leaves left dense.

  Returns:
    New params; unmasked leaves are returned unchanged (same objects).
  """
  check_masks(params, masks)
  return _apply(params, masks)


def _apply(params: PyTree, masks: PyTree) -> PyTree:
  def one(_, m, p):
    if m is None or m is True:
      return p
    return jnp.where(m, p, jnp.zeros((), p.dtype))
  return map_with_path(one, masks, params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparsityReport:
  """Fraction of zeros: ``total`` over the counted leaves and ``per_leaf`` by path."""

  total: float
  zeros: int
  size: int
  per_leaf: dict[str, float]

  def __str__(self) -> str:
    lines = [f"{p}: {s:.4f}" for p, s in self.per_leaf.items()]
    return "\n".join(lines + [f"total: {self.total:.4f} ({self.zeros}/{self.size})"])


def sparsity(tree: PyTree, *, include: str = DEFAULT_INCLUDE, exclude: str | None = None) -> SparsityReport:
  """Measures sparsity of a mask tree or of a parameter tree (typed weight leaves count as their dense form).

  For a mask tree (bool leaves) every bool leaf counts (the fraction of False entries);
  None / True leaves are dense and not counted. For a parameter tree the leaves chosen
  by ``include`` / ``exclude`` count (the fraction of exact zeros).

  Returns:
    A :class:`SparsityReport` with per-leaf fractions and the total.
  """
  items = leaves_with_paths(tree)
  is_mask = items and all(getattr(x, "dtype", None) == np.bool_ or x is True for _, x in items)
  if is_mask:
    chosen = [(p, x) for p, x in items if x is not True]
  else:
    paths = set(prunable_paths(tree, include=include, exclude=exclude))
    chosen = [(p, x) for p, x in items if p in paths]
  per_leaf, zeros, size = {}, 0, 0
  for p, x in chosen:
    arr = np.asarray(weights.to_dense(x))
    z = int(arr.size - np.count_nonzero(arr))
    per_leaf[p] = z / arr.size if arr.size else 0.0
    zeros += z
    size += arr.size
  return SparsityReport(total=zeros / size if size else 0.0, zeros=zeros, size=size, per_leaf=per_leaf)


def masks_from_params(params: PyTree, *, include: str = DEFAULT_INCLUDE, exclude: str | None = None) -> PyTree:
  """Masks that keep exactly the nonzero entries of the selected leaves (None elsewhere)."""
  selected = set(prunable_paths(params, include=include, exclude=exclude))
  return map_with_path(lambda p, x: (weights.to_dense(x) != 0) if p in selected else None, params)


def combine_masks(a: PyTree, b: PyTree) -> PyTree:
  """Logical AND of two mask trees (None / True is the identity)."""
  diff = structure_diff(a, b)
  if diff is not None:
    raise ValueError(f"the two mask trees do not match ({diff})")
  second = dict(leaves_with_paths(b))
  for path, x in leaves_with_paths(a):
    y = second.get(path)
    if x is not True and y is not None and y is not True and tuple(x.shape) != tuple(y.shape):
      raise ValueError(f"mask leaf {path!r} has shape {tuple(x.shape)} in the first tree, "
                       f"{tuple(y.shape)} in the second")

  def one(_, x, y):
    if x is None or x is True:
      return y
    if y is None or y is True:
      return x
    return jnp.logical_and(x, y)
  return map_with_path(one, a, b)


def leaf_masks(masks: PyTree) -> dict[str, jax.Array]:
  """``{path: bool array}`` for the masked (non-None) leaves."""
  return {p: m for p, m in leaves_with_paths(masks) if m is not None and m is not True}
