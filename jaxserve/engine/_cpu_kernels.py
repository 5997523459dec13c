"""C++ kernels for the CPU (paged attention, a matmul over packed weights), called from jitted code as XLA FFI custom calls.

A small model's decode step on a small CPU is mostly reading memory: the K/V blocks and every
weight matrix. XLA reads gathered KV blocks at about a third of the memory bandwidth and packs
each weight matrix again on every matmul. The attention kernel (``csrc/paged_attention_cpu.cc``)
writes the step's K/V into their slots in place and handles every query row of a step (decodes
and causal prefill chunks), reading each block once per pass; the matmul
(``csrc/matmul_cpu.cc``) reads weights packed once, at load time, into column panels
(:func:`pack_dense`). Both split their work between the threads of XLA's own intra-op pool.
They are compiled on first use with the system C++ compiler against the FFI headers shipped in
jaxlib, cached under ``$JAXSERVE_CACHE_DIR`` (default ``~/.cache/jaxserve``), and registered
with JAX. Without a compiler (or with ``JAXSERVE_CPU_KERNEL=0``), :func:`available` is False and
the engine keeps the pure-XLA path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "jaxserve_paged_attention_cpu"
WRITE_TARGET = "jaxserve_write_paged_attention_cpu"
MATMUL_TARGET = "jaxserve_matmul_cpu"
_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("paged_attention_cpu.cc", "matmul_cpu.cc")]
_HEADERS = [Path(__file__).parent / "csrc" / "parallel.h"]
_lock = threading.Lock()
_state: dict[str, object] = {}
log = logging.getLogger(__name__)


def _cache_dir() -> Path:
  root = os.environ.get("JAXSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxserve")
  return Path(root)


def _build() -> Path:
  """Compiles the kernels (once per sources, jaxlib headers and machine) and returns the library path."""
  src = b"".join(path.read_bytes() for path in _SOURCES + _HEADERS)
  include = jax.ffi.include_dir()
  flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread"]
  key = hashlib.sha256(src + include.encode() + " ".join(flags).encode() + platform.machine().encode()
                       + platform.node().encode()).hexdigest()[:16]
  out = _cache_dir() / f"cpu_kernels-{key}.so"
  if out.exists():
    return out
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
      raise OSError(f"{out.parent} is not writable")
  except OSError:  # e.g. a read-only home: build in the temp directory instead
    user = os.getuid() if hasattr(os, "getuid") else 0
    out = Path(tempfile.gettempdir()) / f"jaxserve-{user}" / out.name
    if out.exists():
      return out
  cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX)")
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    lib = os.path.join(tmp, out.name)
    proc = subprocess.run([cxx, *flags, "-I", include, *map(str, _SOURCES), "-o", lib], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {', '.join(p.name for p in _SOURCES)} failed:\n{proc.stderr[-2000:]}")
    os.replace(lib, out)  # atomic: concurrent builders each produce the same file
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
        _state["ok"], _state["lib"] = True, lib
      except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
        log.warning("jaxserve: CPU kernels unavailable, using XLA's attention and matmul (%s)", e)
        _state["ok"], _state["error"] = False, str(e)
    return bool(_state["ok"])


def supported(dtype, sliding_window) -> bool:
  """Whether the kernel handles pools of ``dtype`` (float32 only) with this sliding window (none)."""
  return jnp.dtype(dtype) == jnp.float32 and sliding_window is None


def paged_rows(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, row_seq: jax.Array,
               row_len: jax.Array, *, scale: float, num_threads: int = 0) -> jax.Array:
  """Attention of query rows over block-layout pools, float32 (call :func:`available` first).

  Args:
    q: ``[T, H, D]`` query rows.
    k_pages, v_pages: ``[NB, KVH, BS, D]`` pools.
    block_tables: ``[S, W]`` physical blocks of each sequence.
    row_seq: ``[T]`` sequence of each row.
    row_len: ``[T]`` positions each row sees (its position + 1: causal); 0 makes the row zero.
    scale: softmax scale.
    num_threads: parts the rows are split into, run on XLA's intra-op thread pool (0: one per
      pool thread).
  """
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
  return call(q.astype(jnp.float32), k_pages, v_pages, block_tables.astype(jnp.int32), row_seq.astype(jnp.int32),
              row_len.astype(jnp.int32), scale=np.float32(scale), num_threads=np.int64(num_threads))


def write_paged_rows(q: jax.Array, k_new: jax.Array, v_new: jax.Array, slot_mapping: jax.Array, k_pages: jax.Array,
                     v_pages: jax.Array, block_tables: jax.Array, row_seq: jax.Array, row_len: jax.Array, *,
                     scale: float, num_threads: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The engine's step in one call: writes ``k_new, v_new`` ``[N, KVH, D]`` into their slots
  (``slot_mapping`` ``[N]``; slots outside the pool are skipped), then :func:`paged_rows`.

  The pools are aliased input to output, so inside a jitted step whose pools are donated they
  are updated in place (no scatter, no copy). Returns ``(out, k_pages, v_pages)``.
  """
  out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k_pages.shape, jnp.float32),
               jax.ShapeDtypeStruct(v_pages.shape, jnp.float32))
  call = jax.ffi.ffi_call(WRITE_TARGET, out_types, input_output_aliases={4: 1, 5: 2})
  return call(q.astype(jnp.float32), k_new.astype(jnp.float32), v_new.astype(jnp.float32),
              slot_mapping.astype(jnp.int32), k_pages, v_pages, block_tables.astype(jnp.int32),
              row_seq.astype(jnp.int32), row_len.astype(jnp.int32), scale=np.float32(scale),
              num_threads=np.int64(num_threads))


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


