"""Paged decode attention kernel (Pallas, interpret mode) vs its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas import testing as kt

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


@pytest.fixture(autouse=True)
def _strict_numpy():
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield


def _edge_lengths(page_size):
  # 1, exactly one page, one past a page boundary, long (several compute
  # blocks of 128 keys), empty, and two full pages.
  return [1, page_size, page_size + 1, 300, 0, 2 * page_size]


# Covering sweep: every page size meets every GQA ratio, and every value of
# each axis meets both head dims and both dtypes.
SWEEP = [
    (8, 64, 1, F32), (8, 128, 2, BF16), (8, 64, 4, BF16), (8, 128, 8, F32),
    (16, 128, 1, BF16), (16, 64, 2, F32), (16, 128, 4, F32), (16, 64, 8, BF16),
    (32, 64, 1, BF16), (32, 128, 2, F32), (32, 64, 4, F32), (32, 128, 8, BF16),
    (16, 64, 4, F16),
]


@pytest.mark.parametrize("page_size,head_dim,group,dtype", SWEEP)
def test_kernel_matches_reference_sweep(page_size, head_dim, group, dtype):
  rng = np.random.default_rng([page_size, head_dim, group])
  b = kt.decode_batch(rng, _edge_lengths(page_size), num_heads=2 * group,
                      num_kv_heads=2, head_dim=head_dim, page_size=page_size,
                      dtype=dtype)
  args = (b.q, b.k_pages, b.v_pages, b.block_tables, b.kv_lens)
  ref = kp.paged_attention_reference(*args)
  kt.assert_close(ref, kt.decode_oracle(*args), dtype, "reference vs oracle")
  # One split, and several splits of short compute blocks (exact combine).
  for knobs in ({"num_splits": 1}, {"num_splits": 4,
                                    "pages_per_compute_block": 2}):
    out = kp.paged_attention(*args, interpret=True, poison_outputs=True,
                             **knobs)
    assert out.dtype == dtype and out.shape == b.q.shape
    kt.assert_close(out, ref, dtype, f"kernel {knobs}")
  assert not np.asarray(out[4].astype(F32)).any(), "length 0 must give zeros"


def test_soft_cap_and_scale():
  rng = np.random.default_rng(1)
  b = kt.decode_batch(rng, [5, 40, 77], num_heads=4, num_kv_heads=2,
                      head_dim=64, page_size=16)
  args = (b.q * 8.0, b.k_pages, b.v_pages, b.block_tables, b.kv_lens)
  kw = {"sm_scale": 0.3, "soft_cap": 5.0}
  out = kp.paged_attention(*args, interpret=True, **kw)
  want = kt.decode_oracle(*args, **kw)
  kt.assert_close(out, want, F32, "soft cap")
  plain = kt.decode_oracle(*args, sm_scale=0.3)
  assert np.abs(want - plain).max() > 1e-2, "soft cap should change output"


def test_auto_knobs_and_padding_columns():
  # Default knobs; a table with many padded (null) columns and big splits.
  rng = np.random.default_rng(2)
  b = kt.decode_batch(rng, [3, 129], num_heads=8, num_kv_heads=1,
                      head_dim=64, page_size=16, extra_cols=20)
  args = (b.q, b.k_pages, b.v_pages, b.block_tables, b.kv_lens)
  want = kt.decode_oracle(*args)
  kt.assert_close(kp.paged_attention(*args, interpret=True), want, F32)
  kt.assert_close(kp.paged_attention(*args, interpret=True, num_splits=64),
                  want, F32)


def test_auto_compute_block_fits_shared_memory():
  # float32 at head_dim 128 with 128 keys per step asked an H200 for 270 KiB
  # of shared memory (it has 227 KiB): wide tiles take fewer keys.
  from kernels_pallas import _core
  keys = lambda ps, d, size: ps * _core.auto_pages_per_compute_block(
      ps, 1 << 20, d, size)
  assert keys(16, 128, 2) == 128  # bfloat16, head_dim 128
  assert keys(16, 128, 4) == 64  # float32
  assert keys(16, 256, 2) == 64
  assert keys(8, 64, 4) == 128
  assert keys(32, 256, 4) == 32  # never below one page
  assert keys(4, 512, 4) == 16  # never below 16 keys (Triton dot minimum)
  for ps in (1, 2, 4, 8, 16, 32):
    for d in (16, 64, 128, 256):
      for size in (2, 4):
        assert keys(ps, d, size) * d * size <= max(32 << 10, 16 * d * size,
                                                   ps * d * size)
  assert _core.auto_pages_per_compute_block(16, 2, 128, 4) == 2  # short table


def test_shared_pages_between_sequences():
  # Prefix sharing: two sequences point at the same physical pages.
  rng = np.random.default_rng(3)
  b = kt.decode_batch(rng, [40, 40], num_heads=4, num_kv_heads=2,
                      head_dim=64, page_size=16, nan_garbage=False)
  tables = b.block_tables.at[1, :2].set(b.block_tables[0, :2])
  args = (b.q, b.k_pages, b.v_pages, tables, b.kv_lens)
  kt.assert_close(kp.paged_attention(*args, interpret=True),
                  kt.decode_oracle(*args), F32)


def test_inside_outer_jit_and_vmap_free_of_host_checks():
  # Under the engine's jit the values are traced: value checks are skipped
  # and the call still matches.
  rng = np.random.default_rng(4)
  b = kt.decode_batch(rng, [17, 1, 64], num_heads=4, num_kv_heads=2,
                      head_dim=64, page_size=16)
  f = jax.jit(lambda *a: kp.paged_attention(*a, interpret=True))
  args = (b.q, b.k_pages, b.v_pages, b.block_tables, b.kv_lens)
  kt.assert_close(f(*args), kt.decode_oracle(*args), F32)


def test_traced_out_of_range_pages_never_read_outside_pool():
  # Under jit a bad table cannot be checked; page ids are clamped, so the
  # result stays finite (garbage in, no out-of-bounds read).
  rng = np.random.default_rng(5)
  b = kt.decode_batch(rng, [20], num_heads=2, num_kv_heads=1, head_dim=64,
                      page_size=16, nan_garbage=False)
  bad = b.block_tables.at[0, 1].set(10_000)
  f = jax.jit(lambda *a: kp.paged_attention(*a, interpret=True))
  out = f(b.q, b.k_pages, b.v_pages, bad, b.kv_lens)
  assert np.isfinite(np.asarray(out)).all()


def _valid_args():
  rng = np.random.default_rng(6)
  b = kt.decode_batch(rng, [5, 20], num_heads=4, num_kv_heads=2, head_dim=64,
                      page_size=16)
  return dict(q=b.q, k_pages=b.k_pages, v_pages=b.v_pages,
              block_tables=b.block_tables, lengths=b.kv_lens)


BAD = [
    ("q", lambda a: a["q"][0], "3-D"),
    ("q", lambda a: a["q"][:, :3], "GQA ratio"),
    ("q", lambda a: a["q"].astype(jnp.int32), "dtype"),
    ("q", lambda a: a["q"].astype(BF16), "dtype must equal q dtype"),
    ("q", lambda a: a["q"][..., :32], "head_dim"),
    ("v_pages", lambda a: a["v_pages"][:, :-1], "shape of k_pages"),
    ("k_pages", lambda a: a["k_pages"][0], "num_kv_heads, num_pages"),
    ("block_tables", lambda a: a["block_tables"][:1], "one row per sequence"),
    ("block_tables", lambda a: a["block_tables"].astype(jnp.int64)
     if jax.config.jax_enable_x64 else a["block_tables"].astype(F32),
     "int32"),
    ("block_tables", lambda a: a["block_tables"].at[0, 0].set(999),
     r"entries must be in \[0, "),
    ("block_tables", lambda a: a["block_tables"].at[1, 0].set(-1),
     r"entries must be in \[0, "),
    ("lengths", lambda a: a["lengths"][:1], "shape"),
    ("lengths", lambda a: a["lengths"].at[0].set(10_000), "max_blocks"),
    ("lengths", lambda a: a["lengths"].at[0].set(-2), "max_blocks"),
]


@pytest.mark.parametrize("name,mutate,match", BAD)
def test_invalid_inputs_raise_clear_errors(name, mutate, match):
  a = _valid_args()
  a[name] = mutate(a)
  with pytest.raises(ValueError, match=match):
    kp.paged_attention(a.pop("q"), a.pop("k_pages"), a.pop("v_pages"),
                       a.pop("block_tables"), a.pop("lengths"),
                       interpret=True)


@pytest.mark.parametrize("knobs,match", [
    ({"pages_per_compute_block": 3}, "power of 2"),
    ({"num_splits": 0}, "num_splits"),
    ({"sm_scale": -1.0}, "sm_scale"),
    ({"soft_cap": 0.0}, "soft_cap"),
])
def test_invalid_knobs(knobs, match):
  a = _valid_args()
  with pytest.raises(ValueError, match=match):
    kp.paged_attention(*a.values(), interpret=True, **knobs)


def test_compiled_path_rejects_tiles_triton_cannot_lower():
  rng = np.random.default_rng(7)
  b = kt.decode_batch(rng, [5], num_heads=2, num_kv_heads=1, head_dim=8,
                      page_size=16)
  with pytest.raises(ValueError, match="head_dim a power of 2 >= 16"):
    kp.paged_attention(b.q, b.k_pages, b.v_pages, b.block_tables, b.kv_lens,
                       interpret=False)
  # Interpret mode has no such limit (stories260K has head_dim 8).
  out = kp.paged_attention(b.q, b.k_pages, b.v_pages, b.block_tables,
                           b.kv_lens, interpret=True)
  kt.assert_close(out, kt.decode_oracle(b.q, b.k_pages, b.v_pages,
                                        b.block_tables, b.kv_lens), F32)


@pytest.mark.parametrize("dtype,page_size,head_dim,group,splits", [
    (BF16, 16, 128, 4, 1), (BF16, 16, 128, 4, 4), (F32, 8, 64, 1, 2),
    (BF16, 32, 64, 8, 1),
])
def test_triton_lowering_without_a_gpu(dtype, page_size, head_dim, group,
                                       splits):
  # Lower the compiled (non-interpret) kernels for CUDA on this CPU: catches
  # primitives the Pallas Triton lowering does not support before GPU time.
  from kernels_pallas import _core, paged_decode, paged_ragged
  sds = jax.ShapeDtypeStruct
  kvh, batch, tokens = 2, 3, 40
  pool = sds((kvh, 50, page_size, head_dim), dtype)
  tables, lens = sds((batch, 16), jnp.int32), sds((batch,), jnp.int32)
  cfg = _core.KernelConfig(pages_per_compute_block=max(1, 32 // page_size),
                           num_splits=splits, num_warps=4, num_stages=2,
                           interpret=False)
  try:
    decode = paged_decode._paged_attention.trace(
        sds((batch, kvh * group, head_dim), dtype), pool, pool, tables, lens,
        sm_scale=0.1, soft_cap=30.0, config=cfg).lower(
            lowering_platforms=("cuda",))
  except RuntimeError as e:  # JAX 0.11 wants a real GPU to pick the arch
    if "No supported GPU devices found" not in str(e):
      raise
    pytest.skip(f"cannot lower for CUDA without a GPU here: {e}")
  assert "triton" in decode.as_text()
  ragged = paged_ragged._ragged_paged_attention.trace(
      sds((tokens, kvh * group, head_dim), dtype), pool, pool, tables, lens,
      sds((batch + 1,), jnp.int32), sds((), jnp.int32), sm_scale=0.1,
      soft_cap=None, block_q=8, config=cfg).lower(lowering_platforms=("cuda",))
  assert "triton" in ragged.as_text()


def test_compiled_kernel_supported():
  assert kp.compiled_kernel_supported(head_dim=128, page_size=16)
  assert kp.compiled_kernel_supported(head_dim=64, page_size=8)
  assert not kp.compiled_kernel_supported(head_dim=8, page_size=16)
  assert not kp.compiled_kernel_supported(head_dim=96, page_size=16)
  assert not kp.compiled_kernel_supported(head_dim=128, page_size=12)
