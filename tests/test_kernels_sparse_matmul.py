"""N:M sparse matmul kernel (Pallas, interpret mode) vs its reference and a float64 oracle."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas import sparse_matmul as sm

F32, BF16 = jnp.float32, jnp.bfloat16
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "sparse_gpu.py"
# The NumPy reference packer lives in the benchmark, which needs it too.
_spec = importlib.util.spec_from_file_location("sparse_gpu", BENCH)
bench = sys.modules.setdefault("sparse_gpu",
                              importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bench)

TOLERANCE = {  # (atol, rtol) vs the reference and the float64 oracle
    jnp.dtype(F32): (1e-4, 1e-5),
    jnp.dtype(BF16): (2e-2, 1e-2),  # one bf16 rounding of the output
}


@pytest.fixture(autouse=True)
def _strict_numpy():
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield


def _weight(rng, k, cols, *, n, m, panel, dtype, dropout=0.1):
  """Random N:M weight (exact in dtype, some groups short) and its packing."""
  w = bench.random_nm_weight(rng, k, cols, n=n, m=m, dropout=dropout)
  w = np.asarray(jnp.asarray(w, dtype).astype(F32))
  values, meta = bench.pack_nm(w, n=n, m=m, panel=panel)
  return w, jnp.asarray(values, dtype), jnp.asarray(meta)


def _x(rng, batch, k, dtype):
  return jnp.asarray(rng.standard_normal((batch, k), np.float32), dtype)


def _oracle(x, w):
  return np.asarray(jnp.asarray(x, F32), np.float64) @ np.asarray(
      w, np.float64)


def _assert_close(got, want, dtype, what=""):
  got = np.asarray(jnp.asarray(got, F32), np.float64)
  want = np.asarray(jnp.asarray(want, F32), np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert np.isfinite(got).all(), f"{what}: non-finite output (unwritten?)"
  atol, rtol = TOLERANCE[jnp.dtype(dtype)]
  np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)


# (n, m, K, N, panel P, batch, dtype): 2:4, 1:4, 4:8 (4-bit indices), 8:16
# and 2:3; N never a multiple of P; every batch of (1, 8, 33) meets both
# dtypes; P = 48 is no power of 2.
SWEEP = [
    (2, 4, 128, 80, 32, 1, F32),
    (2, 4, 256, 200, 64, 33, BF16),
    (2, 4, 64, 40, 48, 8, BF16),
    (1, 4, 128, 48, 32, 33, F32),
    (1, 4, 64, 130, 32, 8, BF16),
    (4, 8, 128, 72, 16, 1, BF16),
    (4, 8, 256, 96, 64, 8, F32),
    (8, 16, 128, 40, 16, 33, BF16),
    (2, 3, 48, 20, 16, 1, F32),
]


@pytest.mark.parametrize("n,m,k,cols,panel,batch,dtype", SWEEP)
def test_kernel_matches_reference_and_oracle(n, m, k, cols, panel, batch,
                                             dtype):
  rng = np.random.default_rng([n, m, k, cols, batch])
  w, values, meta = _weight(rng, k, cols, n=n, m=m, panel=panel, dtype=dtype)
  x = _x(rng, batch, k, dtype)
  kw = dict(n=n, m=m, n_out=cols)
  ref = kp.nm_sparse_matmul_reference(x, values, meta, **kw)
  oracle = _oracle(x, w)
  assert ref.dtype == dtype and ref.shape == (batch, cols)
  _assert_close(ref, oracle, dtype, "reference vs float64 oracle")
  # Default knobs; then 3 groups per step (the last step reaches past K),
  # 16 lanes per program and split-K.
  for knobs in ({}, {"block_k": 3 * m, "block_n": 16, "num_splits": 3}):
    out = kp.nm_sparse_matmul(x, values, meta, **kw, interpret=True,
                              poison_outputs=True, **knobs)
    assert out.dtype == dtype and out.shape == (batch, cols)
    _assert_close(out, ref, dtype, f"kernel {knobs} vs reference")
    _assert_close(out, oracle, dtype, f"kernel {knobs} vs oracle")


def test_to_dense_inverts_the_packer():
  rng = np.random.default_rng(0)
  for n, m, panel in ((2, 4, 32), (1, 4, 16), (4, 8, 48), (8, 16, 16)):
    w, values, meta = _weight(rng, 4 * m, 70, n=n, m=m, panel=panel,
                              dtype=F32, dropout=0.3)
    groups = (w.reshape(-1, m, 70) != 0).sum(axis=1)
    assert groups.max() <= n and groups.min() < n  # short groups occur
    assert values.shape == (-(-70 // panel), 4 * n, panel)
    dense = kp.nm_sparse_to_dense(values, meta, n=n, m=m, n_out=70)
    np.testing.assert_array_equal(np.asarray(dense), w)


def test_duplicate_and_unsorted_indices_add():
  # Any index layout is valid input: W[k, col] sums its group's slots that
  # point at k % m. Random indices (duplicates, any order) and random values.
  rng = np.random.default_rng(1)
  n, m, k, cols, panel = 3, 4, 64, 40, 16
  num_panels, slots = -(-cols // panel), (k // m) * n
  values = rng.standard_normal((num_panels, slots, panel)).astype(np.float32)
  idx = rng.integers(0, m, (num_panels, slots, panel)).astype(np.uint32)
  meta = np.bitwise_or.reduce(
      idx.reshape(num_panels, slots, panel // 16, 16)
      << (2 * np.arange(16, dtype=np.uint32)), axis=-1).astype(np.uint32)
  w = np.zeros((k, num_panels * panel))
  g = np.arange(slots) // n
  for p in range(num_panels):
    for lane in range(panel):
      np.add.at(w[:, p * panel + lane], g * m + idx[p, :, lane],
                values[p, :, lane])
  w = w[:, :cols]
  x = _x(rng, 5, k, F32)
  args = (x, jnp.asarray(values), jnp.asarray(meta))
  kw = dict(n=n, m=m, n_out=cols)
  np.testing.assert_allclose(kp.nm_sparse_to_dense(args[1], args[2], **kw), w,
                             rtol=1e-6, atol=1e-6)
  _assert_close(kp.nm_sparse_matmul(*args, **kw, interpret=True,
                                    block_k=8), _oracle(x, w), F32)


def test_large_batch_uses_several_batch_tiles():
  rng = np.random.default_rng(2)
  w, values, meta = _weight(rng, 64, 48, n=2, m=4, panel=16, dtype=BF16)
  x = _x(rng, 70, 64, BF16)  # 2 tiles of 64 rows, the second mostly padding
  out = kp.nm_sparse_matmul(x, values, meta, n=2, m=4, n_out=48,
                            interpret=True, poison_outputs=True, num_splits=2)
  _assert_close(out, _oracle(x, w), BF16)


def test_inside_outer_jit():
  rng = np.random.default_rng(3)
  w, values, meta = _weight(rng, 64, 40, n=2, m=4, panel=16, dtype=F32)
  x = _x(rng, 3, 64, F32)
  f = jax.jit(lambda *a: kp.nm_sparse_matmul(*a, n=2, m=4, n_out=40,
                                             interpret=True))
  _assert_close(f(x, values, meta), _oracle(x, w), F32)


@pytest.mark.parametrize("k,cols,batch", [
    (4096, 4096, 1), (4096, 11008, 8), (11008, 4096, 64), (4096, 4096, 33),
    (256, 64, 1),
])
@pytest.mark.parametrize("n,m,panel,itemsize", [
    (2, 4, 128, 2), (2, 4, 256, 2), (4, 8, 128, 4), (1, 4, 128, 2),
])
def test_auto_config_fits_the_compiled_kernel(k, cols, batch, n, m, panel,
                                              itemsize):
  cfg = sm.make_config(batch=batch, k=k, n_out=cols, panel=panel, n=n, m=m,
                       itemsize=itemsize, interpret=False)
  gs = cfg.block_k // m
  assert cfg.block_k % m == 0 and gs >= 16 and gs & (gs - 1) == 0
  assert cfg.block_n >= 16 and panel % cfg.block_n == 0
  assert cfg.block_n & (cfg.block_n - 1) == 0
  assert cfg.block_b in (16, 32, 64) and cfg.block_b >= min(batch, 64)
  steps = -(-(k // m) // gs)
  per_split = -(-steps // cfg.num_splits)
  assert (cfg.num_splits - 1) * per_split < steps  # no empty split
  smem = sm.shared_memory_estimate(
      n=n, m=m, block_k=cfg.block_k, block_n=cfg.block_n,
      block_b=cfg.block_b, num_stages=cfg.num_stages, itemsize=itemsize)
  # bfloat16 tiles fit the budget (two programs per SM); float32 4:8 with
  # 64 x rows cannot at 16 groups per step, but fits the hardware.
  assert smem <= (sm.SHARED_BUDGET if itemsize == 2 else sm.SHARED_LIMIT)


def test_auto_config_llama_decode():
  # 4096x4096 bf16 2:4 at batch 1: 64 column blocks of 64 lanes, 256 K rows
  # per step, 4 splits of 4 steps: 256 programs.
  cfg = sm.make_config(batch=1, k=4096, n_out=4096, panel=128, n=2, m=4)
  assert (cfg.block_n, cfg.block_k, cfg.block_b, cfg.num_splits) == (64, 256,
                                                                     16, 4)


def _valid_args():
  rng = np.random.default_rng(6)
  _, values, meta = _weight(rng, 64, 40, n=2, m=4, panel=16, dtype=F32)
  return dict(x=_x(rng, 3, 64, F32), values=values, meta=meta)


BAD = [
    ("x", lambda a: a["x"][0], {}, "x must be a 2-D array"),
    ("x", lambda a: a["x"].astype(jnp.int32), {}, "x dtype"),
    ("x", lambda a: a["x"].astype(BF16), {}, "values dtype must equal x"),
    ("x", lambda a: a["x"][:, :62], {}, "multiple of m"),
    ("x", lambda a: a["x"][:, :60], {}, r"values.shape\[1\] must be"),
    ("x", lambda a: a["x"][:0], {}, "at least one row"),
    ("values", lambda a: a["values"][0], {}, "values must be a 3-D"),
    ("values", lambda a: a["values"][:, :, :8], {}, "multiple of 16"),
    ("values", lambda a: a["values"][:2], {}, "panels"),
    ("meta", lambda a: a["meta"].astype(jnp.int32), {}, "uint32"),
    ("meta", lambda a: a["meta"][:, :-1], {}, "meta must have shape"),
    ("meta", lambda a: a["meta"], {"m": 8, "n": 4}, "4-bit indices"),
    ("meta", lambda a: a["meta"], {"m": 17}, r"m must be in \[2, 16\]"),
    ("meta", lambda a: a["meta"], {"n": 4}, r"n must be in \[1, m\)"),
    ("meta", lambda a: a["meta"], {"n": 0}, r"n must be in \[1, m\)"),
    ("meta", lambda a: a["meta"], {"n_out": 100}, "panels"),
    ("meta", lambda a: a["meta"], {"n_out": 2.5}, "must be ints"),
]


@pytest.mark.parametrize("name,mutate,pattern,match", BAD)
def test_invalid_inputs_raise_clear_errors(name, mutate, pattern, match):
  a = _valid_args()
  a[name] = mutate(a)
  kw = {"n": 2, "m": 4, "n_out": 40, **pattern}
  with pytest.raises(ValueError, match=match):
    kp.nm_sparse_matmul(a["x"], a["values"], a["meta"], **kw, interpret=True)


@pytest.mark.parametrize("knobs,match", [
    ({"block_k": 6}, "block_k must be a positive multiple of m"),
    ({"block_k": 0}, "block_k must be a positive multiple of m"),
    ({"block_n": 24}, "block_n must be a multiple of 16"),
    ({"block_n": 32}, "divides the panel width 16"),
    ({"num_splits": 0}, "num_splits"),
    ({"num_warps": 0}, "num_warps"),
    ({"num_stages": 0}, "num_stages"),
])
def test_invalid_knobs(knobs, match):
  a = _valid_args()
  with pytest.raises(ValueError, match=match):
    kp.nm_sparse_matmul(*a.values(), n=2, m=4, n_out=40, interpret=True,
                        **knobs)


def test_compiled_path_rejects_tiles_triton_cannot_lower():
  a = _valid_args()
  with pytest.raises(ValueError, match="power of 2 >= 16"):
    kp.nm_sparse_matmul(*a.values(), n=2, m=4, n_out=40, interpret=False,
                        block_k=12)
  with pytest.raises(ValueError, match="block_n a power of 2"):
    sm.make_config(batch=1, k=64, n_out=40, panel=48, n=2, m=4, block_n=48)


@pytest.mark.parametrize("dtype,n,m,batch,knobs", [
    (BF16, 2, 4, 1, {}), (BF16, 2, 4, 64, {"num_splits": 1}),
    (F32, 4, 8, 33, {}), (BF16, 1, 4, 8, {"block_k": 128, "block_n": 32}),
])
def test_triton_lowering_without_a_gpu(dtype, n, m, batch, knobs):
  # Lower the compiled kernel for CUDA on this CPU: catches primitives the
  # Pallas Triton lowering does not support before GPU time. K = 1040 is no
  # multiple of any block_k here: the last step reaches past K.
  sds = jax.ShapeDtypeStruct
  k, cols, panel = 1040, 300, 128
  cfg = sm.make_config(batch=batch, k=k, n_out=cols, panel=panel, n=n, m=m,
                       itemsize=jnp.dtype(dtype).itemsize, interpret=False,
                       **knobs)
  num_panels, slots = -(-cols // panel), (k // m) * n
  try:
    lowered = sm._nm_sparse_matmul.trace(
        sds((batch, k), dtype), sds((num_panels, slots, panel), dtype),
        sds((num_panels, slots, panel * sm.index_bits(m) // 32), jnp.uint32),
        n=n, m=m, n_out=cols, config=cfg).lower(lowering_platforms=("cuda",))
  except RuntimeError as e:  # JAX 0.11 wants a real GPU to pick the arch
    if "No supported GPU devices found" not in str(e):
      raise
    pytest.skip(f"cannot lower for CUDA without a GPU here: {e}")
  assert "triton" in lowered.as_text()


def test_benchmark_smoke_writes_json(tmp_path):
  out = tmp_path / "sparse_gpu.json"
  proc = subprocess.run(
      [sys.executable, str(BENCH), "--smoke", "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["correct"] is True
  assert result["env"]["jax"] == jax.__version__
  assert result["env"]["device_kind"]
  assert all(c["ok"] for c in result["correctness"])
  cases = result["cases"]
  assert [(c["K"], c["N"], c["batch"]) for c in cases] == [(64, 80, 1),
                                                           (64, 80, 3)]
  for c in cases:
    assert c["kernel"]["us"] > 0 and c["kernel"]["ok"]
    assert c["dense_xla"]["us"] > 0
    assert c["weight_bytes"]["kernel"] < c["weight_bytes"]["dense"]
    torch_col = c["torch_sparse"]
    assert "us" in torch_col or "skipped" in torch_col
  assert result["tuning"] and "us" in result["tuning"][0]
  assert "| K x N |" in proc.stdout
