"""One data module, one loss, one trainer, one calibration check: masked recovery and LoRA are two uses of them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
import jaxprune.structured
from jaxprune import FinetuneConfig, PruneConfig, Windows, finetune, prune
from jaxprune._cli_prune import prune_config
from jaxprune._masks import leaf_masks
from jaxprune._tree import leaves_with_paths
from jaxprune._wanda import wanda_layer
from jaxprune.cli import build_parser
from jaxserve import model
from jaxserve.testing import tiny_model

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1, head_dim=8)


def _windows(n=4, t=16, seed=0, vocab=32):
  targets = np.random.default_rng(seed).integers(3, vocab, (n, t)).astype(np.int32)
  return Windows(np.concatenate([np.ones((n, 1), np.int32), targets[:, :-1]], 1), targets)


def test_one_loss_one_result_type_for_both_halves():
  assert jaxprune.structured.lm_loss is jaxprune.lm_loss
  assert jaxprune.structured.FinetuneResult is jaxprune.FinetuneResult is jaxprune.TrainResult
  cfg, params = tiny_model(seed=0, **SMALL)
  w = _windows()
  stacked = np.concatenate([w.inputs, w.targets[:, -1:]], axis=1)  # [N, T + 1], BOS first
  assert float(jaxprune.lm_loss(params, cfg, stacked)) == pytest.approx(float(jaxprune.lm_loss(params, cfg, w)))


def test_sample_windows_layouts():
  ids = np.arange(100, dtype=np.int32)
  for distinct in (True, False):
    w = jaxprune.sample_windows(ids, nsamples=5, seq_len=8, bos_id=1, seed=3, distinct=distinct)
    assert w.inputs.shape == w.targets.shape == (5, 8)
    assert (w.inputs[:, 0] == 1).all() and (w.inputs[:, 1:] == w.targets[:, :-1]).all()
    assert (np.diff(w.targets, axis=1) == 1).all()  # contiguous slices of the stream
  starts = jaxprune.sample_windows(ids, nsamples=12, seq_len=8, bos_id=1, distinct=True).targets[:, 0]
  assert len(set(starts.tolist())) == 12 and (starts % 8 == 0).all()
  with pytest.raises(ValueError, match="asked for nsamples=13"):
    jaxprune.sample_windows(ids, nsamples=13, seq_len=8, bos_id=1)
  assert jaxprune.sample_windows(ids, nsamples=13, seq_len=8, bos_id=1, distinct=False).inputs.shape == (13, 8)


@pytest.mark.parametrize("method", ["wanda", "taylor"])
def test_prune_checks_the_vocabulary_range(method):
  cfg, params = tiny_model(seed=0, **SMALL)
  bad = Windows(np.full((2, 8), 1, np.int32), np.full((2, 8), 999, np.int32))
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 32\), got \[1, 999\]"):
    prune(params, cfg, PruneConfig(method=method, sparsity=0.5), bad)
  with pytest.raises(ValueError, match="exceed the model's context"):
    prune(params, cfg, PruneConfig(method=method, sparsity=0.5), _windows(t=cfg.max_position_embeddings + 1))


def test_train_updates_only_the_trainable_leaves_with_the_callers_tx():
  cfg, params = tiny_model(seed=0, **SMALL)
  w = _windows()
  batch = Windows(w.inputs[None], w.targets[None])
  trainable = lambda path: "/mlp/" in path
  out = jaxprune.train(params, jaxprune._data.loss_fn_for(cfg), lambda step: batch, 5, tx=optax.sgd(0.5),
                       trainable=trainable)
  assert out.losses.shape == (5,) and out.losses[-1] < out.losses[0]
  for (path, new), (_, old) in zip(leaves_with_paths(out.params), leaves_with_paths(params)):
    assert np.array_equal(new, old) != trainable(path), path
  with pytest.raises(ValueError, match="selects no parameter"):
    jaxprune.train(params, jaxprune._data.loss_fn_for(cfg), lambda step: batch, 1, trainable=lambda path: False)


@pytest.mark.parametrize("kw,match", [
    (dict(learning_rate=-1e-3), "learning_rate must be a finite number > 0"),  # trained uphill before
    (dict(learning_rate=0.0), "learning_rate must be a finite number > 0"),  # trained nothing
    (dict(learning_rate=float("nan")), "learning_rate must be a finite number > 0"),  # NaN losses
    (dict(steps=2.7), "steps must be an int >= 1"),  # ran 2 steps
    (dict(steps="3"), "steps must be an int >= 1"),  # a TypeError deep in optax
])
def test_train_refuses_bad_settings_before_a_step(kw, match):
  cfg, params = tiny_model(seed=0, **SMALL)
  w = _windows()
  steps = kw.pop("steps", 2)
  with pytest.raises(ValueError, match=match):
    jaxprune.train(params, jaxprune._data.loss_fn_for(cfg), lambda step: Windows(w.inputs[None], w.targets[None]),
                   steps, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(learning_rate=-1.0), "learning_rate must be a finite number > 0"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(warmup_steps=20), r"warmup_steps must be an int in \[0, 9\]"),
    (dict(grad_clip=-1.0), "grad_clip must be a finite number > 0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0"),
])
def test_default_optimizer_refuses_bad_settings(kw, match):
  with pytest.raises(ValueError, match=match):
    jaxprune.default_optimizer(**{"learning_rate": 1e-3, "steps": 10, **kw})


def test_random_scores_need_an_int_seed():
  _, params = tiny_model(seed=0, **SMALL)
  for seed in ("x", 1.5):
    with pytest.raises(ValueError, match="seed must be an int"):
      jaxprune.random_scores(params, seed)


def test_finetune_takes_a_tx_and_a_schedule_and_keeps_zeros():
  cfg, params = tiny_model(seed=0, **SMALL)
  res = prune(params, cfg, PruneConfig(method="magnitude", sparsity=0.5))
  stream = np.tile(np.arange(3, 19, dtype=np.int32), 64)
  seen = []
  schedule = lambda step: (seen.append(step), 3e-2 * 0.99 ** step)[1]
  ft = finetune(res.params, cfg, res.masks, stream,
                FinetuneConfig(steps=30, batch_size=4, seq_len=16, learning_rate=schedule))
  assert seen and ft.losses[-5:].mean() < 0.5 * ft.losses[:5].mean()
  sgd = finetune(res.params, cfg, res.masks, stream, FinetuneConfig(steps=3, batch_size=4, seq_len=16),
                 tx=optax.sgd(1e-2))
  for out in (ft, sgd):
    for path, m in leaf_masks(res.masks).items():
      assert (np.asarray(dict(leaves_with_paths(out.params))[path])[~np.asarray(m)] == 0).all()
  assert not np.array_equal(sgd.params["layers_0"]["mlp"]["up_proj"]["kernel"],
                            res.params["layers_0"]["mlp"]["up_proj"]["kernel"])


def test_true_sequential_is_a_choice():
  cfg, params = tiny_model(seed=0, **SMALL)
  calib = _windows(n=8, t=16)
  one = prune(params, cfg, PruneConfig(method="wanda", sparsity=0.5, true_sequential=False), calib)
  seq = prune(params, cfg, PruneConfig(method="wanda", sparsity=0.5), calib)
  assert PruneConfig(method="wanda", sparsity=0.5).true_sequential  # the default: today's behaviour
  q = lambda r: np.asarray(r.masks["layers_0"]["self_attn"]["q_proj"]["kernel"])
  o = lambda r: np.asarray(r.masks["layers_0"]["self_attn"]["o_proj"]["kernel"])
  np.testing.assert_array_equal(q(one), q(seq))  # the first group sees the same inputs either way
  # One pass: o_proj is pruned on the inputs of the unpruned block.
  x = model.embed(params, cfg, jnp.asarray(calib.inputs))
  xin = model.block_forward(params["layers_0"], cfg, 0, x, return_linear_inputs=True).linear_inputs["self_attn/o_proj"]
  xin = np.asarray(xin, np.float32).reshape(-1, xin.shape[-1])
  _, expected = wanda_layer(params["layers_0"]["self_attn"]["o_proj"]["kernel"], jnp.asarray(xin.T @ xin),
                            sparsity=0.5, scope="output")
  np.testing.assert_array_equal(o(one), np.asarray(expected))
  assert not np.array_equal(o(seq), np.asarray(expected))
  args = build_parser().parse_args(["prune", "--method", "wanda", "--sparsity", "0.5", "--out", "x",
                                    "--no-true-sequential"])
  assert prune_config(args).true_sequential is False
  args = build_parser().parse_args(["prune", "--method", "wanda", "--sparsity", "0.5", "--out", "x"])
  assert prune_config(args).true_sequential is True
