"""Ragged paged attention kernel (prefill chunks + decodes) vs its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels_pallas as kp
from kernels_pallas import _core
from kernels_pallas import testing as kt

F32, BF16 = jnp.float32, jnp.bfloat16


@pytest.fixture(autouse=True)
def _strict_numpy():
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield


def _args(b):
  return (b.q, b.k_pages, b.v_pages, b.block_tables, b.kv_lens, b.cu_q_lens,
          b.num_seqs)


# Mixed batches: (q_lens, kv_lens). Fresh prefill (q == kv), continued
# chunk (q < kv), decodes (q == 1), an empty chunk, chunks crossing pages.
MIXED = [
    ([7, 1, 1, 20, 0, 1], [7, 33, 1, 45, 12, 100]),
    ([1, 1, 1], [16, 17, 1]),  # pure decode
    ([40], [40]),  # one long prefill chunk, several query blocks
    ([9, 16, 1, 3], [9, 50, 130, 3]),
]
CASES = [  # (page_size, head_dim, group, dtype, block_q)
    (8, 64, 1, F32, None), (16, 128, 2, BF16, 4), (32, 64, 4, F32, 3),
    (16, 64, 8, BF16, None), (8, 128, 4, F32, 1),
]
# Every case runs the first two mixes (split and unsplit); the long ones run
# on a few cases.
SWEEP = ([c + (0, 3) for c in CASES] + [c + (1, 1) for c in CASES]
         + [CASES[0] + (2, 3), CASES[1] + (2, 1), CASES[1] + (3, 3),
            CASES[2] + (3, 1)])


@pytest.mark.parametrize("page_size,head_dim,group,dtype,block_q,mix,splits",
                         SWEEP)
def test_ragged_matches_reference(page_size, head_dim, group, dtype, block_q,
                                  mix, splits):
  q_lens, kv_lens = MIXED[mix]
  rng = np.random.default_rng([mix, page_size, group])
  b = kt.ragged_batch(rng, q_lens, kv_lens, num_heads=2 * group,
                      num_kv_heads=2, head_dim=head_dim, page_size=page_size,
                      dtype=dtype, num_tokens=sum(q_lens) + 3,
                      num_seqs_max=len(q_lens) + 1)
  ref = kp.ragged_paged_attention_reference(*_args(b))
  kt.assert_close(ref, kt.ragged_oracle(*_args(b)), dtype,
                  "reference vs oracle")
  out = kp.ragged_paged_attention(
      *_args(b), block_q=block_q, num_splits=splits, pages_per_compute_block=2,
      interpret=True, poison_outputs=True)
  assert out.dtype == dtype and out.shape == b.q.shape
  kt.assert_close(out, ref, dtype, f"kernel splits={splits}")
  pad = np.asarray(out[sum(q_lens):].astype(F32))
  assert not pad.any(), "padding rows must be zero"


def test_ragged_soft_cap_and_decode_agree_with_decode_kernel():
  # A pure-decode ragged batch is the decode kernel's job too.
  rng = np.random.default_rng(11)
  kv_lens = [1, 16, 17, 70]
  b = kt.ragged_batch(rng, [1] * 4, kv_lens, num_heads=4, num_kv_heads=2,
                      head_dim=64, page_size=16)
  kw = {"soft_cap": 3.0, "sm_scale": 0.5}
  ragged = kp.ragged_paged_attention(*_args(b), interpret=True, **kw)
  decode = kp.paged_attention(b.q, b.k_pages, b.v_pages, b.block_tables,
                              b.kv_lens, interpret=True, **kw)
  kt.assert_close(ragged, decode, F32)
  kt.assert_close(ragged, kt.ragged_oracle(*_args(b), **kw), F32)


def test_every_kernel_output_element_is_written():
  # Raw kernel output (padding rows included) starts as NaN and must come
  # back finite: padding rows are written (finite values the wrappers drop).
  rng = np.random.default_rng(12)
  b = kt.decode_batch(rng, [0, 3, 40], num_heads=6, num_kv_heads=2,
                      head_dim=64, page_size=16)
  rows = _core.num_rows(1, 3)
  qb = jnp.zeros((3, 2, rows, 64), F32).at[:, :, :3].set(
      b.q.reshape(3, 2, 3, 64))
  pos = jnp.where(jnp.arange(rows)[None, :] < 3, b.kv_lens[:, None] - 1, -1)
  for splits in (1, 2):
    cfg = _core.KernelConfig(pages_per_compute_block=1, num_splits=splits,
                             num_warps=4, num_stages=2, interpret=True,
                             poison_outputs=True)
    tables = _core.pad_block_tables(b.block_tables, splits)
    out = _core.blocked_attention(qb, pos.astype(jnp.int32), tables,
                                  b.k_pages, b.v_pages, sm_scale=0.125,
                                  soft_cap=None, config=cfg)
    out = np.asarray(out)
    assert np.isfinite(out).all()
    assert not out[0].any(), "a length-0 sequence gives zeros"


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_mixes_property(data):
  # Fixed shapes (one compile); random chunk/context lengths, live sequence
  # count and physical pages.
  num_seqs_max, num_tokens, page_size, max_ctx = 5, 24, 8, 60
  live = data.draw(st.integers(1, num_seqs_max), label="num_seqs")
  q_lens, kv_lens, budget = [], [], num_tokens
  for _ in range(live):
    q = data.draw(st.integers(0, min(budget, 12)))
    kv = data.draw(st.integers(max(q, 1), max_ctx))
    q_lens.append(q)
    kv_lens.append(kv)
    budget -= q
  seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
  rng = np.random.default_rng(seed)
  b = kt.ragged_batch(rng, q_lens, kv_lens, num_heads=4, num_kv_heads=2,
                      head_dim=16, page_size=page_size, num_tokens=num_tokens,
                      num_seqs_max=num_seqs_max, extra_cols=0)
  # Keep the table width fixed across examples (one compile).
  width = -(-max_ctx // page_size)
  tables = jnp.pad(b.block_tables, ((0, 0), (0, width - b.block_tables.shape[1])))
  b = b._replace(block_tables=tables)
  out = kp.ragged_paged_attention(*_args(b), block_q=4, num_splits=2,
                                  pages_per_compute_block=2, interpret=True)
  kt.assert_close(out, kt.ragged_oracle(*_args(b)), F32)


def _valid():
  rng = np.random.default_rng(13)
  b = kt.ragged_batch(rng, [3, 1], [5, 20], num_heads=4, num_kv_heads=2,
                      head_dim=64, page_size=16, num_tokens=6,
                      num_seqs_max=3)
  return dict(q=b.q, k_pages=b.k_pages, v_pages=b.v_pages,
              block_tables=b.block_tables, kv_lens=b.kv_lens,
              cu_q_lens=b.cu_q_lens, num_seqs=b.num_seqs)


BAD = [
    ("q", lambda a: a["q"][:, :3], "GQA ratio"),
    ("q", lambda a: a["q"][:0], "at least one row"),
    ("q", lambda a: a["q"].astype(BF16), "dtype must equal q dtype"),
    ("kv_lens", lambda a: a["kv_lens"][:2], "kv_lens must have shape"),
    ("cu_q_lens", lambda a: a["cu_q_lens"][:3], "cu_q_lens must have shape"),
    ("cu_q_lens", lambda a: a["cu_q_lens"].astype(F32), "int32"),
    ("cu_q_lens", lambda a: a["cu_q_lens"].at[0].set(1), r"cu_q_lens\[0\]"),
    ("cu_q_lens", lambda a: a["cu_q_lens"].at[1].set(5), "non-decreasing"),
    ("cu_q_lens", lambda a: a["cu_q_lens"].at[2].set(9), "exceeds"),
    ("kv_lens", lambda a: a["kv_lens"].at[0].set(2), "longer than its kv_len"),
    ("kv_lens", lambda a: a["kv_lens"].at[1].set(999), "max_blocks"),
    ("num_seqs", lambda a: 4, "num_seqs must be in"),
    ("num_seqs", lambda a: jnp.asarray([2], jnp.int32), "num_seqs"),
    ("block_tables", lambda a: a["block_tables"].at[0, 0].set(999),
     r"entries must be in \[0, "),
]


@pytest.mark.parametrize("name,mutate,match", BAD)
def test_invalid_inputs_raise_clear_errors(name, mutate, match):
  a = _valid()
  a[name] = mutate(a)
  with pytest.raises(ValueError, match=match):
    kp.ragged_paged_attention(*a.values(), interpret=True)


def test_invalid_block_q():
  with pytest.raises(ValueError, match="block_q"):
    kp.ragged_paged_attention(*_valid().values(), block_q=0, interpret=True)
