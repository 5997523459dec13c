"""Iterative Optimal Brain Surgeon on one linear layer: remove the least salient weights, refit the rest, repeat.

For small layers only: every round inverts one ``in x in`` matrix per output.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._sparsegpt import check_layer, damped_hessian
from jaxprune._topk import keep_mask, nm_keep_mask, num_pruned
from jaxprune._validate import resolve_target

_HI = jax.lax.Precision.HIGHEST


def _restricted_inverse(h: jax.Array, mask: jax.Array) -> jax.Array:
  """Per output row r: the inverse of H restricted to its kept inputs, identity on pruned ones.

  h ``[in, in]``, mask ``[out, in]`` -> ``[out, in, in]``.
  """
  m = mask.astype(jnp.float32)
  a = m[:, :, None] * h[None] * m[:, None, :] + jax.vmap(jnp.diag)(1.0 - m)
  return jnp.linalg.inv(a)


def _refit(h: jax.Array, w0: jax.Array, mask: jax.Array, ainv: jax.Array) -> jax.Array:
  """The least-squares weights ``argmin ||X w0_r - X w_r||`` with ``w_r`` zero off the mask, per row."""
  rhs = jnp.where(mask, jnp.matmul(w0, h, precision=_HI), 0.0)
  return jnp.where(mask, jnp.einsum("rij,rj->ri", ainv, rhs, precision=_HI), 0.0)


@functools.partial(jax.jit, static_argnames=("rounds", "n", "m"))
def _iterate(w0: jax.Array, gram: jax.Array, targets: jax.Array, percdamp: jax.Array, *, rounds: int,
             n: int | None, m: int | None) -> tuple[jax.Array, jax.Array]:
  h, w0 = damped_hessian(gram, w0, percdamp)
  mask = jnp.ones(w0.shape, bool)
  w = w0
  for r in range(rounds):
    ainv = _restricted_inverse(h, mask)
    w = _refit(h, w0, mask, ainv)
    # OBS saliency of removing weight q from row r: w_q^2 / (2 [H_KK^-1]_qq); pruned ones rank first.
    sal = jnp.where(mask, jnp.square(w) / jnp.diagonal(ainv, axis1=1, axis2=2), -jnp.inf)
    if n is None:
      mask = keep_mask(sal, targets[r]) & mask
    else:  # one more weight out of every group of M per round
      mask = nm_keep_mask(sal.T, m - r - 1, m).T & mask
  ainv = _restricted_inverse(h, mask)
  return _refit(h, w0, mask, ainv), mask


def obs_layer(kernel: jax.Array, gram: jax.Array, *, sparsity: float | None = None, pattern: Any = None,
              rounds: int = 4, percdamp: float = 0.01, max_inputs: int = 1024) -> tuple[jax.Array, jax.Array]:
  """Iterative OBS (Hassibi & Stork 1993, layer-wise): ``rounds`` prune/refit steps to the target.

  Each round ranks the surviving weights by their OBS saliency ``w_q^2 / [H_KK^-1]_qq``
  (H the layer Hessian restricted to the row's kept inputs K), prunes the least salient
  layer-wide up to the round's target ``1 - (1 - s)^((r + 1) / rounds)``, and refits
  every row's kept weights exactly by least squares against the dense layer's output.
  With an N:M pattern there are ``M - N`` rounds, each removing one weight per group.

  Args:
    kernel: ``(in, out)`` weights; ``in`` at most ``max_inputs`` (cost ``out * in^3`` per round).
    gram: ``(in, in)`` ``X^T X`` of the calibration inputs.
    sparsity, pattern: the target.
    rounds: prune/refit rounds for unstructured sparsity.
    percdamp: dampening as a fraction of the mean diagonal of H.

  Returns:
    ``(new_kernel, mask)``, pruned entries exactly zero.
  """
  s, nm = resolve_target(sparsity, pattern)
  kernel, gram = jnp.asarray(kernel), jnp.asarray(gram, jnp.float32)
  check_layer(kernel, gram, nm)
  if kernel.shape[0] > max_inputs:
    raise ValueError(f"iterative OBS inverts one {kernel.shape[0]}x{kernel.shape[0]} matrix per output per round; "
                     f"inputs > max_inputs={max_inputs}: use sparsegpt for large layers")
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  size = kernel.size
  if nm is None:
    targets = jnp.asarray([num_pruned(1.0 - (1.0 - s) ** ((r + 1) / rounds), size) for r in range(rounds)],
                          jnp.int32)
    targets = targets.at[-1].set(num_pruned(s, size))
  else:
    rounds, targets = nm[1] - nm[0], jnp.zeros((nm[1] - nm[0],), jnp.int32)
  w, mask = _iterate(kernel.T.astype(jnp.float32), gram, targets, jnp.float32(percdamp), rounds=rounds,
                     n=None if nm is None else nm[0], m=None if nm is None else nm[1])
  return w.T.astype(kernel.dtype), mask.T
