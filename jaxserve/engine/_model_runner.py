"""Runs a scheduled step on the device: pads it to one of a fixed set of compiled programs, runs the model, samples."""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine import _compile_cache, _cpu_kernels
from jaxserve.engine._executable_cache import ExecutableCache, signature
from jaxserve.engine._attention import PagedAttention, copy_blocks, make_meta, pool_shape
from jaxserve.engine._input_batch import step_arrays
from jaxserve.engine._sampler import (SamplerConfig, SamplerOutput, SamplingTensors, argmax, sample,
                                      sampling_tensors_spec)
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


def step_token_buckets(max_num_seqs: int, max_num_batched_tokens: int, cheap_padding: bool = False) -> tuple[int, ...]:
  """Padded token counts of the step programs: each decode batch's bucket (up to ``max_num_seqs``
  sequences) and each token bucket (up to ``max_num_batched_tokens`` tokens); a step runs in the
  smallest one that holds its tokens.

  ``cheap_padding``: the step's matmuls and attention skip its padding rows (the C++ CPU kernels
  take the real row count), so decode batches and token counts pad to powers of two (8, 16, 32, ...)
  instead of multiples of 8 and 32 and 1.5x steps: fewer programs to compile (9 instead of 12 up to
  2048 tokens), for the cost of elementwise work on padding.
  """
  if cheap_padding:
    decode_pad, token_pad = (lambda n: pow2_bucket(n, 8)), (lambda n: pow2_bucket(n, 16))
  else:
    decode_pad, token_pad = decode_bucket, token_bucket
  decode = {decode_pad(n) for n in range(1, min(max_num_seqs, max_num_batched_tokens) + 1)}
  return tuple(sorted(decode | {token_pad(t) for t in range(1, max_num_batched_tokens + 1)}))


def row_buckets(max_rows: int) -> tuple[int, ...]:
  """Padded row counts of the sampler's programs: 8, 32, 128, ... (x4), the last one ``max_rows`` rounded up to 8."""
  top = -(-max_rows // 8) * 8
  out, r = [], 8
  while r < top:
    out.append(r)
    r *= 4
  return tuple(out + [top])


def pad_rows(num_rows: int, max_num_seqs: int) -> int:
  """The sampler row bucket for ``num_rows`` rows (at most ``max_num_seqs`` in a step: a request is
  admitted only with room for all its ``n`` samples or beams)."""
  return next((b for b in row_buckets(max_num_seqs) if b >= num_rows), pow2_bucket(num_rows, 8))


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: str) -> int:
  itemsize = jnp.dtype(dtype).itemsize
  return sum(2 * cfg.kv_heads(i) * block_size * cfg.head_dim * itemsize for i in range(cfg.num_layers))


class SequenceInputError(Exception):
  """Building the step's host inputs failed for some sequences alone (the others build fine)."""

  def __init__(self, indices: list[int], cause: BaseException):
    super().__init__(f"{type(cause).__name__}: {cause}")
    self.indices, self.cause = indices, cause


def _forward_step(params, kv_pools, logits_buf, tokens, positions, meta, logits_index, *, cfg: ModelConfig,
                  attn: PagedAttention, native_rows: bool, kv_pool_sharding: NamedSharding | None):
  """One step's model forward: greedy tokens, the new KV pools and the logits buffer (what the runner jits)."""
  # the step's real tokens and sequences lead its padded rows: the native matmuls skip the padding
  lens = meta.cu_q_lens[1:] - meta.cu_q_lens[:-1]
  if native_rows:  # every layer's attention reads the same row view: derive it once
    meta = meta.with_rows(tokens.shape[1])
  out = forward(params, cfg, tokens, positions, kv=kv_pools, attn=attn, meta=meta,
                logits_index=logits_index, rows=meta.cu_q_lens[-1], logits_rows=jnp.sum(lens > 0, dtype=jnp.int32),
                jit_blocks=True)
  logits = out.logits[0]
  buf = jax.lax.dynamic_update_slice(logits_buf, logits.astype(logits_buf.dtype), (0, 0))
  if kv_pool_sharding is not None:
    buf = jax.lax.with_sharding_constraint(buf, NamedSharding(kv_pool_sharding.mesh, PartitionSpec()))
  greedy = _cpu_kernels.argmax(logits) if native_rows else argmax(logits)  # native_rows: the C++ kernels are in use
  return greedy, out.kv, buf


