"""LoRA recovery: adapters start as a no-op, merge exactly, accumulate gradients exactly, and lower the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.structured import LoraConfig, finetune_lora, init_lora, lm_loss, merge_lora
from jaxprune._data import Windows
from jaxprune._train import split, train_step
from jaxprune.structured._lora import _is_adapter, _optimizer, lora_loss_fn
from jaxserve.testing import tiny_model


def _model():
  return tiny_model(seed=0, num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=32, head_dim=8,
                    intermediate_size=48, vocab_size=64)


def test_adapters_start_as_a_no_op_and_merge_exactly():
  cfg, params = _model()
  lc = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
  lora = init_lora(params, lc, jax.random.PRNGKey(0))
  assert sorted(lora) == ["layers_0/mlp/down_proj/kernel", "layers_0/self_attn/q_proj/kernel",
                          "layers_1/mlp/down_proj/kernel", "layers_1/self_attn/q_proj/kernel"]
  jax.tree.map(np.testing.assert_array_equal, merge_lora(params, lora, lc.scale), params)
  key = jax.random.PRNGKey(1)
  lora = jax.tree.map(lambda x: jax.random.normal(key, x.shape), lora)
  merged = merge_lora(params, lora, lc.scale)
  a, b = lora["layers_1/mlp/down_proj/kernel"]["a"], lora["layers_1/mlp/down_proj/kernel"]["b"]
  w = params["layers_1"]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_allclose(merged["layers_1"]["mlp"]["down_proj"]["kernel"], w + 2.0 * np.asarray(a) @ np.asarray(b),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(merged["layers_0"]["mlp"]["up_proj"]["kernel"], params["layers_0"]["mlp"]["up_proj"]["kernel"])


def test_accumulated_micro_batches_equal_one_full_batch_step():
  cfg, params = _model()
  lc = LoraConfig(rank=4, steps=10, learning_rate=1e-2)
  windows = np.random.default_rng(0).integers(3, 64, (8, 13)).astype(np.int32)
  windows[:, 0] = 1
  lora = init_lora(params, lc, jax.random.PRNGKey(0))
  lora = jax.tree.map(lambda x: x + 0.01, lora)  # nonzero B so that every adapter gets a gradient
  tx = _optimizer(lc)
  results = []
  for shape in ((1, 8, 13), (4, 2, 13)):  # one batch of 8 vs four accumulated micro-batches of 2
    trained, frozen = split({"model": params, "lora": jax.tree.map(jnp.copy, lora)}, _is_adapter)
    w = jnp.asarray(windows.reshape(shape))
    trained, _, loss = train_step(trained, tx.init(trained), frozen, Windows(w[..., :-1], w[..., 1:]),
                                  loss_fn=lora_loss_fn(cfg, lc.scale), update=tx.update)
    results.append((trained["lora"], float(loss)))
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), results[0][0], results[1][0])


def test_finetuning_lowers_the_loss_and_leaves_other_weights_alone():
  cfg, params = _model()
  text = np.tile(np.arange(5, 25, dtype=np.int32), 400)  # a learnable periodic stream
  lc = LoraConfig(rank=4, steps=40, learning_rate=2e-2, batch_size=8, micro_batch=4, seq_len=20)
  out = finetune_lora(params, cfg, text, lc)
  assert len(out.losses) == 40 and out.losses[-1] < 0.5 * out.losses[0]
  windows = np.concatenate([[[1]] * 4, np.stack([text[i:i + 20] for i in range(4)])], axis=1).astype(np.int32)
  assert float(lm_loss(out.params, cfg, jnp.asarray(windows))) < 0.5 * float(lm_loss(params, cfg, jnp.asarray(windows)))
  for name in ("embed_tokens", "norm", "lm_head"):
    jax.tree.map(np.testing.assert_array_equal, out.params[name], params[name])
  assert not np.array_equal(out.params["layers_0"]["mlp"]["up_proj"]["kernel"], params["layers_0"]["mlp"]["up_proj"]["kernel"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "rank must be >= 1"),
    (dict(targets=("q_proj", "lm_head")), "targets must be a non-empty subset"),
    (dict(batch_size=10, micro_batch=4), "multiple of micro_batch"),
    (dict(learning_rate=0.0), "learning_rate must be a positive"),
])
def test_bad_lora_settings(kwargs, message):
  with pytest.raises(ValueError, match=message):
    LoraConfig(**kwargs)


def test_bad_recovery_text():
  cfg, params = _model()
  with pytest.raises(ValueError, match="at least seq_len"):
    finetune_lora(params, cfg, np.arange(10), LoraConfig(seq_len=32))
