"""Scores and Hessian diagonals: HVP vs jax.hessian, Hutchinson convergence, Taylor/Fisher/OBD/Wanda."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import _hessian, _scores
from jaxprune._data import Windows, loss_fn_for
from jaxserve.testing import tiny_model

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1, head_dim=8)


@pytest.fixture(scope="module")
def model():
  cfg, params = tiny_model(seed=0, **SMALL)
  rng = np.random.default_rng(0)
  targets = rng.integers(0, 32, (4, 12)).astype(np.int32)
  inputs = np.concatenate([np.ones((4, 1), np.int32), targets[:, :-1]], axis=1)
  batches = [Windows(inputs[:2], targets[:2]), Windows(inputs[2:], targets[2:])]
  return cfg, params, batches


def test_hvp_equals_hessian_times_v():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.standard_normal((6, 6)), jnp.float32)
  def f(w):
    return jnp.sum(jnp.tanh(a @ w["x"]) ** 2) + jnp.sum(w["x"] * w["y"] ** 3)
  w = {"x": jnp.asarray(rng.standard_normal(6), jnp.float32), "y": jnp.asarray(rng.standard_normal(6), jnp.float32)}
  v = {"x": jnp.asarray(rng.standard_normal(6), jnp.float32), "y": jnp.asarray(rng.standard_normal(6), jnp.float32)}
  flat = lambda t: jnp.concatenate([t["x"], t["y"]])
  h = jax.hessian(lambda z: f({"x": z[:6], "y": z[6:]}))(flat(w))
  np.testing.assert_allclose(flat(_hessian.hvp(f, w, v)), h @ flat(v), rtol=1e-5, atol=1e-5)


def test_hvp_on_model_loss_equals_hessian(model):
  cfg, params, batches = model
  path = "layers_0/self_attn/q_proj/kernel"
  f = loss_fn_for(cfg)
  w0 = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
  g = lambda w: f(_hessian.replace_leaves(params, {path: w}), batches[0])
  v = jnp.asarray(np.random.default_rng(2).standard_normal(w0.shape), jnp.float32)
  h = jax.hessian(g)(w0).reshape(w0.size, w0.size)
  np.testing.assert_allclose(_hessian.hvp(g, w0, v).reshape(-1), h @ v.reshape(-1), rtol=1e-4, atol=1e-6)


def test_hutchinson_converges_to_exact_diagonal(model):
  cfg, params, batches = model
  f = loss_fn_for(cfg)
  inc = r"layers_0/(self_attn/q_proj|mlp/up_proj)/kernel"
  exact = _hessian.exact_hessian_diagonal(f, params, batches, include=inc)
  errs = {}
  for k in (4, 64, 1024):
    est = _hessian.hutchinson_diagonal(f, params, batches, jax.random.PRNGKey(0), num_probes=k, include=inc,
                                           probe_chunk=min(k, 128))
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(est), jax.tree.leaves(exact)))
    den = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(exact))
    errs[k] = (num / den) ** 0.5
  assert errs[1024] < errs[64] < errs[4]
  assert errs[1024] < 0.25 * errs[4]  # error ~ 1/sqrt(k): 16x fewer would be 0.0625
  assert exact["layers_0"]["mlp"]["down_proj"]["kernel"] is None


def test_exact_diagonal_rejects_big_leaves(model):
  cfg, params, batches = model
  with pytest.raises(ValueError, match="max_size"):
    _hessian.exact_hessian_diagonal(loss_fn_for(cfg), params, batches, max_size=100)


def test_taylor_and_fisher_match_definitions(model):
  cfg, params, batches = model
  f = loss_fn_for(cfg)
  path = ("layers_1", "mlp", "down_proj", "kernel")
  w = params["layers_1"]["mlp"]["down_proj"]["kernel"]
  grad = jax.jit(jax.grad(f))
  grads = [grad(params, b)["layers_1"]["mlp"]["down_proj"]["kernel"] for b in batches]
  taylor = _scores.taylor_scores(f, params, batches)
  np.testing.assert_allclose(taylor["layers_1"]["mlp"]["down_proj"]["kernel"],
                             np.abs(w * (grads[0] + grads[1]) / 2), rtol=1e-5, atol=1e-9)
  per_example = []
  for b in batches:
    for i in range(2):
      one = Windows(b.inputs[i:i + 1], b.targets[i:i + 1])
      per_example.append(grad(params, one)["layers_1"]["mlp"]["down_proj"]["kernel"])
  fisher = np.mean([np.square(g) for g in per_example], axis=0)
  got = _scores.fisher_diagonal(f, params, batches, chunk=1)
  np.testing.assert_allclose(got[path[0]][path[1]][path[2]][path[3]], fisher, rtol=1e-4, atol=1e-10)
  fs = _scores.fisher_scores(f, params, batches)
  np.testing.assert_allclose(fs["layers_1"]["mlp"]["down_proj"]["kernel"], 0.5 * fisher * np.square(w),
                             rtol=1e-4, atol=1e-12)


def test_obd_scores_are_half_h_w2(model):
  cfg, params, batches = model
  f = loss_fn_for(cfg)
  inc = r"layers_1/self_attn/v_proj/kernel"
  d = _hessian.exact_hessian_diagonal(f, params, batches, include=inc)["layers_1"]["self_attn"]["v_proj"]["kernel"]
  s = _scores.obd_scores(f, params, batches, hessian="exact", include=inc)
  w = params["layers_1"]["self_attn"]["v_proj"]["kernel"]
  np.testing.assert_allclose(s["layers_1"]["self_attn"]["v_proj"]["kernel"], 0.5 * d * w ** 2, rtol=1e-6)
  with pytest.raises(ValueError, match="hessian must be"):
    _scores.obd_scores(f, params, batches, hessian="diag")


@pytest.mark.parametrize("fn", ["taylor_scores", "fisher_scores", "obd_scores"])
@pytest.mark.parametrize("batches", [None, []])
def test_data_dependent_scores_need_calibration(model, fn, batches):
  cfg, params, _ = model
  with pytest.raises(ValueError, match="calibration data"):
    getattr(_scores, fn)(loss_fn_for(cfg), params, batches)


def test_magnitude_random_wanda():
  cfg, params = tiny_model(seed=1, **SMALL)
  m = _scores.magnitude_scores(params)
  assert m["embed_tokens"]["embedding"] is None
  np.testing.assert_array_equal(m["layers_0"]["mlp"]["up_proj"]["kernel"],
                                np.abs(params["layers_0"]["mlp"]["up_proj"]["kernel"]))
  r1, r2, r3 = (_scores.random_scores(params, s) for s in (0, 0, 1))
  a = r1["layers_0"]["mlp"]["up_proj"]["kernel"]
  np.testing.assert_array_equal(a, r2["layers_0"]["mlp"]["up_proj"]["kernel"])
  assert not np.array_equal(a, r3["layers_0"]["mlp"]["up_proj"]["kernel"])
  norm = jnp.arange(16, dtype=jnp.float32)
  w = _scores.wanda_scores(params, {"layers_0/mlp/up_proj/kernel": norm})
  np.testing.assert_allclose(w["layers_0"]["mlp"]["up_proj"]["kernel"],
                             np.abs(params["layers_0"]["mlp"]["up_proj"]["kernel"]) * np.arange(16)[:, None])
  with pytest.raises(ValueError, match="norm of shape"):
    _scores.wanda_scores(params, {"layers_0/mlp/up_proj/kernel": jnp.ones(3)})
