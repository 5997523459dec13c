"""Counting-based exact selection equals the sort-based one, also on arrays sharded over 4 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprune._select import ordered_key, prune_masks_by_count, prune_rows_by_count
from jaxprune._topk import keep_mask_sorted as keep_mask


def test_ordered_key_is_monotone():
  x = jnp.asarray([-jnp.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7e30, jnp.inf], jnp.float32)
  keys = np.asarray(ordered_key(x)).astype(np.int64)
  assert np.all(np.diff(keys) >= 0) and keys[3] < keys[4] + 1


@pytest.mark.parametrize("seed", range(4))
def test_counting_selection_equals_stable_sort(seed):
  rng = np.random.default_rng(seed)
  shape = (int(rng.integers(3, 40)), int(rng.integers(3, 40)))
  s = jnp.asarray(rng.integers(-5, 6, size=shape).astype(np.float32))  # many ties
  for k in (0, 1, s.size // 3, s.size // 2, s.size - 1, s.size):
    (pruned,) = prune_masks_by_count([s], k)
    np.testing.assert_array_equal(np.asarray(~pruned), np.asarray(keep_mask(s, k)))
    assert int(pruned.sum()) == k
  rows = prune_rows_by_count(s, 2, axis=1)
  np.testing.assert_array_equal(np.asarray(~rows), np.asarray(jax.vmap(lambda r: keep_mask(r, 2))(s)))


def test_counting_selection_on_sharded_array_gathers_nothing():
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  mesh = jax.make_mesh((4,), ("tp",))
  rng = np.random.default_rng(0)
  a = rng.normal(size=(64, 32)).astype(np.float32)
  b = np.round(rng.normal(size=(32, 16)), 1).astype(np.float32)
  sa = jax.device_put(a, NamedSharding(mesh, P(None, "tp")))
  sb = jax.device_put(b, NamedSharding(mesh, P("tp", None)))
  k = (a.size + b.size) // 2
  fn = jax.jit(lambda x, y: prune_masks_by_count([x, y], k))
  got = fn(sa, sb)
  flat = np.concatenate([a.ravel(), b.ravel()])
  expected = ~np.asarray(keep_mask(jnp.asarray(flat), k))
  np.testing.assert_array_equal(np.concatenate([np.asarray(g).ravel() for g in got]), expected)
  assert got[0].sharding.spec == P(None, "tp")
  hlo = fn.lower(sa, sb).compile().as_text()
  assert "all-gather" not in hlo and "all-reduce" in hlo


def _mesh4():
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices")
  from jaxserve.sharding import make_mesh
  return make_mesh(4)


@pytest.mark.parametrize("spec", [P(None, "tp"), P("tp", None)], ids=["column-parallel", "row-parallel"])
@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}], ids=["50%", "2:4"])
def test_sparsegpt_and_wanda_on_sharded_kernels_equal_unsharded(spec, target):
  from jaxprune import sparsegpt_layer, wanda_layer
  mesh = _mesh4()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(512, 64)).astype(np.float32)
  gram = x.T @ x
  kernel = rng.normal(size=(64, 128)).astype(np.float32)
  sharded = jax.device_put(kernel, NamedSharding(mesh, spec))
  for fn, kw in ((sparsegpt_layer, {"blocksize": 32}), (wanda_layer, {})):
    w_ref, m_ref = fn(kernel, gram, **target, **kw)
    w, m = fn(sharded, gram, **target, **kw)
    np.testing.assert_array_equal(np.asarray(m), np.asarray(m_ref))
    np.testing.assert_allclose(np.asarray(w), np.asarray(w_ref), atol=1e-5)
    assert w.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)  # the result stays where the parameter was


def test_sparsegpt_solve_on_row_split_weights_gathers_nothing():
  from jaxprune._sparsegpt import _solve
  mesh = _mesh4()
  rng = np.random.default_rng(2)
  x = rng.normal(size=(256, 64)).astype(np.float32)
  w = jax.device_put(rng.normal(size=(128, 64)).astype(np.float32), NamedSharding(mesh, P("tp", None)))
  counts = jnp.full((2,), 128 * 32 // 2, jnp.int32)
  hlo = _solve.lower(w, jnp.asarray(x.T @ x), counts, jnp.float32(0.01), blocksize=32, n=None, m=None
                     ).compile().as_text()
  assert "all-gather" not in hlo


def test_global_magnitude_masks_of_sharded_model_equal_unsharded():
  from jaxprune import magnitude_scores, topk_masks
  from jaxserve.loaders import load_model
  from jaxserve.sharding import place_like, shard_params
  mesh = _mesh4()
  m = load_model()
  sharded = shard_params(m.params, m.cfg, mesh)
  for scope in ("layer", "global"):
    fn = jax.jit(lambda p: topk_masks(magnitude_scores(p), 0.5, scope=scope))
    ref, got = fn(m.params), fn(sharded)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "all-gather" not in fn.lower(sharded).compile().as_text()
    placed = place_like(got, sharded)  # masks inherit the parameters' sharding
    q = placed["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tp")), 2)
    assert {s.data.shape for s in q.addressable_shards} == {(64, 16)}


def test_prune_driver_on_sharded_model_equals_unsharded():
  """SparseGPT and Wanda through the layer-by-layer driver, parameters split over 4 devices."""
  from jaxprune import PruneConfig, calibration_windows, prune
  from jaxserve.loaders import CALIB_TEXT, load_model
  from jaxserve.sharding import shard_params
  mesh = _mesh4()
  m = load_model()
  calib = calibration_windows(CALIB_TEXT, m.tokenizer, nsamples=8, seq_len=64, bos_id=m.cfg.bos_token_id)
  sharded = shard_params(m.params, m.cfg, mesh)
  for method in ("sparsegpt", "wanda"):
    config = PruneConfig(method=method, sparsity=0.5)
    ref, got = prune(m.params, m.cfg, config, calib), prune(sharded, m.cfg, config, calib)
    for a, b in zip(jax.tree.leaves(ref.masks), jax.tree.leaves(got.masks)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(got.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    o = got.params["layers_0"]["self_attn"]["o_proj"]["kernel"]
    assert {s.data.shape for s in o.addressable_shards} == {(16, 64)}  # still split by input rows


def test_layer_hessians_from_data_parallel_batches_are_reduced_across_devices():
  from jaxprune._sequential import block_pass
  from jaxserve.loaders import load_model
  mesh = _mesh4()
  m = load_model()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 64)).astype(np.float32))
  xs = jax.device_put(x, NamedSharding(mesh, P("tp")))  # calibration batch split over devices
  block = m.params["layers_0"]
  _, ref = block_pass(block, x, cfg=m.cfg, layer=0, capture=True)
  _, got = block_pass(block, xs, cfg=m.cfg, layer=0, capture=True)
  for k in ref:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref[k]), rtol=1e-5, atol=1e-3)
  hlo = block_pass.lower(block, xs, cfg=m.cfg, layer=0, capture=True).compile().as_text()
  assert "all-reduce" in hlo and "all-gather" not in hlo
