"""Paged decode attention: one query token per sequence over its KV pages.

Three parts, as in the JAX Pallas ops: the kernel body (shared with the ragged
kernel, in `_core.py`), the jitted wrapper `paged_attention` that validates
its inputs, and `paged_attention_reference`, the pure-jnp specification.

Layout (per layer): `k_pages`, `v_pages` are `[num_kv_heads, num_pages,
page_size, head_dim]`; page 0 is the engine's null page (never valid data, may
appear in padded block-table entries). Query head `h` reads KV head
`h // (num_heads // num_kv_heads)`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels_pallas import _checks, _compat, _core


def paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
  """Decode attention by gathering each sequence's pages (the specification).

  Args:
    q: [batch, num_heads, head_dim] query of each sequence's current token.
    k_pages: [num_kv_heads, num_pages, page_size, head_dim] key pool.
    v_pages: [num_kv_heads, num_pages, page_size, head_dim] value pool.
    block_tables: [batch, max_blocks] int32 page of each logical block.
    lengths: [batch] int32 number of valid keys of each sequence.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).

  Returns:
    [batch, num_heads, head_dim] in q's dtype; zero where length is 0.
    Logits, softmax and the weighted sum are computed in float32.
  """
  batch, num_heads, head_dim = q.shape
  kvh, _, page_size, _ = k_pages.shape
  group = num_heads // kvh
  scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
  max_len = block_tables.shape[1] * page_size
  # [KVH, B, max_blocks, page_size, D] -> [B, KVH, L, D]
  k = k_pages[:, block_tables].reshape(kvh, batch, max_len, head_dim)
  v = v_pages[:, block_tables].reshape(kvh, batch, max_len, head_dim)
  k = jnp.swapaxes(k, 0, 1)
  v = jnp.swapaxes(v, 0, 1).astype(jnp.float32)
  qg = q.reshape(batch, kvh, group, head_dim)
  s = jnp.einsum("bkgd,bkld->bkgl", qg, k, preferred_element_type=jnp.float32,
                 precision=jax.lax.Precision.HIGHEST) * scale
  if soft_cap is not None:
    s = soft_cap * jnp.tanh(s / soft_cap)
  valid = jnp.arange(max_len)[None, :] < lengths[:, None]  # [B, L]
  valid = valid[:, None, None, :]
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  # Slots past a sequence's end may hold anything, even NaN: select, not mask.
  o = jnp.einsum("bkgl,bkld->bkgd", p,
                 jnp.where(valid[:, :, 0, :, None], v, 0.0),
                 precision=jax.lax.Precision.HIGHEST)
  return o.reshape(batch, num_heads, head_dim).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "config"))
def _paged_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale,
                     soft_cap, config: _core.KernelConfig):
  batch, num_heads, head_dim = q.shape
  kvh = k_pages.shape[0]
  group = num_heads // kvh
  rows = _core.num_rows(1, group)
  # Rows of block b, KV head h: the group's query heads, padded to `rows`.
  q_blocks = q.reshape(batch, kvh, group, head_dim)
  q_blocks = jnp.pad(q_blocks, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  row_is_head = jnp.arange(rows) < group
  positions = jnp.where(row_is_head[None, :], lengths[:, None] - 1, -1)
  tables = _core.pad_block_tables(
      block_tables, config.pages_per_compute_block * config.num_splits)
  out = _core.blocked_attention(q_blocks, positions.astype(jnp.int32), tables,
                                k_pages, v_pages, sm_scale=sm_scale,
                                soft_cap=soft_cap, config=config)
  return out[:, :, :group, :].reshape(batch, num_heads, head_dim)


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    pages_per_compute_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
    poison_outputs: bool = False,
) -> jax.Array:
  """Paged grouped-query decode attention (Pallas kernel).

  Args:
    q: [batch, num_heads, head_dim] query of each sequence's current token.
    k_pages: [num_kv_heads, num_pages, page_size, head_dim] key pool.
    v_pages: [num_kv_heads, num_pages, page_size, head_dim] value pool.
    block_tables: [batch, max_blocks] int32; entries in [0, num_pages).
    lengths: [batch] int32 valid keys per sequence, in [0, max_blocks *
      page_size]; a length-0 sequence returns zeros.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).
    pages_per_compute_block: pages per inner step (power of 2); default about
      128 keys.
    num_splits: sequence splits (flash-decoding), merged exactly; default
      chosen from batch * num_kv_heads so the GPU has enough programs.
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining depth (GPU only).
    interpret: run the Pallas interpreter; None = unless the backend is a GPU.
    poison_outputs: testing aid: the kernel's output buffers start as NaN so
      any element it fails to write shows up.

  Returns:
    [batch, num_heads, head_dim] in q's dtype.

  Raises:
    ValueError: on inconsistent shapes or dtypes, a GQA ratio that does not
      divide, out-of-range block-table entries or lengths (checked when the
      arrays are concrete; under an outer jit the kernel clamps page ids so it
      never reads outside the pool), or bad tuning knobs.
  """
  _checks.check_knobs(sm_scale=sm_scale, soft_cap=soft_cap,
                      pages_per_compute_block=pages_per_compute_block,
                      num_splits=num_splits)
  if not hasattr(q, "ndim") or not hasattr(k_pages, "ndim"):
    raise ValueError("q, k_pages and v_pages must be arrays")
  _checks.check_pool(k_pages, v_pages, q.dtype,
                     q.shape[-1] if q.ndim else -1)
  _checks.check_query(q, k_pages.shape[0])
  batch, _, head_dim = q.shape
  _, num_pages, page_size, _ = k_pages.shape
  _checks.check_int_array(block_tables, "block_tables", ndim=2)
  if block_tables.shape[0] != batch:
    raise ValueError(f"block_tables must have one row per sequence ({batch}),"
                     f" got shape {tuple(block_tables.shape)}")
  _checks.check_int_array(lengths, "lengths", shape=(batch,))
  max_blocks = block_tables.shape[1]
  if max_blocks < 1:
    raise ValueError("block_tables needs at least one column")
  _checks.check_block_table_values(block_tables, num_pages)
  _checks.check_lengths_values(lengths, max_blocks * page_size, "lengths")

  interpret = _compat.resolve_interpret(interpret)
  config = make_config(
      page_size=page_size, max_blocks=max_blocks,
      num_programs=batch * k_pages.shape[0], head_dim=head_dim,
      itemsize=jnp.dtype(k_pages.dtype).itemsize,
      pages_per_compute_block=pages_per_compute_block, num_splits=num_splits,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      poison_outputs=poison_outputs)
  _checks.check_compiled_shapes(head_dim, page_size,
                                config.pages_per_compute_block * page_size,
                                interpret)
  scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
  with _compat.quiet_backend_warnings():
    return _paged_attention(q, k_pages, v_pages, block_tables, lengths,
                            sm_scale=scale,
                            soft_cap=None if soft_cap is None else
                            float(soft_cap), config=config)


def make_config(*, page_size: int, max_blocks: int, num_programs: int,
                head_dim: int, itemsize: int, pages_per_compute_block: int | None, num_splits: int | None,
                num_warps: int, num_stages: int, interpret: bool,
                poison_outputs: bool = False) -> _core.KernelConfig:
  """Fills in default tuning knobs (shared with the ragged wrapper)."""
  ppcb = pages_per_compute_block or _core.auto_pages_per_compute_block(
      page_size, max_blocks, head_dim, itemsize)
  max_splits = max(1, -(-max_blocks // ppcb))
  if num_splits is None:
    splits = _core.auto_num_splits(num_programs, max_blocks, ppcb)
  else:
    splits = min(num_splits, max_splits)
  return _core.KernelConfig(pages_per_compute_block=ppcb, num_splits=splits,
                            num_warps=int(num_warps),
                            num_stages=int(num_stages), interpret=interpret,
                            poison_outputs=bool(poison_outputs))
