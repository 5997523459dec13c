"""C++ kernels for the CPU (attention, block copies, matmuls, sampling), called from jitted code as FFI custom calls.

A small model's decode step on a small CPU is mostly reading memory: the K/V blocks and every
weight matrix. XLA reads gathered KV blocks at about a third of the memory bandwidth and packs
each weight matrix again on every matmul. The attention kernel (``csrc/paged_attention_cpu.cc``)
writes the step's K/V into their slots in place and handles every query row of a step (decodes
and causal prefill chunks), reading each block once per pass (the same file copies blocks in place for
copy-on-write, :func:`copy_blocks`); the matmul
(``csrc/matmul_cpu.cc``) reads weights packed once, at load time, into column panels
(:class:`jaxserve.weights.PackedDense`); the sparse matmuls (``csrc/sparse_matmul_cpu.cc``, :func:`nm_matmul`,
:func:`bitmask_matmul`) read N:M or bitmask-compressed weights, fewer bytes than dense; the sampler
(``csrc/sampler_cpu.cc``, :func:`sample`, :func:`argmax`) is ``jaxserve.engine._sampler.sample`` in one
pass per row, and makes each sampler program a single call (trivial to compile). All split
their work between the threads of XLA's own intra-op pool.
They are compiled on first use with the system C++ compiler against the FFI headers shipped in
jaxlib (without ``-ffast-math``: loading them leaves the process's floating-point modes alone),
cached under ``$JAXSERVE_CACHE_DIR/cpu_kernels`` (default ``~/.cache/jaxserve/cpu_kernels``, a
private 0700 directory, keyed by :func:`cache_key`; a library is loaded only from a directory and
file of this user's that nobody else can write), and registered with JAX. Without a compiler
(or with ``JAXSERVE_CPU_KERNEL=0``), :func:`available` is False and the engine keeps the pure-XLA
path. float32 and bfloat16 (float32 accumulation) pools and packed weights; the sparse matmuls
are float32 only. ``JAXSERVE_CPU_KERNEL_ISA=generic`` builds without AVX-512
(the kernels' portable paths) and ``no-bf16`` makes the bfloat16 matmul widen to float32 instead
of using AVX-512 BF16 or AMX, for tests; ``JAXSERVE_CPU_AMX=0`` keeps the bfloat16 matmul off AMX
(its prefill-sized path, see :data:`AMX_MIN_ROWS`). :func:`info` says which paths run (also logged at load).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "jaxserve_paged_attention_cpu"
WRITE_TARGET = "jaxserve_write_paged_attention_cpu"
MATMUL_TARGET = "jaxserve_matmul_cpu"
NM_MATMUL_TARGET = "jaxserve_nm_matmul_cpu"
BITMASK_MATMUL_TARGET = "jaxserve_bitmask_matmul_cpu"
TARGET_BF16 = "jaxserve_paged_attention_bf16_cpu"
WRITE_TARGET_BF16 = "jaxserve_write_paged_attention_bf16_cpu"
COPY_BLOCKS_TARGET = "jaxserve_copy_blocks_cpu"
MATMUL_TARGET_BF16 = "jaxserve_matmul_bf16_cpu"
SAMPLE_TARGET = "jaxserve_sample_cpu"
SAMPLE_VOCAB_TARGET = "jaxserve_sample_vocab_cpu"  # with [R, V] penalty and ban arrays
SAMPLE_PROCESSED_TARGET = "jaxserve_sample_processed_cpu"  # also returns the processed logits (tests)
SAMPLE_NOISE_TARGET = "jaxserve_sample_noise_cpu"  # each row's random bits, uniforms and Gumbel noise (tests)
ARGMAX_TARGET = "jaxserve_argmax_cpu"
ISAS = ("native", "no-bf16", "generic")  # values of $JAXSERVE_CPU_KERNEL_ISA
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # pool and packed-weight dtypes the kernels take
# Rows of x up to which the bfloat16 matmul uses vdpbf16ps (csrc/matmul_cpu.cc: it did half the
# FMAs' multiply-adds per cycle on the Sapphire Rapids VM, so it pays only in memory-bound decodes)
BF16_DOT_MAX_ROWS = 4
# Rows of x from which the bfloat16 matmul uses AMX tiles where the CPU has them (csrc/matmul_cpu.cc):
# measured on the Sapphire Rapids VM (loaded, interleaved, medians; shapes 512x512 .. 4096x4096, 1 and 2
# threads), AMX beat the widening path by 1.3-3x from 5 rows (one of 20 cases at 5-6 rows 0.9x) and was
# about even with vdpbf16ps at 1-4 rows (memory-bound)
AMX_MIN_ROWS = BF16_DOT_MAX_ROWS + 1
_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("paged_attention_cpu.cc", "matmul_cpu.cc", "sparse_matmul_cpu.cc", "sampler_cpu.cc")]
_HEADERS = [Path(__file__).parent / "csrc" / name for name in ("parallel.h", "valid_rows.h")]
_lock = threading.Lock()
_state: dict[str, object] = {}
log = logging.getLogger(__name__)


def _cache_dir() -> Path:
  """Where built kernels are kept: ``$JAXSERVE_CACHE_DIR/cpu_kernels`` (default ``~/.cache/jaxserve/cpu_kernels``)."""
  root = os.environ.get("JAXSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxserve")
  return Path(root) / "cpu_kernels"


def _compile_flags() -> list[str]:
  """The compiler flags, for ``$JAXSERVE_CPU_KERNEL_ISA`` (``native`` or ``generic``).

  No ``-ffast-math`` (nor ``-Ofast``, ``-funsafe-math-optimizations``): linking a shared library
  with it runs code at load time that turns on flush-to-zero for the whole process. The flags
  here only let the compiler contract ``a * b + c`` into FMAs and vectorize without errno or FP
  traps; the reductions are vectorized by explicit ``#pragma omp simd``.
  """
  flags = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fopenmp-simd",
           "-std=c++17", "-shared", "-fPIC", "-pthread"]
  if platform.machine().lower() in ("x86_64", "amd64"):
    # GCC's -march tuning for recent Intel cores prefers 256-bit vectors: the attention loops
    # (#pragma omp simd) then use no zmm register at all. Measured on the 2-core Xeon (Sapphire
    # Rapids), alternating builds, loaded machine: a 256-row causal prefill 1.1-1.4 ms -> 0.76-0.81
    # ms, decode batches unchanged. Harmless where AVX-512 is absent (the widest vectors are used).
    flags.append("-mprefer-vector-width=512")
  if _isa() == "generic":
    flags.append("-mno-avx512f")  # also drops the AVX-512 extensions: the AVX2 (or older) paths
  return flags


def _amx_allowed() -> bool:
  """``$JAXSERVE_CPU_AMX``: ``1`` (default: the bfloat16 matmul may use AMX) or ``0`` (never); read when a call is
  traced."""
  amx = os.environ.get("JAXSERVE_CPU_AMX", "1")
  if amx not in ("0", "1"):
    raise ValueError(f"JAXSERVE_CPU_AMX must be '0' or '1', got {amx!r}")
  return amx == "1"


def _isa() -> str:
  """``$JAXSERVE_CPU_KERNEL_ISA``: ``native`` (default), ``no-bf16`` (the bfloat16 matmul widens to float32
  instead of using AVX-512 BF16 or AMX; read when a call is traced) or ``generic`` (built without AVX-512)."""
  isa = os.environ.get("JAXSERVE_CPU_KERNEL_ISA", "native")
  if isa not in ISAS:
    raise ValueError(f"JAXSERVE_CPU_KERNEL_ISA must be one of {ISAS}, got {isa!r}")
  return isa


@functools.lru_cache(maxsize=None)
def cpu_flags() -> str:
  """The CPU's instruction-set flags, once per process (what native code built here depends on)."""
  return _cpu_flags()