class ModelRunner:
  """Owns the device state (parameters, per-layer KV pools, the last step's logits) and the compiled step programs.

  The programs form a small fixed set (:meth:`program_keys`), compiled ahead of use by
  :meth:`compile_all` (``LLM(compile="eager")``) or on first use:

  * the model step, one per padded token count T (:func:`step_token_buckets`): a step's tokens
    pad to the smallest T that holds them and its sequences to ``min(T, max_num_seqs)`` slots
    (the C++ CPU kernel reads ragged metadata, so nothing else shapes the program). Backends that
    batch decodes apart (the XLA loops, the Pallas decode kernel) get a second, decode-only program
    per decode bucket. The step writes its logits into a persistent ``[slots, V]`` buffer.
  * the sampler, one per row bucket (:func:`row_buckets`) and with or without ``[R, V]``
    penalty/ban arrays; every other sampling choice is data, so client settings add no program.
    With the C++ CPU kernels each is one call of the C++ sampler (cheap to compile).
  * the copy-on-write block copy, one per copy-count bucket.

  The pools and the logits buffer are donated to each step so XLA updates them in place; after a
  failed step they are gone, and :meth:`reset_device_state` allocates fresh ones.

  With ``background_compile`` (lazy compilation), a step whose program is not compiled yet runs
  in the smallest compiled program that holds it (more padding, same results up to float rounding)
  while its own compiles on a helper thread.
  """

  def __init__(self, cfg: ModelConfig, params: Any, *, num_blocks: int, block_size: int, max_model_len: int,
               max_num_seqs: int, max_num_batched_tokens: int, attention: PagedAttention, kv_pool_sharding: Any = None,
               background_compile: bool = False, sparse_weights: str = "auto", compilation_cache: str | None = None):
    self.cfg, self.attn = cfg, attention
    # with the C++ CPU kernels, every Dense runs on a native matmul over its packed or compressed
    # kernel (converted once, here; typed leaves dispatch in jaxserve.weights.matmul)
    self.uses_cpu_kernels = kv_pool_sharding is None and attention.use_cpu_kernel(cfg.dtype)
    # q/k/v and gate/up as one matmul each with the C++ kernels (sharded models keep them apart)
    self.params = prepare_params(params, sparse=sparse_weights, native=self.uses_cpu_kernels,
                                 fuse=self.uses_cpu_kernels)
    self.block_size, self.num_blocks = block_size, num_blocks
    blocks_per_seq = -(-max_model_len // block_size)
    self.table_width = -(-blocks_per_seq // attention.kv_chunk) * attention.kv_chunk
    self.max_num_seqs = max_num_seqs
    self.token_buckets = step_token_buckets(max_num_seqs, max_num_batched_tokens, cheap_padding=self.uses_cpu_kernels)
    self.max_slots = decode_bucket(max_num_seqs)
    self.row_buckets = row_buckets(max_num_seqs)
    # decode-only steps get programs of their own where the attention batches decodes apart
    self.split_decodes = not attention.use_cpu_kernel(cfg.dtype)
    self.kv_pool_sharding = kv_pool_sharding
    self.compilation_cache = compilation_cache
    # whole compiled programs on disk (a warm start skips tracing them): one device, the engine's own
    # directory (a JAX cache directory the user configured gets JAX's entries only)
    self.program_cache = None
    if compilation_cache and kv_pool_sharding is None and not _compile_cache.is_users(compilation_cache):
      self.program_cache = ExecutableCache(compilation_cache)
      if not self.program_cache.ok:
        self.program_cache = None
    self.reset_device_state()
    # a function of its own, not a bound method: a jitted method would hold the runner, and the
    # runner the jitted function (with every compiled program), in a reference cycle that only
    # Python's full collection frees (each dropped engine then kept its programs' code mapped)
    self._forward = jax.jit(self.step_function(attention), donate_argnums=(1, 2))
    self._sample = jax.jit(functools.partial(sample, native=self.uses_cpu_kernels), static_argnums=(2,))
    self._copy = jax.jit(functools.partial(copy_blocks, layout=attention.kv_layout, native=self.uses_cpu_kernels),
                         donate_argnums=(0,))
    self._executables: dict[tuple, Any] = {}  # program key -> compiled program
    self._signatures: dict[tuple, str] = {}  # program key -> its executable-cache key
    self._compiling: dict[tuple, concurrent.futures.Future] = {}
    self._lock = threading.Lock()
    self._compiler = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxserve-compile")
                      if background_compile else None)
    self.num_fallback_steps = 0  # steps run in a larger program while their own compiled
    self.num_blocking_compiles = 0  # steps that waited for their program to compile

  def step_function(self, attention: PagedAttention) -> Any:
    """The step's forward (to jit; donate arguments 1 and 2) with this runner's settings and ``attention``;
    it holds no reference to the runner."""
    return functools.partial(_forward_step, cfg=self.cfg, attn=attention, native_rows=self.uses_cpu_kernels,
                             kv_pool_sharding=self.kv_pool_sharding)

  def reset_device_state(self) -> None:
    """Allocates fresh (zeroed) KV pools and logits buffer: at start, and after a failed step took the old ones."""
    dtype = jnp.dtype(self.cfg.dtype)
    shapes = [pool_shape(self.cfg.kv_heads(i), self.num_blocks, self.block_size, self.cfg.head_dim,
                         self.attn.kv_layout) for i in range(self.cfg.num_layers)]
    self.kv_pools = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for shape in shapes]
    self.logits = jnp.zeros((self.max_slots, self.cfg.vocab_size), jnp.float32)
    if self.kv_pool_sharding is not None:  # tensor parallel: each device holds its KV heads of every block
      self.kv_pools = jax.device_put(self.kv_pools, self.kv_pool_sharding)
      self.logits = jax.device_put(self.logits, NamedSharding(self.kv_pool_sharding.mesh, PartitionSpec()))

  # ---- the program set
  def step_key(self, num_tokens: int, decode_only: bool) -> tuple[str, int, int, int]:
    """``("step", T, slots, decode slots)`` of a step with this many tokens (all decodes or not)."""
    t = next((b for b in self.token_buckets if b >= num_tokens), None)
    if t is None:
      raise ValueError(f"a step of {num_tokens} tokens exceeds max_num_batched_tokens "
                       f"(largest step program: {self.token_buckets[-1]} tokens)")
    slots = min(t, self.max_slots)
    if decode_only and self.split_decodes:
      t = slots = decode_bucket(num_tokens)
      return ("step", t, slots, slots)
    return ("step", t, slots, 0)

  def sample_key(self, num_rows: int, cfg: SamplerConfig) -> tuple[str, int, SamplerConfig]:
    return ("sample", pad_rows(num_rows, self.max_num_seqs), cfg)

  def copy_key(self, num_copies: int) -> tuple[str, int]:
    return ("copy", max(8, 1 << (3 * math.ceil(math.log2(max(num_copies, 1)) / 3))))

  def program_keys(self) -> list[tuple]:
    """Every program a step can need: what :meth:`compile_all` compiles."""
    keys = {self.step_key(t, False) for t in self.token_buckets}
    if self.split_decodes:
      keys |= {self.step_key(n, True) for n in range(1, min(self.max_num_seqs, self.token_buckets[-1]) + 1)}
    keys = sorted(keys)
    keys += [self.sample_key(r, SamplerConfig(vocab_arrays=v)) for r in self.row_buckets for v in (False, True)]
    keys += sorted({self.copy_key(n) for n in range(1, self.max_num_seqs + 1)})
    return keys

  @property
  def num_compiled_programs(self) -> int:
    """Programs compiled so far (each one at this boundary: model steps, samplers, block copies)."""
    return len(self._executables)

  def compile_all(self, progress: bool = False) -> int:
    """Makes every program of :meth:`program_keys` ready; returns how many it added.

    A program the executable cache holds (an earlier process with the same model, settings and
    code) is loaded from it; the others are traced and compiled. Tracing runs on this thread (it holds the GIL) while XLA compiles the programs already traced
    on a pool of one thread per core, so a construction takes about the CPU time of its compiles
    divided by the cores.
    """
    missing = [k for k in self.program_keys() if k not in self._executables]
    todo = missing
    if self.program_cache is not None and missing:  # loads on one thread per core (they release the GIL)
      with concurrent.futures.ThreadPoolExecutor(max(1, min(len(missing), os.cpu_count() or 1)),
                                                 thread_name_prefix="jaxserve-load") as pool:
        loaded = list(pool.map(self._load, missing))
      todo = [k for k, ok in zip(missing, loaded) if not ok]  # what the executable cache does not hold
    bar = None
    if progress and todo:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(todo), desc="Compiling step programs", dynamic_ncols=True)
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    # one scope held across the loop keeps JAX's cache bound until the last compile is done
    with _compile_cache.scope(self._jax_cache_dir), \
         concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxserve-compile") as pool:
      futures = [pool.submit(self._compile, key, self._lower(key)) for key in todo]
      for f in concurrent.futures.as_completed(futures):
        f.result()
        if bar is not None:
          bar.update(1)
    if bar is not None:
      bar.close()
    return len(missing)

  def _spec(self, x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

  def _example_args(self, key) -> tuple:
    """Arguments of the right shapes for compiling program ``key`` (all padding)."""
    spec = functools.partial(jax.tree.map, self._spec)
    if key[0] == "step":
      _, t, slots, decode_slots = key
      meta = make_meta([], 0, num_tokens=t, decode_slots=decode_slots, prefill_slots=slots - decode_slots,
                       block_size=self.block_size, table_width=self.table_width)
      zeros = np.zeros((1, t), np.int32)
      return spec(self.params), spec(self.kv_pools), spec(self.logits), zeros, zeros, meta, np.zeros((1, slots), np.int32)
    if key[0] == "sample":
      _, r, cfg = key
      return spec(self.logits), sampling_tensors_spec(r, self.cfg.vocab_size, cfg), cfg
    n = key[1]
    return spec(self.kv_pools), np.zeros(n, np.int32), np.zeros(n, np.int32)

  def _lower(self, key):
    fn = {"step": self._forward, "sample": self._sample, "copy": self._copy}[key[0]]
    return fn.lower(*self._example_args(key))

  @property
  def _jax_cache_dir(self) -> str | None:
    """JAX's persistent cache for the engine's compiles: off where the executable cache keeps them (JAX
    serializes an executable it loaded from its own cache without its code: stored again, it would not run)."""
    return None if self.program_cache is not None else self.compilation_cache

  def _signature(self, key) -> str:
    sig = self._signatures.get(key)
    if sig is None:  # once per program (looked up on load, again on store after a miss)
      context = repr((self.cfg, self.attn, self.uses_cpu_kernels, self.split_decodes, self.block_size,
                      self.table_width, self.max_slots))
      sig = self._signatures[key] = signature(key, self._example_args(key), context)
    return sig

  def _load(self, key) -> bool:
    """Takes program ``key`` from the executable cache if it is there."""
    exe = self.program_cache.load(self._signature(key)) if self.program_cache is not None else None
    if exe is not None:
      with self._lock:
        self._executables[key] = exe
    return exe is not None

  def _compile(self, key, lowered=None):
    """Compiles program ``key`` (from its lowering, if given) and keeps it (also on disk)."""
    if lowered is None and self._load(key):
      return self._executables[key]
    lowered = lowered or self._lower(key)
    with _compile_cache.scope(self._jax_cache_dir):  # the cache is read and written in compile()
      # JAX serializes an executable it loaded from its own cache without its code: stored, it would
      # fail in the next process ("Function ... not found"), so a compile JAX's cache may have served
      # (bound by some other compile of this process) is not stored
      served = _compile_cache.jax_cache_may_serve()
      exe = lowered.compile()
      served = served or _compile_cache.jax_cache_may_serve()
    if self.program_cache is not None and not served:
      self.program_cache.store(self._signature(key), exe)
    elif self.program_cache is not None:
      with self._lock:
        self.program_cache.skipped += 1
    with self._lock:
      self._executables[key] = exe
    return exe

  def _program(self, key):
    exe = self._executables.get(key)
    if exe is None:  # lazy compilation: the first step that needs it waits
      self.num_blocking_compiles += 1
      exe = self._compile(key)
    return exe

  # ---- running a step
  def copy(self, copies: Sequence[tuple[int, int]]) -> None:
    """Copy-on-write block copies, padded with null-block no-ops."""
    key = self.copy_key(len(copies))
    src = np.zeros(key[1], np.int32)
    dst = np.zeros(key[1], np.int32)
    src[:len(copies)], dst[:len(copies)] = zip(*copies)
    self.kv_pools = self._program(key)(self.kv_pools, src, dst)

  def execute(self, sched: SchedulerOutput) -> tuple[jax.Array, jax.Array, list[int]]:
    """Runs the model on the scheduled tokens.

    Returns:
      ``(logits, greedy, rows)``: the logits buffer ``[max slots, V]`` (this step's rows first),
      the argmax of each of the step's logits rows ``[slots]`` (plain greedy batches need nothing
      else), and for each scheduled sequence in order its row in ``logits``.

    Raises:
      SequenceInputError: the host inputs of some sequences could not be built (nothing ran).
    """
    nd = sched.num_decode
    # decodes longest first (the batched decode loop stops early for groups of short ones)
    order = sorted(range(nd), key=lambda j: -sched.seqs[j].start) + list(range(nd, len(sched.seqs)))
    seqs = [sched.seqs[j] for j in order]
    key = self._choose(self.step_key(sched.num_tokens, nd == len(seqs)), sched.num_tokens, len(seqs))
    if len(seqs) > key[2]:
      raise RuntimeError(f"a step of {len(seqs)} sequences exceeds its program's {key[2]} slots "
                         f"(max_num_seqs={self.max_num_seqs}): the scheduler admitted too many")
    try:
      args = self._step_inputs(seqs, nd, key)
    except Exception as e:  # noqa: BLE001 - find the sequences that fail alone; the rest can run
      bad = [order[j] for j, s in enumerate(seqs) if self._fails_alone(s, key)]
      if not bad:
        raise
      raise SequenceInputError(bad, e) from e
    rows = [0] * len(seqs)
    for j in range(len(seqs)):  # sequence j of the step took logits slot j
      rows[order[j]] = j
    if sched.copies:
      self.copy(sched.copies)
    greedy, self.kv_pools, self.logits = self._run_step(self._program(key), args)
    return self.logits, greedy, rows

  def _run_step(self, exe, args):
    """Calls a compiled step program (the pools and logits buffer are donated to it)."""
    return exe(self.params, self.kv_pools, self.logits, *args)

  def _step_inputs(self, seqs, nd: int, key) -> tuple:
    """The step's host arrays (:func:`step_arrays`)."""
    return step_arrays(seqs, nd, key, block_size=self.block_size, table_width=self.table_width)

  def _fails_alone(self, s, key) -> bool:
    try:
      self._step_inputs([s], 0, ("step", key[1], key[2], 0))
    except Exception:  # noqa: BLE001
      return True
    return False

  def _choose(self, key, num_tokens: int, num_seqs: int):
    """The step's own program, or with background compilation a compiled one that holds it."""
    with self._lock:
      for done in [k for k, f in self._compiling.items() if f.done()]:
        self._compiling.pop(done).result()  # re-raises a compile error here
    if self._compiler is None or key in self._executables:
      return key
    decode_only = key[3] > 0
    fits = [k for k in self._executables if k[0] == "step" and k[1] >= num_tokens and k[2] >= num_seqs
            and (k[3] == 0 or (decode_only and k[3] >= num_seqs))]
    if not fits:
      return key
    with self._lock:
      if key not in self._compiling:
        self._compiling[key] = self._compiler.submit(self._compile, key)
    self.num_fallback_steps += 1
    return min(fits, key=lambda k: (k[1], k[2]))

  def sample(self, logits: jax.Array, tensors: SamplingTensors, cfg: SamplerConfig) -> SamplerOutput:
    """Samples on the device from the logits buffer :meth:`execute` returned and brings the (small)
    results to the host: the step's one sync."""
    out = self._program(self.sample_key(tensors.row_index.shape[0], cfg))(logits, tensors)
    return SamplerOutput(*(None if x is None else np.asarray(x) for x in out))
