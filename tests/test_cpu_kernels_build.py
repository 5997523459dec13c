"""Building and loading the C++ CPU kernels: the process's floating-point modes, the cache key, the private cache directory."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.engine import _cpu_kernels

_HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))

# Loads the kernels, runs one packed matmul and one fused K/V write + attention, and prints the
# smallest float32 denormal arithmetic from numpy and from jitted JAX code before and after.
_DENORMALS = r"""
import jax, jax.numpy as jnp, numpy as np
from jaxserve import weights
from jaxserve.engine import _cpu_kernels

def tiny():
  return [float(np.float32(1e-38) / np.float32(100)), float(jax.jit(lambda x: x / 100)(jnp.float32(1e-38)))]

before = tiny()
assert _cpu_kernels.available(), _cpu_kernels._state.get("error")
w = weights.PackedDense.pack(jnp.ones((8, 16), jnp.float32))
mm = jax.jit(lambda x: _cpu_kernels.packed_matmul(x, w.panels.reshape(8, 16)))(jnp.ones((2, 8), jnp.float32))
pools = jnp.zeros((4, 1, 4, 8), jnp.float32)
out, _, _ = jax.jit(_cpu_kernels.write_paged_rows, static_argnames="scale")(
    jnp.ones((1, 2, 8)), jnp.ones((1, 1, 8)), jnp.ones((1, 1, 8)), jnp.int32([4]), pools, pools,
    jnp.int32([[1]]), jnp.int32([0]), jnp.int32([1]), scale=0.5)
assert float(mm[0, 0]) == 8.0 and float(out[0, 0, 0]) == 1.0
print((before, tiny()))
"""


@pytest.mark.skipif(not _HAS_COMPILER, reason="no C++ compiler")
def test_loading_and_running_the_kernels_keeps_denormals():
  """-ffast-math would link crtfastmath.o, which sets flush-to-zero for the whole process on load."""
  proc = subprocess.run([sys.executable, "-c", _DENORMALS], capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  before, after = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own subprocess's two lists
  assert before[0] > 0, "this machine flushes denormals before the kernels load"
  assert after == before, f"denormal results changed once the kernels loaded: {before} -> {after}"


def _key(**changes) -> str:
  args = dict(sources=b"src", include="/inc", flags=["-O3"], cpu_flags="avx2 fma sse2", jaxlib_version="0.10.2")
  args.update(changes)
  return _cpu_kernels.cache_key(**args)


def test_cache_key_follows_the_cpu_and_jaxlib_not_the_host_name(monkeypatch):
  base = _key()
  assert _key(cpu_flags="avx2 avx512f fma sse2") != base  # a -march=native library would SIGILL elsewhere
  assert _key(jaxlib_version="0.10.3") != base
  assert _key(flags=["-O3", "-mno-avx512f"]) != base
  assert _key(sources=b"src2") != base
  monkeypatch.setattr(platform, "node", lambda: "some-other-host")
  assert _key() == base
  # the real inputs: this CPU's flags are read, and the same process gets the same key
  assert _cpu_kernels._cpu_flags()
  assert _cpu_kernels._jaxlib_version()


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_refuses_a_cache_others_can_write(tmp_path, monkeypatch):
  shared = tmp_path / "shared"
  (shared / "cpu_kernels").mkdir(parents=True)
  (shared / "cpu_kernels").chmod(0o777)
  monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(shared))
  with pytest.raises(PermissionError, match="lets group or others write"):
    _cpu_kernels._private_dir()
  (shared / "cpu_kernels").chmod(0o770)
  with pytest.raises(PermissionError, match="lets group or others write"):
    _cpu_kernels._private_dir()
  lib = tmp_path / "lib.so"
  lib.write_bytes(b"")
  lib.chmod(0o666)
  with pytest.raises(PermissionError, match="0o666"):
    _cpu_kernels.check_private(lib)
  # a new cache directory is created private
  monkeypatch.setenv("JAXSERVE_CACHE_DIR", str(tmp_path / "fresh"))
  made = _cpu_kernels._private_dir()
  assert made == tmp_path / "fresh" / "cpu_kernels" and made.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_refuses_a_cache_owned_by_someone_else(tmp_path, monkeypatch):
  real = os.getuid()
  monkeypatch.setattr(os, "getuid", lambda: real + 1)  # as another user sees our directory
  d = tmp_path / "cpu_kernels"
  d.mkdir(mode=0o700)
  with pytest.raises(PermissionError, match=f"owned by uid {real}, not by this user"):
    _cpu_kernels.check_private(d)


@pytest.mark.skipif(not _HAS_COMPILER or not hasattr(os, "getuid"), reason="needs a compiler and POSIX permissions")
def test_refused_cache_falls_back_to_xla(tmp_path):
  """In a fresh process with a world-writable cache, the kernels are not loaded and the engine keeps XLA's path."""
  shared = tmp_path / "cpu_kernels"
  shared.mkdir()
  shared.chmod(0o777)
  code = ("import logging; logging.basicConfig()\n"
          "from jaxserve.engine import _cpu_kernels, PagedAttention; import jax.numpy as jnp\n"
          "print(_cpu_kernels.available(), PagedAttention().use_cpu_kernel(jnp.float32))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAXSERVE_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["False", "False"]
  assert "lets group or others write" in proc.stderr
  assert not list(Path(shared).iterdir())  # nothing was built there either


@pytest.mark.skipif(not _HAS_COMPILER or platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 build")
def test_attention_loops_use_512_bit_vectors_where_the_cpu_has_them():
  """GCC's tuning for recent Intel cores prefers 256-bit vectors unless told otherwise."""
  if "avx512f" not in _cpu_kernels._cpu_flags().split():
    pytest.skip("no AVX-512 on this CPU")
  objdump = shutil.which("objdump")
  if objdump is None or not _cpu_kernels.available():
    pytest.skip("needs objdump and the kernels")
  lib = str(_cpu_kernels._build())
  text = subprocess.run([objdump, "-d", "--no-show-raw-insn", lib], capture_output=True, text=True, timeout=300).stdout
  # the attention's prefill tile (its FMAs over 16 query lanes) runs on zmm registers
  tile = [block for block in text.split("\n\n") if "TileILi64" in block.split("\n")[0]]
  assert tile, "the 64-wide attention tile is not in the library"
  assert any("zmm" in line and "vfmadd" in line for block in tile for line in block.splitlines())


@pytest.mark.skipif(not _HAS_COMPILER or not hasattr(os, "getuid"), reason="needs a compiler and POSIX permissions")
def test_a_group_writable_umask_still_builds_a_loadable_library(tmp_path):
  code = ("import os; os.umask(0o002)\n"
          "from jaxserve.engine import _cpu_kernels\n"
          "print(_cpu_kernels.available(), _cpu_kernels._state.get('error'))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAXSERVE_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[0] == "True", proc.stdout
  (lib,) = (tmp_path / "cpu_kernels").glob("*.so")
  assert lib.stat().st_mode & 0o777 == 0o755 and (tmp_path / "cpu_kernels").stat().st_mode & 0o777 == 0o700
