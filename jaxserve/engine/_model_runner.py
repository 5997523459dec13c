"""Runs a scheduled step on the device: builds bucketed inputs, calls the model over the paged pools, samples."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine._attention import PagedAttention, copy_blocks, make_meta, pool_shape
from jaxserve.engine._sampler import SamplerConfig, SamplerOutput, SamplingTensors, sample
from jaxserve.engine._scheduler import SchedulerOutput
from jaxserve.model import forward


def pow2_bucket(n: int, minimum: int = 1) -> int:
  """Smallest power of two >= max(n, minimum)."""
  return 1 << max(0, math.ceil(math.log2(max(n, minimum, 1))))


def decode_bucket(n: int) -> int:
  """Padded decode-slot count: multiples of 8 up to 64, then of 32 (decode cost grows with every slot)."""
  step = 8 if n <= 64 else 32
  return -(-n // step) * step


def token_bucket(n: int) -> int:
  """Padded token count: powers of two, with a 1.5x step in between from 256 on (less padding waste)."""
  p = pow2_bucket(n, 16)
  return p * 3 // 4 if p >= 512 and n <= p * 3 // 4 else p


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: str) -> int:
  itemsize = jnp.dtype(dtype).itemsize
  return sum(2 * cfg.kv_heads(i) * block_size * cfg.head_dim * itemsize for i in range(cfg.num_layers))


class ModelRunner:
  """Owns the device state (parameters, per-layer KV pools) and the jitted step programs.

  Every step is padded to a bucket: ``(tokens, decode slots, prefill slots)`` for the model (at
  most ``max_num_seqs / 8 + 6`` decode buckets times a few token and prefill buckets) and
  ``(logits rows, sample rows, sampler config)`` for the sampler, so the number of compiled
  programs stays small and stops growing after warm-up. The pools are donated to each call
  so XLA updates them in place.
  """

  def __init__(self, cfg: ModelConfig, params: Any, *, num_blocks: int, block_size: int, max_model_len: int,
               max_num_seqs: int, attention: PagedAttention, kv_sharding: Any = None):
    self.cfg, self.params, self.attn = cfg, params, attention
    self.block_size, self.num_blocks = block_size, num_blocks
    blocks_per_seq = -(-max_model_len // block_size)
    self.table_width = -(-blocks_per_seq // attention.kv_chunk) * attention.kv_chunk
    dtype = jnp.dtype(cfg.dtype)
    shapes = [pool_shape(cfg.kv_heads(i), num_blocks, block_size, cfg.head_dim, attention.kv_layout)
              for i in range(cfg.num_layers)]
    self.kv = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for shape in shapes]
    if kv_sharding is not None:  # tensor parallel: each device holds its KV heads of every block
      self.kv = jax.device_put(self.kv, kv_sharding)
    self._forward = jax.jit(self._forward_impl, donate_argnums=(1,))
    self._sample = jax.jit(sample, static_argnums=(2,))
    self._copy = jax.jit(functools.partial(copy_blocks, layout=attention.kv_layout), donate_argnums=(0,))
    self.program_keys: set[tuple] = set()  # one jit program per distinct key

  def _forward_impl(self, params, kv, tokens, positions, meta, logits_index):
    out = forward(params, self.cfg, tokens, positions, kv=kv, attn=self.attn, meta=meta, logits_index=logits_index)
    logits = out.logits[0]
    return logits, jnp.argmax(logits, axis=-1).astype(jnp.int32), out.kv

  @property
  def num_compiled_programs(self) -> int:
    """Programs compiled so far: one per distinct bucket (the keys jit specializes on)."""
    return len(self.program_keys)

  def copy(self, copies: Sequence[tuple[int, int]]) -> None:
    """Copy-on-write block copies, padded to a power of two with null-block no-ops."""
    n = pow2_bucket(len(copies))
    src = np.zeros(n, np.int32)
    dst = np.zeros(n, np.int32)
    src[:len(copies)], dst[:len(copies)] = zip(*copies)
    self.program_keys.add(("copy", n))
    self.kv = self._copy(self.kv, src, dst)

  def execute(self, sched: SchedulerOutput) -> tuple[jax.Array, jax.Array, list[int]]:
    """Runs the model on the scheduled tokens.

    Returns:
      ``(logits, greedy, rows)``: device logits ``[slots, V]`` (one row per padded sequence slot),
      their argmax ``[slots]`` (plain greedy batches need nothing else), and for each scheduled
      sequence in order its row in ``logits``.
    """
    if sched.copies:
      self.copy(sched.copies)
    nd = sched.num_decode
    # decodes longest first (the batched decode loop stops early for groups of short ones)
    order = sorted(range(nd), key=lambda j: -sched.seqs[j].start) + list(range(nd, len(sched.seqs)))
    seqs = [sched.seqs[j] for j in order]
    num_prefill = len(seqs) - nd
    decode_slots = decode_bucket(nd) if nd else 0
    prefill_slots = pow2_bucket(num_prefill) if num_prefill else 0
    prefill_tokens = sum(s.num_tokens for s in seqs[nd:])
    num_tokens = decode_slots + (token_bucket(prefill_tokens) if num_prefill else 0)
    tokens = np.zeros((1, num_tokens), np.int32)
    positions = np.zeros((1, num_tokens), np.int32)
    logits_index = np.zeros((1, decode_slots + prefill_slots), np.int32)
    rows, row = [0] * len(seqs), 0
    for j, s in enumerate(seqs):
      end = s.start + s.num_tokens
      tokens[0, row:row + s.num_tokens] = s.seq.token_ids[s.start:end]
      positions[0, row:row + s.num_tokens] = np.arange(s.start, end)
      slot = j if j < nd else decode_slots + j - nd
      row += s.num_tokens
      logits_index[0, slot] = row - 1
      rows[order[j]] = slot
    meta = make_meta([(s.num_tokens, s.start + s.num_tokens, s.block_ids) for s in seqs], nd,
                     num_tokens=num_tokens, decode_slots=decode_slots, prefill_slots=prefill_slots,
                     block_size=self.block_size, table_width=self.table_width)
    self.program_keys.add(("forward", num_tokens, decode_slots, prefill_slots))
    logits, greedy, self.kv = self._forward(self.params, self.kv, tokens, positions, meta, logits_index)
    return logits, greedy, rows

  def sample(self, logits: jax.Array, tensors: SamplingTensors, cfg: SamplerConfig) -> SamplerOutput:
    """Samples on the device and brings the (small) results to the host: the step's one sync."""
    self.program_keys.add(("sample", logits.shape[0], tensors.row_index.shape[0], cfg))
    out = self._sample(logits, tensors, cfg)
    return SamplerOutput(*(None if x is None else np.asarray(x) for x in out))
