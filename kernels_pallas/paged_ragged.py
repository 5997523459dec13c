"""Ragged paged attention: mixed prefill chunks and decodes in one call.

The batch is a flat run of query tokens `q[T_total, H, D]`. Sequence `s` owns
rows `cu_q_lens[s]:cu_q_lens[s+1]`; they are the last `q_len` of its
`kv_lens[s]` tokens, already written to the KV pool, and attend causally
within the chunk and to every earlier token of the sequence. A decode is a
chunk of one token. Rows at or after `cu_q_lens[num_seqs]` are padding.

Three parts: the kernel body (shared, `_core.py`), the jitted wrapper
`ragged_paged_attention` (validates, cuts every chunk into query blocks of
`block_q` tokens, runs the kernel, scatters rows back), and
`ragged_paged_attention_reference` (the specification: every token is a
decode query of length `position + 1`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import _checks, _compat, _core
from kernels_pallas.paged_decode import make_config
from kernels_pallas.paged_decode import paged_attention_reference


class _TokenLayout(NamedTuple):
  """Where each query row of a ragged batch belongs (traced arrays)."""

  cu: jax.Array  # [S + 1] cumulative chunk lengths, frozen past num_seqs
  q_lens: jax.Array  # [S] chunk length of each sequence (0 past num_seqs)
  token_valid: jax.Array  # [T] bool: row belongs to a live sequence
  seq: jax.Array  # [T] sequence of each row (clipped to S - 1 for padding)
  offset: jax.Array  # [T] index of the row inside its chunk
  position: jax.Array  # [T] absolute position of the row in its sequence


def _token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens) -> _TokenLayout:
  num_seqs_max = kv_lens.shape[0]
  idx = jnp.arange(num_seqs_max + 1)
  # Sequences past num_seqs own no tokens: freeze the cumulative lengths.
  cu = jnp.where(idx <= num_seqs, cu_q_lens,
                 cu_q_lens[jnp.minimum(num_seqs, num_seqs_max)])
  q_lens = cu[1:] - cu[:-1]
  t = jnp.arange(num_tokens)
  seq = jnp.searchsorted(cu[1:], t, side="right")
  valid = seq < num_seqs_max
  seq = jnp.minimum(seq, num_seqs_max - 1)
  offset = t - cu[seq]
  position = kv_lens[seq] - q_lens[seq] + offset
  return _TokenLayout(cu, q_lens, valid, seq, offset, position)


def ragged_paged_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array | int,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
  """Ragged attention as one decode query per token (the specification).

  Token `t` of sequence `s` at position `p` attends to keys `0..p` of `s`,
  which is exactly a decode query of length `p + 1` through `s`'s block table.

  Args:
    q: [T_total, num_heads, head_dim] query tokens of all chunks.
    k_pages: [num_kv_heads, num_pages, page_size, head_dim] key pool.
    v_pages: [num_kv_heads, num_pages, page_size, head_dim] value pool.
    block_tables: [S, max_blocks] int32 pages of each sequence.
    kv_lens: [S] int32 tokens of each sequence in the cache, chunk included.
    cu_q_lens: [S + 1] int32 cumulative query lengths, cu_q_lens[0] = 0.
    num_seqs: number of live sequences (<= S); scalar int32 array or int.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).

  Returns:
    [T_total, num_heads, head_dim] in q's dtype; padding rows are zero.
  """
  lay = _token_layout(cu_q_lens, kv_lens, jnp.asarray(num_seqs, jnp.int32),
                      q.shape[0])
  lengths = jnp.where(lay.token_valid, lay.position + 1, 0).astype(jnp.int32)
  lengths = jnp.maximum(lengths, 0)
  return paged_attention_reference(q, k_pages, v_pages,
                                   block_tables[lay.seq], lengths,
                                   sm_scale=sm_scale, soft_cap=soft_cap)


def num_query_blocks(num_tokens: int, num_seqs_max: int, block_q: int) -> int:
  """Static upper bound on sum_s ceil(q_len_s / block_q)."""
  return max(1, min(num_tokens, num_seqs_max + num_tokens // block_q))


@functools.partial(jax.jit,
                   static_argnames=("sm_scale", "soft_cap", "block_q",
                                    "config"))
def _ragged_paged_attention(q, k_pages, v_pages, block_tables, kv_lens,
                            cu_q_lens, num_seqs, *, sm_scale, soft_cap,
                            block_q: int, config: _core.KernelConfig):
  num_tokens, num_heads, head_dim = q.shape
  kvh = k_pages.shape[0]
  group = num_heads // kvh
  num_seqs_max = kv_lens.shape[0]
  rows = _core.num_rows(block_q, group)
  n_blocks = num_query_blocks(num_tokens, num_seqs_max, block_q)
  lay = _token_layout(cu_q_lens, kv_lens, num_seqs, num_tokens)

  # Query blocks: chunk s is cut into ceil(q_len / block_q) blocks.
  blocks_per_seq = (lay.q_lens + block_q - 1) // block_q
  blk_end = jnp.cumsum(blocks_per_seq)
  blk_start = blk_end - blocks_per_seq
  i = jnp.arange(n_blocks)
  blk_seq = jnp.searchsorted(blk_end, i, side="right")  # [N]
  blk_valid = blk_seq < num_seqs_max
  s = jnp.minimum(blk_seq, num_seqs_max - 1)
  first_tok = (i - blk_start[s]) * block_q  # offset of row 0 in its chunk
  # Row r of a block: token r // group of the block, head r % group.
  r = np.arange(rows)
  r_tok, r_head = r // group, r % group
  off = first_tok[:, None] + r_tok[None, :]  # [N, M] offset in chunk
  row_valid = (blk_valid[:, None] & (r < block_q * group)[None, :]
               & (off < lay.q_lens[s][:, None]))
  tok = jnp.clip(lay.cu[s][:, None] + off, 0, num_tokens - 1)
  positions = kv_lens[s][:, None] - lay.q_lens[s][:, None] + off
  positions = jnp.where(row_valid, positions, -1).astype(jnp.int32)

  qg = q.reshape(num_tokens, kvh, group, head_dim)
  q_blocks = qg[tok, :, r_head[None, :], :]  # [N, M, KVH, D]
  q_blocks = jnp.where(row_valid[:, :, None, None], q_blocks, 0)
  q_blocks = jnp.swapaxes(q_blocks, 1, 2)  # [N, KVH, M, D]
  tables = _core.pad_block_tables(
      block_tables[s], config.pages_per_compute_block * config.num_splits)
  out = _core.blocked_attention(q_blocks, positions, tables, k_pages, v_pages,
                                sm_scale=sm_scale, soft_cap=soft_cap,
                                config=config)  # [N, KVH, M, D]

  # Scatter back: token t sits in block blk_start[s] + off // block_q.
  t_blk = blk_start[lay.seq] + lay.offset // block_q
  t_row = (lay.offset % block_q) * group
  t_blk = jnp.clip(t_blk, 0, n_blocks - 1)
  heads = np.arange(group)
  got = out[t_blk[:, None], :, t_row[:, None] + heads[None, :], :]
  got = jnp.swapaxes(got, 1, 2)  # [T, KVH, G, D]
  got = jnp.where(lay.token_valid[:, None, None, None], got, 0)
  return got.reshape(num_tokens, num_heads, head_dim)


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array | int,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    pages_per_compute_block: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool | None = None,
    poison_outputs: bool = False,
) -> jax.Array:
  """Paged attention for a ragged batch of prefill chunks and decodes.

  Args:
    q: [T_total, num_heads, head_dim] query tokens, chunk after chunk.
    k_pages: [num_kv_heads, num_pages, page_size, head_dim] key pool (the
      chunk's own K/V must already be written).
    v_pages: [num_kv_heads, num_pages, page_size, head_dim] value pool.
    block_tables: [S, max_blocks] int32; entries in [0, num_pages).
    kv_lens: [S] int32 cached tokens per sequence including its chunk.
    cu_q_lens: [S + 1] int32 cumulative chunk lengths; cu_q_lens[0] = 0,
      non-decreasing, cu_q_lens[num_seqs] <= T_total, and each chunk no
      longer than its kv_len.
    num_seqs: live sequences (<= S); scalar int32 array or int. Rows from
      cu_q_lens[num_seqs] on are padding and come back as zeros.
    sm_scale: logit scale, default 1/sqrt(head_dim).
    soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).
    block_q: query tokens per kernel program; default fills 64 rows
      (block_q * num_heads / num_kv_heads).
    pages_per_compute_block: pages per inner step (power of 2).
    num_splits: sequence splits (flash-decoding), merged exactly.
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining depth (GPU only).
    interpret: run the Pallas interpreter; None = unless the backend is a GPU.
    poison_outputs: testing aid: the kernel's output buffers start as NaN so
      any element it fails to write shows up.

  Returns:
    [T_total, num_heads, head_dim] in q's dtype.

  Raises:
    ValueError: on inconsistent shapes or dtypes, a GQA ratio that does not
      divide, out-of-range values (checked when the arrays are concrete), or
      bad tuning knobs.
  """
  _checks.check_knobs(sm_scale=sm_scale, soft_cap=soft_cap,
                      pages_per_compute_block=pages_per_compute_block,
                      num_splits=num_splits, block_q=block_q)
  if not hasattr(q, "ndim") or not hasattr(k_pages, "ndim"):
    raise ValueError("q, k_pages and v_pages must be arrays")
  _checks.check_pool(k_pages, v_pages, q.dtype,
                     q.shape[-1] if q.ndim else -1)
  _checks.check_query(q, k_pages.shape[0])
  num_tokens, num_heads, head_dim = q.shape
  kvh, num_pages, page_size, _ = k_pages.shape
  if num_tokens < 1:
    raise ValueError("q needs at least one row (T_total >= 1)")
  _checks.check_int_array(block_tables, "block_tables", ndim=2)
  num_seqs_max, max_blocks = block_tables.shape
  if num_seqs_max < 1 or max_blocks < 1:
    raise ValueError("block_tables must be [S >= 1, max_blocks >= 1], got "
                     f"shape {tuple(block_tables.shape)}")
  _checks.check_int_array(kv_lens, "kv_lens", shape=(num_seqs_max,))
  _checks.check_int_array(cu_q_lens, "cu_q_lens", shape=(num_seqs_max + 1,))
  if isinstance(num_seqs, (int, np.integer)):
    num_seqs = np.int32(num_seqs)
  _checks.check_int_array(num_seqs, "num_seqs", shape=())
  _checks.check_block_table_values(block_tables, num_pages)
  _checks.check_lengths_values(kv_lens, max_blocks * page_size, "kv_lens")
  _check_ragged_values(cu_q_lens, kv_lens, num_seqs, num_tokens)

  group = num_heads // kvh
  if block_q is None:
    block_q = max(1, 64 // group)
  interpret = _compat.resolve_interpret(interpret)
  n_blocks = num_query_blocks(num_tokens, num_seqs_max, block_q)
  config = make_config(
      page_size=page_size, max_blocks=max_blocks, num_programs=n_blocks * kvh,
      head_dim=head_dim, itemsize=jnp.dtype(k_pages.dtype).itemsize,
      pages_per_compute_block=pages_per_compute_block, num_splits=num_splits,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      poison_outputs=poison_outputs)
  _checks.check_compiled_shapes(head_dim, page_size,
                                config.pages_per_compute_block * page_size,
                                interpret)
  scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
  with _compat.quiet_backend_warnings():
    return _ragged_paged_attention(
        q, k_pages, v_pages, block_tables, kv_lens, cu_q_lens,
        jnp.asarray(num_seqs, jnp.int32), sm_scale=scale,
        soft_cap=None if soft_cap is None else float(soft_cap),
        block_q=block_q, config=config)


def _check_ragged_values(cu_q_lens, kv_lens, num_seqs, num_tokens) -> None:
  cu, kv, n = (_checks.concrete(x) for x in (cu_q_lens, kv_lens, num_seqs))
  if n is not None:
    n = int(n)
    if not 0 <= n <= kv_lens.shape[0]:
      raise ValueError(f"num_seqs must be in [0, {kv_lens.shape[0]}] (rows of"
                       f" block_tables), got {n}")
  if cu is None or n is None:
    return
  live = cu[:n + 1]
  if live[0] != 0:
    raise ValueError(f"cu_q_lens[0] must be 0, got {int(live[0])}")
  q_lens = np.diff(live)
  if (q_lens < 0).any():
    raise ValueError("cu_q_lens must be non-decreasing over the first "
                     f"num_seqs + 1 entries, got {live.tolist()}")
  if live[-1] > num_tokens:
    raise ValueError(f"cu_q_lens[num_seqs] = {int(live[-1])} exceeds the "
                     f"{num_tokens} rows of q")
  if kv is not None and (q_lens > kv[:n]).any():
    bad = int(np.argmax(q_lens > kv[:n]))
    raise ValueError(
        f"sequence {bad}: chunk of {int(q_lens[bad])} query tokens is longer "
        f"than its kv_len {int(kv[bad])}; kv_lens must count the chunk too")
