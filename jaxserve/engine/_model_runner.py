"""Runs a scheduled step on the device: builds bucketed inputs, calls the model over the paged pools, samples."""

from __future__ import annotations

import concurrent.futures
import functools
import math
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine._attention import PagedAttention, copy_blocks, make_meta, pool_shape
from jaxserve.engine._sampler import SamplerConfig, SamplerOutput, SamplingTensors, sample
from jaxserve.engine._scheduler import SchedulerOutput
from jaxserve.engine._weight_forms import prepare_params
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

  With ``background_compile``, a step whose bucket has no compiled program yet runs in the
  smallest compiled bucket that holds it (more padding, same results up to float rounding)
  while its own program compiles on a helper thread; only a step that fits no compiled bucket
  waits for a compile. A server then does not stall every stream on each new bucket.
  """

  def __init__(self, cfg: ModelConfig, params: Any, *, num_blocks: int, block_size: int, max_model_len: int,
               max_num_seqs: int, attention: PagedAttention, kv_sharding: Any = None,
               background_compile: bool = False, sparse_weights: str = "auto"):
    self.cfg, self.attn = cfg, attention
    # with the C++ CPU kernels, every Dense runs on a native matmul over its packed or compressed
    # kernel (converted once, here; typed leaves dispatch in jaxserve.weights.matmul)
    native = kv_sharding is None and attention.use_cpu_kernel(cfg.dtype)
    self.params = prepare_params(params, sparse=sparse_weights, native=native)
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
    self.max_num_seqs = max_num_seqs
    self._executables: dict[tuple[int, int, int], Any] = {}  # forward bucket -> compiled program
    self._compiling: dict[tuple[int, int, int], concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self._compiler = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxserve-compile")
                      if background_compile else None)
    self.num_fallback_steps = 0  # steps run in a larger bucket while their own compiled
    self.num_blocking_compiles = 0  # steps that waited for their program to compile

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
    prefill_tokens = sum(s.num_tokens for s in seqs[nd:])
    key = self.bucket(nd, num_prefill, prefill_tokens)
    num_tokens, decode_slots, prefill_slots = self._choose(key, nd, num_prefill, prefill_tokens)
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
    bucket = (num_tokens, decode_slots, prefill_slots)
    exe = self._executables.get(bucket)
    if exe is None:  # compile here (the first step of this bucket waits for it)
      self.num_blocking_compiles += 1
      exe = self._compile(bucket, (tokens, positions, meta, logits_index))
    logits, greedy, self.kv = exe(self.params, self.kv, tokens, positions, meta, logits_index)
    return logits, greedy, rows

  @staticmethod
  def bucket(num_decode: int, num_prefill: int, prefill_tokens: int) -> tuple[int, int, int]:
    """``(tokens, decode slots, prefill slots)`` a step of this many decodes and prefill chunks pads to."""
    decode_slots = decode_bucket(num_decode) if num_decode else 0
    prefill_slots = pow2_bucket(num_prefill) if num_prefill else 0
    return decode_slots + (token_bucket(prefill_tokens) if num_prefill else 0), decode_slots, prefill_slots

  def _choose(self, key, nd, num_prefill, prefill_tokens) -> tuple[int, int, int]:
    """The step's own bucket, or with background compilation a compiled one that holds it."""
    with self._lock:
      for done in [k for k, f in self._compiling.items() if f.done()]:
        self._compiling.pop(done).result()  # re-raises a compile error here
    if self._compiler is None or key in self._executables:
      return key
    fits = [k for k in self._executables
            if k[1] >= nd and k[2] >= num_prefill and k[0] - k[1] >= prefill_tokens and (k[2] > 0) == (num_prefill > 0)]
    if not fits:
      return key
    with self._lock:
      if key not in self._compiling:
        self._compiling[key] = self._compiler.submit(self._compile, key, self._example_inputs(key))
    self.num_fallback_steps += 1
    return min(fits, key=lambda k: (k[0], k[1] + k[2]))

  def _example_inputs(self, key):
    """Inputs of the right shapes for compiling bucket ``key`` (all padding)."""
    num_tokens, decode_slots, prefill_slots = key
    meta = make_meta([], 0, num_tokens=num_tokens, decode_slots=decode_slots, prefill_slots=prefill_slots,
                     block_size=self.block_size, table_width=self.table_width)
    zeros = np.zeros((1, num_tokens), np.int32)
    return zeros, zeros, meta, np.zeros((1, decode_slots + prefill_slots), np.int32)

  def _compile(self, key, inputs):
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    exe = self._forward.lower(jax.tree.map(spec, self.params), jax.tree.map(spec, self.kv), *inputs).compile()
    with self._lock:
      self._executables[key] = exe
      self.program_keys.add(("forward",) + key)
    return exe

  def warmup(self, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None) -> int:
    """Compiles programs ahead of use; returns how many it compiled.

    Always the decode-only bucket of every batch size up to ``max_num_seqs``. With
    ``max_num_batched_tokens``, also one catch-all mixed bucket per prefill-token bucket up to it
    (every decode slot and as many prefill slots as tokens): any mixed step fits one of them, so
    with background compilation no step ever waits for a compile.
    """
    top = max_num_seqs or self.max_num_seqs
    keys = [(slots, slots, 0) for slots in sorted({decode_bucket(i) for i in range(1, top + 1)})]
    if max_num_batched_tokens:
      d = decode_bucket(top)
      tokens = sorted({token_bucket(t) for t in range(1, max_num_batched_tokens + 1)})
      keys += [(d + t, d, pow2_bucket(min(top, t))) for t in tokens]
    n = 0
    for key in keys:
      if key not in self._executables:
        self._compile(key, self._example_inputs(key))
        n += 1
    return n

  def sample(self, logits: jax.Array, tensors: SamplingTensors, cfg: SamplerConfig) -> SamplerOutput:
    """Samples on the device and brings the (small) results to the host: the step's one sync."""
    self.program_keys.add(("sample", logits.shape[0], tensors.row_index.shape[0], cfg))
    out = self._sample(logits, tensors, cfg)
    return SamplerOutput(*(None if x is None else np.asarray(x) for x in out))