def _cpu_flags() -> str:
  """The CPU's instruction-set flags (``/proc/cpuinfo``; elsewhere the compiler's ``-march=native`` expansion)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith(("flags", "Features")):  # x86, arm
          return " ".join(sorted(line.split(":", 1)[1].split()))
  except OSError:
    pass
  cxx = _compiler()
  if cxx is None:
    return platform.processor()
  proc = subprocess.run([cxx, "-march=native", "-Q", "--help=target"], capture_output=True, text=True, timeout=60)
  return proc.stdout


def _jaxlib_version() -> str:
  import jaxlib
  return jaxlib.__version__


def cache_key(sources: bytes, include: str, flags: list[str], cpu_flags: str, jaxlib_version: str) -> str:
  """The build's cache key: the sources, the FFI headers, the flags, the CPU's instruction sets and jaxlib.

  A ``-march=native`` library runs only on a CPU with the same instruction sets (another dies with
  SIGILL) and against the jaxlib whose FFI headers it was built with; the host name plays no
  part (containers share host names across machines).
  """
  parts = [sources, include.encode(), " ".join(flags).encode(), platform.machine().encode(), cpu_flags.encode(),
           jaxlib_version.encode()]
  return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def check_private(path: Path) -> None:
  """Raises PermissionError unless ``path`` is owned by this user and not writable by group or others.

  A library is loaded (its code run) only from such a place: anyone who can write the directory or
  the file could have put their own code there.
  """
  st = path.lstat()
  if hasattr(os, "getuid") and st.st_uid != os.getuid():
    raise PermissionError(f"refusing to load the CPU kernels from {path}: it is owned by uid {st.st_uid}, not by "
                          f"this user (uid {os.getuid()}); point JAXSERVE_CACHE_DIR at a directory of your own")
  if st.st_mode & 0o022:
    raise PermissionError(f"refusing to load the CPU kernels from {path}: its mode {oct(st.st_mode & 0o777)} lets "
                          f"group or others write it; it must be private (chmod go-w, e.g. 700), or point "
                          f"JAXSERVE_CACHE_DIR elsewhere")


def _private_dir() -> Path:
  """The cache directory, created 0700 and checked; a fresh private temp directory if it cannot be created."""
  out = _cache_dir()
  try:
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    writable = os.access(out, os.W_OK)
  except OSError:
    writable = False
  if not writable:  # e.g. a read-only home: build in a new private (0700, unpredictable) temp directory
    if "tmp_dir" not in _state:
      _state["tmp_dir"] = tempfile.mkdtemp(prefix="jaxserve-cpu-kernels-")
    out = Path(_state["tmp_dir"])
  check_private(out)
  return out


def _build() -> Path:
  """Compiles the kernels (once per key: :func:`cache_key`) and returns the library path (checked private)."""
  src = b"".join(path.read_bytes() for path in _SOURCES + _HEADERS)
  include = jax.ffi.include_dir()
  flags = _compile_flags()
  key = cache_key(src, include, flags, _cpu_flags(), _jaxlib_version())
  out = _private_dir() / f"cpu_kernels-{key}.so"
  if not out.exists():
    cxx = _compiler()
    if cxx is None:
      raise RuntimeError("no C++ compiler found (set CXX)")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
      lib = os.path.join(tmp, out.name)
      proc = subprocess.run([cxx, *flags, "-I", include, *map(str, _SOURCES), "-o", lib], capture_output=True,
                            text=True, timeout=600)
      if proc.returncode != 0:
        raise RuntimeError(f"compiling {', '.join(p.name for p in _SOURCES)} failed:\n{proc.stderr[-2000:]}")
      os.chmod(lib, 0o755)  # not group-writable whatever the umask (check_private would refuse it)
      os.replace(lib, out)  # atomic: concurrent builders each produce the same file
  check_private(out)
  return out


def available() -> bool:
  """Whether the kernels are built and registered (builds them on the first call; False on failure)."""
  with _lock:
    if "ok" not in _state:
      if os.environ.get("JAXSERVE_CPU_KERNEL", "1") == "0":
        _state["ok"] = False
        return False
      try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxservePagedAttentionCpu), platform="cpu")
        jax.ffi.register_ffi_target(WRITE_TARGET, jax.ffi.pycapsule(lib.JaxserveWritePagedAttentionCpu),
                                    platform="cpu")
        jax.ffi.register_ffi_target(MATMUL_TARGET, jax.ffi.pycapsule(lib.JaxserveMatmulCpu), platform="cpu")
        jax.ffi.register_ffi_target(COPY_BLOCKS_TARGET, jax.ffi.pycapsule(lib.JaxserveCopyBlocksCpu), platform="cpu")
        jax.ffi.register_ffi_target(TARGET_BF16, jax.ffi.pycapsule(lib.JaxservePagedAttentionBf16Cpu),
                                    platform="cpu")
        jax.ffi.register_ffi_target(WRITE_TARGET_BF16, jax.ffi.pycapsule(lib.JaxserveWritePagedAttentionBf16Cpu),
                                    platform="cpu")
        jax.ffi.register_ffi_target(MATMUL_TARGET_BF16, jax.ffi.pycapsule(lib.JaxserveMatmulBf16Cpu),
                                    platform="cpu")
        jax.ffi.register_ffi_target(NM_MATMUL_TARGET, jax.ffi.pycapsule(lib.JaxserveNmMatmulCpu), platform="cpu")
        jax.ffi.register_ffi_target(BITMASK_MATMUL_TARGET, jax.ffi.pycapsule(lib.JaxserveBitmaskMatmulCpu),
                                    platform="cpu")
        for target, symbol in ((SAMPLE_TARGET, lib.JaxserveSampleCpu),
                               (SAMPLE_VOCAB_TARGET, lib.JaxserveSampleVocabCpu),
                               (SAMPLE_PROCESSED_TARGET, lib.JaxserveSampleProcessedCpu),
                               (SAMPLE_NOISE_TARGET, lib.JaxserveSampleNoiseCpu),
                               (ARGMAX_TARGET, lib.JaxserveArgmaxCpu)):
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
        _state["ok"], _state["lib"] = True, lib
        log.info("jaxserve: CPU kernels loaded (%s); bfloat16 matmul: %s", lib._name, _bf16_path(lib))
      except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
        log.warning("jaxserve: CPU kernels unavailable, using XLA's attention and matmul (%s)", e)
        _state["ok"], _state["error"] = False, str(e)
    return bool(_state["ok"])


def supported(dtype, sliding_window) -> bool:
  """Whether the kernel handles pools of ``dtype`` (float32 or bfloat16) with this sliding window (none)."""
  return jnp.dtype(dtype) in DTYPES and sliding_window is None


def bf16_path() -> str:
  """The bfloat16 matmul's path here: ``"amx"`` (AMX tiles from :data:`AMX_MIN_ROWS` rows, ``vdpbf16ps`` up to
  :data:`BF16_DOT_MAX_ROWS` rows, widening between), ``"avx512_bf16"`` (``vdpbf16ps`` up to
  :data:`BF16_DOT_MAX_ROWS` rows, widening above) or ``"widen"`` (bfloat16 widened to float32, then FMAs), from
  the CPU (checked by the library at run time: AMX also needs the OS's permission, asked for at the first AMX
  call; refused, the kernel falls back and this says so), ``$JAXSERVE_CPU_KERNEL_ISA`` and
  ``$JAXSERVE_CPU_AMX``."""
  return _bf16_path(_state["lib"]) if available() else "widen"


def _bf16_path(lib: ctypes.CDLL) -> str:
  if _isa() != "native" or not lib.JaxserveCpuBf16Dot():
    return "widen"
  return "amx" if _amx_allowed() and lib.JaxserveCpuAmx() else "avx512_bf16"


def info() -> dict[str, object]:
  """What runs: ``{"available", "isa", "bf16_matmul", "error"}`` (for stats and logs)."""
  ok = available()
  return {"available": ok, "isa": _isa(), "bf16_matmul": bf16_path() if ok else None,
          "error": _state.get("error")}


def paged_rows(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, row_seq: jax.Array,
               row_len: jax.Array, *, scale: float, num_threads: int = 0) -> jax.Array:
  """Attention of query rows over block-layout pools; float32 out (call :func:`available` first).

  Args:
    q: ``[T, H, D]`` query rows (computed in float32).
    k_pages, v_pages: ``[NB, KVH, BS, D]`` pools, float32 or bfloat16 (widened as they are read).
    block_tables: ``[S, W]`` physical blocks of each sequence.
    row_seq: ``[T]`` sequence of each row.
    row_len: ``[T]`` positions each row sees (its position + 1: causal); 0 makes the row zero.
    scale: softmax scale.
    num_threads: parts the rows are split into, run on XLA's intra-op thread pool (0: one per
      pool thread).
  """
  target = _pool_target(TARGET, TARGET_BF16, k_pages, v_pages)
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
  return call(q.astype(jnp.float32), k_pages, v_pages, block_tables.astype(jnp.int32), row_seq.astype(jnp.int32),
              row_len.astype(jnp.int32), scale=np.float32(scale), num_threads=np.int64(num_threads))


def write_paged_rows(q: jax.Array, k_new: jax.Array, v_new: jax.Array, slot_mapping: jax.Array, k_pages: jax.Array,
                     v_pages: jax.Array, block_tables: jax.Array, row_seq: jax.Array, row_len: jax.Array, *,
                     scale: float, num_threads: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The engine's step in one call: writes ``k_new, v_new`` ``[N, KVH, D]`` into their slots
  (``slot_mapping`` ``[N]``; slots outside the pool are skipped), then :func:`paged_rows`.

  ``k_new, v_new`` are rounded to the pools' dtype (as XLA's ``astype``) before they are written.
  The pools are aliased input to output, so inside a jitted step whose pools are donated they
  are updated in place (no scatter, no copy). Returns ``(out, k_pages, v_pages)``.
  """
  target = _pool_target(WRITE_TARGET, WRITE_TARGET_BF16, k_pages, v_pages)
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
               jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype))
  call = jax.ffi.ffi_call(target, out_types, input_output_aliases={4: 1, 5: 2})
  return call(q.astype(jnp.float32), k_new.astype(k_pages.dtype), v_new.astype(v_pages.dtype),
              slot_mapping.astype(jnp.int32), k_pages, v_pages, block_tables.astype(jnp.int32),
              row_seq.astype(jnp.int32), row_len.astype(jnp.int32), scale=np.float32(scale),
              num_threads=np.int64(num_threads))


