"""Hessian diagonals for OBD: exact per leaf with ``jax.hessian``, or Hutchinson's estimator from HVPs."""

from __future__ import annotations

import functools

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxprune._masks import DEFAULT_INCLUDE, prunable_paths
from jaxprune._tree import leaves_with_paths, map_with_path

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]  # (params, batch) -> scalar


def replace_leaves(params: PyTree, sel: dict[str, jax.Array]) -> PyTree:
  """``params`` with the leaves named in ``sel`` (path -> array) swapped in."""
  return map_with_path(lambda p, x: sel[p] if p in sel else x, params)


def expand(params: PyTree, sel: dict[str, Any]) -> PyTree:
  """A pytree like ``params`` holding ``sel[path]`` where given and None elsewhere."""
  return map_with_path(lambda p, x: sel.get(p), params)


def select(params: PyTree, include: str = DEFAULT_INCLUDE, exclude: str | None = None) -> dict[str, jax.Array]:
  """``{path: leaf}`` for the leaves matched by ``include`` / ``exclude``; raises if none match."""
  paths = prunable_paths(params, include=include, exclude=exclude)
  if not paths:
    raise ValueError(f"no parameter path matches include={include!r} (exclude={exclude!r})")
  flat = dict(leaves_with_paths(params))
  return {p: jnp.asarray(flat[p], jnp.float32) for p in paths}


def check_batches(batches: Any, method: str) -> list[Any]:
  """Data-dependent scores need at least one calibration batch."""
  if batches is None:
    raise ValueError(f"{method} needs calibration data: pass a non-empty sequence of batches")
  batches = list(batches)
  if not batches:
    raise ValueError(f"{method} needs calibration data: the sequence of batches is empty")
  return batches


def hvp(f: Callable[[PyTree], jax.Array], x: PyTree, v: PyTree) -> PyTree:
  """Hessian-vector product ``H(x) v`` by forward-over-reverse: ``jax.jvp`` of ``jax.grad``."""
  return jax.jvp(jax.grad(f), (x,), (v,))[1]


def _rademacher(key: jax.Array, sel: dict) -> dict:
  ks = jax.random.split(key, len(sel))
  return {p: jax.random.rademacher(k, x.shape, jnp.float32) for k, (p, x) in zip(ks, sel.items())}


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _probe_sum(sel: dict, params: PyTree, batch: Any, keys: jax.Array, *, loss_fn: LossFn) -> dict:
  """Sum over the probes ``keys`` of ``v * (H v)``, H the Hessian of the loss w.r.t. ``sel``.

  The gradient is linearized once (forward-over-reverse, as in :func:`hvp`) and its
  tangent map applied to every probe, so the primal pass is shared by the chunk.
  """
  grad = jax.grad(lambda s: loss_fn(replace_leaves(params, s), batch))
  _, hvp_fn = jax.linearize(grad, sel)
  vs = jax.vmap(lambda k: _rademacher(k, sel))(keys)
  hv = jax.vmap(hvp_fn)(vs)
  return {p: jnp.sum(vs[p] * hv[p], axis=0) for p in sel}


@functools.partial(jax.jit, static_argnames=("loss_fn", "path"))
def _leaf_hessian_diagonal(w: jax.Array, params: PyTree, batch: Any, *, loss_fn: LossFn, path: str) -> jax.Array:
  h = jax.hessian(lambda w: loss_fn(replace_leaves(params, {path: w}), batch))(w)
  return jnp.diagonal(h.reshape(w.size, w.size)).reshape(w.shape)


def hutchinson_diagonal(loss_fn: LossFn, params: PyTree, batches: Sequence[Any], key: jax.Array, *,
                        num_probes: int = 16, include: str = DEFAULT_INCLUDE, exclude: str | None = None,
                        probe_chunk: int = 8, progress: bool = False) -> PyTree:
  """Hutchinson's estimate of diag(H): ``mean_k v_k * (H v_k)`` with Rademacher ``v_k``.

  H is the Hessian of the mean of ``loss_fn(params, batch)`` over ``batches`` with respect
  to the selected leaves (the others held fixed). Each probe costs one HVP per batch
  (``jax.jvp`` over ``jax.grad``); the estimate is unbiased and its error falls as 1/sqrt(k).

  Args:
    loss_fn: ``(params, batch) -> scalar``.
    params: parameter pytree.
    batches: non-empty sequence of batches passed to ``loss_fn``.
    key: PRNG key for the probes.
    num_probes: k, the number of Rademacher probes (>= 1).
    include, exclude: leaf selection (see :func:`jaxprune.prunable_paths`).
    probe_chunk: probes evaluated together under ``vmap`` (memory grows with it).
    progress: show a progress bar over probes.

  Returns:
    A pytree like ``params`` with the diagonal estimate (float32) at selected leaves, None elsewhere.
  """
  if int(num_probes) < 1:
    raise ValueError(f"num_probes must be >= 1, got {num_probes}")
  batches = check_batches(batches, "Hutchinson's Hessian diagonal")
  sel = select(params, include, exclude)
  chunk = max(1, min(int(probe_chunk), int(num_probes)))

  acc = {p: jnp.zeros_like(x) for p, x in sel.items()}
  all_keys = jax.random.split(key, int(num_probes))
  with tqdm(total=int(num_probes), desc="hutchinson probes", disable=not progress) as bar:
    for start in range(0, int(num_probes), chunk):
      keys = all_keys[start:start + chunk]
      for batch in batches:  # the same probes for every batch: v * (mean_b H_b) v
        acc = jax.tree.map(jnp.add, acc, _probe_sum(sel, params, batch, keys, loss_fn=loss_fn))
      bar.update(len(keys))
  scale = 1.0 / (int(num_probes) * len(batches))
  return expand(params, {p: a * scale for p, a in acc.items()})


def exact_hessian_diagonal(loss_fn: LossFn, params: PyTree, batches: Sequence[Any], *,
                           include: str = DEFAULT_INCLUDE, exclude: str | None = None,
                           max_size: int = 4096) -> PyTree:
  """The exact diagonal of each selected leaf's Hessian block, from ``jax.hessian``.

  Builds the full ``n x n`` block of every leaf (``n`` = leaf size), so it is for small
  leaves only: a leaf larger than ``max_size`` raises; use :func:`hutchinson_diagonal`.
  """
  batches = check_batches(batches, "the exact Hessian diagonal")
  sel = select(params, include, exclude)
  big = [(p, x.size) for p, x in sel.items() if x.size > max_size]
  if big:
    raise ValueError(f"exact Hessian needs leaves of at most max_size={max_size} entries; {big[0][0]} has "
                     f"{big[0][1]}: use hessian='hutchinson' or raise max_size")
  out = {}
  for path, x in sel.items():
    d = jnp.zeros(x.shape, jnp.float32)
    for batch in batches:
      d = d + _leaf_hessian_diagonal(x, params, batch, loss_fn=loss_fn, path=path)
    out[path] = d / len(batches)
  return expand(params, out)

