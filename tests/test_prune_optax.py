"""The optax pruning transformation and its sparsity schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune._data import Windows, loss_fn_for
from jaxprune._masks import apply_masks, dense_masks, leaf_masks, sparsity
from jaxprune._optax import PruningState, find_pruning_state, prune_updates
from jaxprune._schedules import Fixed, Iterative, OneShot, Polynomial
from jaxprune._scores import magnitude_scores
from jaxprune._topk import num_pruned, topk_masks
from jaxserve.testing import tiny_model

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1, head_dim=8)


@pytest.fixture(scope="module")
def setup():
  cfg, params = tiny_model(seed=0, **SMALL)
  rng = np.random.default_rng(0)
  targets = rng.integers(0, 32, (4, 16)).astype(np.int32)
  batch = Windows(np.concatenate([np.ones((4, 1), np.int32), targets[:, :-1]], 1), targets)
  return cfg, params, batch


def _train(cfg, params, batch, tx, steps, use_jit=True):
  loss = loss_fn_for(cfg)

  def step(params, state):
    grads = jax.grad(loss)(params, batch)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam computes float ** int32 (its step count)
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  step = jax.jit(step) if use_jit else step
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_pruned_weights_stay_exactly_zero_for_100_steps(setup):
  cfg, params, batch = setup
  masks = topk_masks(magnitude_scores(params), 0.5)
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), prune_updates(masks=masks))
  out, state = _train(cfg, params, batch, tx, 100)
  for path, m in leaf_masks(masks).items():
    w = np.asarray(_flat(out)[path])
    assert (w[~np.asarray(m)] == 0).all()  # exactly zero, not just small
    assert (w[np.asarray(m)] != np.asarray(_flat(params)[path])[np.asarray(m)]).mean() > 0.9  # the rest trained
  assert sparsity(out).total == 0.5
  assert int(find_pruning_state(state).count) == 100


def _flat(tree):
  from jaxprune._tree import leaves_with_paths
  return dict(leaves_with_paths(tree))


def test_jit_and_no_jit_agree(setup):
  cfg, params, batch = setup
  tx = optax.chain(optax.adam(1e-2), prune_updates(Polynomial(sparsity=0.6, begin_step=0, end_step=4, frequency=2)))
  a, sa = _train(cfg, params, batch, tx, 6, use_jit=True)
  b, sb = _train(cfg, params, batch, tx, 6, use_jit=False)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(find_pruning_state(sa).masks), jax.tree.leaves(find_pruning_state(sb).masks)):
    np.testing.assert_array_equal(x, y)


def test_polynomial_schedule_follows_formula_and_masks_only_grow(setup):
  cfg, params, batch = setup
  sched = Polynomial(sparsity=0.8, begin_step=2, end_step=12, frequency=2)
  for t in range(16):
    s, now = sched(jnp.int32(t))
    tt = min(max(t - 2, 0), 10)
    assert float(s) == pytest.approx(0.8 * (1 - (1 - tt / 10) ** 3), abs=1e-6)
    assert bool(now) == (2 <= t <= 12 and (t - 2) % 2 == 0)
  tx = optax.chain(optax.sgd(1e-2), prune_updates(sched))
  state = tx.init(params)
  loss = loss_fn_for(cfg)
  step = jax.jit(lambda p, st: tx.update(jax.grad(loss)(p, batch), st, p))
  prev = None
  for t in range(14):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    masks = find_pruning_state(state).masks
    if prev is not None:
      for m0, m1 in zip(jax.tree.leaves(prev), jax.tree.leaves(masks)):
        assert not (np.asarray(m1) & ~np.asarray(m0)).any()  # nothing revives
    last_update = 2 + 2 * ((min(t, 12) - 2) // 2) if t >= 2 else None
    want = float(sched(jnp.int32(last_update))[0]) if last_update is not None else 0.0
    for m in leaf_masks(masks).values():  # layer scope: every leaf exactly at the last target
      assert int((~m).sum()) == num_pruned(np.float32(want), m.size)
    prev = masks
  assert abs(sparsity(params).total - 0.8) < 1e-2


def test_one_shot_and_iterative(setup):
  cfg, params, batch = setup
  tx = optax.chain(optax.sgd(1e-3), prune_updates(OneShot(sparsity=0.5, step=3)))
  out, st = _train(cfg, params, batch, tx, 3)
  assert sparsity(out).total == 0.0
  out, st = _train(cfg, params, batch, tx, 4)
  assert sparsity(out).total == 0.5 and sparsity(find_pruning_state(st).masks).total == 0.5
  it = Iterative(sparsity=0.75, cycles=2, period=5, start=1)
  got = [(round(float(it(jnp.int32(t))[0]), 6), bool(it(jnp.int32(t))[1])) for t in (0, 1, 6, 11)]
  assert got[1] == (0.5, True) and got[2] == (0.75, True) and not got[0][1] and not got[3][1]


def test_nm_through_the_transformation(setup):
  cfg, params, batch = setup
  tx = optax.chain(optax.adam(1e-2), prune_updates(OneShot(sparsity=0.5, step=0), pattern="2:4"))
  out, _ = _train(cfg, params, batch, tx, 10)
  w = np.asarray(out["layers_0"]["mlp"]["down_proj"]["kernel"])  # (24, 16)
  np.testing.assert_array_equal((w.reshape(6, 4, 16) != 0).sum(1), 2)


def test_bad_inputs(setup):
  cfg, params, batch = setup
  masks = dense_masks(params)
  del masks["layers_1"]
  with pytest.raises(ValueError, match="does not match"):
    prune_updates(masks=masks).init(params)
  tx = prune_updates()
  with pytest.raises(ValueError, match="needs params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="sparsity must be in"):
    Polynomial(sparsity=1.0, begin_step=0, end_step=10)
  with pytest.raises(ValueError, match="end_step"):
    Polynomial(sparsity=0.5, begin_step=5, end_step=5)
  with pytest.raises(ValueError, match="N:M"):
    prune_updates(pattern="4:2")
  assert isinstance(tx.init(params), PruningState)


@pytest.mark.parametrize("make,match", [
    (lambda: OneShot(sparsity=0.5, step=None), "step must be an int"),
    (lambda: OneShot(sparsity=0.5, step=True), "step must be an int"),
    (lambda: Iterative(sparsity=0.5, cycles=2, period=None), "period must be an int"),
    (lambda: Polynomial(sparsity=0.5, begin_step=0, end_step=10.5), "end_step must be an int"),
    (lambda: Polynomial(sparsity=0.5, begin_step=0, end_step="10"), "end_step must be an int"),
    (lambda: Polynomial(sparsity=0.5, begin_step=0, end_step=2**40), r"end_step must be an int in \[0, 2147483647\]"),
    (lambda: Iterative(sparsity=0.5, cycles=2, period=2**40), r"period must be an int in \[1, 2147483647\]"),
    (lambda: Polynomial(sparsity=0.5, initial_sparsity=0.9, begin_step=0, end_step=10), "initial_sparsity must be <="),
    (lambda: prune_updates("poly"), "schedule must be"),
])
def test_bad_schedules_fail_at_construction(make, match):
  """Each failed later (TypeError deep in a comparison, an int32 overflow in jit) or ran silently before."""
  with pytest.raises(ValueError, match=match):
    make()