def copy_blocks(pages: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
  """Copy-on-write in a ``[NB, ...]`` pool (blocks first): block ``dst[i]`` becomes a copy of block ``src[i]``.

  The sources are read before any block is written (as ``pages.at[dst].set(pages[src])``); pairs with
  ``src == dst`` (padding) cost nothing. The pool is aliased input to output: inside a jitted function
  that donates it, it is updated in place. Any dtype; an index outside the pool is an error.
  """
  if pages.ndim < 1 or src.shape != dst.shape or src.ndim != 1:
    raise ValueError(f"copy_blocks: need a pool [NB, ...] and src, dst [N], got {pages.shape}, {src.shape}, "
                     f"{dst.shape}")
  call = jax.ffi.ffi_call(COPY_BLOCKS_TARGET, jax.ShapeDtypeStruct(pages.shape, pages.dtype),
                          input_output_aliases={0: 0})
  return call(pages, src.astype(jnp.int32), dst.astype(jnp.int32))


def _pool_target(f32: str, bf16: str, k_pages: jax.Array, v_pages: jax.Array) -> str:
  if k_pages.dtype != v_pages.dtype or jnp.dtype(k_pages.dtype) not in DTYPES:
    raise ValueError(f"paged attention: K/V pools must both be float32 or both bfloat16, got {k_pages.dtype} and "
                     f"{v_pages.dtype}")
  return bf16 if k_pages.dtype == jnp.bfloat16 else f32


def step_rows(cu_q_lens: jax.Array, kv_lens: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """``(row_seq, row_len)`` of a flattened step: sequence ``s`` owns rows ``cu_q_lens[s]:cu_q_lens[s+1]``,
  the last of its ``kv_lens[s]`` positions; rows past the step's tokens get length 0."""
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  seq = jnp.searchsorted(cu_q_lens, rows, side="right").astype(jnp.int32) - 1
  seq = jnp.clip(seq, 0, kv_lens.shape[0] - 1)
  q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
  pos = kv_lens[seq] - q_len + (rows - cu_q_lens[seq])
  valid = rows < cu_q_lens[-1]
  return seq, jnp.where(valid, pos + 1, 0)


def packed_matmul(x: jax.Array, packed: jax.Array, *, num_threads: int = 0, bf16_dot: bool | None = None,
                  amx: bool | None = None, rows: jax.Array | int | None = None) -> jax.Array:
  """``x @ W`` for ``x`` ``[..., K]`` and ``W`` ``[K, N]`` in column panels, float32 out (call :func:`available` first).

  Args:
    x: ``[..., K]`` activations; leading axes are flattened into rows; cast to ``packed``'s dtype.
    packed: the panels of :class:`jaxserve.weights.PackedDense` reshaped to ``[rows, N]`` (a
      permutation of W's elements, not W): float32 (``rows = K``), or bfloat16 with ``pairs``
      (``rows`` = K rounded up to even), accumulated in float32.
    num_threads: parts the panels are split into, run on XLA's intra-op thread pool (0: one per
      pool thread).
    bf16_dot: bfloat16 only: True: AVX-512 BF16's ``vdpbf16ps`` (where the CPU has it; checked
      by the kernel); False: widen to float32 and FMA; None: per :func:`bf16_path`, ``vdpbf16ps``
      up to :data:`BF16_DOT_MAX_ROWS` rows of x (decode-sized calls) and widening above.
    amx: bfloat16 only: True: AMX tiles for any number of rows (where the CPU and the OS let it run;
      checked by the kernel, which otherwise takes ``bf16_dot``'s path); False: never; None: per
      :func:`bf16_path`, AMX from :data:`AMX_MIN_ROWS` rows of x (prefill-sized calls).
    rows: how many leading rows of x (flattened) are real, an int or an int32 scalar (traced: an
      engine step's real tokens); only those are multiplied, the other output rows are zeros.
      None: all.
  """
  packed_rows, n = packed.shape
  k = x.shape[-1]
  bf16 = packed.dtype == jnp.bfloat16
  if packed.dtype not in DTYPES or packed_rows != (k + k % 2 if bf16 else k):
    raise ValueError(f"packed_matmul: need float32 [K, N] or bfloat16 [K rounded up to even, N] panels for K={k}, "
                     f"got {packed.dtype} {packed.shape}")
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k).astype(packed.dtype)
  out = jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32)
  if bf16:
    path = bf16_path() if bf16_dot is None or amx is None else None
    if bf16_dot is None:
      dot_rows = BF16_DOT_MAX_ROWS if path in ("amx", "avx512_bf16") else 0
    else:
      dot_rows = np.iinfo(np.int64).max if bf16_dot else 0
    amx_rows = (AMX_MIN_ROWS if path == "amx" else 0) if amx is None else int(amx)
    call = jax.ffi.ffi_call(MATMUL_TARGET_BF16, out)
    return call(x2, packed, _valid_rows(rows, x2.shape[0]), num_threads=np.int64(num_threads),
                bf16_dot_rows=np.int64(dot_rows), amx_min_rows=np.int64(amx_rows)).reshape(*lead, n)
  call = jax.ffi.ffi_call(MATMUL_TARGET, out)
  return call(x2, packed, _valid_rows(rows, x2.shape[0]), num_threads=np.int64(num_threads)).reshape(*lead, n)


