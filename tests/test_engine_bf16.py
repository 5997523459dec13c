"""The bfloat16 C++ CPU kernels (packed matmul, paged attention and its K/V write) against numpy; the engine in bf16."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import weights
from jaxserve.engine import _cpu_kernels, paged_attention_reference
from jaxserve.engine._attention import PagedAttention, make_meta, write_kv


@pytest.fixture(autouse=True)
def _kernels():
  if not _cpu_kernels.available():
    assert not any(shutil.which(c) for c in ("c++", "g++", "clang++")), (
        f"the kernels did not build: {_cpu_kernels._state.get('error')}")
    pytest.skip("no C++ compiler")


def _poisoned(fn, *args, shape):
  """``fn(*args)`` right after NaN-filled arrays of the output's size were freed (a stale allocation the
  kernel fails to overwrite shows as NaN); called twice, both results equal."""
  outs = []
  for _ in range(2):
    poison = [jnp.full(shape, jnp.nan, jnp.float32) for _ in range(4)]
    jax.block_until_ready(poison)
    del poison
    outs.append(np.asarray(jax.tree.leaves(fn(*args))[0]))
  assert not np.isnan(outs[0]).any()
  np.testing.assert_array_equal(outs[0], outs[1])
  return outs[0]


def _bf16(rng, shape):
  """Random bfloat16 values and the same values as float32 numpy."""
  a = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  return a, np.asarray(a, np.float32)


PATHS = [True, False]  # vdpbf16ps (where the CPU has it), the widening fallback


@pytest.mark.parametrize("m, k, n", [(1, 8, 16), (3, 63, 48), (7, 33, 80), (25, 512, 1408), (130, 100, 64),
                                     (9, 17, 32), (1, 1, 16), (300, 48, 96)])
@pytest.mark.parametrize("bf16_dot", PATHS)
def test_bf16_packed_matmul_matches_float32_numpy(m, k, n, bf16_dot):
  rng = np.random.default_rng(m * 1000 + n + k)
  w, w32 = _bf16(rng, (k, n))
  x, x32 = _bf16(rng, (2, m, k))  # leading axes are flattened into rows
  packed = weights.PackedDense.pack(w)
  assert packed.pairs and packed.rows == k + k % 2
  np.testing.assert_array_equal(np.asarray(packed.to_dense(), np.float32), w32)
  want = x32 @ w32  # float32 numpy on the same bfloat16 values: the kernel accumulates in float32
  for threads in (0, 1, 3):
    fn = jax.jit(lambda x, p, t=threads: _cpu_kernels.packed_matmul(x, p.reshape(packed.rows, n), num_threads=t,
                                                                     bf16_dot=bf16_dot))
    got = _poisoned(fn, x, packed.panels, shape=(2 * m, n))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_bf16_matmul_through_weights_dispatch():
  """``weights.matmul`` runs a bfloat16 ``PackedDense`` on the bfloat16 kernel; a float32-layout one declines."""
  rng = np.random.default_rng(7)
  w, w32 = _bf16(rng, (96, 144))
  x, x32 = _bf16(rng, (5, 96))
  from jaxserve.engine._weight_forms import register_cpu_kernels
  register_cpu_kernels()
  packed = weights.PackedDense.pack(w)
  run = jax.jit(weights.matmul)
  assert run.lower(x, packed).as_text().count(_cpu_kernels.MATMUL_TARGET_BF16) == 1
  got = run(x, packed)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), x32 @ w32, rtol=1e-2, atol=1e-2)  # one bf16 rounding
  unpaired = weights.PackedDense.pack(w, pairs=False)  # the float32 layout in bfloat16: the exact expansion
  assert _cpu_kernels.MATMUL_TARGET_BF16 not in run.lower(x, unpaired).as_text()
  np.testing.assert_array_equal(np.asarray(run(x, unpaired)), np.asarray(got))


def test_bf16_path_is_reported_and_forced_by_the_environment(monkeypatch):
  monkeypatch.setenv("JAXSERVE_CPU_AMX", "0")  # AMX (prefill-sized calls): test_engine_cpu_matmul.py
  cpu_has = "avx512_bf16" in _cpu_kernels._cpu_flags().split()
  assert _cpu_kernels.bf16_path() == ("avx512_bf16" if cpu_has else "widen")
  assert _cpu_kernels.info()["bf16_matmul"] == _cpu_kernels.bf16_path()
  if cpu_has:  # vdpbf16ps for decode-sized calls only
    x = jnp.ones((2, 32), jnp.bfloat16)
    text = jax.jit(lambda x, p: _cpu_kernels.packed_matmul(x, p)).lower(x, jnp.ones((32, 16), jnp.bfloat16)).as_text()
    assert f"bf16_dot_rows = {_cpu_kernels.BF16_DOT_MAX_ROWS}" in text
  monkeypatch.setenv("JAXSERVE_CPU_KERNEL_ISA", "no-bf16")
  assert _cpu_kernels.bf16_path() == "widen"
  x = jnp.ones((2, 32), jnp.bfloat16)
  text = jax.jit(lambda x, p: _cpu_kernels.packed_matmul(x, p)).lower(x, jnp.ones((32, 16), jnp.bfloat16)).as_text()
  assert "bf16_dot_rows = 0" in text
  monkeypatch.setenv("JAXSERVE_CPU_KERNEL_ISA", "avx1024")
  with pytest.raises(ValueError, match="JAXSERVE_CPU_KERNEL_ISA must be one of"):
    _cpu_kernels.bf16_path()


def _attention_case(rng, heads, kv_heads, bs, d):
  nb = 120
  perm = list(rng.permutation(np.arange(1, nb)))
  seqs = []
  for q_len, kv_len in [(1, 1), (1, bs), (1, bs + 1), (1, 5 * bs - 1), (7, 7), (9, 3 * bs), (17, 17), (40, 48)]:
    seqs.append((q_len, kv_len, tuple(int(perm.pop()) for _ in range(-(-kv_len // bs)))))
  t = sum(s[0] for s in seqs)
  meta = make_meta(seqs, 4, num_tokens=t + 5, decode_slots=4, prefill_slots=4, block_size=bs, table_width=16)
  kb, _ = _bf16(rng, (nb, kv_heads, bs, d))  # block layout
  vb, _ = _bf16(rng, (nb, kv_heads, bs, d))
  q = jnp.asarray(rng.standard_normal((t + 5, heads, d)), jnp.float32)
  return meta, kb, vb, q, t


@pytest.mark.parametrize("heads, kv_heads, bs, d", [(8, 4, 16, 64), (4, 4, 8, 16), (8, 1, 4, 32), (6, 2, 16, 8),
                                                   (4, 2, 16, 128), (6, 2, 5, 64), (3, 1, 32, 64), (2, 2, 16, 48)])
def test_bf16_attention_matches_float32_numpy(heads, kv_heads, bs, d):
  rng = np.random.default_rng(heads * 7 + bs + d)
  meta, kb, vb, q, t = _attention_case(rng, heads, kv_heads, bs, d)
  # the reference on the same bfloat16 values, in float32 numpy
  ref = np.asarray(paged_attention_reference(q, np.asarray(kb, np.float32), np.asarray(vb, np.float32), meta,
                                             layout="block"))
  for threads in (0, 1, 3):
    def call(q, kb, vb, meta, t=threads):
      row_seq, row_len = _cpu_kernels.step_rows(meta.cu_q_lens, meta.kv_lens, q.shape[0])
      return _cpu_kernels.paged_rows(q, kb, vb, meta.block_tables, row_seq, row_len, scale=1 / np.sqrt(d),
                                     num_threads=t)
    got = _poisoned(jax.jit(call), q, kb, vb, meta, shape=q.shape)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)
    assert not np.any(got[t:])  # padding rows are zero
  # the fused call: the step's K/V rounded to bfloat16 and written in place, then attention
  k_new = jnp.asarray(rng.standard_normal((t + 5, kv_heads, d)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((t + 5, kv_heads, d)), jnp.float32)
  kw, vw = write_kv(kb, vb, k_new, v_new, meta.slot_mapping, layout="block")  # XLA's astype rounding
  assert kw.dtype == jnp.bfloat16
  ref = np.asarray(paged_attention_reference(q, np.asarray(kw, np.float32), np.asarray(vw, np.float32), meta,
                                             layout="block"))

  def fused(q, k_new, v_new, kb, vb, meta):
    row_seq, row_len = _cpu_kernels.step_rows(meta.cu_q_lens, meta.kv_lens, q.shape[0])
    return _cpu_kernels.write_paged_rows(q, k_new, v_new, meta.slot_mapping, kb, vb, meta.block_tables, row_seq,
                                         row_len, scale=1 / np.sqrt(d))
  out, k2, v2 = jax.jit(fused, donate_argnums=(3, 4))(q, k_new, v_new, kb.copy(), vb.copy(), meta)
  assert k2.dtype == v2.dtype == jnp.bfloat16
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(k2[1:], np.float32), np.asarray(kw[1:], np.float32))  # 0: null block
  np.testing.assert_array_equal(np.asarray(v2[1:], np.float32), np.asarray(vw[1:], np.float32))
  # through PagedAttention: the kernel applies to bfloat16 pools (the engine's layer call is the fused kernel)
  # and equals the XLA loops
  assert PagedAttention().use_cpu_kernel(jnp.bfloat16)
  layer = jax.jit(PagedAttention().__call__, static_argnums=0)
  qb, kn, vn = q[None].astype(jnp.bfloat16), k_new[None].astype(jnp.bfloat16), v_new[None].astype(jnp.bfloat16)
  assert _cpu_kernels.WRITE_TARGET_BF16 in layer.lower(0, qb, kn, vn, (kb, vb), meta).as_text()
  with_kernel = jax.jit(PagedAttention().attend)(q, kb, vb, meta)
  without = jax.jit(PagedAttention(cpu_kernel=False).attend)(q, kb, vb, meta)
  np.testing.assert_allclose(with_kernel, without, atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="must both be float32 or both bfloat16"):
    _cpu_kernels.paged_rows(q, kb, vb.astype(jnp.float32), meta.block_tables, *_cpu_kernels.step_rows(
        meta.cu_q_lens, meta.kv_lens, q.shape[0]), scale=1.0)


_GENERIC = r"""
import jax, jax.numpy as jnp, numpy as np
from jaxserve import weights
from jaxserve.engine import _cpu_kernels, paged_attention_reference
from jaxserve.engine._attention import make_meta
assert _cpu_kernels.available(), _cpu_kernels._state.get("error")
assert _cpu_kernels.info()["bf16_matmul"] == "widen"
rng = np.random.default_rng(0)
w = jnp.asarray(rng.standard_normal((65, 112)), jnp.bfloat16)
x = jnp.asarray(rng.standard_normal((11, 65)), jnp.bfloat16)
p = weights.PackedDense.pack(w)
got = jax.jit(lambda x, q: _cpu_kernels.packed_matmul(x, q.reshape(p.rows, 112), bf16_dot=True))(x, p.panels)
np.testing.assert_allclose(got, np.asarray(x, np.float32) @ np.asarray(w, np.float32), rtol=1e-4, atol=1e-3)
seqs = [(1, 20, (3, 1)), (9, 9, (2,))]
meta = make_meta(seqs, 1, num_tokens=12, decode_slots=1, prefill_slots=1, block_size=16, table_width=4)
kb = jnp.asarray(rng.standard_normal((5, 2, 16, 32)), jnp.bfloat16)
vb = jnp.asarray(rng.standard_normal((5, 2, 16, 32)), jnp.bfloat16)
q = jnp.asarray(rng.standard_normal((12, 4, 32)), jnp.float32)
rs, rl = _cpu_kernels.step_rows(jnp.asarray(meta.cu_q_lens), jnp.asarray(meta.kv_lens), 12)
out = _cpu_kernels.paged_rows(q, kb, vb, jnp.asarray(meta.block_tables), rs, rl, scale=32 ** -0.5)
ref = paged_attention_reference(q, np.asarray(kb, np.float32), np.asarray(vb, np.float32), meta, layout="block")
np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
print("ok")
"""


def test_generic_build_runs_the_widening_paths():
  """Built without AVX-512 (as on a CPU without it): the widening fallback, even when vdpbf16ps is asked for."""
  proc = subprocess.run([sys.executable, "-c", _GENERIC], capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAXSERVE_CPU_KERNEL_ISA": "generic", "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0 and proc.stdout.split()[-1] == "ok", proc.stderr[-3000:]


def test_engine_bfloat16_equals_float32_greedy():
  """The embedded model in bfloat16 runs on the C++ kernels (packed weights, bfloat16 pools) and gives float32's
  greedy tokens on short outputs."""
  from jaxserve.engine import LLM, SamplingParams
  prompts = ["Once upon a time", "Lily and Tom went to the park. They", "The cat"]
  greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
  outs = {}
  for dtype in ("float32", "bfloat16"):
    llm = LLM(dtype=dtype, max_num_seqs=4, max_model_len=64, compile="lazy", compilation_cache=False)
    runner = llm.engine.runner
    assert runner.kv_pools[0][0].dtype == jnp.dtype(dtype) and runner.attn.use_cpu_kernel(dtype)
    formats = llm.stats()["weight_formats"]
    assert formats.get("packed", 0) >= 1 and set(formats) <= {"packed", "dense"}, formats
    outs[dtype] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
  assert outs["bfloat16"] == outs["float32"]


def test_model_with_bf16_packed_weights_runs_the_kernel():
  """The forward pass with bfloat16 weights packed by the engine calls the bfloat16 kernel for every packed Dense
  and equals the plain bfloat16 forward within bfloat16 rounding."""
  from jaxserve.config import ModelConfig
  from jaxserve.engine._weight_forms import prepare_params, weight_formats
  from jaxserve.model import forward, init_params
  cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, max_position_embeddings=64, dtype="bfloat16")
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg.replace(dtype="float32"), seed=3))
  packed = prepare_params(params, native=True)
  assert weight_formats(packed) == {"packed": 2 * 7 + 1}
  assert all(w.pairs and w.dtype == jnp.bfloat16 for w in jax.tree.leaves(packed, is_leaf=weights.is_typed)
             if weights.is_typed(w))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 11)), jnp.int32)
  run = jax.jit(lambda p, t: forward(p, cfg, t).logits)
  assert run.lower(packed, tokens).as_text().count(_cpu_kernels.MATMUL_TARGET_BF16) == 2 * 7 + 1
  plain, fast = np.asarray(run(params, tokens)), np.asarray(run(packed, tokens))
  np.testing.assert_allclose(fast, plain, rtol=0.05, atol=0.05 * np.abs(plain).max())
  assert (fast.argmax(-1) == plain.argmax(-1)).mean() > 0.9


def test_stats_say_which_cpu_kernel_paths_run(monkeypatch):
  """``llm.stats()["cpu_kernels"]``: whether the engine's steps run on the C++ kernels, and ``_cpu_kernels.info()``
  (the bfloat16 matmul's path follows ``JAXSERVE_CPU_KERNEL_ISA``); a sliding-window model runs XLA's loops."""
  from jaxserve.engine import LLM
  from jaxserve.loaders import LoadedModel
  from jaxserve.model import init_params
  from jaxserve.testing import tiny_config
  cfg = tiny_config(max_position_embeddings=64)
  llm = LLM(LoadedModel(cfg, init_params(cfg, seed=0), None), max_num_seqs=2, compile="lazy", compilation_cache=False)
  got = llm.stats()["cpu_kernels"]
  assert got == {"used": True, **_cpu_kernels.info()}
  assert got["available"] and got["error"] is None and got["bf16_matmul"] in ("amx", "avx512_bf16", "widen")
  monkeypatch.setenv("JAXSERVE_CPU_KERNEL_ISA", "no-bf16")
  assert llm.stats()["cpu_kernels"]["bf16_matmul"] == "widen"
  windowed = cfg.replace(sliding_window=8)
  llm = LLM(LoadedModel(windowed, init_params(windowed, seed=0), None), max_num_seqs=2, compile="lazy",
            compilation_cache=False)
  assert llm.stats()["cpu_kernels"]["used"] is False
