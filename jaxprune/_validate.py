"""Input checks shared by the public API: each raises a ValueError saying what would be right."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._tree import leaves_with_paths, structure_diff

Pattern = tuple[int, int]


def check_sparsity(sparsity: Any, name: str = "sparsity") -> float:
  """Returns ``sparsity`` as a float in [0, 1) or raises."""
  try:
    s = float(sparsity)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number in [0, 1), got {sparsity!r}") from None
  if not (0.0 <= s < 1.0) or math.isnan(s):
    raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
  return s


def parse_pattern(pattern: str | Sequence[int] | None) -> Pattern | None:
  """Parses ``"2:4"`` or ``(2, 4)`` into ``(n, m)`` with ``0 < n < m``; None stays None."""
  if pattern is None:
    return None
  if isinstance(pattern, str):
    parts = pattern.split(":")
    try:
      n, m = (int(p) for p in parts)
    except ValueError:
      raise ValueError(f"pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
  else:
    try:
      n, m = (int(p) for p in pattern)
    except (TypeError, ValueError):
      raise ValueError(f"pattern must be a pair (N, M) of integers, got {pattern!r}") from None
  if n < 1 or m < 2 or n >= m:
    raise ValueError(f"N:M pattern needs 0 < N < M (N nonzeros in every M), got {n}:{m}")
  return n, m


def resolve_target(sparsity: Any, pattern: Any) -> tuple[float, Pattern | None]:
  """Checks a sparsity / N:M pattern pair; with a pattern the sparsity is 1 - N/M."""
  nm = parse_pattern(pattern)
  if nm is None:
    if sparsity is None:
      raise ValueError("give a sparsity in [0, 1) or an N:M pattern such as '2:4'")
    return check_sparsity(sparsity), None
  implied = 1.0 - nm[0] / nm[1]
  if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
    raise ValueError(
        f"pattern {nm[0]}:{nm[1]} means sparsity {implied:g}, but sparsity={sparsity!r} was given; "
        "omit the sparsity or make them agree")
  return implied, nm


def check_scope(scope: str, allowed: Sequence[str] = ("layer", "global", "output")) -> str:
  if scope not in allowed:
    raise ValueError(f"scope must be one of {tuple(allowed)}, got {scope!r}")
  return scope


def check_finite(tree: Any, what: str = "params") -> None:
  """Raises if any floating leaf holds NaN or infinity (names the first bad leaf)."""
  for path, leaf in leaves_with_paths(tree):
    if leaf is None or isinstance(leaf, jax.ShapeDtypeStruct):
      continue
    arr = jnp.asarray(leaf)
    if jnp.issubdtype(arr.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(arr))):
      raise ValueError(f"{what} leaf {path!r} holds NaN or infinite values; prune only finite weights")


def check_masks(params: Any, masks: Any) -> None:
  """Raises unless ``masks`` mirrors ``params``: bool arrays of the leaf's shape, or None / True."""
  diff = structure_diff(masks, params)
  if diff is not None:
    raise ValueError(f"mask tree does not match the params tree ({diff})")
  shapes = dict(leaves_with_paths(params))
  for path, m in leaves_with_paths(masks, keep_none=True):
    if m is None or m is True:
      continue
    if not hasattr(m, "shape") or not hasattr(m, "dtype"):
      raise ValueError(f"mask leaf {path!r} must be a bool array, None or True, got {type(m).__name__}")
    if m.dtype != np.bool_:
      raise ValueError(f"mask leaf {path!r} must have dtype bool, got {m.dtype}")
    if tuple(m.shape) != tuple(shapes[path].shape):
      raise ValueError(f"mask leaf {path!r} has shape {tuple(m.shape)}, the parameter has {tuple(shapes[path].shape)}")
