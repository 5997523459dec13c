"""The C++ CPU matmuls over N:M and bitmask weights against a numpy packer and ``x @ W`` in float64."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.testing import poisoned_call
from jaxserve.engine import _cpu_kernels

P = 16  # lanes of a panel


def _require_kernels():
  if not _cpu_kernels.available():
    assert not any(shutil.which(c) for c in ("c++", "g++", "clang++")), (
        f"the kernels did not build: {_cpu_kernels._state.get('error')}")
    pytest.skip("no C++ compiler")


# --- reference packers, written from the formats' specification --------------------------------

def random_nm(rng, k: int, n_out: int, n: int, m: int, duplicates: bool = False):
  """A random N:M weight as ``(idx [G, n, N], val [G, n, N])``: slot ``j`` of group ``g`` keeps
  ``W[g*m + idx[g, j, c], c] = val[g, j, c]``; with ``duplicates``, some slots repeat an index with value 0."""
  groups = k // m
  idx = np.sort(np.argsort(rng.random((groups, m, n_out)), axis=1)[:, :n], axis=1)
  val = rng.standard_normal((groups, n, n_out)).astype(np.float32)
  if duplicates:
    for j in range(1, n):  # the previous slot's index again (still ascending), with value 0
      dup = rng.random((groups, n_out)) < 0.3
      idx[:, j] = np.where(dup, idx[:, j - 1], idx[:, j])
      val[:, j] = np.where(dup, 0.0, val[:, j])
  return idx, val


def nm_dense(idx, val, m: int) -> np.ndarray:
  groups, n, n_out = idx.shape
  w = np.zeros((groups * m, n_out), np.float64)
  cols = np.broadcast_to(np.arange(n_out), idx.shape)
  np.add.at(w, ((np.arange(groups)[:, None, None] * m + idx), cols), val)
  return w


def pack_nm(idx, val, m: int):
  """``(values [NP, S, 16] float32, meta [NP, S, W] uint32)`` exactly as the kernel reads them."""
  groups, n, n_out = idx.shape
  panels = -(-n_out // P)
  pad = panels * P - n_out
  idx = np.pad(idx, ((0, 0), (0, 0), (0, pad)))
  val = np.pad(val, ((0, 0), (0, 0), (0, pad)))
  b = 2 if m <= 4 else 4
  per_word = 32 // b
  values = np.zeros((panels, groups * n, P), np.float32)
  meta = np.zeros((panels, groups * n, P // per_word), np.uint32)
  for p in range(panels):
    for g in range(groups):
      for j in range(n):
        for lane in range(P):
          values[p, g * n + j, lane] = val[g, j, p * P + lane]
          meta[p, g * n + j, lane // per_word] |= np.uint32(idx[g, j, p * P + lane] << (b * (lane % per_word)))
  return values, meta


def pack_bitmask(w: np.ndarray, keep: np.ndarray):
  """``(bits [NP, K] uint16, values [nnz + 16] float32, offsets [NP + 1] int64)`` of ``w`` where ``keep``."""
  k, n_out = w.shape
  panels = -(-n_out // P)
  bits = np.zeros((panels, k), np.uint16)
  values, offsets = [], [0]
  for p in range(panels):
    for kk in range(k):
      for lane in range(P):
        col = p * P + lane
        if col < n_out and keep[kk, col]:
          bits[p, kk] |= np.uint16(1 << lane)
          values.append(w[kk, col])
    offsets.append(len(values))
  return bits, np.array(values + [0.0] * P, np.float32), np.array(offsets, np.int64)


# --- helpers --------------------------------------------------------------------------------------

_poisoned = poisoned_call


def _check(fn, x, w_ref, threads):
  rows, k = x.shape[0], x.shape[1]
  got = _poisoned(jax.jit(lambda x: fn(x, threads)), x, shape=(rows, w_ref.shape[1]))
  want = x.astype(np.float64) @ w_ref
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.sqrt(max(k, 1)) * max(1.0, np.abs(w_ref).max()))


ROWS = (1, 3, 8, 17, 64, 300)
THREADS = (0, 1, 3)


def _round_up(k, m):
  return -(-k // m) * m


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (2, 8), (3, 16)])
@pytest.mark.parametrize("k, n_out", [(4, 5), (12, 20), (100, 37), (172, 1408), (512, 20)])
def test_nm_matmul_matches_reference(n, m, k, n_out):
  _require_kernels()
  k = _round_up(k, m)
  rng = np.random.default_rng(k * 1000 + n_out * 10 + m)
  idx, val = random_nm(rng, k, n_out, n, m, duplicates=k >= 100)
  values, meta = pack_nm(idx, val, m)
  w = nm_dense(idx, val, m)
  assert ((w != 0).reshape(k // m, m, n_out).sum(1) <= n).all()  # the N:M property of what was packed
  fn = lambda x, t: _cpu_kernels.nm_matmul(x, values, meta, n=n, m=m, n_out=n_out, num_threads=t)
  for i, rows in enumerate(ROWS if n_out < 1408 else (1, 8, 64)):
    _check(fn, rng.standard_normal((rows, k)).astype(np.float32), w, THREADS[i % 3])


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (1, 2), (2, 3), (3, 7), (15, 16), (3, 16)])
@pytest.mark.parametrize("k, n_out", [(48, 37), (200, 20), (1040, 33)])
def test_nm_matmul_many_rows_matches_reference(n, m, k, n_out):
  """Prefill-sized row counts (not multiples of the 8-row tiles; K and N not multiples of 16 or 64,
  an odd number of groups, n:m up to 15:16) on 1 and 2 threads, and only the first ``rows`` rows
  real (the others must be zeros over poisoned memory)."""
  _require_kernels()
  k = _round_up(k, m) + (m if (_round_up(k, m) // m) % 2 == 0 else 0)  # an odd number of groups
  assert (k // m) % 2 == 1
  rng = np.random.default_rng(k * 1000 + n_out * 10 + m + n)
  idx, val = random_nm(rng, k, n_out, n, m, duplicates=True)
  values, meta = pack_nm(idx, val, m)
  w = nm_dense(idx, val, m)
  for i, rows in enumerate((63, 64, 65, 129, 200 + m)):
    threads = 1 + i % 2
    fn = lambda x, t: _cpu_kernels.nm_matmul(x, values, meta, n=n, m=m, n_out=n_out, num_threads=t)
    _check(fn, rng.standard_normal((rows, k)).astype(np.float32), w, threads)
  x = rng.standard_normal((134, k)).astype(np.float32)
  for real in (67, 134):  # padding rows from the rows operand: zeros over poisoned memory
    run = jax.jit(lambda x, r: _cpu_kernels.nm_matmul(x, values, meta, n=n, m=m, n_out=n_out, num_threads=2, rows=r))
    got = _poisoned(run, x, jnp.int32(real), shape=(x.shape[0], n_out))
    want = x[:real].astype(np.float64) @ w
    np.testing.assert_allclose(got[:real], want, rtol=2e-5, atol=2e-5 * np.sqrt(k) * max(1.0, np.abs(w).max()))
    np.testing.assert_array_equal(got[real:], 0.0)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("k, n_out", [(4, 5), (12, 20), (100, 37), (172, 1408), (512, 20)])
def test_bitmask_matmul_matches_reference(density, k, n_out):
  _require_kernels()
  rng = np.random.default_rng(k * 1000 + n_out * 10 + int(density * 100))
  keep = rng.random((k, n_out)) < density
  w = np.where(keep, rng.standard_normal((k, n_out)), 0.0).astype(np.float32)
  keep &= rng.random((k, n_out)) < 0.95  # some kept zeros: what is kept is the mask, not the values
  w = np.where(keep, w, 0.0).astype(np.float32)
  bits, values, offsets = pack_bitmask(w, keep)
  assert offsets[-1] == keep.sum() and values.shape == (keep.sum() + P,)
  fn = lambda x, t: _cpu_kernels.bitmask_matmul(x, bits, values, offsets, n_out=n_out, num_threads=t)
  for i, rows in enumerate(ROWS if n_out < 1408 else (1, 8, 64)):
    _check(fn, rng.standard_normal((rows, k)).astype(np.float32), w.astype(np.float64), THREADS[i % 3])


def test_leading_axes_eager_and_jit_agree():
  _require_kernels()
  rng = np.random.default_rng(0)
  idx, val = random_nm(rng, 64, 40, 2, 4)
  values, meta = pack_nm(idx, val, 4)
  x = rng.standard_normal((2, 3, 64)).astype(np.float32)
  eager = _cpu_kernels.nm_matmul(x, values, meta, n=2, m=4, n_out=40)
  jitted = jax.jit(lambda x: _cpu_kernels.nm_matmul(x, values, meta, n=2, m=4, n_out=40))(x)
  assert eager.shape == (2, 3, 40)
  np.testing.assert_array_equal(eager, jitted)
  np.testing.assert_allclose(eager, x.astype(np.float64) @ nm_dense(idx, val, 4), rtol=2e-5, atol=1e-4)


def test_bad_arguments_fail_with_clear_errors():
  _require_kernels()
  rng = np.random.default_rng(1)
  idx, val = random_nm(rng, 16, 20, 2, 4)
  values, meta = pack_nm(idx, val, 4)
  x = jnp.ones((2, 16), jnp.float32)
  with pytest.raises(ValueError, match="0 < n < m"):
    _cpu_kernels.nm_matmul(x, values, meta, n=4, m=4, n_out=20)
  with pytest.raises(ValueError, match="panels"):
    _cpu_kernels.nm_matmul(x, values, meta, n=2, m=4, n_out=40)
  with pytest.raises(ValueError, match=r"x must be \[\.\.\., 16\]"):
    _cpu_kernels.nm_matmul(jnp.ones((2, 12)), values, meta, n=2, m=4, n_out=20)
  with pytest.raises(ValueError, match="meta"):
    _cpu_kernels.nm_matmul(x, values, meta[..., :0], n=2, m=4, n_out=20)
  w = rng.standard_normal((16, 20)).astype(np.float32)
  bits, bvalues, offsets = pack_bitmask(w, np.abs(w) > 0.5)
  with pytest.raises(ValueError, match="uint16 bits"):
    _cpu_kernels.bitmask_matmul(x, bits.astype(np.int32), bvalues, offsets, n_out=20)
  bad = offsets.copy()
  bad[1] -= 1  # panel 0's bits count one value more than its offsets give it
  with pytest.raises(Exception, match="kept bits but offsets"):
    jax.block_until_ready(_cpu_kernels.bitmask_matmul(x, bits, bvalues, bad, n_out=20))


def _generic_sweep() -> str:
  """A small sweep of both kernels, run in a process built with JAXSERVE_CPU_KERNEL_ISA=generic."""
  assert _cpu_kernels.available(), _cpu_kernels._state.get("error")
  rng = np.random.default_rng(2)
  for (n, m), k, n_out in [((2, 4), 100, 37), ((3, 16), 176, 20), ((4, 8), 24, 5)]:
    idx, val = random_nm(rng, k, n_out, n, m, duplicates=True)
    values, meta = pack_nm(idx, val, m)
    for rows, t in [(1, 0), (17, 3), (64, 1)]:
      _check(lambda x, t: _cpu_kernels.nm_matmul(x, values, meta, n=n, m=m, n_out=n_out, num_threads=t),
             rng.standard_normal((rows, k)).astype(np.float32), nm_dense(idx, val, m), t)
  for density, k, n_out in [(0.3, 100, 37), (0.0, 12, 20), (1.0, 520, 5)]:
    keep = rng.random((k, n_out)) < density
    w = np.where(keep, rng.standard_normal((k, n_out)), 0.0).astype(np.float32)
    bits, values, offsets = pack_bitmask(w, keep)
    for rows, t in [(1, 0), (17, 3), (64, 1)]:
      _check(lambda x, t: _cpu_kernels.bitmask_matmul(x, bits, values, offsets, n_out=n_out, num_threads=t),
             rng.standard_normal((rows, k)).astype(np.float32), w.astype(np.float64), t)
  return str(_cpu_kernels._build())


def test_generic_build_matches_reference():
  """The portable paths (no AVX-512), built and run in a subprocess."""
  _require_kernels()
  env = dict(os.environ, JAXSERVE_CPU_KERNEL_ISA="generic", JAX_PLATFORMS="cpu")
  code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
          "import test_engine_sparse_matmul as t; print(t._generic_sweep())")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lib = proc.stdout.strip().splitlines()[-1]
  assert lib != str(_cpu_kernels._build()), "the generic build must be its own library"


@pytest.mark.parametrize("kind", ["packed", "packed-bf16", "2:4", "bitmask"])
def test_rows_operand_multiplies_only_the_real_rows(kind):
  """With ``rows = r`` (traced, as an engine step passes its real token count) every kernel gives
  ``x[:r] @ W`` in the first r rows and zeros below (over poisoned memory), and r outside
  [0, M] is clamped; without it, every row is computed."""
  _require_kernels()
  from jaxserve import weights
  rng = np.random.default_rng(7)
  k, n_out, m_rows = 64, 48, 12
  w = rng.standard_normal((k, n_out)).astype(np.float32)
  if kind.startswith("packed"):
    dtype = jnp.bfloat16 if kind == "packed-bf16" else jnp.float32
    packed = weights.PackedDense.pack(jnp.asarray(w, dtype))
    w = np.asarray(packed.to_dense().astype(jnp.float32))
    fn = lambda x, r: _cpu_kernels.packed_matmul(x.astype(dtype), packed.panels.reshape(packed.rows, n_out), rows=r)
    tol = 3e-2 if dtype == jnp.bfloat16 else 2e-5
  elif kind == "2:4":
    idx, val = random_nm(rng, k, n_out, 2, 4)
    values, meta = pack_nm(idx, val, 4)
    w = nm_dense(idx, val, 4).astype(np.float32)
    fn = lambda x, r: _cpu_kernels.nm_matmul(x, values, meta, n=2, m=4, n_out=n_out, rows=r)
    tol = 2e-5
  else:
    keep = rng.random((k, n_out)) < 0.3
    w = np.where(keep, w, 0.0).astype(np.float32)
    bits, values, offsets = pack_bitmask(w, keep)
    fn = lambda x, r: _cpu_kernels.bitmask_matmul(x, bits, values, offsets, n_out=n_out, rows=r)
    tol = 2e-5
  x = rng.standard_normal((m_rows, k)).astype(np.float32)
  if kind == "packed-bf16":
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  want = x.astype(np.float64) @ w.astype(np.float64)
  run = jax.jit(fn)
  for r, real in [(0, 0), (1, 1), (5, 5), (m_rows, m_rows), (m_rows + 7, m_rows), (-3, 0)]:
    got = _poisoned(run, x, jnp.int32(r), shape=(m_rows, n_out))
    np.testing.assert_allclose(got[:real], want[:real], rtol=tol, atol=tol * 8)
    np.testing.assert_array_equal(got[real:], 0.0)
  np.testing.assert_allclose(_poisoned(jax.jit(lambda x: fn(x, None)), x, shape=(m_rows, n_out)), want,
                             rtol=tol, atol=tol * 8)
  with pytest.raises(ValueError, match="rows must be one integer"):
    fn(x, jnp.ones(2, jnp.int32))
