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