_PANEL = 16  # lanes of a sparse matmul's column panel


def _valid_rows(rows: jax.Array | int | None, num_rows: int) -> jax.Array:
  """The matmul kernels' ``rows`` operand: ``[1]`` int32, the leading rows of x that are real (default all)."""
  if rows is None:
    return jnp.full((1,), num_rows, jnp.int32)
  rows = jnp.asarray(rows)
  if rows.size != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
    raise ValueError(f"rows must be one integer (the real rows of x), got {rows.dtype} {rows.shape}")
  return rows.reshape(1).astype(jnp.int32)


def _rows(x: jax.Array, k: int, name: str) -> jax.Array:
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"{name}: x must be [..., {k}] (K from the weights), got {x.shape}")
  return x.reshape(-1, k).astype(jnp.float32)


def nm_matmul(x: jax.Array, values: jax.Array, meta: jax.Array, *, n: int, m: int, n_out: int,
              num_threads: int = 0, rows: jax.Array | int | None = None) -> jax.Array:
  """``x @ W`` for a float32 ``W`` ``[K, n_out]`` stored N:M-sparse (call :func:`available` first).

  ``W`` keeps ``n`` of every ``m`` consecutive rows (a group) of each column, in column panels of
  16 lanes (panel ``p``: columns ``16p .. 16p + 15``; ``NP = ceil(n_out / 16)``; lanes past
  ``n_out`` hold zeros and index 0). Slot row ``r = g * n + j`` is the ``j``-th kept value of group
  ``g``; ``b = 2`` index bits if ``m <= 4``, else 4; ``words = b // 2``. Then
  ``W[g * m + idx, 16p + l] += values[p, r, l]`` with
  ``idx = (meta[p, r, l // (32 // b)] >> (b * (l % (32 // b)))) & (2**b - 1)``.

  Args:
    x: ``[..., K]`` activations; leading axes are flattened into rows.
    values: ``[NP, S, 16]`` float32 kept weights, ``S = K // m * n``.
    meta: ``[NP, S, words]`` uint32 packed in-group indices.
    n, m: the pattern, ``2 <= m <= 16``, ``0 < n < m``, ``K % m == 0``.
    n_out: ``N``, the output columns.
    num_threads: parts the panels are split into, run on XLA's intra-op thread pool (0: one per
      pool thread).
    rows: as for :func:`packed_matmul`: the real leading rows of x (the other output rows are zeros).

  Returns:
    ``[..., n_out]`` float32.
  """
  if not (2 <= m <= 16 and 0 < n < m):
    raise ValueError(f"nm_matmul: need 2 <= m <= 16 and 0 < n < m, got n={n}, m={m}")
  words = 1 if m <= 4 else 2
  if values.ndim != 3 or values.shape[2] != _PANEL or values.shape[1] % n:
    raise ValueError(f"nm_matmul: values must be [NP, S, 16] with S a multiple of n={n}, got {values.shape}")
  panels, slots = values.shape[:2]
  k = slots // n * m
  if panels != -(-n_out // _PANEL) or n_out < 1:
    raise ValueError(f"nm_matmul: n_out={n_out} needs {-(-n_out // _PANEL)} panels, values has {panels}")
  if meta.shape != (panels, slots, words) or meta.dtype != jnp.uint32 or values.dtype != jnp.float32:
    raise ValueError(f"nm_matmul: need float32 values and uint32 meta [{panels}, {slots}, {words}], got "
                     f"{values.dtype} values and {meta.dtype} meta {meta.shape}")
  lead, x2 = x.shape[:-1], _rows(x, k, "nm_matmul")
  call = jax.ffi.ffi_call(NM_MATMUL_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n_out), jnp.float32))
  out = call(x2, values, meta, _valid_rows(rows, x2.shape[0]), n=np.int64(n), m=np.int64(m),
             num_threads=np.int64(num_threads))
  return out.reshape(*lead, n_out)


