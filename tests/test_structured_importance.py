"""Group importance against slow references: member slices by hand, full-batch and per-example gradients, exact Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._hessian import exact_hessian_diagonal
from jaxprune.structured import (AGGREGATIONS, GradientStats, Importance, calibration_gradients, lm_loss,
                                 unit_scores)
from jaxserve.testing import tiny_model


def _model(kv_heads=2):
  """A tiny model whose every parameter (biases and norms included) is random and nonzero."""
  cfg, params = tiny_model(seed=3, num_heads=4, num_kv_heads=kv_heads, num_layers=2, attention_bias=True,
                           attention_out_bias=True, intermediate_size=40, hidden_size=32, head_dim=8)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  return cfg, jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _windows(cfg, n=6, t=12, seed=0):
  w = np.random.default_rng(seed).integers(3, cfg.vocab_size, (n, t + 1))
  w[:, 0] = cfg.bos_token_id
  return jnp.asarray(w, jnp.int32)


def _members(params, cfg, unit, layer):
  """Per member (in 'first' order), a list over units of the member's slice: the slow, explicit specification."""
  d = cfg.head_dim
  if unit in ("attn", "head", "mlp"):
    blk = params[f"layers_{layer}"]
    a, m = blk["self_attn"], blk["mlp"]
    if unit == "mlp":
      n = cfg.ffn(layer)
      return [[x["kernel"][:, c] for c in range(n)] for x in (m["gate_proj"], m["up_proj"])] + \
             [[m["down_proj"]["kernel"][c, :] for c in range(n)]]
    width = d * (cfg.heads(layer) // cfg.kv_heads(layer)) if unit == "attn" else d
    n = cfg.kv_heads(layer) if unit == "attn" else cfg.heads(layer)
    q = lambda u: slice(u * width, (u + 1) * width)
    kv = lambda u: slice(u * d, (u + 1) * d)
    out = [[a["q_proj"]["kernel"][:, q(u)] for u in range(n)], [a["q_proj"]["bias"][q(u)] for u in range(n)]]
    if unit == "attn":
      for name in ("k_proj", "v_proj"):
        out += [[a[name]["kernel"][:, kv(u)] for u in range(n)], [a[name]["bias"][kv(u)] for u in range(n)]]
    return out + [[a["o_proj"]["kernel"][q(u), :] for u in range(n)]]
  if unit == "hidden":
    n = cfg.hidden_size
    out = [[params["embed_tokens"]["embedding"][:, c] for c in range(n)]]
    for i in range(cfg.num_layers):
      blk = params[f"layers_{i}"]
      for mod, name in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                        ("mlp", "gate_proj"), ("mlp", "up_proj")):
        out.append([blk[mod][name]["kernel"][c, :] for c in range(n)])
      out.append([blk["self_attn"]["o_proj"]["kernel"][:, c] for c in range(n)])
      out.append([blk["self_attn"]["o_proj"]["bias"][c] for c in range(n)])
      out.append([blk["mlp"]["down_proj"]["kernel"][:, c] for c in range(n)])
      out += [[blk[nm]["scale"][c] for c in range(n)] for nm in ("input_layernorm", "post_attention_layernorm")]
    out.append([params["norm"]["scale"][c] for c in range(n)])
    out.append([params["lm_head"]["kernel"][c, :] for c in range(n)])
    return out
  raise AssertionError(unit)


def _reference(values, cfg, unit, layer, reduce, aggregation):
  members = np.array([[float(reduce(np.asarray(s, np.float64))) for s in m] for m in _members(values, cfg, unit, layer)])
  if aggregation == "prod":
    return np.log(members).sum(0)
  return {"sum": members.sum(0), "mean": members.mean(0), "max": members.max(0), "first": members[0]}[aggregation]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("unit", ["attn", "head", "mlp", "hidden"])
def test_magnitude_scores_match_explicit_slices(unit, aggregation):
  cfg, params = _model()
  np_params = jax.tree.map(np.asarray, params)
  for kind, reduce in (("l1", lambda s: np.abs(s).sum()), ("l2", lambda s: np.square(s).sum())):
    got = unit_scores(params, cfg, Importance(kind=kind, aggregation=aggregation), unit)
    for layer in ([-1] if unit == "hidden" else range(cfg.num_layers)):
      want = _reference(np_params, cfg, unit, layer, reduce, aggregation)
      np.testing.assert_allclose(got[layer], want, rtol=1e-5, atol=1e-6)


