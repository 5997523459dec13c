"""Structured pruning: physical removal equals the masked model for every strategy and GQA ratio; counts match the ratio."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.structured import (Importance, PrunePlan, StructuredConfig, check_plan, compose, count_parameters,
                                 mask_groups, planned_layer_sizes, prune_structured, remove_groups)
from jaxserve.model import forward
from jaxserve.testing import tiny_model

GQA = [8, 4, 2]  # KV heads for 8 query heads: GQA ratios 1, 2 and 4
TAYLOR = Importance(kind="taylor", taylor="param_first", micro_batch=4)
STRATEGIES = {
    "block_kv_group": StructuredConfig(ratio=0.5, importance=TAYLOR),
    "block_query_head": StructuredConfig(ratio=0.5, attention_unit="query_head", importance=Importance(kind="l2")),
    "block_global_round8": StructuredConfig(ratio=0.4, scope="global", round_to=8, importance=Importance(kind="l1")),
    "block_iterative_ranges": StructuredConfig(ratio=0.5, iterative_steps=2, attention_layers=(1, 3),
                                               mlp_layers=(0, 2), importance=TAYLOR),
    "channel": StructuredConfig(ratio=0.25, mode="channel", round_to=8, importance=TAYLOR),
    "layer": StructuredConfig(ratio=0.4, mode="layer", importance=Importance(kind="taylor", taylor="vectorize")),
    "layer_keep": StructuredConfig(ratio=0.0, mode="layer", keep_layers=2, importance=Importance(kind="random")),
}


def _model(kv_heads, **kw):
  return tiny_model(seed=kv_heads, num_heads=8, num_kv_heads=kv_heads, num_layers=3, attention_bias=True,
                    attention_out_bias=True, **kw)


def _windows(cfg, n=8, t=16, seed=0):
  w = np.random.default_rng(seed).integers(3, cfg.vocab_size, (n, t + 1))
  w[:, 0] = cfg.bos_token_id
  return w.astype(np.int32)


def _logits(params, cfg, seed=1):
  tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 24))
  return np.asarray(forward(params, cfg, jnp.asarray(tokens)).logits)


@pytest.mark.parametrize("kv_heads", GQA)
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_removal_equals_masked_model(name, kv_heads):
  cfg, params = _model(kv_heads)
  sc = STRATEGIES[name]
  if sc.attention_unit == "query_head" and kv_heads == 8:
    with pytest.raises(ValueError, match="query heads per KV group"):
      prune_structured(params, cfg, sc, _windows(cfg))
    return
  result = prune_structured(params, cfg, sc, _windows(cfg))
  assert count_parameters(result.params) < count_parameters(params)
  small = _logits(result.params, result.cfg)
  masked = _logits(mask_groups(params, cfg, result.plan), cfg)
  dense = _logits(params, cfg)
  scale = np.abs(masked).max()
  np.testing.assert_allclose(small, masked, atol=2e-5 * scale, rtol=0)
  assert np.abs(dense - masked).max() > 1e-2 * scale  # something was really removed
  assert result.cfg.num_parameters() == count_parameters(result.params)
  sizes = planned_layer_sizes(cfg, sc)
  if sizes is not None:
    assert sizes == [(result.cfg.heads(i), result.cfg.kv_heads(i), result.cfg.ffn(i))
                     for i in range(result.cfg.num_layers)]


def _hand_masked(params, cfg, layer, kv_drop, mlp_drop, hidden_drop):
  """Independent reference: zero a KV group (its q/k/v columns, o rows), MLP channels and hidden channels by hand."""
  p = jax.tree.map(np.array, params)
  d, g = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
  a, m = p[f"layers_{layer}"]["self_attn"], p[f"layers_{layer}"]["mlp"]
  q_cols = slice(kv_drop * g * d, (kv_drop + 1) * g * d)
  kv_cols = slice(kv_drop * d, (kv_drop + 1) * d)
  a["q_proj"]["kernel"][:, q_cols] = 0
  a["q_proj"]["bias"][q_cols] = 0
  a["o_proj"]["kernel"][q_cols, :] = 0
  for name in ("k_proj", "v_proj"):
    a[name]["kernel"][:, kv_cols] = 0
    a[name]["bias"][kv_cols] = 0
  m["gate_proj"]["kernel"][:, mlp_drop] = 0
  m["up_proj"]["kernel"][:, mlp_drop] = 0
  m["down_proj"]["kernel"][mlp_drop, :] = 0
  p["embed_tokens"]["embedding"][:, hidden_drop] = 0
  p["lm_head"]["kernel"][hidden_drop, :] = 0
  for i in range(cfg.num_layers):
    blk = p[f"layers_{i}"]
    blk["self_attn"]["o_proj"]["kernel"][:, hidden_drop] = 0
    blk["self_attn"]["o_proj"]["bias"][hidden_drop] = 0
    blk["mlp"]["down_proj"]["kernel"][:, hidden_drop] = 0
  return p


@pytest.mark.parametrize("kv_heads", GQA)
def test_removal_matches_hand_written_mask(kv_heads):
  cfg, params = _model(kv_heads)
  kv_drop, mlp_drop, hidden_drop = 1, [0, 5, 17, 95], [3, 10, 11, 40, 63]
  g = cfg.num_heads // kv_heads
  plan = PrunePlan.full(cfg)
  plan = plan.with_layer("kv_heads", 1, [k for k in range(kv_heads) if k != kv_drop])
  plan = plan.with_layer("heads", 1, [h for h in range(cfg.num_heads) if h // g != kv_drop])
  plan = plan.with_layer("mlp", 1, [c for c in range(cfg.intermediate_size) if c not in mlp_drop])
  plan = plan.replace(hidden=[c for c in range(cfg.hidden_size) if c not in hidden_drop])
  small, small_cfg = remove_groups(params, cfg, plan)
  assert (small_cfg.hidden_size, small_cfg.kv_heads(1), small_cfg.heads(1), small_cfg.ffn(1)) == \
      (59, kv_heads - 1, cfg.num_heads - g, 92)
  assert small_cfg.rms_norm_eps == pytest.approx(cfg.rms_norm_eps * 64 / 59)
  ref = _logits(_hand_masked(params, cfg, 1, kv_drop, mlp_drop, hidden_drop), cfg)
  np.testing.assert_allclose(_logits(small, small_cfg), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
  # kept weights are the original ones, cut out
  kept = [c for c in range(96) if c not in mlp_drop]
  keep_h = [c for c in range(64) if c not in hidden_drop]
  np.testing.assert_array_equal(small["layers_1"]["mlp"]["up_proj"]["kernel"],
                                np.asarray(params["layers_1"]["mlp"]["up_proj"]["kernel"])[np.ix_(keep_h, kept)])


def _block_units_removed(cfg, result):
  kv = [cfg.kv_heads(i) - result.cfg.kv_heads(i) for i in range(cfg.num_layers)]
  ffn = [cfg.ffn(i) - result.cfg.ffn(i) for i in range(cfg.num_layers)]
  return kv, ffn


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.7])
@pytest.mark.parametrize("round_to", [1, 8])
def test_removed_count_matches_ratio_local(ratio, round_to):
  cfg, params = tiny_model(num_heads=8, num_kv_heads=4, num_layers=2, intermediate_size=100)
  sc = StructuredConfig(ratio=ratio, round_to=round_to, importance=Importance(kind="l2"),
                        attention_layers=(0, 0) if ratio * 4 < 0.5 else None)
  result = prune_structured(params, cfg, sc)
  kv, ffn = _block_units_removed(cfg, result)
  for i in range(cfg.num_layers):
    if sc.attention_layers is None:
      assert abs(kv[i] - ratio * 4) <= 0.5  # whole KV groups: the nearest count
    kept = 100 - ffn[i]
    assert kept % round_to == 0 and abs(ffn[i] - ratio * 100) <= round_to / 2
  # parameters: each removed unit takes exactly its slices
  per_kv = cfg.hidden_size * cfg.head_dim * (2 * 2 + 2)  # 2 query heads (q, o) + k, v
  expected = sum(kv) * per_kv + sum(ffn) * 3 * cfg.hidden_size
  assert count_parameters(params) - count_parameters(result.params) == expected
  assert result.report["block_removed_fraction"] == pytest.approx(
      expected / (result.report["block_parameters_before"]))


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_removed_count_matches_ratio_global(ratio):
  cfg, params = tiny_model(num_heads=8, num_kv_heads=4, num_layers=3, intermediate_size=100)
  result = prune_structured(params, cfg, StructuredConfig(ratio=ratio, scope="global", importance=Importance(kind="l1")))
  kv, ffn = _block_units_removed(cfg, result)
  assert sum(kv) == int(np.floor(ratio * 12 + 0.5)) and sum(ffn) == int(np.floor(ratio * 300 + 0.5))
  assert all(result.cfg.kv_heads(i) >= 1 for i in range(3))


def test_channel_and_layer_counts():
  cfg, params = tiny_model(num_layers=4)
  res = prune_structured(params, cfg, StructuredConfig(ratio=0.3, mode="channel", importance=Importance(kind="l2")))
  assert res.cfg.hidden_size == 64 - round(0.3 * 64)
  res = prune_structured(params, cfg, StructuredConfig(ratio=0.5, mode="layer", importance=Importance(kind="l2")))
  assert res.cfg.num_layers == 2 and len(res.plan.layers) == 2
  assert sorted(k for k in res.params if k.startswith("layers_")) == ["layers_0", "layers_1"]


def test_layer_ranges_are_half_open_and_empty_range_prunes_nothing():
  cfg, params = tiny_model(num_heads=8, num_kv_heads=4, num_layers=4)
  res = prune_structured(params, cfg, StructuredConfig(ratio=0.5, attention_layers=(0, 0), mlp_layers=(1, 3),
                                                       importance=Importance(kind="l2")))
  assert [res.cfg.kv_heads(i) for i in range(4)] == [4, 4, 4, 4]
  assert [res.cfg.ffn(i) for i in range(4)] == [96, 48, 48, 96]
  assert not res.cfg.is_uniform


def test_iterative_composes_to_a_plan_on_the_original():
  cfg, params = tiny_model(num_heads=8, num_kv_heads=4, num_layers=2)
  sc = StructuredConfig(ratio=0.5, iterative_steps=2, importance=TAYLOR)
  res = prune_structured(params, cfg, sc, _windows(cfg))
  assert [s["step"] for s in res.report["steps"]] == [1, 2]
  assert res.report["steps"][0]["parameters"] > res.report["steps"][1]["parameters"]
  check_plan(cfg, res.plan)
  direct, direct_cfg = remove_groups(params, cfg, res.plan)
  assert direct_cfg == res.cfg
  jax.tree.map(np.testing.assert_array_equal, direct, res.params)


def test_compose_and_plan_checks():
  cfg, _ = tiny_model(num_heads=4, num_kv_heads=2, num_layers=2)
  outer = PrunePlan.full(cfg).with_layer("mlp", 0, range(10, 96)).replace(hidden=range(1, 64))
  inner = PrunePlan.full(cfg.replace(hidden_size=63, layer_intermediate_size=(86, 96))).with_layer("mlp", 0, [0, 5])
  both = compose(outer, inner)
  assert both.mlp[0] == (10, 15) and both.hidden == tuple(range(1, 64))
  with pytest.raises(ValueError, match="KV head 1 is removed"):
    check_plan(cfg, PrunePlan.full(cfg).with_layer("kv_heads", 0, [0]))
  with pytest.raises(ValueError, match="same number"):
    check_plan(cfg, PrunePlan.full(cfg).with_layer("heads", 0, [0, 1, 2]))
  with pytest.raises(ValueError, match="keeps no"):
    check_plan(cfg, PrunePlan.full(cfg).with_layer("mlp", 1, []))
  with pytest.raises(ValueError, match="increasing, distinct"):
    check_plan(cfg, PrunePlan.full(cfg).replace(hidden=[0, 0, 1]))