def bitmask_matmul(x: jax.Array, bits: jax.Array, values: jax.Array, offsets: jax.Array, *, n_out: int,
                   num_threads: int = 0, rows: jax.Array | int | None = None) -> jax.Array:
  """``x @ W`` for a float32 ``W`` ``[K, n_out]`` stored as a bitmask and values (call :func:`available` first).

  Column panels of 16 lanes (panel ``p``: columns ``16p .. 16p + 15``; ``NP = ceil(n_out / 16)``;
  bits past ``n_out`` are 0). Panel by panel, ``k`` ascending, ``values`` holds the kept lanes of
  row ``k`` in lane order (``_mm512_maskz_expand_ps`` order), then 16 zeros.

  Args:
    x: ``[..., K]`` activations; leading axes are flattened into rows.
    bits: ``[NP, K]`` uint16; bit ``l`` of ``bits[p, k]`` set iff ``W[k, 16p + l]`` is kept.
    values: ``[nnz + 16]`` float32 kept weights and 16 zeros of padding.
    offsets: ``[NP + 1]`` int64 (int32 without ``jax_enable_x64``); ``offsets[p]`` is the index
      in ``values`` of panel ``p``'s first value, ``offsets[NP] = nnz``. The kernel checks that
      each panel's bits count ``offsets[p + 1] - offsets[p]`` values (an error otherwise).
    n_out: ``N``, the output columns.
    num_threads: as for :func:`nm_matmul`.
    rows: as for :func:`packed_matmul`.

  Returns:
    ``[..., n_out]`` float32.
  """
  panels = -(-n_out // _PANEL)
  if n_out < 1 or bits.ndim != 2 or bits.shape[0] != panels or bits.dtype != jnp.uint16:
    raise ValueError(f"bitmask_matmul: n_out={n_out} needs uint16 bits [{panels}, K], got {bits.dtype} {bits.shape}")
  if values.ndim != 1 or values.shape[0] < _PANEL or values.dtype != jnp.float32:
    raise ValueError(f"bitmask_matmul: values must be float32 [nnz + 16], got {values.dtype} {values.shape}")
  if offsets.shape != (panels + 1,) or offsets.dtype not in (jnp.int32, jnp.int64):
    raise ValueError(f"bitmask_matmul: offsets must be int64 or int32 [{panels + 1}], got {offsets.dtype} "
                     f"{offsets.shape}")
  lead, x2 = x.shape[:-1], _rows(x, bits.shape[1], "bitmask_matmul")
  call = jax.ffi.ffi_call(BITMASK_MATMUL_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n_out), jnp.float32))
  return call(x2, bits, values, offsets, _valid_rows(rows, x2.shape[0]),
              num_threads=np.int64(num_threads)).reshape(*lead, n_out)


