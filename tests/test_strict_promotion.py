"""The library in a program that runs JAX strict: no implicit dtype promotion, no implicit rank promotion.

The whole suite runs strict (tests/conftest.py); these tests set the modes themselves with JAX's
thread-local context managers, so they hold whatever the session's settings are. They cover what a
user does end to end: prune (every method), fine-tune with the default optimizer and with their own
optax ``tx``, and ``LLM.generate`` of a few tokens from a float32 and a bfloat16 model, dense and
2:4-pruned, greedy and sampled. Any library line that relies on implicit promotion fails here.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune import FinetuneConfig, PruneConfig, Windows
from jaxprune._data import loss_fn_for
from jaxserve.engine import LLM, SamplingParams
from jaxserve.generate import generate
from jaxserve.loaders import LoadedModel
from jaxserve.testing import tiny_model

SMALL = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=1, head_dim=8)


@contextlib.contextmanager
def strict():
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    yield


def _windows(n=4, t=16, seed=0):
  targets = np.random.default_rng(seed).integers(3, SMALL["vocab_size"], (n, t)).astype(np.int32)
  return Windows(np.concatenate([np.ones((n, 1), np.int32), targets[:, :-1]], 1), targets)


def test_strict_mode_rejects_implicit_promotion():
  """The modes are in force: what the tests below rely on to fail on a promotion regression."""
  x = jax.numpy.ones((2, 3), jax.numpy.float32)
  with strict():
    with pytest.raises(jax.dtypes.TypePromotionError):
      x * jax.numpy.ones((2, 3), jax.numpy.bfloat16)
    with pytest.raises(jax.dtypes.TypePromotionError):
      jax.numpy.ones((), jax.numpy.int32) * 0.5
    with pytest.raises(ValueError, match="rank_promotion"):
      x * jax.numpy.ones((3,), jax.numpy.float32)


@pytest.mark.parametrize("method", jaxprune.METHODS)
def test_every_pruning_method_runs_strict(method):
  cfg, params = tiny_model(seed=0, **SMALL)
  with strict():
    res = jaxprune.prune(params, cfg, PruneConfig(method=method, sparsity=0.5), _windows())
  assert jaxprune.sparsity(res.masks).total == pytest.approx(0.5, abs=0.01)


def test_finetune_and_train_with_a_users_tx_run_strict():
  cfg, params = tiny_model(seed=0, **SMALL)
  res = jaxprune.prune(params, cfg, PruneConfig(method="magnitude", sparsity=0.5))
  stream = np.tile(np.arange(3, 19, dtype=np.int32), 16)
  w = _windows()
  tx = optax.chain(optax.adam(1e-2), jaxprune.prune_updates(masks=res.masks))  # optax's Adam: float ** int32 inside
  with strict():
    ft = jaxprune.finetune(res.params, cfg, res.masks, stream,  # default AdamW on a warmup-cosine schedule
                           FinetuneConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1))
    out = jaxprune.train(res.params, loss_fn_for(cfg), lambda step: Windows(w.inputs[None], w.targets[None]), 3,
                         tx=tx)
  for losses in (ft.losses, out.losses):
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
  for trained in (ft.params, out.params):
    assert jaxprune.sparsity(trained).total == 0.5  # pruned weights stayed exactly zero


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llm_generate_runs_strict(dtype):
  cfg, params = tiny_model(seed=1, dtype=dtype)
  pruned = jaxprune.prune(params, cfg, PruneConfig(method="magnitude", pattern="2:4")).params
  prompts = [[5, 9, 17], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
  greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
  sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.1, max_tokens=4,
                           ignore_eos=True, seed=3)
  for p in (params, pruned):
    want = [generate(p, cfg, [q], 4)[0] for q in prompts]
    with strict():
      llm = LLM(LoadedModel(cfg, p, None), block_size=8, max_num_batched_tokens=16, max_num_seqs=4,
                compilation_cache=False)
      out = llm.generate([{"prompt_token_ids": q} for q in prompts], [greedy, sampled], use_tqdm=False)
    assert len(out[1].outputs[0].token_ids) == 4
    assert all(0 <= t < cfg.vocab_size for t in out[1].outputs[0].token_ids)
    if dtype == "float32":  # bfloat16 rounding may differ between the paged and the contiguous path
      assert out[0].outputs[0].token_ids == want[0]