def test_layer_scores_sum_every_block_parameter():
  cfg, params = _model()
  got = unit_scores(params, cfg, Importance(kind="l1"), "layer")[-1]
  want = [sum(float(np.abs(np.asarray(x)).sum()) for x in jax.tree.leaves(params[f"layers_{i}"]))
          for i in range(cfg.num_layers)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_taylor_variants_match_explicit_formulas():
  cfg, params = _model()
  w = _windows(cfg)
  grad = jax.jit(jax.grad(lm_loss), static_argnums=1)
  g = grad(params, cfg, w)  # reference: one gradient of the mean loss over all windows
  per_example = [grad(params, cfg, w[i:i + 1]) for i in range(len(w))]
  fisher = jax.tree.map(lambda *gs: sum(x ** 2 for x in gs) / len(gs), *per_example)
  stats = calibration_gradients(params, cfg, w, Importance(taylor="param_second", micro_batch=4))
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
  jax.tree.map(close, stats.grad, g)
  jax.tree.map(close, stats.curvature, fisher)
  P, G, F = (jax.tree.map(lambda x: np.asarray(x, np.float64), t) for t in (params, g, fisher))
  formulas = {
      "param_first": lambda p, g_, f: np.abs(p * g_),
      "param_second": lambda p, g_, f: np.abs(p * f * p),
      "param_mix": lambda p, g_, f: np.abs(p * g_ - 0.5 * p * f * p),
  }
  for variant, fn in formulas.items():
    sal = jax.tree.map(fn, P, G, F)
    got = unit_scores(params, cfg, Importance(taylor=variant), "mlp", stats=GradientStats(g, fisher))
    for layer in range(cfg.num_layers):
      want = _reference(sal, cfg, "mlp", layer, np.sum, "sum")
      np.testing.assert_allclose(got[layer], want, rtol=1e-4)
  # vectorize: |sum W g| over each channel of each member, then summed over the group's channels
  got = unit_scores(params, cfg, Importance(taylor="vectorize"), "attn", stats=GradientStats(g, None))
  wg = jax.tree.map(lambda p, g_: p * g_, P, G)
  for layer in range(cfg.num_layers):
    members = _members(wg, cfg, "attn", layer)
    channel_axis = [1, 0, 1, 0, 1, 0, 0]  # q kernel cols, q bias, k cols, k bias, v cols, v bias, o rows
    want = sum(np.array([np.abs(s.sum(axis=1 - ax) if s.ndim == 2 else s).sum() for s in m])
               for m, ax in zip(members, channel_axis))
    np.testing.assert_allclose(got[layer], want, rtol=1e-4)


def test_hutchinson_curvature_converges_to_the_exact_hessian_diagonal():
  cfg, params = tiny_model(seed=0, num_layers=1, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1,
                           head_dim=8, vocab_size=64)
  w = _windows(cfg, n=2, t=8)
  leaf = "layers_0/post_attention_layernorm/scale"
  exact = exact_hessian_diagonal(lambda p, b: lm_loss(p, cfg, b), params, [w], include=leaf)
  exact = exact["layers_0"]["post_attention_layernorm"]["scale"]
  errors = []
  for probes in (4, 64):
    est = calibration_gradients(params, cfg, w, Importance(taylor="param_second", hessian="hutchinson",
                                                            hutchinson_probes=probes, micro_batch=2),
                                key=jax.random.PRNGKey(1)).curvature
    errors.append(float(jnp.linalg.norm(est["layers_0"]["post_attention_layernorm"]["scale"] - exact)))
  assert errors[1] < 0.5 * errors[0]  # the error falls as 1/sqrt(k): 1/4 expected


def test_random_scores_are_seeded():
  cfg, params = _model()
  a = unit_scores(params, cfg, Importance(kind="random"), "mlp", seed=1)
  b = unit_scores(params, cfg, Importance(kind="random"), "mlp", seed=1)
  c = unit_scores(params, cfg, Importance(kind="random"), "mlp", seed=2)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])


def test_bad_importance_settings():
  with pytest.raises(ValueError, match="taylor must be one of"):
    Importance(taylor="param_third")
  with pytest.raises(ValueError, match="aggregation must be one of"):
    Importance(aggregation="median")
  cfg, params = _model()
  with pytest.raises(ValueError, match="unit_kind must be one of"):
    unit_scores(params, cfg, Importance(kind="l1"), "neuron")
