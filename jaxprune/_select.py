"""Exact k-smallest selection by counting, with no sort: works on sharded arrays without gathering them.

The k-th smallest score is found by bisection over the bits of an order-preserving uint32 key;
each step is an elementwise comparison and a sum, which XLA partitions over any sharding with a
scalar all-reduce. Ties at the threshold are broken by flat index (lowest pruned first), the same
rule as the sort-based :func:`jaxprune._topk.keep_mask`, so both give identical masks.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def ordered_key(x: jax.Array) -> jax.Array:
  """uint32 keys with ``key(a) < key(b)`` iff ``a < b`` for float32 ``a, b`` (NaN excluded)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  sign = jnp.uint32(0x80000000)
  return jnp.where(bits & sign, ~bits, bits | sign)


def flat_index(shape: Sequence[int], offset: int = 0) -> jax.Array:
  """Row-major flat index of every element of ``shape`` (int32), plus ``offset``."""
  idx = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.int32, tuple(shape), axis) * stride
    stride *= shape[axis]
  return idx + offset


def _count(preds) -> jax.Array:
  return sum(jnp.sum(p, dtype=jnp.int32) for p in preds)


def _bisect(bits: int, dtype, fewer_than_k) -> jax.Array:
  """Largest value ``r`` (built MSB first) such that ``fewer_than_k(r)`` holds."""
  def body(i, r):
    trial = r | (jnp.asarray(1, dtype) << (bits - 1 - i).astype(dtype))
    return jnp.where(fewer_than_k(trial), trial, r)
  return jax.lax.fori_loop(0, bits, body, jnp.asarray(0, dtype))


def prune_masks_by_count(scores: Sequence[jax.Array], k) -> list[jax.Array]:
  """Bool masks (True = prune) of the ``k`` smallest entries over all of ``scores`` together.

  Entries are ordered by ``(score, index)`` where the index runs row-major through each array
  and on through the next one. ``k`` may be traced; ``0 <= k <= total size``.
  """
  keys = [ordered_key(s) for s in scores]
  total = sum(int(s.size) for s in scores)
  if total >= 2 ** 31:
    raise ValueError(f"counting selection supports at most 2**31 - 1 entries at once, got {total}")
  offsets, idx = 0, []
  for s in scores:
    idx.append(flat_index(s.shape, offsets))
    offsets += int(s.size)
  k = jnp.asarray(k, jnp.int32)
  # v = the k-th smallest key: the largest v with count(key < v) < k
  v = _bisect(32, jnp.uint32, lambda t: _count(key < t for key in keys) < k)
  need = k - _count(key < v for key in keys)  # entries equal to v that must go, lowest index first
  # j = the largest j with count(key == v and index < j) < need, plus one is the cut
  j = _bisect(31, jnp.int32, lambda t: _count((key == v) & (i < t) for key, i in zip(keys, idx)) < need)
  cut = jnp.where(need > 0, j + 1, 0)
  return [jnp.where(k > 0, (key < v) | ((key == v) & (i < cut)), False) for key, i in zip(keys, idx)]


def prune_rows_by_count(scores: jax.Array, k, axis: int) -> jax.Array:
  """Per-slice variant: prune the ``k`` smallest entries along ``axis`` of a 2-D array, independently."""
  moved = jnp.moveaxis(scores, axis, -1)
  out = jax.vmap(lambda row: prune_masks_by_count([row], k)[0])(moved.reshape(-1, moved.shape[-1]))
  return jnp.moveaxis(out.reshape(moved.shape), -1, axis)
