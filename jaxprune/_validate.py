"""Input checks shared by the public API: each raises a ValueError saying what would be right."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._tree import leaves_with_paths, structure_diff

Pattern = tuple[int, int]


def check_int(name: str, value: Any, lo: int | None, hi: int | None = None) -> int:
  """Returns ``value`` as an int in [lo, hi] (None: unbounded) or raises (bools and floats such as 2.5 are refused)."""
  ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
  if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
    shown = "" if lo is None and hi is None else f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"
    raise ValueError(f"{name} must be an int{shown}, got {value!r}")
  return int(value)


def check_real(name: str, value: Any, lo: float, *, open_lo: bool = False) -> float:
  """Returns ``value`` as a finite float ``>= lo`` (``> lo`` with ``open_lo``) or raises."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
  if not ok or (value <= lo if open_lo else value < lo):
    raise ValueError(f"{name} must be a finite number {'>' if open_lo else '>='} {lo:g}, got {value!r}")
  return float(value)


def check_sparsity(sparsity: Any, name: str = "sparsity") -> float:
  """Returns ``sparsity`` as a float in [0, 1) or raises (strings and bools are not numbers here)."""
  try:
    if isinstance(sparsity, (str, bytes, bool, np.bool_)):
      raise TypeError
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
      n, m = pattern
    except (TypeError, ValueError):
      n = m = None
    if not all(isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) for x in (n, m)):
      raise ValueError(f"pattern must be 'N:M' or a pair (N, M) of integers, got {pattern!r}")
    n, m = int(n), int(m)
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


def check_token_ids(token_ids: Any, vocab_size: int, what: str = "token_ids") -> np.ndarray:
  """Returns a 1-D token stream as int32 or raises: integers in [0, vocab_size), nothing else."""
  try:
    ids = np.asarray(token_ids)
  except ValueError:
    ids = np.asarray(None)
  if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
    raise ValueError(f"{what} must be a 1-D sequence of integer token ids, got {_described(token_ids, ids)}")
  if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
    raise ValueError(f"{what} must be in [0, {vocab_size}) (the model's vocabulary), got ids in "
                     f"[{int(ids.min())}, {int(ids.max())}]")
  return ids.astype(np.int32)


def _described(value: Any, arr: np.ndarray) -> str:
  if isinstance(value, str):
    return "a string (tokenize it first)"
  return f"shape {arr.shape} dtype {arr.dtype}"


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
    if path not in shapes:
      raise ValueError(f"mask leaf {path!r} is an array, but the tree it masks holds None there; use None")
    if not hasattr(m, "shape") or not hasattr(m, "dtype"):
      raise ValueError(f"mask leaf {path!r} must be a bool array, None or True, got {type(m).__name__}")
    if m.dtype != np.bool_:
      raise ValueError(f"mask leaf {path!r} must have dtype bool, got {m.dtype}")
    if tuple(m.shape) != tuple(shapes[path].shape):
      raise ValueError(f"mask leaf {path!r} has shape {tuple(m.shape)}, the parameter has {tuple(shapes[path].shape)}")
