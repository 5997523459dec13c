"""SparseGPT on one linear layer: OBS with the layer Hessian, Cholesky of H^-1, lazy blocked column updates."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxprune._topk import keep_mask, keep_mask_rows, num_pruned
from jaxprune._validate import resolve_target
from jaxserve.sharding import shard_rows_like

_HI = jax.lax.Precision.HIGHEST


def check_layer(kernel: Any, gram: Any, pattern: tuple[int, int] | None) -> None:
  """Validates an ``(in, out)`` kernel against an ``(in, in)`` Gram matrix and an N:M pattern."""
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2-D (in, out), got shape {kernel.shape}")
  if gram.shape != (kernel.shape[0], kernel.shape[0]):
    raise ValueError(f"gram must be (in, in) = {(kernel.shape[0],) * 2} for a kernel of shape {kernel.shape}, "
                     f"got {gram.shape}")
  if pattern is not None and kernel.shape[0] % pattern[1]:
    raise ValueError(f"N:M {pattern[0]}:{pattern[1]} needs the input dimension to be a multiple of "
                     f"{pattern[1]}, got {kernel.shape[0]}")
  if not bool(jnp.all(jnp.isfinite(kernel))) or not bool(jnp.all(jnp.isfinite(gram))):
    raise ValueError("kernel and gram must be finite (no NaN or infinity)")


def damped_hessian(gram: jax.Array, w: jax.Array, percdamp: float) -> tuple[jax.Array, jax.Array]:
  """``H = X^T X`` with dead inputs (zero diagonal) set to 1 and their weights zeroed, plus
  ``percdamp * mean(diag H)`` on the diagonal. ``w`` is ``(out, in)``. Returns ``(H, w)``."""
  h = gram.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(jnp.float32))
  w = jnp.where(dead[None, :], 0.0, w)
  h = h + (percdamp * jnp.mean(jnp.diagonal(h))) * jnp.eye(h.shape[0], dtype=jnp.float32)
  return h, w


@functools.partial(jax.jit, static_argnames=("blocksize", "n", "m"))
def _solve(w: jax.Array, gram: jax.Array, counts: jax.Array, percdamp: jax.Array, *, blocksize: int,
           n: int | None, m: int | None) -> tuple[jax.Array, jax.Array]:
  """w ``[out, in]`` (rows are outputs); counts ``[blocks]`` pruned per block (unstructured)."""
  rows, cols = w.shape
  h, w = damped_hessian(gram, w, percdamp)
  eye = jnp.eye(cols, dtype=jnp.float32)
  hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), eye)
  u = jnp.linalg.cholesky(hinv).T  # upper: H^-1 = U^T U; row i of U drives the update after column i
  masks = []
  for bi, b0 in enumerate(range(0, cols, blocksize)):
    b1 = min(b0 + blocksize, cols)
    u1 = u[b0:b1, b0:b1]
    d = jnp.diagonal(u1)
    w1 = w[:, b0:b1]
    if n is None:  # adaptive mask selection over the whole block, exact count
      mask1 = keep_mask(jnp.square(w1) / jnp.square(d)[None, :], counts[bi])
    else:
      mask1 = jnp.ones(w1.shape, bool)

    def body(i, carry, u1=u1, d=d):
      w1, mask1, err1 = carry
      if n is not None:  # at a group start, choose its N:M mask from the weights updated so far
        g = jnp.square(jax.lax.dynamic_slice(w1, (0, i), (rows, m))) / jnp.square(
            jax.lax.dynamic_slice(d, (i,), (m,)))[None, :]
        mask1 = jnp.where(i % m == 0, jax.lax.dynamic_update_slice(mask1, keep_mask_rows(g, m - n), (0, i)), mask1)
      col = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
      keep = jax.lax.dynamic_index_in_dim(mask1, i, axis=1, keepdims=False)
      err = jnp.where(keep, 0.0, col) / d[i]
      w1 = w1 - err[:, None] * u1[i][None, :]  # u1[i, :i] == 0: only columns >= i move
      return w1, mask1, jax.lax.dynamic_update_index_in_dim(err1, err, i, axis=1)

    w1, mask1, err1 = jax.lax.fori_loop(0, b1 - b0, body, (w1, mask1, jnp.zeros_like(w1)))
    w = w.at[:, b0:b1].set(jnp.where(mask1, w1, 0.0))
    if b1 < cols:
      w = w.at[:, b1:].add(-jnp.matmul(err1, u[b0:b1, b1:], precision=_HI))
    masks.append(mask1)
  return w, jnp.concatenate(masks, axis=1)


def sparsegpt_layer(kernel: jax.Array, gram: jax.Array, *, sparsity: float | None = None,
                    pattern: Any = None, blocksize: int = 128, percdamp: float = 0.01
                    ) -> tuple[jax.Array, jax.Array]:
  """Prunes one ``(in, out)`` kernel with SparseGPT (Frantar & Alistarh 2023).

  Minimises ``||X W - X W'||`` column by column (over inputs) with Optimal Brain Surgeon
  updates: the remaining weights absorb each pruned weight's error through the rows of
  the upper Cholesky factor of ``H^-1``; updates to later blocks are applied lazily once
  per block of ``blocksize`` columns. Unstructured masks are chosen per block by
  ``w^2 / [H^-1]_ii^2`` with an exact count per block (the counts sum to the layer
  target); N:M masks are chosen for each group of M inputs when the sweep reaches it.

  Args:
    kernel: ``(in, out)`` weights.
    gram: ``(in, in)`` ``X^T X`` of the layer's calibration inputs (any positive scale).
    sparsity: target in [0, 1) (omit with ``pattern``).
    pattern: N:M pattern (``"2:4"``); the input dimension must be a multiple of M.
    blocksize: columns per lazy-update block.
    percdamp: dampening, as a fraction of the mean diagonal of H.

  Returns:
    ``(new_kernel, mask)``; pruned entries of ``new_kernel`` are exactly zero.
  """
  s, nm = resolve_target(sparsity, pattern)
  kernel, gram = jnp.asarray(kernel), jnp.asarray(gram, jnp.float32)
  check_layer(kernel, gram, nm)
  if blocksize < 1 or percdamp < 0:
    raise ValueError(f"need blocksize >= 1 and percdamp >= 0, got {blocksize}, {percdamp}")
  cols, rows = kernel.shape
  if nm is not None:
    blocksize = max(nm[1], blocksize - blocksize % nm[1])
  edges = list(range(0, cols, blocksize)) + [cols]
  counts = np.array([num_pruned(s, rows * b) - num_pruned(s, rows * a) for a, b in zip(edges[:-1], edges[1:])],
                    np.int32)
  # Rows of w (outputs) are independent: on sharded parameters solve them where they lie, rows split
  # over the devices (an all-to-all for a row-parallel kernel), never gathering the matrix.
  w = shard_rows_like(kernel.T.astype(jnp.float32), kernel)
  w, mask = _solve(w, gram, jnp.asarray(counts), jnp.float32(percdamp),
                   blocksize=blocksize, n=None if nm is None else nm[0], m=None if nm is None else nm[1])
  if not bool(jnp.all(jnp.isfinite(w))):
    raise ValueError("SparseGPT produced non-finite weights: the layer Hessian is not positive definite "
                     f"even with percdamp={percdamp}; raise percdamp or add calibration data")
  w, mask = w.T.astype(kernel.dtype), mask.T
  if isinstance(getattr(kernel, "sharding", None), NamedSharding):
    w, mask = jax.device_put(w, kernel.sharding), jax.device_put(mask, kernel.sharding)
  return w, mask
