"""The C++ CPU matmul over packed weights (``PackedDense``) against numpy, and the engine's model with and without it."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig
from jaxserve.testing import poisoned_call
from jaxserve import weights
from jaxserve.engine import _cpu_kernels
from jaxserve.engine._weight_forms import prepare_params, weight_formats
from jaxserve.model import forward, init_params


def _require_kernels():
  if not _cpu_kernels.available():
    assert not any(shutil.which(c) for c in ("c++", "g++", "clang++")), (
        f"the kernels did not build: {_cpu_kernels._state.get('error')}")
    pytest.skip("no C++ compiler")


@pytest.mark.parametrize("m, k, n", [(1, 8, 16), (3, 64, 48), (7, 33, 80), (25, 512, 1408), (130, 100, 64),
                                     (9, 17, 32), (300, 48, 96)])
def test_packed_matmul_matches_numpy(m, k, n):
  _require_kernels()
  rng = np.random.default_rng(m * 1000 + n)
  w = rng.standard_normal((k, n)).astype(np.float32)
  x = rng.standard_normal((2, m, k)).astype(np.float32)  # leading axes are flattened into rows
  packed = weights.PackedDense.pack(jnp.asarray(w))
  np.testing.assert_array_equal(packed.to_dense(), w)
  for threads in (0, 1, 3):
    got = jax.jit(lambda x, p, t=threads: _cpu_kernels.packed_matmul(x, p.reshape(k, n), num_threads=t))(
        x, packed.panels)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_model_with_packed_weights_matches_plain():
  """The engine's forward pass with every packable Dense packed equals the plain forward; N % 16 != 0 stays dense."""
  _require_kernels()
  cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=168, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, max_position_embeddings=64)
  params = init_params(cfg, seed=3)
  packed = prepare_params(params, native=True)
  assert weight_formats(packed) == {"packed": 2 * 5 + 1, "dense": 2 * 2}  # gate/up have N = 168
  up = packed["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert isinstance(packed["layers_0"]["mlp"]["down_proj"]["kernel"], weights.PackedDense)
  assert not weights.is_typed(up)
  np.testing.assert_array_equal(packed["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
  jax.tree.map(np.testing.assert_array_equal, weights.densify(packed), params)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 11)), jnp.int32)
  plain = forward(params, cfg, tokens).logits
  run = jax.jit(lambda p, t: forward(p, cfg, t).logits)
  assert run.lower(packed, tokens).as_text().count(_cpu_kernels.MATMUL_TARGET) >= 2 * 5 + 1  # every packed kernel
  fast = run(packed, tokens)
  np.testing.assert_allclose(fast, plain, rtol=1e-4, atol=1e-4)


