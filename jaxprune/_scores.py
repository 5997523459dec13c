"""Saliency scores as pytrees: magnitude, random, Taylor, Fisher, OBD and Wanda (higher = keep)."""

from __future__ import annotations

import functools

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxprune._hessian import (LossFn, check_batches, exact_hessian_diagonal, expand, hutchinson_diagonal,
                               replace_leaves, select)
from jaxprune._masks import DEFAULT_INCLUDE
from jaxprune._tree import leaves_with_paths
from jaxprune._validate import check_int

PyTree = Any


def magnitude_scores(params: PyTree, *, include: str = DEFAULT_INCLUDE, exclude: str | None = None) -> PyTree:
  """``|w|`` at the selected leaves, None elsewhere."""
  return expand(params, {p: jnp.abs(x) for p, x in select(params, include, exclude).items()})


def random_scores(params: PyTree, seed: int = 0, *, include: str = DEFAULT_INCLUDE,
                  exclude: str | None = None) -> PyTree:
  """Uniform random scores (seeded; leaf ``i`` in flatten order uses ``fold_in(key, i)``)."""
  key = jax.random.PRNGKey(check_int("seed", seed, None))
  sel = select(params, include, exclude)
  return expand(params, {p: jax.random.uniform(jax.random.fold_in(key, i), x.shape)
                         for i, (p, x) in enumerate(sel.items())})


def _grad_impl(sel: dict, params: PyTree, batch: Any, *, loss_fn: LossFn) -> dict:
  return jax.grad(lambda s: loss_fn(replace_leaves(params, s), batch))(sel)


_grad = jax.jit(_grad_impl, static_argnames=("loss_fn",))


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _sq_grad_sum(sel: dict, params: PyTree, examples: Any, *, loss_fn: LossFn) -> dict:
  """Sum over examples (leading axis) of the squared per-example gradient."""
  def one(example):
    return _grad_impl(sel, params, jax.tree.map(lambda a: a[None], example), loss_fn=loss_fn)
  g = jax.vmap(one)(examples)
  return {p: jnp.sum(jnp.square(x), axis=0) for p, x in g.items()}


def _mean_grad(loss_fn: LossFn, params: PyTree, batches: list[Any], sel: dict[str, jax.Array]) -> dict:
  acc = {p: jnp.zeros_like(x) for p, x in sel.items()}
  for batch in batches:
    acc = jax.tree.map(jnp.add, acc, _grad(sel, params, batch, loss_fn=loss_fn))
  return {p: a / len(batches) for p, a in acc.items()}


def taylor_scores(loss_fn: LossFn, params: PyTree, batches: Sequence[Any], *, include: str = DEFAULT_INCLUDE,
                  exclude: str | None = None) -> PyTree:
  """First-order Taylor saliency ``|w * g|``, g the gradient of the mean loss over ``batches``."""
  batches = check_batches(batches, "taylor scores")
  sel = select(params, include, exclude)
  g = _mean_grad(loss_fn, params, batches, sel)
  return expand(params, {p: jnp.abs(sel[p] * g[p]) for p in sel})


def fisher_diagonal(loss_fn: LossFn, params: PyTree, batches: Sequence[Any], *, include: str = DEFAULT_INCLUDE,
                    exclude: str | None = None, chunk: int = 8) -> PyTree:
  """Empirical Fisher diagonal: the mean over examples of the squared per-example gradient.

  Every batch is split into examples along its leading axis (``loss_fn`` is called on
  batches of one); per-example gradients are taken ``chunk`` at a time with ``vmap``.
  """
  batches = check_batches(batches, "fisher scores")
  sel = select(params, include, exclude)
  acc = {p: jnp.zeros_like(x) for p, x in sel.items()}
  count = 0
  for batch in batches:
    n = jax.tree.leaves(batch)[0].shape[0]
    for start in range(0, n, chunk):
      part = jax.tree.map(lambda a: a[start:start + chunk], batch)
      acc = jax.tree.map(jnp.add, acc, _sq_grad_sum(sel, params, part, loss_fn=loss_fn))
    count += n
  return expand(params, {p: a / count for p, a in acc.items()})


