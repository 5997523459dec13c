"""Wanda on one linear layer: prune by ``|W| * ||X||`` per output, no weight update."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._sparsegpt import check_layer
from jaxprune._topk import keep_mask, keep_mask_rows, nm_keep_mask, num_pruned
from jaxprune._validate import check_scope, resolve_target


def wanda_layer(kernel: jax.Array, gram: jax.Array, *, sparsity: float | None = None, pattern: Any = None,
                scope: str = "output") -> tuple[jax.Array, jax.Array]:
  """Prunes one ``(in, out)`` kernel with Wanda (Sun et al. 2023).

  The score of ``W[i, o]`` is ``|W[i, o]| * ||X_i||_2`` with ``||X_i||^2 = gram[i, i]``;
  each output column keeps its highest scores (``num_pruned(sparsity, in)`` pruned per
  output; Wanda's grouping), or the whole layer is ranked at once with ``scope="layer"``,
  or N per group of M inputs are kept with ``pattern``.

  Returns:
    ``(new_kernel, mask)`` with pruned entries exactly zero.
  """
  s, nm = resolve_target(sparsity, pattern)
  kernel, gram = jnp.asarray(kernel), jnp.asarray(gram, jnp.float32)
  check_layer(kernel, gram, nm)
  check_scope(scope, ("output", "layer"))
  score = jnp.abs(kernel.astype(jnp.float32)) * jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))[:, None]
  if nm is None and scope == "layer":
    mask = keep_mask(score, num_pruned(s, kernel.size))
  elif nm is None:
    mask = keep_mask_rows(score.T, num_pruned(s, kernel.shape[0])).T
  else:
    mask = nm_keep_mask(score, *nm)
  return jnp.where(mask, kernel, jnp.zeros((), kernel.dtype)), mask
