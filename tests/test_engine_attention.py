"""Paged attention backends (chunked XLA, Pallas in interpret mode) against the dense reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine import PagedAttention, paged_attention_reference
from jaxserve.engine._attention import copy_blocks, make_meta, write_kv


def _batch(rng, kvh, bs, nb, decodes, prefills, width):
  """Random pools and a ragged batch whose blocks are a random permutation of the pool."""
  perm = list(rng.permutation(np.arange(1, nb)))
  seqs = []
  for q_len, kv_len in [(1, L) for L in decodes] + list(prefills):
    blocks = tuple(int(perm.pop()) for _ in range(-(-kv_len // bs)))
    seqs.append((q_len, kv_len, blocks))
  return seqs


@pytest.mark.parametrize("bs, q_tile, kv_chunk, window", [(4, 8, 2, None), (8, 32, 8, None), (4, 4, 1, 6),
                                                          (16, 16, 4, None)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("cpu_kernel", [False, None])  # the XLA loops; the C++ kernel where it applies
def test_xla_paged_attention_matches_reference(bs, q_tile, kv_chunk, window, heads, kv_heads, cpu_kernel):
  rng = np.random.default_rng(bs * 100 + heads * 10 + kv_heads)
  d, nb = 16, 80
  # lengths: 1, exactly one block, one past a block, long; prefill chunks with and without context
  seqs = _batch(rng, kv_heads, bs, nb, [1, bs, bs + 1, 5 * bs + 3], [(7, 7), (3, 2 * bs + 1), (33, 40), (1, 9)],
                width=16)
  t = sum(s[0] for s in seqs) + 3
  meta = make_meta(seqs, 4, num_tokens=t, decode_slots=8, prefill_slots=4, block_size=bs, table_width=16)
  kp = jnp.asarray(rng.standard_normal((kv_heads, nb, bs, d)), jnp.float32)
  vp = jnp.asarray(rng.standard_normal((kv_heads, nb, bs, d)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((t, heads, d)), jnp.float32)
  attn = PagedAttention(sliding_window=window, q_tile=q_tile, kv_chunk=kv_chunk, decode_kv_chunk=max(1, kv_chunk // 2),
                        cpu_kernel=cpu_kernel)
  assert attn.kv_layout == "block"
  kb, vb = jnp.swapaxes(kp, 0, 1), jnp.swapaxes(vp, 0, 1)  # [NB, KVH, bs, D]
  got = jax.jit(attn.attend)(q, kb, vb, meta)
  ref = paged_attention_reference(q, kp, vp, meta, sliding_window=window)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_array_equal(paged_attention_reference(q, kb, vb, meta, sliding_window=window, layout="block"), ref)
  assert not np.any(np.asarray(got)[sum(s[0] for s in seqs):])  # padding rows are zero


def test_bfloat16_pools_within_tolerance():
  rng = np.random.default_rng(5)
  seqs = _batch(rng, 2, 8, 40, [3, 17], [(12, 20)], width=8)
  meta = make_meta(seqs, 2, num_tokens=16, decode_slots=2, prefill_slots=1, block_size=8, table_width=8)
  kp = jnp.asarray(rng.standard_normal((2, 40, 8, 32)), jnp.bfloat16)
  vp = jnp.asarray(rng.standard_normal((2, 40, 8, 32)), jnp.bfloat16)
  q = jnp.asarray(rng.standard_normal((16, 4, 32)), jnp.bfloat16)
  got = PagedAttention(kv_chunk=8).attend(q, jnp.swapaxes(kp, 0, 1), jnp.swapaxes(vp, 0, 1), meta)
  ref = paged_attention_reference(q, kp, vp, meta)
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=3e-2, rtol=3e-2)


def test_pallas_backend_in_interpret_mode_matches_xla():
  rng = np.random.default_rng(6)
  nb, bs = 48, 8
  kp = jnp.asarray(rng.standard_normal((2, nb, bs, 16)), jnp.float32)
  vp = jnp.asarray(rng.standard_normal((2, nb, bs, 16)), jnp.float32)
  for decodes, prefills, dslots, pslots in [([1, 9, 30], [], 4, 0), ([5, 17], [(6, 6), (4, 21)], 2, 2)]:
    seqs = _batch(rng, 2, bs, nb, decodes, prefills, width=8)
    t = dslots + sum(q for q, _ in prefills) + 2 * bool(prefills)
    meta = make_meta(seqs, len(decodes), num_tokens=t, decode_slots=dslots, prefill_slots=pslots, block_size=bs,
                     table_width=8)
    q = jnp.asarray(rng.standard_normal((t, 4, 16)), jnp.float32)
    xla = PagedAttention(kv_chunk=4).attend(q, jnp.swapaxes(kp, 0, 1), jnp.swapaxes(vp, 0, 1), meta)
    pallas = PagedAttention(impl="pallas", interpret=True).attend(q, kp, vp, meta)
    np.testing.assert_allclose(pallas, xla, atol=2e-5, rtol=2e-5)


def test_write_and_copy_blocks():
  kp = jnp.zeros((2, 6, 4, 3))
  vp = jnp.zeros((2, 6, 4, 3))
  k = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3) + 1
  kp, vp = write_kv(kp, vp, k, -k, jnp.int32([9, 22]))  # block 2 slot 1, block 5 slot 2
  np.testing.assert_array_equal(kp[:, 2, 1], k[0])
  np.testing.assert_array_equal(vp[:, 5, 2], -k[1])
  (kp2, vp2), = copy_blocks([(kp, vp)], jnp.int32([2, 0]), jnp.int32([4, 0]))
  np.testing.assert_array_equal(kp2[:, 4], kp[:, 2])
  np.testing.assert_array_equal(vp2[:, 4], vp[:, 2])
  np.testing.assert_array_equal(kp2[:, 2], kp[:, 2])
  # the XLA path's block layout [NB, KVH, bs, D] holds the same values
  kb, vb = write_kv(jnp.zeros((6, 2, 4, 3)), jnp.zeros((6, 2, 4, 3)), k, -k, jnp.int32([9, 22]), layout="block")
  np.testing.assert_array_equal(kb, jnp.swapaxes(kp, 0, 1))
  np.testing.assert_array_equal(vb, jnp.swapaxes(vp, 0, 1))
  (kb2, vb2), = copy_blocks([(kb, vb)], jnp.int32([2, 0]), jnp.int32([4, 0]), layout="block")
  np.testing.assert_array_equal(kb2, jnp.swapaxes(kp2, 0, 1))
  np.testing.assert_array_equal(vb2, jnp.swapaxes(vp2, 0, 1))
  with pytest.raises(ValueError, match="KV layout"):
    write_kv(kp, vp, k, -k, jnp.int32([9, 22]), layout="heads")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_native_copy_blocks_equals_the_xla_copy_and_updates_in_place(dtype):
  from jaxserve.engine import _cpu_kernels
  if not _cpu_kernels.available():
    pytest.skip("no C++ kernels here")
  rng = np.random.default_rng(5)
  pools = [tuple(jnp.asarray(rng.standard_normal((9, 2, 4, 3)), dtype) for _ in range(2)) for _ in range(2)]
  # 3 -> 5 while 5 -> 7: block 7 gets 5's old contents (sources read first); (0, 0) pads; 1 -> 8 -> ...
  src, dst = jnp.int32([3, 5, 0, 1, 0]), jnp.int32([5, 7, 0, 8, 0])
  want = copy_blocks(pools, src, dst, layout="block")
  copy = jax.jit(lambda p, s, d: copy_blocks(p, s, d, layout="block", native=True), donate_argnums=0)
  fresh = [tuple(jnp.copy(x) for x in kv) for kv in pools]
  pointer = fresh[0][0].unsafe_buffer_pointer()
  got = copy(fresh, src, dst)
  for (wk, wv), (gk, gv) in zip(want, got):
    np.testing.assert_array_equal(np.asarray(gk, np.float32), np.asarray(wk, np.float32))
    np.testing.assert_array_equal(np.asarray(gv, np.float32), np.asarray(wv, np.float32))
  assert got[0][0].unsafe_buffer_pointer() == pointer  # donated: copied in place, no new pool
  with pytest.raises(Exception, match="outside a pool of 9 blocks"):
    jax.block_until_ready(_cpu_kernels.copy_blocks(pools[0][0], jnp.int32([1]), jnp.int32([9])))


def test_pallas_rejects_sliding_window():
  with pytest.raises(ValueError, match="sliding window"):
    PagedAttention(impl="pallas", sliding_window=8)


def _compiler_present():
  import shutil
  return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


# head dims of 16k take the AVX-512 decode path (query heads two at a time: G = 3 leaves one alone)
@pytest.mark.parametrize("heads, kv_heads, bs, d", [(8, 4, 16, 64), (4, 4, 8, 16), (8, 1, 4, 32), (6, 2, 16, 8),
                                                   (4, 2, 16, 128), (6, 2, 5, 64)])
def test_cpu_kernel_matches_reference(heads, kv_heads, bs, d):
  from jaxserve.engine import _cpu_kernels
  if not _cpu_kernels.available():
    assert not _compiler_present(), f"the kernel did not build: {_cpu_kernels._state.get('error')}"
    pytest.skip("no C++ compiler")
  rng = np.random.default_rng(heads * 7 + bs + d)
  nb = 160
  # decodes (one row each) and prefill chunks (causal runs, cut into tiles of 16 / G rows and single rows)
  prefills = [(1, 1), (2, 2), (7, 7), (8, 8), (9, 3 * bs), (17, 17), (40, 48)]
  seqs = _batch(rng, kv_heads, bs, nb, [1, bs, bs + 1, 7 * bs - 1, 3, 40], prefills, width=8)
  t = sum(s[0] for s in seqs)
  meta = make_meta(seqs, 6, num_tokens=t + 5, decode_slots=8, prefill_slots=8, block_size=bs, table_width=16)
  kb = jnp.asarray(rng.standard_normal((nb, kv_heads, bs, d)), jnp.float32)  # block layout
  vb = jnp.asarray(rng.standard_normal((nb, kv_heads, bs, d)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((t + 5, heads, d)), jnp.float32)
  ref = np.asarray(paged_attention_reference(q, kb, vb, meta, layout="block"))
  for threads in (0, 1, 3):
    def call(q, kb, vb, meta, t=threads):
      row_seq, row_len = _cpu_kernels.step_rows(meta.cu_q_lens, meta.kv_lens, q.shape[0])
      return _cpu_kernels.paged_rows(q, kb, vb, meta.block_tables, row_seq, row_len, scale=1 / np.sqrt(d),
                                       num_threads=t)
    got = jax.jit(call)(q, kb, vb, meta)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)
    assert not np.any(np.asarray(got)[t:])  # padding rows (length 0) are zero
  # the engine's fused call: the step's K/V written into their slots (in place), then attention
  k_new = jnp.asarray(rng.standard_normal((t + 5, kv_heads, d)), jnp.float32)
  v_new = jnp.asarray(rng.standard_normal((t + 5, kv_heads, d)), jnp.float32)
  kw, vw = write_kv(kb, vb, k_new, v_new, meta.slot_mapping, layout="block")
  ref = np.asarray(paged_attention_reference(q, kw, vw, meta, layout="block"))

  def fused(q, k_new, v_new, kb, vb, meta):
    row_seq, row_len = _cpu_kernels.step_rows(meta.cu_q_lens, meta.kv_lens, q.shape[0])
    return _cpu_kernels.write_paged_rows(q, k_new, v_new, meta.slot_mapping, kb, vb, meta.block_tables, row_seq,
                                           row_len, scale=1 / np.sqrt(d))
  out, k2, v2 = jax.jit(fused, donate_argnums=(3, 4))(q, k_new, v_new, kb.copy(), vb.copy(), meta)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  real = np.unique(np.asarray(meta.slot_mapping)[:t] // bs)  # the padding rows all write the null block
  np.testing.assert_array_equal(np.asarray(k2)[real], np.asarray(kw)[real])
  np.testing.assert_array_equal(np.asarray(v2)[real], np.asarray(vw)[real])
  np.testing.assert_array_equal(np.asarray(k2)[1:], np.asarray(kw)[1:])
  # through PagedAttention (decodes and a prefill chunk in one step): kernel == XLA loops
  seqs = _batch(rng, kv_heads, bs, nb, [5, 2 * bs + 3], [(9, 9), (4, 3 * bs)], width=8)
  meta = make_meta(seqs, 2, num_tokens=20, decode_slots=4, prefill_slots=2, block_size=bs, table_width=8)
  q = jnp.asarray(rng.standard_normal((20, heads, d)), jnp.float32)
  assert PagedAttention().use_cpu_kernel(jnp.float32) and not PagedAttention(cpu_kernel=False).use_cpu_kernel(
      jnp.float32)
  with_kernel = jax.jit(PagedAttention().attend)(q, kb, vb, meta)
  without = jax.jit(PagedAttention(cpu_kernel=False).attend)(q, kb, vb, meta)
  np.testing.assert_allclose(with_kernel, without, atol=2e-5, rtol=2e-5)
  assert not PagedAttention().use_cpu_kernel(jnp.float16) and not PagedAttention(sliding_window=4).use_cpu_kernel(
      jnp.float32)  # bfloat16 pools: tests/test_engine_bf16.py


@pytest.mark.parametrize("v_shape", [(1, 1, 4), (1, 2, 8)])
def test_the_fused_write_rejects_new_values_of_another_shape(v_shape):
  """The step's new V must be [N, KV heads, D] like its K: a smaller one was read past its end."""
  from jaxserve.engine import _cpu_kernels
  if not _cpu_kernels.available():
    assert not _compiler_present(), f"the kernel did not build: {_cpu_kernels._state.get('error')}"
    pytest.skip("no C++ compiler")
  pools = jnp.zeros((4, 1, 4, 8), jnp.float32)
  call = jax.jit(_cpu_kernels.write_paged_rows, static_argnames="scale")
  args = (jnp.ones((1, 2, 8)), jnp.ones((1, 1, 8)), jnp.ones(v_shape), jnp.int32([4]), pools, pools,
          jnp.int32([[1]]), jnp.int32([0]), jnp.int32([1]))
  with pytest.raises(Exception, match="expected new K/V"):
    jax.block_until_ready(call(*args, scale=0.5))
  out, _, _ = call(*args[:2], jnp.ones((1, 1, 8)), *args[3:], scale=0.5)  # the same call, shapes right
  assert float(out[0, 0, 0]) == 1.0
