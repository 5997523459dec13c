"""Masks from scores: layer-wise, global or per-output top-k with an exact count, and N:M groups.

Tie-break (documented and tested): entries are ranked by ``(score, flat index)`` with a
stable sort, so among equal scores the entry with the lower row-major index (within the
leaf; for global scope, leaves in tree-flatten order) is pruned first.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._select import prune_masks_by_count
from jaxprune._tree import leaves_with_paths, map_with_path
from jaxprune._validate import check_masks, check_scope, check_sparsity, parse_pattern

PyTree = Any


def num_pruned(sparsity: Any, size: int) -> Any:
  """Entries to prune for a target: ``floor(sparsity * size + 1/2)`` (Python int or traced)."""
  if isinstance(sparsity, (int, float)):
    return int(math.floor(sparsity * size + 0.5))
  return jnp.floor(jnp.asarray(sparsity, jnp.float32) * size + 0.5).astype(jnp.int32)


@jax.jit
def keep_mask(scores: jax.Array, k: Any) -> jax.Array:
  """Bool mask of ``scores``' shape pruning its ``k`` lowest entries (``k`` may be traced).

  The whole array is one group, ranked by ``(score, flat index)``. Selection is by counting
  (no sort), so sharded scores are never gathered; :func:`keep_mask_sorted` is the reference.
  """
  return ~prune_masks_by_count([scores], k)[0]


def keep_mask_sorted(scores: jax.Array, k: Any) -> jax.Array:
  """Reference of :func:`keep_mask`: the same ranking with a stable sort."""
  flat = scores.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  return (ranks >= k).reshape(scores.shape)


@jax.jit
def keep_mask_rows(scores: jax.Array, k: Any) -> jax.Array:
  """Like :func:`keep_mask` independently for each row of a 2-D ``scores``."""
  return jax.vmap(lambda row: keep_mask(row, k))(scores)


def _prior(score: jax.Array, old: Any) -> jax.Array:
  """Scores with already-pruned entries forced to the front (they stay pruned)."""
  score = jnp.asarray(score, jnp.float32)
  if old is None or old is True:
    return score
  return jnp.where(old, score, -jnp.inf)


def topk_masks(scores: PyTree, sparsity: Any, *, scope: str = "layer", masks: PyTree | None = None) -> PyTree:
  """Keeps the highest scores; exactly ``num_pruned(sparsity, n)`` entries are pruned.

  Args:
    scores: pytree of score arrays; None leaves are not pruned (their mask is None).
    sparsity: target fraction in [0, 1); a Python float, or a traced scalar under ``jit``.
    scope: ``"layer"`` (each leaf on its own), ``"global"`` (one ranking over all
      leaves), or ``"output"`` (each output column of a 2-D ``(in, out)`` kernel on its
      own, comparing its inputs: Wanda's grouping).
    masks: optional current masks; entries they prune stay pruned and count toward the target.

  Returns:
    A mask pytree (True = keep) with None where ``scores`` is None.
  """
  check_scope(scope)
  if not isinstance(sparsity, jax.Array):
    sparsity = check_sparsity(sparsity)
  elif not isinstance(sparsity, jax.core.Tracer):  # a traced target is checked by its schedule
    check_sparsity(sparsity)
  old = _old_by_path(scores, masks)
  if scope == "global":
    return _global(scores, sparsity, old)

  def one(path, s):
    if s is None:
      return None
    prev = _as_bool(old.get(path), s.shape)
    s = _prior(s, prev)
    if scope == "layer":
      return keep_mask(s, num_pruned(sparsity, s.size)) & prev
    if s.ndim != 2:
      raise ValueError(f"scope='output' needs 2-D (in, out) leaves; {path!r} has shape {s.shape}")
    return keep_mask_rows(s.T, num_pruned(sparsity, s.shape[0])).T & prev
  return map_with_path(one, scores)


def _old_by_path(scores: PyTree, masks: PyTree | None) -> dict[str, Any]:
  if masks is None:
    return {}
  check_masks(scores, masks)
  return dict(leaves_with_paths(masks))


def _global(scores: PyTree, sparsity: Any, old: dict[str, Any]) -> PyTree:
  items = [(p, _prior(s, old.get(p))) for p, s in leaves_with_paths(scores)]
  if not items:
    return scores
  # one ranking over all leaves (in tree order) without concatenating them: nothing is gathered
  pruned = prune_masks_by_count([s for _, s in items], num_pruned(sparsity, sum(s.size for _, s in items)))
  out = {p: ~drop & _as_bool(old.get(p), s.shape) for (p, s), drop in zip(items, pruned)}
  return map_with_path(lambda p, s: None if s is None else out[p], scores)


def _required_pattern(pattern: Any) -> tuple[int, int]:
  if pattern is None:
    raise ValueError("an N:M pattern such as '2:4' or (2, 4) is required, got None")
  return parse_pattern(pattern)


def nm_compatible(shape: tuple[int, ...], m: int) -> bool:
  """Whether a leaf can carry an N:M pattern: 2-D with its input dimension (axis 0) divisible by M."""
  return len(shape) == 2 and shape[0] % m == 0


def nm_incompatible(scores: PyTree, pattern: Any) -> list[str]:
  """Paths of scored leaves that must stay dense under an N:M pattern."""
  _, m = _required_pattern(pattern)
  return [p for p, s in leaves_with_paths(scores) if not nm_compatible(tuple(s.shape), m)]


@functools.partial(jax.jit, static_argnames=("n", "m"))
def nm_keep_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
  """N:M mask of one ``(in, out)`` score array: in every M consecutive inputs of each output, keep the N best."""
  i, o = scores.shape
  groups = scores.reshape(i // m, m, o).transpose(0, 2, 1)  # [groups, out, m]
  order = jnp.argsort(groups, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  keep = ranks >= (m - n)
  return keep.transpose(0, 2, 1).reshape(i, o)


def nm_masks(scores: PyTree, pattern: Any, *, masks: PyTree | None = None) -> PyTree:
  """N:M masks along the input dimension (axis 0 of ``(in, out)`` kernels).

  In every group of M consecutive input rows of each output column exactly N entries
  are kept (stable tie-break within the group). Leaves whose input dimension is not a
  multiple of M (or that are not 2-D) stay dense: their mask is None; list them with
  :func:`nm_incompatible`.

  Args:
    scores: pytree of ``(in, out)`` score arrays (None = not pruned).
    pattern: ``"N:M"`` or ``(N, M)`` with ``0 < N < M``.
    masks: optional current masks whose pruned entries stay pruned (a group already
      holding fewer than N survivors keeps them all).
  """
  n, m = _required_pattern(pattern)
  old = _old_by_path(scores, masks)

  def one(path, s):
    if s is None or not nm_compatible(tuple(s.shape), m):
      return None
    return nm_keep_mask(_prior(s, old.get(path)), n, m) & _as_bool(old.get(path), s.shape)
  return map_with_path(one, scores)


def _as_bool(mask: Any, shape: tuple[int, ...]) -> jax.Array:
  if mask is None or mask is True:
    return jnp.ones(shape, bool)
  return mask
