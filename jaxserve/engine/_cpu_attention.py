"""A C++ paged-attention kernel for the CPU, called from jitted code as an XLA FFI custom call.

XLA's code for gathered KV blocks reads them at about a third of the memory bandwidth on a small
CPU, and attention in a small model's step is mostly reading. The kernel
(``csrc/paged_attention_cpu.cc``) handles every query row of a step (decodes and causal prefill
chunks), reads each block of K and V once per row, contiguously, prefetching the next block, and
splits the rows between the threads of XLA's own intra-op pool. It is compiled on first use with
the system C++ compiler against the FFI headers shipped in jaxlib, cached under
``$JAXSERVE_CACHE_DIR`` (default ``~/.cache/jaxserve``), and registered with JAX. Without a
compiler (or with ``JAXSERVE_CPU_KERNEL=0``), :func:`available` is False and the engine keeps the
pure-XLA path.
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

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "jaxserve_paged_attention_cpu"
WRITE_TARGET = "jaxserve_write_paged_attention_cpu"
_SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cc"
_lock = threading.Lock()
_state: dict[str, object] = {}
log = logging.getLogger(__name__)


def _cache_dir() -> Path:
  root = os.environ.get("JAXSERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxserve")
  return Path(root)


def _build() -> Path:
  """Compiles the kernel (once per source, jaxlib headers and machine) and returns the library path."""
  src = _SOURCE.read_bytes()
  include = jax.ffi.include_dir()
  flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread"]
  key = hashlib.sha256(src + include.encode() + " ".join(flags).encode() + platform.machine().encode()
                       + platform.node().encode()).hexdigest()[:16]
  out = _cache_dir() / f"paged_attention_cpu-{key}.so"
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
    proc = subprocess.run([cxx, *flags, "-I", include, str(_SOURCE), "-o", lib], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{proc.stderr[-2000:]}")
    os.replace(lib, out)  # atomic: concurrent builders each produce the same file
  return out


def available() -> bool:
  """Whether the kernel is built and registered (builds it on the first call; False on failure)."""
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
        _state["ok"], _state["lib"] = True, lib
      except Exception as e:  # noqa: BLE001 - any failure means: use the XLA path
        log.warning("jaxserve: CPU attention kernel unavailable, using XLA attention (%s)", e)
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