def argmax(x: jax.Array, *, num_threads: int = 0) -> jax.Array:
  """``jaxserve.engine._sampler.argmax`` of ``x`` ``[..., V]`` (float32, or bfloat16 widened): int32 ``[...]``, the
  first maximum of each row, the first NaN where a row has one (call :func:`available` first).

  One pass over each row; rows (and parts of rows, when there are fewer rows than twice the threads) are split
  over XLA's intra-op thread pool (``num_threads`` parts; 0: one per pool thread).
  """
  if x.ndim < 1 or x.shape[-1] < 1 or x.dtype not in DTYPES:
    raise ValueError(f"argmax: x must be float32 or bfloat16 [..., V] with V >= 1, got {x.dtype} {x.shape}")
  lead, v = x.shape[:-1], x.shape[-1]
  x2 = x.reshape(-1, v).astype(jnp.float32)
  call = jax.ffi.ffi_call(ARGMAX_TARGET, jax.ShapeDtypeStruct((x2.shape[0],), jnp.int32))
  return call(x2, num_threads=np.int64(num_threads)).reshape(lead)


def sample(logits: jax.Array, row_index: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           min_p: jax.Array, seed: jax.Array, counter: jax.Array, logprobs: jax.Array, *, num_top_logprobs: int,
           repetition_penalty: jax.Array | None = None, presence_penalty: jax.Array | None = None,
           frequency_penalty: jax.Array | None = None, prompt_mask: jax.Array | None = None,
           output_counts: jax.Array | None = None, banned: jax.Array | None = None, processed: bool = False,
           num_threads: int = 0) -> tuple[jax.Array, ...]:
  """``jaxserve.engine._sampler.sample`` in one C++ call (call :func:`available` first).

  Args:
    logits: ``[N, V]`` float32; row ``r`` samples from ``logits[row_index[r]]``.
    row_index, top_k: ``[R]`` int32.
    temperature, top_p, min_p: ``[R]`` float32.
    seed: ``[R, 2]`` uint32; counter: ``[R, 2]`` int32 (the row's random stream, as ``_sampler._row_keys``).
    logprobs: ``[]`` bool: compute the logprob outputs (zeros otherwise).
    num_top_logprobs: K, the top logprobs returned per row (``1 <= K <= V``).
    repetition_penalty, presence_penalty, frequency_penalty: ``[R]`` float32, and prompt_mask, output_counts,
      banned: ``[R, V]`` bool, int32, bool: penalties and bans, all six or none.
    processed: also return the processed logits ``[R, V]`` (for tests; needs the six penalty and ban arrays).
    num_threads: parts the rows are split into, on XLA's intra-op thread pool (0: one per pool thread).

  Returns:
    ``(tokens [R] int32, logprob [R] float32, rank [R] int32, top_ids [R, K] int32, top_logprobs [R, K] float32)``,
    then ``processed`` where asked for.
  """
  if logits.ndim != 2 or logits.dtype != jnp.float32 or 0 in logits.shape:
    raise ValueError(f"sample: logits must be float32 [N, V] with N, V >= 1, got {logits.dtype} {logits.shape}")
  v = logits.shape[1]
  if row_index.ndim != 1:
    raise ValueError(f"sample: row_index must be [R], got {row_index.shape}")
  r = row_index.shape[0]
  if not 1 <= num_top_logprobs <= v:
    raise ValueError(f"sample: num_top_logprobs must be in [1, {v}] (the vocabulary), got {num_top_logprobs}")
  args = dict(row_index=(row_index, jnp.int32, (r,)), temperature=(temperature, jnp.float32, (r,)),
              top_k=(top_k, jnp.int32, (r,)), top_p=(top_p, jnp.float32, (r,)), min_p=(min_p, jnp.float32, (r,)),
              seed=(seed, jnp.uint32, (r, 2)), counter=(counter, jnp.int32, (r, 2)),
              logprobs=(logprobs, jnp.bool_, ()))
  vocab = dict(repetition_penalty=(repetition_penalty, jnp.float32, (r,)),
               presence_penalty=(presence_penalty, jnp.float32, (r,)),
               frequency_penalty=(frequency_penalty, jnp.float32, (r,)), prompt_mask=(prompt_mask, jnp.bool_, (r, v)),
               output_counts=(output_counts, jnp.int32, (r, v)), banned=(banned, jnp.bool_, (r, v)))
  given = [a is not None for a, _, _ in vocab.values()]
  if any(given) and not all(given):
    raise ValueError(f"sample: pass {', '.join(vocab)} together, or none of them")
  if processed and not all(given):
    raise ValueError("sample: processed=True needs the penalty and ban arrays")
  if all(given):
    args.update(vocab)
  for name, (a, dtype, shape) in args.items():
    if a.shape != shape or a.dtype != dtype:
      raise ValueError(f"sample: {name} must be {jnp.dtype(dtype)} {list(shape)}, got {a.dtype} {list(a.shape)}")
  k = num_top_logprobs
  out = [jax.ShapeDtypeStruct((r,), jnp.int32), jax.ShapeDtypeStruct((r,), jnp.float32),
         jax.ShapeDtypeStruct((r,), jnp.int32), jax.ShapeDtypeStruct((r, k), jnp.int32),
         jax.ShapeDtypeStruct((r, k), jnp.float32)]
  target = SAMPLE_VOCAB_TARGET if all(given) else SAMPLE_TARGET
  if processed:
    out.append(jax.ShapeDtypeStruct((r, v), jnp.float32))
    target = SAMPLE_PROCESSED_TARGET
  call = jax.ffi.ffi_call(target, out)
  return tuple(call(logits, *(a for a, _, _ in args.values()), num_threads=np.int64(num_threads)))


