"""Counting-based exact selection equals the sort-based one, also on arrays sharded over 4 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxprune._select import ordered_key, prune_masks_by_count, prune_rows_by_count
from jaxprune._topk import keep_mask, keep_mask_rows


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
  np.testing.assert_array_equal(np.asarray(~rows), np.asarray(keep_mask_rows(s, 2)))


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
