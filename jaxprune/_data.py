"""Calibration and fine-tuning data: token windows from a text file, and the language-model loss."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model import forward

_STORY_SEPARATOR = "<|endoftext|>"


class Windows(NamedTuple):
  """Token windows: ``inputs`` is ``[BOS] + window[:-1]``, ``targets`` the window; both ``[N, T]`` int32."""

  inputs: np.ndarray
  targets: np.ndarray


def read_text(path: str) -> str:
  """Reads a UTF-8 text file; TinyStories ``<|endoftext|>`` separators become blank lines."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"{path}: cannot read calibration text ({e.strerror})") from None
  if not text.strip():
    raise ValueError(f"{path}: calibration text is empty")
  return text.replace(_STORY_SEPARATOR, "")


def sample_windows(token_ids: Any, *, nsamples: int, seq_len: int, bos_id: int, seed: int = 0) -> Windows:
  """``nsamples`` distinct non-overlapping windows of ``seq_len`` tokens, chosen at random (seeded).

  Windows follow the evaluation protocol's layout (BOS, then the window shifted by one),
  so calibration sees what evaluation sees. Raises if the text holds fewer windows.
  """
  if nsamples < 1 or seq_len < 2:
    raise ValueError(f"need nsamples >= 1 and seq_len >= 2, got nsamples={nsamples}, seq_len={seq_len}")
  ids = np.asarray(token_ids, np.int32)
  available = len(ids) // seq_len
  if available < nsamples:
    raise ValueError(f"calibration text has {len(ids)} tokens = {available} windows of {seq_len}; "
                     f"asked for nsamples={nsamples}: use a longer text or fewer samples")
  picks = np.sort(np.random.default_rng(seed).choice(available, nsamples, replace=False))
  targets = np.stack([ids[i * seq_len:(i + 1) * seq_len] for i in picks])
  inputs = np.concatenate([np.full((nsamples, 1), bos_id, np.int32), targets[:, :-1]], axis=1)
  return Windows(inputs, targets)


def calibration_windows(path: str, tokenizer: Any, *, nsamples: int = 128, seq_len: int = 256, seed: int = 0,
                        bos_id: int | None = None) -> Windows:
  """Reads ``path``, tokenizes it whole and samples windows (see :func:`sample_windows`)."""
  bos = bos_id if bos_id is not None else tokenizer.bos_id
  if bos is None:
    raise ValueError("the tokenizer has no BOS id; pass bos_id")
  return sample_windows(tokenizer.encode(read_text(path)), nsamples=nsamples, seq_len=seq_len, bos_id=bos, seed=seed)


def lm_loss(params: Any, cfg: ModelConfig, batch: Windows | tuple) -> jax.Array:
  """Mean next-token negative log-likelihood of ``batch = (inputs, targets)``."""
  inputs, targets = batch
  logits = forward(params, cfg, inputs).logits
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1))


@functools.lru_cache(maxsize=32)
def loss_fn_for(cfg: ModelConfig):
  """``(params, batch) -> loss`` for a model config; the same object per config, so jitted
  functions taking it as a static argument compile once."""
  return functools.partial(_loss, cfg=cfg)


def _loss(params, batch, *, cfg):
  return lm_loss(params, cfg, batch)


def batches_of(windows: Windows, batch_size: int) -> list[Windows]:
  """Splits windows into consecutive batches of at most ``batch_size``."""
  n = len(windows.inputs)
  return [Windows(windows.inputs[i:i + batch_size], windows.targets[i:i + batch_size])
          for i in range(0, n, batch_size)]
