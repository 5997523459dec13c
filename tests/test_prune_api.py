"""The prune() entry point on tiny models: every method, exact targets, N:M reporting, input checks, fine-tuning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune._data import Windows, lm_loss
from jaxprune._finetune import FinetuneConfig, finetune
from jaxprune._masks import dense_masks, leaf_masks, prunable_paths, sparsity
from jaxprune._prune import METHODS, PruneConfig, prune
from jaxprune._tree import leaves_with_paths
from jaxserve.testing import tiny_model

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1, head_dim=8)


def _windows(n=4, t=16, seed=0, vocab=32):
  targets = np.random.default_rng(seed).integers(3, vocab, (n, t)).astype(np.int32)
  return Windows(np.concatenate([np.ones((n, 1), np.int32), targets[:, :-1]], 1), targets)


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=0, **SMALL)


@pytest.mark.parametrize("method,target", [(m, dict(sparsity=0.5)) for m in METHODS] + [
    (m, dict(pattern="2:4")) for m in ("magnitude", "taylor", "wanda", "sparsegpt", "obs")])
def test_every_method_hits_the_target_exactly(model, method, target):
  cfg, params = model
  res = prune(params, cfg, PruneConfig(method=method, num_probes=2, **target), _windows())
  sizes = {p: x.size for p, x in leaves_with_paths(params)}
  assert set(res.report.achieved.per_leaf) == set(prunable_paths(params))
  assert res.report.achieved.total == 0.5 and res.report.dense_leaves == ()
  assert sparsity(res.params).total >= 0.5  # weights are zero wherever the mask prunes
  for path, m in leaf_masks(res.masks).items():
    w = np.asarray(dict(leaves_with_paths(res.params))[path])
    assert (w[~np.asarray(m)] == 0).all() and int((~np.asarray(m)).sum()) == sizes[path] // 2
    if "pattern" in target:
      np.testing.assert_array_equal(np.asarray(m).reshape(-1, 4, m.shape[1]).sum(1), 2)
  untouched = [p for p in sizes if p not in prunable_paths(params)]
  for p in untouched:  # embeddings and norms are left alone by every method
    np.testing.assert_array_equal(dict(leaves_with_paths(res.params))[p], dict(leaves_with_paths(params))[p])


def test_nm_incompatible_leaves_stay_dense_and_are_reported():
  cfg, params = tiny_model(seed=1, **{**SMALL, "intermediate_size": 20})
  for method in ("magnitude", "sparsegpt"):
    res = prune(params, cfg, PruneConfig(method=method, pattern="4:8"), _windows())
    assert res.report.dense_leaves == ("layers_0/mlp/down_proj/kernel", "layers_1/mlp/down_proj/kernel")
    assert res.masks["layers_0"]["mlp"]["down_proj"]["kernel"] is None
    np.testing.assert_array_equal(res.params["layers_0"]["mlp"]["down_proj"]["kernel"],
                                  params["layers_0"]["mlp"]["down_proj"]["kernel"])
    assert res.report.to_dict()["dense_leaves"] == list(res.report.dense_leaves)
    rep = res.report.achieved  # dense leaves count as unpruned in the achieved sparsity
    assert rep.per_leaf["layers_0/mlp/down_proj/kernel"] == 0.0 and rep.per_leaf["layers_0/mlp/up_proj/kernel"] == 0.5
    assert rep.total == pytest.approx(0.5 * (1 - 2 * 20 * 16 / rep.size))


def test_global_scope_and_iterative_rounds(model):
  cfg, params = model
  res = prune(params, cfg, PruneConfig(method="magnitude", sparsity=0.7, scope="global"))
  assert res.report.achieved.total == pytest.approx(0.7, abs=0.5 / res.report.achieved.size)
  per_leaf = res.report.achieved.per_leaf.values()
  assert max(per_leaf) - min(per_leaf) > 0.05  # global ranking gives leaves different sparsities
  it = prune(params, cfg, PruneConfig(method="magnitude", sparsity=0.5, rounds=2, round_steps=2), _windows())
  assert it.report.achieved.total == 0.5


def test_sequential_methods_use_pruned_inputs(model):
  """Block 1's solve must see inputs from the pruned block 0: pruning only block 1 differs."""
  cfg, params = model
  calib = _windows(8, 16)
  both = prune(params, cfg, PruneConfig(method="sparsegpt", sparsity=0.5), calib)
  only1 = prune(params, cfg, PruneConfig(method="sparsegpt", sparsity=0.5, include=r"layers_1/.*_proj/kernel"), calib)
  a = both.params["layers_1"]["mlp"]["up_proj"]["kernel"]
  b = only1.params["layers_1"]["mlp"]["up_proj"]["kernel"]
  assert not np.allclose(a, b)