def sample_noise(seed: jax.Array, counter: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The random stream :func:`sample` draws for each row, for tests (call :func:`available` first).

  ``seed`` ``[R, 2]`` uint32 and ``counter`` ``[R, 2]`` int32 -> ``(bits, uniform, gumbel)``, each ``[R, V]``: the
  uint32 ``jax.random.bits`` of the row's key, the float32 uniforms in ``[tiny, 1)`` of ``jax.random.gumbel`` and
  its noise ``-log(-log(uniform))``.
  """
  if seed.ndim != 2 or seed.shape[1] != 2 or seed.dtype != jnp.uint32 or counter.shape != seed.shape or \
     counter.dtype != jnp.int32:
    raise ValueError(f"sample_noise: need seed uint32 [R, 2] and counter int32 [R, 2], got {seed.dtype} "
                     f"{seed.shape} and {counter.dtype} {counter.shape}")
  r = seed.shape[0]
  out = (jax.ShapeDtypeStruct((r, vocab_size), jnp.uint32), jax.ShapeDtypeStruct((r, vocab_size), jnp.float32),
         jax.ShapeDtypeStruct((r, vocab_size), jnp.float32))
  return tuple(jax.ffi.ffi_call(SAMPLE_NOISE_TARGET, out)(seed, counter))
