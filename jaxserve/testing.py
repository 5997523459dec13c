"""Tiny random models for fast tests."""

from __future__ import annotations

from typing import Any

from jaxserve.config import ModelConfig
from jaxserve.model import Params, init_params


def tiny_config(**overrides: Any) -> ModelConfig:
  """A 2-layer model with GQA ratio 2, small enough for unit tests."""
  base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
  base.update(overrides)
  return ModelConfig(**base)


def tiny_model(seed: int = 0, **overrides: Any) -> tuple[ModelConfig, Params]:
  """``(cfg, params)`` of a random tiny model."""
  cfg = tiny_config(**overrides)
  return cfg, init_params(cfg, seed)


def poisoned_call(fn, *args: Any, shape: tuple[int, ...]) -> Any:
  """``fn(*args)`` as numpy, called twice, each time right after NaN-filled float32 arrays of ``shape``
  were freed (a stale allocation a kernel fails to overwrite shows as NaN); asserts neither result
  holds a NaN and both are equal, and returns the first."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  outs = []
  for _ in range(2):
    poison = [jnp.full(shape, jnp.nan, jnp.float32) for _ in range(4)]
    jax.block_until_ready(poison)
    del poison
    outs.append(np.asarray(fn(*args)))
  assert not np.isnan(outs[0]).any() and not np.isnan(outs[1]).any()
  np.testing.assert_array_equal(outs[0], outs[1])
  return outs[0]
