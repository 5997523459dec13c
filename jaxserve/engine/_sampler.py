"""Device-side sampling: penalties, temperature, top-k / top-p / min-p, per-row seeds, logprobs."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static choices (part of the jit key): which processing steps any row of the batch needs."""

  all_greedy: bool = True
  use_top_k_top_p: bool = False
  use_min_p: bool = False
  use_penalties: bool = False
  use_ban: bool = False
  num_logprobs: int | None = None  # top-k logprobs to return (None: no logprobs at all)


class SamplingTensors(NamedTuple):
  """Per-row sampling inputs ``[R]`` (rows may repeat a logits row: ``n`` samples of one prompt)."""

  row_index: Array  # [R] int32: logits row to sample from
  temperature: Array  # [R] float32 (0: greedy)
  top_k: Array  # [R] int32 (vocab size when disabled)
  top_p: Array  # [R] float32
  min_p: Array  # [R] float32
  repetition_penalty: Array  # [R] float32
  presence_penalty: Array  # [R] float32
  frequency_penalty: Array  # [R] float32
  seed: Array  # [R, 2] uint32: the request's seed
  counter: Array  # [R, 2] int32: (completion index, output position): the row's own random stream
  prompt_mask: Array | None  # [R, V] bool: token occurs in the prompt (penalties only)
  output_counts: Array | None  # [R, V] int32: occurrences in the output so far (penalties only)
  banned: Array | None  # [R, V] bool: stop tokens masked before min_tokens


class SamplerOutput(NamedTuple):
  tokens: Array  # [R] int32
  logprob: Array | None  # [R] float32: sampled token's log-probability under the model
  rank: Array | None  # [R] int32: its rank (1 = most likely)
  top_ids: Array | None  # [R, K] int32
  top_logprobs: Array | None  # [R, K] float32


def apply_penalties(logits: Array, prompt_mask: Array, output_counts: Array, repetition: Array,
                    presence: Array, frequency: Array) -> Array:
  """vLLM's penalties: repetition over prompt and output tokens, presence and frequency over the output."""
  seen = prompt_mask | (output_counts > 0)
  rep = repetition[:, None]
  logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
  counts = output_counts.astype(logits.dtype)
  return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def top_k_top_p_min_p(logits: Array, top_k: Array, top_p: Array, min_p: Array, *, use_top_k_top_p: bool = True,
                      use_min_p: bool = True) -> Array:
  """Masks (to -inf) tokens outside the top k, outside the top-p nucleus, or below min_p times the max.

  Top-p is taken over the distribution left after top-k, as vLLM does; the most likely token always survives.
  """
  if use_top_k_top_p:
    v = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(top_k, 1, v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    in_top_k = jnp.arange(v)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    keep = keep.at[:, 0].set(True)
    last_kept = jnp.sum(keep, axis=-1, keepdims=True) - 1
    cutoff = jnp.maximum(kth, jnp.take_along_axis(sorted_desc, last_kept, axis=-1))
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  if use_min_p:
    probs = jax.nn.softmax(logits, axis=-1)
    logits = jnp.where(probs < min_p[:, None] * probs.max(-1, keepdims=True), -jnp.inf, logits)
  return logits


def _row_keys(seed: Array, counter: Array) -> Array:
  def one(s, c):
    key = jax.random.fold_in(jax.random.PRNGKey(s[0]), s[1])
    return jax.random.fold_in(jax.random.fold_in(key, c[0]), c[1])
  return jax.vmap(one)(seed, counter)


def sample(logits: Array, t: SamplingTensors, cfg: SamplerConfig) -> SamplerOutput:
  """Samples one token per row of ``t`` from ``logits[t.row_index]`` (``[N, V]`` float32)."""
  raw = logits[t.row_index]
  x = raw
  if cfg.use_ban:
    x = jnp.where(t.banned, -jnp.inf, x)
  if cfg.use_penalties:
    x = apply_penalties(x, t.prompt_mask, t.output_counts, t.repetition_penalty, t.presence_penalty,
                        t.frequency_penalty)
  greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
  if cfg.all_greedy:
    tokens = greedy
  else:
    temp = jnp.where(t.temperature > 0, t.temperature, 1.0)
    x = top_k_top_p_min_p(x / temp[:, None], t.top_k, t.top_p, t.min_p, use_top_k_top_p=cfg.use_top_k_top_p,
                          use_min_p=cfg.use_min_p)
    keys = _row_keys(t.seed, t.counter)
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (x.shape[-1],), jnp.float32))(keys)
    sampled = jnp.argmax(x + gumbel, axis=-1).astype(jnp.int32)  # Gumbel-max == categorical
    tokens = jnp.where(t.temperature > 0, sampled, greedy)
  if cfg.num_logprobs is None:
    return SamplerOutput(tokens, None, None, None, None)
  logp = jax.nn.log_softmax(raw, axis=-1)
  lp = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  rank = jnp.sum(logp > lp[:, None], axis=-1).astype(jnp.int32) + 1
  top_lp, top_ids = jax.lax.top_k(logp, cfg.num_logprobs) if cfg.num_logprobs else (None, None)
  return SamplerOutput(tokens, lp, rank, top_ids, top_lp)


def reference_processed_logits(logits: np.ndarray, *, prompt: list[int], output: list[int], temperature: float,
                               top_k: int, top_p: float, min_p: float, repetition_penalty: float,
                               presence_penalty: float, frequency_penalty: float) -> np.ndarray:
  """One row, plain numpy: the specification of penalties, temperature and the top-k/top-p/min-p masks."""
  x = np.array(logits, np.float64)
  for tok in set(prompt) | set(output):
    x[tok] = x[tok] / repetition_penalty if x[tok] > 0 else x[tok] * repetition_penalty
  for tok in set(output):
    x[tok] -= frequency_penalty * output.count(tok) + presence_penalty
  if temperature > 0:
    x = x / temperature
  order = np.argsort(-x, kind="stable")
  keep = np.zeros(x.shape, bool)
  k = x.size if top_k <= 0 else min(top_k, x.size)
  kept = order[:k]
  p = np.exp(x[kept] - x[kept].max())
  p /= p.sum()
  mass = 0.0
  for i, tok in enumerate(kept):
    if i == 0 or mass < top_p:
      keep[tok] = True
    mass += p[i]
  x = np.where(keep, x, -np.inf)
  if min_p > 0:
    p = np.exp(x - x.max())
    p /= p.sum()
    x = np.where(p < min_p * p.max(), -np.inf, x)
  return x
