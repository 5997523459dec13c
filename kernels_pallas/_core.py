"""Shared Pallas kernel: blocks of query rows attend to one sequence's KV pages.

Both public kernels reduce to the same work item. A *query block* is up to `M`
rows, each row being one (query token, query head of a GQA group) pair that
belongs to a single sequence, with its absolute position in that sequence
(`-1` marks a padding row). For decode a block is the `G = H // KVH` query
heads of one sequence's single token; for ragged prefill it is `block_q`
consecutive tokens of one chunk times `G` heads. Row `r` may attend to key
positions `0..pos[r]` (causal), which also bounds the pages that are read.

Grid: `(num_query_blocks, num_kv_heads, num_splits)`. Split `p` covers pages
`[p * pages_per_split, (p + 1) * pages_per_split)` of the block table
(flash-decoding); with one split the kernel writes the normalized output,
otherwise it writes the unnormalized accumulator and the softmax statistics,
which `combine_splits` merges exactly.

Softmax statistics are kept in base 2 (logits pre-multiplied by log2(e)) so the
inner loop uses `exp2`. The loop is split in two: compute blocks whose keys
every real row may see run without masks; only the blocks near the end (the
causal diagonal, the partial last page) pay for masking. Padding rows (zero
queries) get finite values that the wrappers drop.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import _compat
from kernels_pallas._compat import pl

LOG2E = math.log2(math.e)
# Finite stand-in for -inf: exp2(MASK - m) is 0 for any real m, and exp2(0)
# where everything is masked is zeroed explicitly, so no inf - inf = nan.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
MIN_ROWS = 16  # Triton's dot needs at least 16 rows.


class KernelConfig(NamedTuple):
  """Static tuning knobs of one pallas_call (hashable)."""

  pages_per_compute_block: int
  num_splits: int
  num_warps: int
  num_stages: int
  interpret: bool
  poison_outputs: bool = False  # testing: outputs start as NaN


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def num_rows(tokens_per_block: int, group: int) -> int:
  """Rows M of a query block: tokens * group, padded to a power of 2 >= 16."""
  return max(MIN_ROWS, next_pow2(tokens_per_block * group))


def auto_pages_per_compute_block(page_size: int, max_pages: int,
                                 head_dim: int = 128,
                                 itemsize: int = 2) -> int:
  """About 128 keys per inner step, never fewer than 16, at most the table.

  Wide tiles are capped at 32 KiB per K (and V) tile: two pipeline stages of
  128 float32 keys x head_dim 128 ask for more shared memory than an H100/H200
  SM has (270 KiB against 227 KiB, seen on an H200), so float32 and
  head_dim 256 take 64 keys per step.
  """
  keys = max(16, min(128, (32 << 10) // max(1, head_dim * itemsize)))
  want = max(1, keys // page_size)
  floor = max(1, 16 // page_size)
  return max(floor, min(want, next_pow2(max_pages)))


def auto_num_splits(num_programs: int, max_pages: int,
                    pages_per_compute_block: int) -> int:
  """Split the sequence until about 512 programs exist (flash-decoding).

  Each split keeps at least one compute block of pages. Small problems are
  latency bound, so more parallel programs beat the cost of the combine.
  """
  target = 512
  splits = 1
  max_useful = max(1, max_pages // pages_per_compute_block)
  while num_programs * splits < target and splits * 2 <= max_useful:
    splits *= 2
  return splits


def _attention_kernel(
    q_ref,  # [M, D] query rows of one query block and one KV head
    pos_ref,  # [M] int32 position of each row in its sequence, -1 = padding
    bt_ref,  # [P] int32 physical page of each logical page (padded with 0)
    k_ref,  # [num_pages, page_size, D] K pool of this KV head
    v_ref,  # [num_pages, page_size, D] V pool of this KV head
    *refs,  # [NaN-filled inputs aliased to the outputs,] outputs:
    # one split: o [M, D]; several: o [M, D] f32, l [M], m [M]
    sm_scale: float,
    soft_cap: float | None,
    pages_per_compute_block: int,
    pages_per_split: int,
    split: bool,
    poisoned: bool,
):
  out_refs = refs[len(refs) // 2:] if poisoned else refs
  num_pages, page_size, head_dim = k_ref.shape
  block_k = pages_per_compute_block * page_size
  rows = q_ref.shape[0]
  precision = (lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None)

  pos = pos_ref[...]
  kv_limit = jnp.max(pos) + 1  # keys some row needs: [0, kv_limit)
  # Keys [0, kv_full) are visible to every real row: no masking needed there.
  kv_full = jnp.minimum(jnp.min(jnp.where(pos >= 0, pos, kv_limit)) + 1,
                        kv_limit)
  first = pl.program_id(2) * pages_per_split
  last = jnp.minimum(first + pages_per_split,
                     (kv_limit + page_size - 1) // page_size)
  num_steps = (jnp.maximum(last - first, 0) + pages_per_compute_block -
               1) // pages_per_compute_block
  full_steps = jnp.clip(
      (jnp.minimum(kv_full // page_size, first + pages_per_split) - first)
      // pages_per_compute_block, 0, num_steps)
  q = q_ref[...]

  def step(j, carry, masked: bool):
    o, l, m = carry
    page0 = first + j * pages_per_compute_block
    pages = bt_ref[pl.ds(page0, pages_per_compute_block)]
    pages = jnp.clip(pages, 0, num_pages - 1)  # never read outside the pool
    k = k_ref[pages].reshape(block_k, head_dim)  # [block_k, D]
    v = v_ref[pages].reshape(block_k, head_dim)  # [block_k, D]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        precision=precision,
                        preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    s = s * LOG2E
    if masked:
      key = page0 * page_size + lax.broadcasted_iota(jnp.int32, (1, block_k),
                                                     1)
      visible = key <= pos[:, None]  # [M, block_k], causal per row
      s = jnp.where(visible, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    if masked:
      p = jnp.where(visible, p, 0.0)
      # Slots past the sequence end may hold anything (NaN too): 0 * NaN = NaN.
      key_col = page0 * page_size + lax.broadcasted_iota(
          jnp.int32, (block_k, 1), 0)
      v = jnp.where(key_col < kv_limit, v, jnp.zeros_like(v))
    l = alpha * l + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         precision=precision,
                         preferred_element_type=jnp.float32)
    return alpha[:, None] * o + pv, l, m_new

  carry = (jnp.zeros((rows, head_dim), jnp.float32),
           jnp.zeros((rows,), jnp.float32),
           jnp.full((rows,), MASK_VALUE, jnp.float32))
  carry = lax.fori_loop(0, full_steps,
                        functools.partial(step, masked=False), carry)
  o, l, m = lax.fori_loop(full_steps, num_steps,
                          functools.partial(step, masked=True), carry)

  if split:
    o_ref, l_ref, m_ref = out_refs
    o_ref[...] = o
    l_ref[...] = l
    m_ref[...] = m
  else:
    (o_ref,) = out_refs
    inv = jnp.where(l > 0.0, 1.0 / jnp.where(l > 0.0, l, 1.0), 0.0)
    o_ref[...] = (o * inv[:, None]).astype(o_ref.dtype)


def combine_splits(o: jax.Array, l: jax.Array, m: jax.Array,
                   dtype) -> jax.Array:
  """Merges per-split partial softmax results exactly.

  Args:
    o: [P, ..., D] float32 unnormalized outputs of each split.
    l: [P, ...] float32 softmax denominators (relative to `m`).
    m: [P, ...] float32 running maxima (base-2 logits).
    dtype: output dtype.

  Returns:
    [..., D] normalized output; rows that saw no key are zero.
  """
  m_all = jnp.max(m, axis=0)
  w = jnp.exp2(m - m_all[None])
  denom = jnp.sum(w * l, axis=0)
  num = jnp.sum(w[..., None] * o, axis=0)
  safe = jnp.where(denom > 0.0, denom, 1.0)
  return jnp.where(denom[..., None] > 0.0, num / safe[..., None],
                   0.0).astype(dtype)


def blocked_attention(
    q_blocks: jax.Array,  # [N, KVH, M, D]
    positions: jax.Array,  # [N, M] int32
    block_tables: jax.Array,  # [N, P] int32, P % (ppcb * splits) == 0
    k_pages: jax.Array,  # [KVH, num_pages, page_size, D]
    v_pages: jax.Array,  # [KVH, num_pages, page_size, D]
    *,
    sm_scale: float,
    soft_cap: float | None,
    config: KernelConfig,
) -> jax.Array:
  """Runs the kernel over all query blocks; returns [N, KVH, M, D] in q dtype.

  Traced (call from inside `jax.jit`); inputs must already be validated.
  """
  n, kvh, rows, head_dim = q_blocks.shape
  _, num_pages, page_size, _ = k_pages.shape
  table_len = block_tables.shape[1]
  splits = config.num_splits
  pages_per_split = table_len // splits
  split = splits > 1
  kernel = functools.partial(
      _attention_kernel,
      sm_scale=float(sm_scale),
      soft_cap=None if soft_cap is None else float(soft_cap),
      pages_per_compute_block=config.pages_per_compute_block,
      pages_per_split=pages_per_split,
      split=split,
      poisoned=config.poison_outputs,
  )
  in_specs = [
      pl.BlockSpec((None, None, rows, head_dim), lambda i, h, p: (i, h, 0, 0)),
      pl.BlockSpec((None, rows), lambda i, h, p: (i, 0)),
      pl.BlockSpec((None, table_len), lambda i, h, p: (i, 0)),
      pl.BlockSpec((None, num_pages, page_size, head_dim),
                   lambda i, h, p: (h, 0, 0, 0)),
      pl.BlockSpec((None, num_pages, page_size, head_dim),
                   lambda i, h, p: (h, 0, 0, 0)),
  ]
  if split:
    out_shape = [
        jax.ShapeDtypeStruct((splits, n, kvh, rows, head_dim), jnp.float32),
        jax.ShapeDtypeStruct((splits, n, kvh, rows), jnp.float32),
        jax.ShapeDtypeStruct((splits, n, kvh, rows), jnp.float32),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, rows, head_dim),
                     lambda i, h, p: (p, i, h, 0, 0)),
        pl.BlockSpec((None, None, None, rows), lambda i, h, p: (p, i, h, 0)),
        pl.BlockSpec((None, None, None, rows), lambda i, h, p: (p, i, h, 0)),
    ]
  else:
    out_shape = [jax.ShapeDtypeStruct((n, kvh, rows, head_dim), q_blocks.dtype)]
    out_specs = [
        pl.BlockSpec((None, None, rows, head_dim), lambda i, h, p: (i, h, 0, 0))
    ]
  inputs = [q_blocks, positions, block_tables, k_pages, v_pages]
  aliases = {}
  if config.poison_outputs:  # every element must be overwritten
    for j, (shape, spec) in enumerate(zip(out_shape, out_specs)):
      aliases[len(inputs)] = j
      inputs.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
      in_specs.append(spec)
  compiler_params = None
  if not config.interpret:
    compiler_params = _compat.triton_compiler_params(config.num_warps,
                                                     config.num_stages)
  outs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(n, kvh, splits),
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      interpret=config.interpret,
      compiler_params=compiler_params,
      name=f"paged_attention_m{rows}_ppcb{config.pages_per_compute_block}",
  )(*inputs)
  if split:
    return combine_splits(*outs, dtype=q_blocks.dtype)
  return outs[0]


def pad_block_tables(block_tables: jax.Array, multiple: int) -> jax.Array:
  """Pads the page axis with the null page 0 to a multiple of `multiple`."""
  extra = -block_tables.shape[1] % multiple
  if extra:
    block_tables = jnp.pad(block_tables, ((0, 0), (0, extra)))
  return block_tables
