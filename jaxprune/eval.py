"""Perplexity of a model on text: non-overlapping windows, BOS prepended to each, exp(mean NLL)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._validate import check_int, check_token_ids
from jaxserve.config import ModelConfig
from jaxserve.model import Params, forward


@functools.partial(jax.jit, static_argnames=("cfg",))
def _window_nll(params: Params, cfg: ModelConfig, inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Negative log-likelihood of each row of ``targets`` [B, L] given ``inputs`` [B, L]: [B]."""
  logits = forward(params, cfg, inputs).logits
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].sum(axis=-1)


def make_windows(token_ids: Sequence[int], seq_len: int, bos_id: int, max_windows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``(inputs, targets)`` of shape [N, seq_len]: inputs are ``[BOS] + window[:-1]``, targets the window."""
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  ids = np.asarray(token_ids, np.int32)
  n = len(ids) // seq_len
  if max_windows is not None:
    n = min(n, max_windows)
  if n == 0:
    raise ValueError(f"text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
  targets = ids[:n * seq_len].reshape(n, seq_len)
  inputs = np.concatenate([np.full((n, 1), bos_id, np.int32), targets[:, :-1]], axis=1)
  return inputs, targets


def perplexity(params: Params, cfg: ModelConfig, token_ids: Sequence[int], seq_len: int = 256,
               max_windows: int | None = None, batch_size: int = 16) -> float:
  """Perplexity over non-overlapping windows of ``seq_len`` tokens, each preceded by BOS.

  ppl = exp(total NLL / number of predicted tokens); every window predicts all its ``seq_len``
  tokens (the first from BOS alone). The remainder shorter than a window is dropped.
  """
  check_int("seq_len", seq_len, 1)
  if seq_len > cfg.max_position_embeddings:
    raise ValueError(f"seq_len={seq_len} exceeds the model's context of {cfg.max_position_embeddings} tokens")
  check_int("batch_size", batch_size, 1)
  if max_windows is not None:
    check_int("max_windows", max_windows, 1)
  if cfg.bos_token_id is None:
    raise ValueError("the model has no bos_token_id; the perplexity protocol prepends BOS to each window")
  token_ids = check_token_ids(token_ids, cfg.vocab_size, "perplexity token_ids")
  inputs, targets = make_windows(token_ids, seq_len, cfg.bos_token_id, max_windows)
  total = 0.0
  batch_size = min(batch_size, len(inputs))
  for start in range(0, len(inputs), batch_size):
    x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
    n = len(x)
    if n < batch_size:  # pad the last batch to keep one compiled shape; padded rows are dropped
      x, y = (np.pad(a, ((0, batch_size - n), (0, 0))) for a in (x, y))
    total += float(np.asarray(_window_nll(params, cfg, x, y))[:n].sum(dtype=np.float64))
  return math.exp(total / targets.size)


def perplexity_of_text(params: Params, cfg: ModelConfig, tokenizer, text: str, seq_len: int = 256,
                       max_windows: int | None = None, batch_size: int = 16) -> float:
  """Tokenizes ``text`` whole (no BOS) and returns :func:`perplexity`."""
  return perplexity(params, cfg, tokenizer.encode(text), seq_len, max_windows, batch_size)
