"""Typed weight leaves (packed, N:M, bitmask): exact round trips, clear rejections, the dispatching matmul, checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import checkpoint
from jaxserve import weights
from jaxserve.model import forward
from jaxserve.testing import tiny_model
from jaxserve.weights import BitmaskSparse, NMSparse, PackedDense


def nm_mask(rng, k: int, cols: int, n: int, m: int) -> np.ndarray:
  """Exactly n kept of every m along K, at random positions."""
  keys = rng.random((k // m, m, cols))
  keep = np.argsort(keys, axis=1)[:, :n]
  mask = np.zeros((k // m, m, cols), bool)
  np.put_along_axis(mask, keep, True, axis=1)
  return mask.reshape(k, cols)


@pytest.mark.parametrize("k, cols, n, m, panel", [(4, 1, 2, 4, 16), (8, 5, 2, 4, 16), (12, 37, 1, 4, 16),
                                                  (16, 40, 3, 8, 16), (32, 17, 5, 16, 16), (64, 300, 2, 4, 128),
                                                  (24, 33, 4, 8, 32)])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_nm_round_trips_exactly(k, cols, n, m, panel, dtype):
  rng = np.random.default_rng(k * cols + n)
  w = rng.standard_normal((k, cols)).astype(dtype)
  mask = nm_mask(rng, k, cols, n, m)
  s = NMSparse.compress(w, mask, n=n, m=m, panel=panel)
  assert s.values.shape == (-(-cols // panel), k // m * n, panel) and s.values.dtype == w.dtype
  assert s.meta.dtype == jnp.uint32 and s.shape == (k, cols)
  np.testing.assert_array_equal(np.asarray(s.to_dense()), np.where(mask, w, 0))
  np.testing.assert_array_equal(np.asarray(s.mask()), mask)
  idx = np.asarray(s.indices())
  assert idx.min() >= 0 and idx.max() < m
  # the pytree round trip (jit) keeps the static fields
  back = jax.jit(lambda t: t)(s)
  assert isinstance(back, NMSparse) and (back.n, back.m, back.shape, back.panel) == (n, m, (k, cols), panel)


def test_nm_bytes_of_2_4_float32():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((512, 1408)).astype(np.float32)
  s = NMSparse.compress(w, nm_mask(rng, 512, 1408, 2, 4), n=2, m=4)
  assert s.nbytes / w.nbytes == pytest.approx(0.53125)  # half the values plus 2 bits of index each


def test_nm_group_with_fewer_kept_is_filled_with_zero_slots():
  w = np.arange(1, 17, dtype=np.float32).reshape(8, 2)
  mask = np.zeros((8, 2), bool)
  mask[0, 0] = mask[5, 1] = mask[6, 1] = True  # column 0 keeps 1 in group 0 and none in group 1
  s = NMSparse.compress(w, mask, n=2, m=4)
  np.testing.assert_array_equal(np.asarray(s.to_dense()), np.where(mask, w, 0))


def test_nm_rejects_a_violating_mask_naming_leaf_and_group():
  w = np.ones((8, 3), np.float32)
  mask = np.zeros((8, 3), bool)
  mask[4:7, 2] = True  # group 1 of column 2 keeps 3
  with pytest.raises(ValueError, match=r"layers_0/mlp/up_proj/kernel: not 2:4 sparse: group 1 \(rows 4..7\) of "
                                       r"column 2 keeps 3 of 4"):
    NMSparse.compress(w, mask, n=2, m=4, name="layers_0/mlp/up_proj/kernel")
  with pytest.raises(ValueError, match="not a multiple of m=4"):
    NMSparse.compress(np.ones((6, 2), np.float32), n=2, m=4)
  with pytest.raises(ValueError, match="0 < n < m <= 16"):
    NMSparse.compress(w, n=4, m=4)
  with pytest.raises(ValueError, match="multiple of 16"):
    NMSparse.compress(w, n=2, m=4, panel=24)


@pytest.mark.parametrize("k, cols, density", [(1, 1, 1.0), (7, 5, 0.5), (33, 40, 0.3), (64, 17, 0.0),
                                              (100, 64, 0.05), (16, 48, 1.0)])
def test_bitmask_round_trips_exactly(k, cols, density):
  rng = np.random.default_rng(k + cols)
  w = rng.standard_normal((k, cols)).astype(np.float32)
  mask = rng.random((k, cols)) < density
  b = BitmaskSparse.compress(w, mask)
  assert b.bits.dtype == jnp.uint16 and b.offsets.dtype == jnp.int32
  assert b.values.shape == (mask.sum() + 16,) and int(b.offsets[-1]) == mask.sum()
  np.testing.assert_array_equal(np.asarray(b.to_dense()), np.where(mask, w, 0))
  np.testing.assert_array_equal(np.asarray(b.mask()), mask)


def test_packed_round_trips_and_rejects_unpackable():
  w = np.random.default_rng(1).standard_normal((9, 80)).astype(np.float32)
  p = PackedDense.pack(jnp.asarray(w))
  assert p.panels.shape == (9 * 80,) and not np.array_equal(np.asarray(p.panels), w.reshape(-1))
  np.testing.assert_array_equal(np.asarray(p.to_dense()), w)
  with pytest.raises(ValueError, match="multiple of 16"):
    PackedDense.pack(jnp.zeros((4, 20)))


def test_matmul_dispatch_reference_paths_match_dense():
  """Without a native kernel every type computes through its exact expansion (under jit too)."""
  rng = np.random.default_rng(2)
  w = rng.standard_normal((64, 48)).astype(np.float32)
  mask = nm_mask(rng, 64, 48, 2, 4)
  wm = np.where(mask, w, 0)
  x = rng.standard_normal((2, 3, 64)).astype(np.float32)
  want = x.astype(np.float64) @ wm
  for leaf in (jnp.asarray(wm), NMSparse.compress(w, mask, n=2, m=4), BitmaskSparse.compress(w, mask),
               PackedDense.pack(jnp.asarray(wm))):
    got = jax.jit(weights.matmul)(jnp.asarray(x), leaf)
    assert got.shape == (2, 3, 48)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="expects 64"):
    weights.matmul(jnp.ones((2, 63)), NMSparse.compress(w, mask, n=2, m=4))


def test_compress_picks_the_smallest_form_above_the_threshold():
  rng = np.random.default_rng(3)
  w = rng.standard_normal((256, 128)).astype(np.float32)
  assert weights.compress(w) is w  # dense: no gain
  assert isinstance(weights.compress(w, nm_mask(rng, 256, 128, 2, 4)), NMSparse)
  s = weights.compress(w, nm_mask(rng, 256, 128, 1, 8))
  assert isinstance(s, NMSparse) and (s.n, s.m) == (1, 8)
  assert isinstance(weights.compress(w, rng.random(w.shape) < 0.3), BitmaskSparse)  # 70% sparse
  light = weights.compress(w, rng.random(w.shape) < 0.75)  # 25% sparse: 0.8x as a bitmask, stays dense
  assert not weights.is_typed(light) and float((np.asarray(light) == 0).mean()) > 0.2


def test_model_forward_with_typed_leaves_equals_dense():
  cfg, params = tiny_model(seed=4)
  masks = jaxprune.nm_masks(jaxprune.magnitude_scores(params), "2:4")
  pruned = jaxprune.apply_masks(params, masks)
  typed = weights.compress_params(params, masks)
  jax.tree.map(np.testing.assert_array_equal, weights.densify(typed), pruned)
  assert weights.nbytes(typed) < 0.7 * weights.nbytes(pruned)
  kinds = {type(x).__name__ for x in jax.tree.leaves(typed, is_leaf=weights.is_typed)}
  assert "NMSparse" in kinds
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  np.testing.assert_allclose(forward(typed, cfg, tokens).logits, forward(pruned, cfg, tokens).logits,
                             rtol=1e-5, atol=1e-5)
  report = jaxprune.sparsity(typed)  # jaxprune.sparsity reads typed leaves
  assert report.total == pytest.approx(jaxprune.sparsity(pruned).total)


def test_checkpoint_saved_compressed_reloads_identically(tmp_path):
  cfg, params = tiny_model(seed=5, hidden_size=256, intermediate_size=512, vocab_size=64)
  scores = jaxprune.magnitude_scores(params)
  checkpoint.save(str(tmp_path / "unpruned"), params, jaxprune.dense_masks(params), cfg=cfg)
  for name, masks in (("nm", jaxprune.nm_masks(scores, "2:4")), ("unstructured", jaxprune.topk_masks(scores, 0.7))):
    pruned = jaxprune.apply_masks(params, masks)
    d = checkpoint.save(str(tmp_path / name), pruned, masks, cfg=cfg)
    back = checkpoint.restore(d)
    jax.tree.map(np.testing.assert_array_equal, back.params, pruned)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.masks, masks)
    up = checkpoint.load_pruned(d).params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(up, NMSparse if name == "nm" else BitmaskSparse)
    # bytes on disk against the unpruned model's (2:4: 0.53x for the kernels; embeddings and head stay dense)
    ratio = _bytes(tmp_path / name) / _bytes(tmp_path / "unpruned")
    assert ratio < (0.6 if name == "nm" else 0.45), ratio
    dense_dir = checkpoint.save(str(tmp_path / f"{name}-dense"), pruned, masks, cfg=cfg, compress=False)
    jax.tree.map(np.testing.assert_array_equal, checkpoint.restore(dense_dir).params, pruned)


def _bytes(path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