def test_packed_params_through_plain_apply_and_no_silent_array_reads():
  """The runner's parameters (packed kernels) handed to the model's plain ``apply`` compute the right answer;
  reading a typed leaf as an array of the dense shape fails loudly instead of giving garbage."""
  from jaxserve.model import Llama, default_attention
  cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, max_position_embeddings=64)
  params = init_params(cfg, seed=4)
  packed = prepare_params(params, native=True)
  leaf = packed["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(leaf, weights.PackedDense)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 96, (2, 9)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
  model = Llama(cfg, default_attention(cfg))
  want = model.apply({"params": params}, tokens, positions).logits
  got = jax.jit(lambda p: model.apply({"params": p}, tokens, positions).logits)(packed)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  for read in (np.asarray, lambda w: np.array(w, np.float32), jnp.asarray, lambda w: w + 1, lambda w: w[0],
               lambda w: jnp.ones((2, w.shape[0])) @ w, lambda w: jnp.dot(jnp.ones((2, w.shape[0])), w)):
    with pytest.raises(TypeError):
      read(leaf)
  with pytest.raises(TypeError, match="not an array of its dense shape"):
    np.asarray(leaf)


def test_forward_rows_skips_only_the_padding():
  """``forward(..., rows=r)`` over native kernels: the r real token rows' logits equal the full forward's; the
  padding rows are not computed (their logits differ); plain arrays ignore ``rows``. ``logits_rows`` does the
  same for the rows ``logits_index`` picks."""
  _require_kernels()
  cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, max_position_embeddings=64)
  params = init_params(cfg, seed=5)
  packed = prepare_params(params, native=True)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 96, (1, 8)), jnp.int32)
  full = forward(params, cfg, tokens).logits
  run = jax.jit(lambda p, r: forward(p, cfg, tokens, rows=r).logits)
  for p in (packed, params):
    got = run(p, jnp.int32(3))
    np.testing.assert_allclose(got[:, :3], full[:, :3], rtol=1e-4, atol=1e-4)
    if p is packed:
      assert not np.allclose(got[:, 3:], full[:, 3:], atol=1e-3)  # skipped, not computed
    else:
      np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)
  index = jnp.asarray([[2, 7, 0]], jnp.int32)
  picked = jax.jit(lambda p: forward(p, cfg, tokens, logits_index=index, rows=jnp.int32(8),
                                     logits_rows=jnp.int32(2)).logits)(packed)
  np.testing.assert_allclose(picked[:, :2], full[:, jnp.asarray([2, 7])], rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(picked[:, 2], 0.0)  # the head skipped the padding slot


# --- bfloat16 on AMX tiles (csrc/matmul_cpu.cc's prefill-sized path) ---


def _amx_cpu() -> bool:
  """Whether this CPU has AMX for bfloat16 (the kernel also needs the OS's permission, asked at its first AMX call)."""
  flags = _cpu_kernels.cpu_flags().split()
  return "amx_bf16" in flags and "amx_tile" in flags


def _amx_calls() -> int:
  lib = _cpu_kernels._state["lib"]
  lib.JaxserveCpuAmxCalls.restype = ctypes.c_int64
  return lib.JaxserveCpuAmxCalls()


_poisoned = poisoned_call


@pytest.mark.parametrize("m, k, n", [(1, 8, 16), (4, 32, 48), (5, 17, 16), (15, 31, 64), (16, 32, 80),
                                     (17, 63, 48), (33, 100, 1408), (47, 1, 16), (64, 512, 96), (100, 257, 112),
                                     (130, 64, 16)])
def test_bf16_amx_matmul_matches_float32_numpy(m, k, n):
  """The AMX path (forced with ``amx=True``) equals float32 numpy on the same bfloat16 values: K odd and not a
  multiple of 32, rows not a multiple of 16, 48- and 16-column panels, 1 and 2 threads; the padding rows past
  ``rows`` are zero; where the CPU has AMX the calls ran on it, elsewhere the fallback computed them."""
  _require_kernels()
  rng = np.random.default_rng(m * 1000 + n + k)
  w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((m + 5, k)), jnp.bfloat16)  # 5 padding rows past the real ones
  packed = weights.PackedDense.pack(w)
  want = np.asarray(x, np.float32)[:m] @ np.asarray(w, np.float32)  # float32 accumulation of bf16 products
  before = _amx_calls()
  for threads in (1, 2):
    fn = jax.jit(lambda x, p, t=threads: _cpu_kernels.packed_matmul(x, p.reshape(packed.rows, n), num_threads=t,
                                                                     amx=True, rows=m))
    got = _poisoned(fn, x, packed.panels, shape=(m + 5, n))
    np.testing.assert_allclose(got[:m], want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    np.testing.assert_array_equal(got[m:], 0.0)
  assert _amx_calls() - before == (4 if _amx_cpu() else 0)  # two threads settings x two poisoned calls


def test_bf16_amx_threshold_and_report(monkeypatch):
  """By default the bfloat16 matmul runs AMX from ``AMX_MIN_ROWS`` rows (where the CPU has it) and
  ``vdpbf16ps`` or widening below; ``info()`` (``llm.stats()["cpu_kernels"]``) says ``"amx"``."""
  _require_kernels()
  monkeypatch.delenv("JAXSERVE_CPU_AMX", raising=False)
  assert (_cpu_kernels._state["lib"].JaxserveCpuAmx() > 0) == _amx_cpu()  # the kernel's cpuid/XCR0 check
  if not _amx_cpu():
    assert _cpu_kernels.bf16_path() != "amx"
    pytest.skip("this CPU has no AMX: the fallback is tested by test_bf16_amx_matmul_matches_float32_numpy")
  assert _cpu_kernels.bf16_path() == "amx" and _cpu_kernels.info()["bf16_matmul"] == "amx"
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.standard_normal((70, 48)), jnp.bfloat16)
  packed = weights.PackedDense.pack(w)
  run = jax.jit(lambda x, p: _cpu_kernels.packed_matmul(x, p.reshape(packed.rows, 48)))
  for m, on_amx in ((_cpu_kernels.AMX_MIN_ROWS - 1, False), (_cpu_kernels.AMX_MIN_ROWS, True), (40, True)):
    x = jnp.asarray(rng.standard_normal((m, 70)), jnp.bfloat16)
    assert f"amx_min_rows = {_cpu_kernels.AMX_MIN_ROWS}" in run.lower(x, packed.panels).as_text()
    before = _amx_calls()
    got = run(x, packed.panels)
    assert _amx_calls() - before == int(on_amx), m
    np.testing.assert_allclose(got, np.asarray(x, np.float32) @ np.asarray(w, np.float32), rtol=1e-4, atol=1e-3)


_AMX_OFF = """
import jax, jax.numpy as jnp, numpy as np
from jaxserve import weights
from jaxserve.engine import _cpu_kernels
assert _cpu_kernels.available(), _cpu_kernels._state.get("error")
assert _cpu_kernels.info()["bf16_matmul"] != "amx"
rng = np.random.default_rng(0)
w = jnp.asarray(rng.standard_normal((65, 112)), jnp.bfloat16)
x = jnp.asarray(rng.standard_normal((40, 65)), jnp.bfloat16)
p = weights.PackedDense.pack(w)
run = jax.jit(lambda x, q: _cpu_kernels.packed_matmul(x, q.reshape(p.rows, 112)))
assert "amx_min_rows = 0" in run.lower(x, p.panels).as_text()
np.testing.assert_allclose(run(x, p.panels), np.asarray(x, np.float32) @ np.asarray(w, np.float32), rtol=1e-4,
                           atol=1e-3)
assert _cpu_kernels._state["lib"].JaxserveCpuAmxCalls() == 0
print("ok")
"""


def test_bf16_amx_switched_off_by_the_environment(monkeypatch):
  """``JAXSERVE_CPU_AMX=0`` (a fresh process): the bfloat16 matmul never runs AMX and still computes the product;
  a value other than 0 or 1 is refused."""
  _require_kernels()
  proc = subprocess.run([sys.executable, "-c", _AMX_OFF], capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAXSERVE_CPU_AMX": "0", "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0 and proc.stdout.split()[-1] == "ok", proc.stderr[-3000:]
  monkeypatch.setenv("JAXSERVE_CPU_AMX", "yes")
  with pytest.raises(ValueError, match="JAXSERVE_CPU_AMX must be"):
    _cpu_kernels.bf16_path()