def fisher_scores(loss_fn: LossFn, params: PyTree, batches: Sequence[Any], *, include: str = DEFAULT_INCLUDE,
                  exclude: str | None = None, chunk: int = 8) -> PyTree:
  """OBD saliency with the Fisher diagonal standing in for the Hessian: ``F_qq w_q^2 / 2``."""
  fisher = fisher_diagonal(loss_fn, params, batches, include=include, exclude=exclude, chunk=chunk)
  return _half_h_w2(params, fisher)


def _half_h_w2(params: PyTree, diag: PyTree) -> PyTree:
  flat = dict(leaves_with_paths(params))
  return expand(params, {p: 0.5 * d * jnp.square(jnp.asarray(flat[p], jnp.float32))
                         for p, d in leaves_with_paths(diag)})


def obd_scores(loss_fn: LossFn, params: PyTree, batches: Sequence[Any], *, hessian: str = "hutchinson",
               num_probes: int = 16, seed: int = 0, include: str = DEFAULT_INCLUDE, exclude: str | None = None,
               max_exact_size: int = 4096, progress: bool = False) -> PyTree:
  """Optimal Brain Damage saliency ``s_q = h_qq w_q^2 / 2`` (LeCun et al. 1990).

  Args:
    loss_fn: ``(params, batch) -> scalar``; H is the Hessian of its mean over ``batches``.
    params: parameter pytree.
    batches: calibration batches.
    hessian: ``"exact"`` (``jax.hessian`` per leaf; small leaves only) or ``"hutchinson"``
      (``num_probes`` Rademacher probes, HVPs by forward-over-reverse).
    num_probes: Hutchinson probes k.
    seed: seed of the probes.
    include, exclude: leaf selection.
    max_exact_size: largest leaf ``hessian="exact"`` accepts.
    progress: progress bar over probes.

  Returns:
    Scores at the selected leaves (None elsewhere). A negative curvature estimate gives a
    negative saliency, so such weights are pruned first (the formula, unclamped).
  """
  if hessian not in ("exact", "hutchinson"):
    raise ValueError(f"hessian must be 'exact' or 'hutchinson', got {hessian!r}")
  batches = check_batches(batches, "OBD scores")
  if hessian == "exact":
    diag = exact_hessian_diagonal(loss_fn, params, batches, include=include, exclude=exclude,
                                  max_size=max_exact_size)
  else:
    diag = hutchinson_diagonal(loss_fn, params, batches, jax.random.PRNGKey(seed), num_probes=num_probes,
                               include=include, exclude=exclude, progress=progress)
  return _half_h_w2(params, diag)


def wanda_scores(params: PyTree, input_norms: dict[str, jax.Array]) -> PyTree:
  """Wanda: ``|W_ij| * ||X_i||_2`` for ``(in, out)`` kernels, ``||X_i||`` the norm of input feature i.

  Args:
    params: parameter pytree.
    input_norms: ``{path: [in] array}`` of per-input-feature activation norms over the
      calibration tokens, for each kernel to score.

  Returns:
    Scores at those paths, None elsewhere. Compare them per output (``scope="output"``).
  """
  flat = dict(leaves_with_paths(params))
  out = {}
  for p, norm in input_norms.items():
    if p not in flat:
      raise ValueError(f"input_norms names {p!r}, which is not a parameter path")
    w = jnp.asarray(flat[p], jnp.float32)
    norm = jnp.asarray(norm, jnp.float32)
    if w.ndim != 2 or norm.shape != (w.shape[0],):
      raise ValueError(f"{p}: need a 2-D (in, out) kernel and a norm of shape ({w.shape[0]},), "
                       f"got {w.shape} and {norm.shape}")
    out[p] = jnp.abs(w) * norm[:, None]
  return expand(params, out)