BAD = [
    (dict(method="magnitude", sparsity=1.0), "sparsity must be in"),
    (dict(method="magnitude", sparsity=-0.2), "sparsity must be in"),
    (dict(method="sparsegpt", pattern="4:4"), "0 < N < M"),
    (dict(method="wanda", pattern="5:4"), "0 < N < M"),
    (dict(method="magnitude", sparsity=0.3, pattern="2:4"), "means sparsity"),
    (dict(method="magic", sparsity=0.5), "method must be one of"),
    (dict(method="sparsegpt", sparsity=0.5, scope="global"), "scope"),
    (dict(method="magnitude"), "give a sparsity"),
    (dict(method="magnitude", sparsity="0.5"), "sparsity must be a number"),
    (dict(method="magnitude", pattern=(2.5, 4)), "pair .* of integers"),
    (dict(method="magnitude", sparsity=0.5, rounds=2.5), "rounds must be an int >= 1"),
    (dict(method="magnitude", sparsity=0.5, batch_size="8"), "batch_size must be an int >= 1"),
    (dict(method="random", sparsity=0.5, seed="x"), "seed must be an int"),
    (dict(method="obd", sparsity=0.5, hessian="bogus"), "hessian must be"),
    (dict(method="sparsegpt", sparsity=0.5, percdamp=float("nan")), "percdamp must be a finite number"),
    (dict(method="sparsegpt", sparsity=0.5, blocksize=0), "blocksize must be an int >= 1"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_config_is_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    PruneConfig(**kwargs)


@pytest.mark.parametrize("method", ["taylor", "fisher", "obd", "wanda", "sparsegpt", "obs"])
def test_missing_calibration_is_rejected_before_work(model, method):
  cfg, params = model
  with pytest.raises(ValueError, match="needs calibration data"):
    prune(params, cfg, PruneConfig(method=method, sparsity=0.5), None)
  with pytest.raises(ValueError, match="calibration data must be"):
    prune(params, cfg, PruneConfig(method=method, sparsity=0.5), Windows(*(np.zeros((0, 4), np.int32),) * 2))


def test_nan_weights_are_rejected(model):
  cfg, params = model
  bad = jax.tree.map(lambda x: x, params)
  bad["layers_1"]["self_attn"]["o_proj"]["kernel"] = bad["layers_1"]["self_attn"]["o_proj"]["kernel"].at[0, 0].set(
      jnp.nan)
  with pytest.raises(ValueError, match="layers_1/self_attn/o_proj/kernel.*NaN"):
    prune(bad, cfg, PruneConfig(method="magnitude", sparsity=0.5))


def test_include_that_matches_nothing(model):
  cfg, params = model
  with pytest.raises(ValueError, match="no parameter path matches"):
    prune(params, cfg, PruneConfig(method="magnitude", sparsity=0.5, include="nothing_here"))
  with pytest.raises(ValueError, match="blocks' linear layers only"):
    prune(params, cfg, PruneConfig(method="sparsegpt", sparsity=0.5, include="embed_tokens"), _windows())


def test_finetune_keeps_zeros_and_lowers_loss(model):
  cfg, params = model
  res = prune(params, cfg, PruneConfig(method="magnitude", sparsity=0.5))
  stream = np.tile(np.arange(3, 19, dtype=np.int32), 64)  # a learnable periodic text
  ft = finetune(res.params, cfg, res.masks, stream,
                FinetuneConfig(steps=40, batch_size=4, seq_len=16, learning_rate=3e-2))
  assert ft.losses[-5:].mean() < 0.5 * ft.losses[:5].mean()
  for path, m in leaf_masks(res.masks).items():
    assert (np.asarray(dict(leaves_with_paths(ft.params))[path])[~np.asarray(m)] == 0).all()
  with pytest.raises(ValueError, match="does not match"):
    finetune(res.params, cfg, {"x": None}, stream, FinetuneConfig(steps=1, batch_size=1, seq_len=4))
  with pytest.raises(ValueError, match="warmup_steps"):
    FinetuneConfig(steps=10, warmup_steps=10)


def test_distillation_pulls_the_student_toward_the_teacher(model):
  cfg, params = model
  res = prune(params, cfg, PruneConfig(method="magnitude", sparsity=0.5))
  stream = np.random.default_rng(0).integers(3, 32, 4096).astype(np.int32)
  with pytest.raises(ValueError, match="teacher"):
    finetune(res.params, cfg, res.masks, stream, FinetuneConfig(steps=2, batch_size=2, seq_len=16, distill=0.5))
  from jaxprune._finetune import distill_loss
  x = _windows(4, 16)
  kl_before = float(distill_loss(res.params, params, cfg, x.inputs, x.targets, 1.0))
  ft = finetune(res.params, cfg, res.masks, stream,
                FinetuneConfig(steps=40, batch_size=4, seq_len=16, learning_rate=1e-2, distill=1.0), teacher=params)
  kl_after = float(distill_loss(ft.params, params, cfg, x.inputs, x.targets, 1.0))
  assert kl_after < 0.5 * kl_before
  assert float(distill_loss(params, params, cfg, x.inputs, x.targets, 1.0)) == pytest.approx(0.0, abs=1e-5)
  for path, m in leaf_masks(res.masks).items():
    assert (np.asarray(dict(leaves_with_paths(ft.params))[path])[~np.asarray(m)] == 0).all()


def test_prune_equals_scores_then_topk(model):
  """prune() for a score method is its score function followed by top-k (what the benchmark reuses)."""
  from jaxprune import apply_masks, magnitude_scores, nm_masks, topk_masks
  cfg, params = model
  for target, masks in ((dict(sparsity=0.4), topk_masks(magnitude_scores(params), 0.4)),
                        (dict(pattern="2:4"), nm_masks(magnitude_scores(params), "2:4"))):
    res = prune(params, cfg, PruneConfig(method="magnitude", **target))
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(apply_masks(params, masks))):
      np.testing.assert_array_equal(a, b)


def test_prune_checks_its_arguments_before_work(model):
  """A dict config or a missing model config failed with an AttributeError; a pattern that fits no leaf
  returned the model unpruned (every leaf dense, 0% sparsity) without a word."""
  cfg, params = model
  with pytest.raises(ValueError, match="config must be a PruneConfig"):
    prune(params, cfg, {"method": "magnitude", "sparsity": 0.5})
  with pytest.raises(ValueError, match="cfg must be the model's ModelConfig"):
    prune(params, None, PruneConfig(method="wanda", sparsity=0.5), _windows())
  for method in ("magnitude", "sparsegpt"):
    with pytest.raises(ValueError, match=r"pattern 2:17 fits none of the 14 selected leaves.*\[16, 24\]"):
      prune(params, cfg, PruneConfig(method=method, pattern="2:17"), _windows())


def test_finetune_refuses_bad_text_and_settings(model):
  """Token ids outside the vocabulary gave NaN losses, negative or float ids a silently wrong run, and a
  negative grad_clip or weight_decay trained in the wrong direction."""
  cfg, params = model
  masks = dense_masks(params)
  stream = np.tile(np.arange(3, 19, dtype=np.int32), 8)
  small = dict(steps=2, batch_size=2, seq_len=8)
  for ids, match in ((stream + 100, r"must be in \[0, 32\).*\[103, 118\]"), (-stream, r"must be in \[0, 32\)"),
                     (stream + 0.5, "integer token ids"), ("once upon a time", "tokenize it first")):
    with pytest.raises(ValueError, match=match):
      finetune(params, cfg, masks, ids, FinetuneConfig(**small))
  with pytest.raises(ValueError, match="exceeds the model's context of 512"):
    finetune(params, cfg, masks, np.tile(stream, 8), FinetuneConfig(steps=2, batch_size=2, seq_len=600))
  with pytest.raises(ValueError, match="config must be a FinetuneConfig"):
    finetune(params, cfg, masks, stream, {"steps": 2})
  for kw, match in ((dict(grad_clip=-1.0), "grad_clip must be a finite number > 0"),
                    (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0"),
                    (dict(learning_rate=float("inf")), "learning_rate must be a finite number > 0"),
                    (dict(steps=2.5), "steps must be an int >= 1"), (dict(seed="x"), "seed must be an int")):
    with pytest.raises(ValueError, match=match):
      FinetuneConfig(**{**small, **kw})


@pytest.mark.parametrize("ids,kw,match", [
    (np.arange(40) + 100, {}, r"token_ids must be in \[0, 32\)"),  # was NaN
    (-np.arange(40), {}, r"token_ids must be in \[0, 32\)"),  # was a finite, wrong perplexity
    (np.arange(40) + 0.5, {}, "integer token ids"),  # was truncated silently
    (np.arange(40).reshape(4, 10), {}, "1-D"),
    ("once upon a time", {}, "tokenize it first"),
    (np.arange(3, 30), dict(batch_size=-1), "batch_size must be an int >= 1"),  # was perplexity 1.0
    (np.arange(3, 30), dict(batch_size=0), "batch_size must be an int >= 1"),
    (np.arange(3, 30), dict(max_windows=-1), "max_windows must be an int >= 1"),
    (np.arange(3, 30), dict(seq_len=2.5), "seq_len must be an int >= 1"),
])
def test_perplexity_refuses_bad_input(model, ids, kw, match):
  from jaxprune import perplexity
  cfg, params = model
  with pytest.raises(ValueError, match=match):
    perplexity(params, cfg, ids, **{"seq_len": 4, **kw})
