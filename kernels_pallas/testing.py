"""Random paged-KV inputs and float64 NumPy oracles for tests and benchmarks."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

TOLERANCE = {  # (atol, rtol) of kernel vs reference, per dtype
    jnp.dtype(jnp.float32): (2e-5, 2e-5),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.float16): (4e-3, 4e-3),
}


class PagedBatch(NamedTuple):
  """Arrays of one attention call (decode or ragged) plus host metadata."""

  q: jnp.ndarray  # [B or T, H, D]
  k_pages: jnp.ndarray  # [KVH, num_pages, page_size, D]
  v_pages: jnp.ndarray  # [KVH, num_pages, page_size, D]
  block_tables: jnp.ndarray  # [B or S, max_blocks] int32
  kv_lens: jnp.ndarray  # [B or S] int32
  cu_q_lens: jnp.ndarray | None  # [S + 1] int32 (ragged only)
  num_seqs: int | None  # ragged only


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pool_and_tables(rng: np.random.Generator, kv_lens, *, num_kv_heads: int,
                     head_dim: int, page_size: int, dtype, extra_pages: int,
                     extra_cols: int, nan_garbage: bool):
  pages_needed = [_cdiv(int(n), page_size) for n in kv_lens]
  num_pages = 1 + sum(pages_needed) + extra_pages  # page 0 = null page
  max_blocks = max(1, max(pages_needed, default=0) + extra_cols)
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  k = rng.standard_normal(shape, dtype=np.float32)
  v = rng.standard_normal(shape, dtype=np.float32)
  perm = rng.permutation(np.arange(1, num_pages))  # random physical pages
  tables = np.zeros((len(kv_lens), max_blocks), np.int32)  # pad: null page
  used = np.zeros(num_pages, bool)
  start = 0
  for s, n in enumerate(pages_needed):
    tables[s, :n] = perm[start:start + n]
    used[perm[start:start + n]] = True
    if nan_garbage and n:  # slots past the end of the last page: garbage
      tail = int(kv_lens[s]) - (n - 1) * page_size
      k[:, tables[s, n - 1], tail:] = np.nan
      v[:, tables[s, n - 1], tail:] = np.nan
    start += n
  if nan_garbage:  # the null page and unused pages hold garbage too
    k[:, ~used] = np.nan
    v[:, ~used] = np.nan
  return (jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(tables, jnp.int32))


def decode_batch(rng: np.random.Generator, lengths, *, num_heads: int,
                 num_kv_heads: int, head_dim: int, page_size: int,
                 dtype=jnp.float32, extra_pages: int = 2, extra_cols: int = 1,
                 nan_garbage: bool = True) -> PagedBatch:
  """Random decode inputs whose block tables are a permutation of the pool.

  Every slot no sequence owns (the null page 0, unused pages, the tail of each
  last page) is NaN when `nan_garbage`, so reading it shows up.
  """
  k, v, tables = _pool_and_tables(
      rng, lengths, num_kv_heads=num_kv_heads, head_dim=head_dim,
      page_size=page_size, dtype=dtype, extra_pages=extra_pages,
      extra_cols=extra_cols, nan_garbage=nan_garbage)
  q = rng.standard_normal((len(lengths), num_heads, head_dim), np.float32)
  return PagedBatch(jnp.asarray(q, dtype), k, v, tables,
                    jnp.asarray(lengths, jnp.int32), None, None)


def ragged_batch(rng: np.random.Generator, q_lens, kv_lens, *, num_heads: int,
                 num_kv_heads: int, head_dim: int, page_size: int,
                 dtype=jnp.float32, num_tokens: int | None = None,
                 num_seqs_max: int | None = None, extra_cols: int = 1,
                 nan_garbage: bool = True) -> PagedBatch:
  """Random ragged inputs: chunk s is the last q_lens[s] of kv_lens[s] tokens.

  `num_tokens` >= sum(q_lens) pads q with rows of random data; `num_seqs_max`
  >= len(q_lens) adds dead sequences (random kv_lens, empty chunks).
  """
  live = len(q_lens)
  num_seqs_max = live if num_seqs_max is None else num_seqs_max
  total = int(sum(q_lens))
  num_tokens = max(1, total) if num_tokens is None else num_tokens
  dead = list(rng.integers(0, 2 * page_size, num_seqs_max - live))
  all_kv = list(kv_lens) + dead
  k, v, tables = _pool_and_tables(
      rng, all_kv, num_kv_heads=num_kv_heads, head_dim=head_dim,
      page_size=page_size, dtype=dtype, extra_pages=2, extra_cols=extra_cols,
      nan_garbage=nan_garbage)
  cu = np.zeros(num_seqs_max + 1, np.int32)
  cu[1:live + 1] = np.cumsum(q_lens)
  # Entries past num_seqs are not read as lengths; make them misleading.
  cu[live + 1:] = total + rng.integers(0, 3, num_seqs_max - live)
  q = rng.standard_normal((num_tokens, num_heads, head_dim), np.float32)
  return PagedBatch(jnp.asarray(q, dtype), k, v, tables,
                    jnp.asarray(all_kv, jnp.int32), jnp.asarray(cu), live)


def _softmax_rows(q, k, v, scale, soft_cap):
  s = (q @ k.T) * scale
  if soft_cap is not None:
    s = soft_cap * np.tanh(s / soft_cap)
  s = s - s.max(axis=-1, keepdims=True)
  p = np.exp(s)
  return (p / p.sum(axis=-1, keepdims=True)) @ v


def _gather_seq(pages, table, length, page_size):
  n = _cdiv(length, page_size)
  x = pages[:, table[:n]].reshape(pages.shape[0], n * page_size, -1)
  return x[:, :length]  # [KVH, length, D]


def decode_oracle(q, k_pages, v_pages, block_tables, lengths, *,
                  sm_scale: float | None = None,
                  soft_cap: float | None = None) -> np.ndarray:
  """Float64 loop over sequences and heads; written independently of jnp."""
  q, kp, vp = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  tables, lengths = np.asarray(block_tables), np.asarray(lengths)
  batch, num_heads, head_dim = q.shape
  kvh, _, page_size, _ = kp.shape
  scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  out = np.zeros_like(q)
  for b in range(batch):
    n = int(lengths[b])
    if n == 0:
      continue
    k = _gather_seq(kp, tables[b], n, page_size)
    v = _gather_seq(vp, tables[b], n, page_size)
    for h in range(num_heads):
      kv = h // (num_heads // kvh)
      out[b, h] = _softmax_rows(q[b, h][None], k[kv], v[kv], scale,
                                soft_cap)[0]
  return out


def ragged_oracle(q, k_pages, v_pages, block_tables, kv_lens, cu_q_lens,
                  num_seqs, *, sm_scale: float | None = None,
                  soft_cap: float | None = None) -> np.ndarray:
  """Float64 causal attention per chunk; padding rows are zero."""
  q, kp, vp = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  tables, kv_lens, cu = (np.asarray(x) for x in (block_tables, kv_lens,
                                                 cu_q_lens))
  _, num_heads, head_dim = q.shape
  kvh, _, page_size, _ = kp.shape
  scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  out = np.zeros_like(q)
  for s in range(int(num_seqs)):
    lo, hi, n = int(cu[s]), int(cu[s + 1]), int(kv_lens[s])
    if hi == lo:
      continue
    k = _gather_seq(kp, tables[s], n, page_size)
    v = _gather_seq(vp, tables[s], n, page_size)
    for i, t in enumerate(range(lo, hi)):
      pos = n - (hi - lo) + i  # absolute position of token t
      for h in range(num_heads):
        kv = h // (num_heads // kvh)
        out[t, h] = _softmax_rows(q[t, h][None], k[kv, :pos + 1],
                                  v[kv, :pos + 1], scale, soft_cap)[0]
  return out


def assert_close(got, want, dtype, what: str = "") -> None:
  """Per-dtype tolerance check that also rejects NaN/inf anywhere in `got`."""
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert np.isfinite(got).all(), f"{what}: non-finite output (unwritten?)"
  atol, rtol = TOLERANCE[jnp.dtype(dtype)]
  np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)