_WIDE, _NARROW = 48, 16  # panel widths of matmul_cpu.cc


def packable(shape: tuple[int, ...], dtype) -> bool:
  """Whether a weight matrix of this shape and dtype can be packed for :func:`packed_matmul` (2-D float32, N % 16 == 0)."""
  return len(shape) == 2 and shape[1] % _NARROW == 0 and jnp.dtype(dtype) == jnp.float32


def pack_dense(w: jax.Array) -> jax.Array:
  """Packs a ``[K, N]`` weight matrix into the column panels :func:`packed_matmul` reads.

  Panels of 48 columns, then the last ``N % 48`` in panels of 16, each ``[K, width]`` and
  contiguous. The result keeps the shape ``[K, N]`` (a permutation of the elements), so a Flax
  ``Dense`` holding it still sees its kernel's shape; only :func:`packed_matmul` may read it.
  """
  k, n = w.shape
  if not packable(w.shape, w.dtype):
    raise ValueError(f"pack_dense needs a float32 [K, N] matrix with N a multiple of 16, got {w.dtype} {w.shape}")
  wide = n // _WIDE * _WIDE
  parts = [jnp.transpose(w[:, :wide].reshape(k, -1, _WIDE), (1, 0, 2)).reshape(-1),
           jnp.transpose(w[:, wide:].reshape(k, -1, _NARROW), (1, 0, 2)).reshape(-1)]
  return jnp.concatenate(parts).reshape(k, n)


def unpack_dense(packed: jax.Array) -> jax.Array:
  """The inverse of :func:`pack_dense`."""
  k, n = packed.shape
  wide = n // _WIDE * _WIDE
  flat = packed.reshape(-1)
  head = jnp.transpose(flat[:k * wide].reshape(-1, k, _WIDE), (1, 0, 2)).reshape(k, wide)
  tail = jnp.transpose(flat[k * wide:].reshape(-1, k, _NARROW), (1, 0, 2)).reshape(k, n - wide)
  return jnp.concatenate([head, tail], axis=1)


def packed_matmul(x: jax.Array, packed: jax.Array, *, num_threads: int = 0) -> jax.Array:
  """``x @ W`` for ``x`` ``[..., K]`` and ``packed = pack_dense(W)``, float32 (call :func:`available` first)."""
  k, n = packed.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k).astype(jnp.float32)
  call = jax.ffi.ffi_call(MATMUL_TARGET, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32))
  return call(x2, packed, num_threads=np.int64(num_threads)).reshape(*lead, n)


def packed_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                       preferred_element_type=None) -> jax.Array:
  """A ``dot_general`` for Flax ``Dense`` whose packable kernels were packed by :func:`pack_dense`.

  ``Dense`` contracts the last axis of its input with the first of its kernel; a kernel that
  :func:`packable` accepts goes through :func:`packed_matmul`, any other through ``lax.dot_general``.
  """
  (contract_lhs, contract_rhs), batch = dimension_numbers
  dense = tuple(contract_lhs) == (lhs.ndim - 1,) and tuple(contract_rhs) == (0,) and not batch[0] and not batch[1]
  if dense and packable(rhs.shape, rhs.dtype):
    return packed_matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def _map_packable_kernels(fn, params: Any) -> Any:
  def apply(path, x):
    return fn(x) if getattr(path[-1], "key", None) == "kernel" and packable(x.shape, x.dtype) else x
  return jax.tree_util.tree_map_with_path(apply, params)


def pack_params(params: Any) -> Any:
  """``params`` with every packable Dense ``kernel`` packed (the tree to run with :func:`packed_dot_general`)."""
  return _map_packable_kernels(pack_dense, params)


def unpack_params(params: Any) -> Any:
  """The inverse of :func:`pack_params`."""
  return _map_packable_kernels(unpack_dense, params)
