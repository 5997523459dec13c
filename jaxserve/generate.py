"""Simple batched generation with a contiguous KV cache (the reference the paged engine must match)."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model import ContiguousKVCache, Params, forward


def _sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Greedy when temperature == 0, else nucleus sampling; logits [B, V] -> ids [B]."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "temperature", "top_p"), donate_argnums=(2,))
def _step(params, cfg, kv, tokens, positions, last, key, temperature, top_p):
  out = forward(params, cfg, tokens, positions, kv=kv, attn=ContiguousKVCache(cfg.sliding_window),
                logits_index=last[:, None])
  return _sample(out.logits[:, 0], key, temperature, top_p), out.kv


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None
             ) -> list[list[int]]:
  """Generates up to ``max_new_tokens`` after each prompt; stops a row at ``eos_id`` (kept in the output).

  Prompts are right-padded into one batch; the cache is reserved for the longest prompt plus
  ``max_new_tokens`` (rounded up to a multiple of 64 to bound recompilation).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  lens = np.array([len(p) for p in prompts], np.int32)
  total = int(lens.max()) + max_new_tokens
  if total > cfg.max_position_embeddings:
    raise ValueError(f"longest prompt ({lens.max()}) + max_new_tokens ({max_new_tokens}) exceeds the "
                     f"model's context of {cfg.max_position_embeddings} tokens")
  bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
  if bad:
    raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
  b, width = len(prompts), int(lens.max())
  tokens = np.zeros((b, width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  kv = ContiguousKVCache.init(cfg, b, min(-(-total // 64) * 64, cfg.max_position_embeddings))
  key = jax.random.PRNGKey(seed)
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), (b, width))
  key, sub = jax.random.split(key)
  nxt, kv = _step(params, cfg, kv, tokens, positions, jnp.asarray(lens - 1), sub, float(temperature), float(top_p))
  outs: list[list[int]] = [[] for _ in range(b)]
  done = np.zeros(b, bool)
  pos = lens.copy()
  zero = jnp.zeros((b,), jnp.int32)
  for _ in range(max_new_tokens):
    ids = np.asarray(nxt)
    for i in range(b):
      if not done[i]:
        outs[i].append(int(ids[i]))
        done[i] = (eos_id is not None and ids[i] == eos_id) or len(outs[i]) >= max_new_tokens
    if done.all():
      break
    key, sub = jax.random.split(key)
    nxt, kv = _step(params, cfg, kv, nxt[:, None], jnp.asarray(pos)[:, None], zero, sub,
                    float(temperature), float(top_p))
    pos = pos + 1
  return outs
