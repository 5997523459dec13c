"""Calibration and training data: token windows of a text, their one validator, and the language-model loss."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.loaders import CALIB_TEXT
from jaxserve.model import forward

_STORY_SEPARATOR = "<|endoftext|>"


class Windows(NamedTuple):
  """Token windows: ``inputs`` is ``[BOS] + window[:-1]``, ``targets`` the window; both ``[N, T]`` int32."""

  inputs: Any
  targets: Any


def read_text(path: str, what: str = "calibration text") -> str:
  """Reads a UTF-8 text file; TinyStories ``<|endoftext|>`` separators are removed (the stories keep their newlines)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"{path}: cannot read {what} ({e.strerror})") from None
  if not text.strip():
    raise ValueError(f"{path}: {what} is empty")
  return text.replace(_STORY_SEPARATOR, "")


def text_token_ids(tokenizer: Any, path: str | None = None) -> np.ndarray:
  """Token ids ``[n]`` int32 of a text file (default: the embedded TinyStories training text, never the eval text)."""
  return np.asarray(tokenizer.encode(read_text(path or CALIB_TEXT)), np.int32)


def sample_windows(token_ids: Any, *, nsamples: int, seq_len: int, bos_id: int, seed: int = 0,
                   distinct: bool = True) -> Windows:
  """``nsamples`` windows of ``seq_len`` tokens of a token stream, chosen at random (seeded).

  Windows follow the evaluation protocol's layout (BOS, then the window shifted by one), so
  calibration and training see what evaluation sees.

  Args:
    token_ids: 1-D token stream.
    nsamples: number of windows.
    seq_len: tokens per window.
    bos_id: the BOS token put in front of every window's inputs.
    seed: sampling seed.
    distinct: True picks distinct non-overlapping windows (aligned to multiples of ``seq_len``;
      raises if the text holds fewer); False picks independent random offsets, which may overlap
      (training draws, and texts shorter than ``nsamples * seq_len``).

  Returns:
    ``Windows(inputs, targets)``, both ``[nsamples, seq_len]`` int32.
  """
  if int(nsamples) < 1 or int(seq_len) < 1 or (distinct and int(seq_len) < 2):
    raise ValueError(f"need nsamples >= 1 and seq_len >= {2 if distinct else 1}, got nsamples={nsamples}, "
                     f"seq_len={seq_len}")
  ids = np.asarray(token_ids, np.int32)
  if ids.ndim != 1:
    raise ValueError(f"token_ids must be a 1-D token stream, got shape {ids.shape}")
  rng = np.random.default_rng(seed)
  if distinct:
    available = len(ids) // seq_len
    if available < nsamples:
      raise ValueError(f"calibration text has {len(ids)} tokens = {available} windows of {seq_len}; "
                       f"asked for nsamples={nsamples}: use a longer text or fewer samples")
    starts = np.sort(rng.choice(available, nsamples, replace=False)) * seq_len
  else:
    if len(ids) < seq_len:
      raise ValueError(f"text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    starts = rng.integers(0, len(ids) - seq_len + 1, size=int(nsamples))
  targets = ids[starts[:, None] + np.arange(seq_len)]
  inputs = np.concatenate([np.full((int(nsamples), 1), bos_id, np.int32), targets[:, :-1]], axis=1)
  return Windows(inputs, targets)


def calibration_windows(path: str, tokenizer: Any, *, nsamples: int = 128, seq_len: int = 256, seed: int = 0,
                        bos_id: int | None = None) -> Windows:
  """Reads ``path``, tokenizes it whole and samples distinct windows (see :func:`sample_windows`)."""
  bos = bos_id if bos_id is not None else tokenizer.bos_id
  if bos is None:
    raise ValueError("the tokenizer has no BOS id; pass bos_id")
  return sample_windows(tokenizer.encode(read_text(path)), nsamples=nsamples, seq_len=seq_len, bos_id=bos, seed=seed)


def as_windows(batch: Any) -> Windows:
  """``Windows`` from ``(inputs, targets)`` ``[N, T]`` or from token windows ``[N, T + 1]`` (BOS first)."""
  if isinstance(batch, tuple):
    return Windows(*batch)
  return Windows(batch[:, :-1], batch[:, 1:])


def check_windows(windows: Any, cfg: ModelConfig, *, needed_by: str) -> Windows:
  """The one check of calibration data, before any work: shape, integer type, vocabulary range, context length.

  Args:
    windows: ``Windows`` / ``(inputs, targets)`` ``[N, T]``, or token windows ``[N, T + 1]`` (BOS first).
    cfg: the model the windows are for.
    needed_by: what needs them, for the message when they are missing (``"method 'wanda'"``).

  Returns:
    ``Windows`` of int32 numpy arrays.
  """
  if windows is None:
    raise ValueError(f"{needed_by} needs calibration data: pass calibration token windows (inputs, targets) [N, T] "
                     "or [N, T + 1] (CLI: --calib FILE; default is the embedded TinyStories train text)")
  parts = windows if isinstance(windows, tuple) else (windows,)
  if len(parts) not in (1, 2):
    raise ValueError(f"calibration data must be (inputs, targets) or one array, got a tuple of {len(parts)}")
  arrays = [np.asarray(x) for x in parts]
  for a in arrays:
    if (a.ndim != 2 or a.shape[0] == 0 or a.shape[1] < (1 if len(arrays) == 2 else 2)
        or not np.issubdtype(a.dtype, np.integer)):
      raise ValueError("calibration data must be a non-empty integer array: (inputs, targets) [N, T] or token "
                       f"windows [N, T + 1] with T >= 1, got shape {a.shape} dtype {a.dtype}")
  if len(arrays) == 2 and arrays[0].shape != arrays[1].shape:
    raise ValueError(f"calibration inputs and targets must have one shape, got {arrays[0].shape} and {arrays[1].shape}")
  lo, hi = min(int(a.min()) for a in arrays), max(int(a.max()) for a in arrays)
  if lo < 0 or hi >= cfg.vocab_size:
    raise ValueError(f"calibration token ids must be in [0, {cfg.vocab_size}), got [{lo}, {hi}]")
  w = as_windows(tuple(arrays) if len(arrays) == 2 else arrays[0])
  if w.inputs.shape[1] > cfg.max_position_embeddings:
    raise ValueError(f"calibration windows of {w.inputs.shape[1]} tokens exceed the model's context of "
                     f"{cfg.max_position_embeddings}")
  return Windows(w.inputs.astype(np.int32), w.targets.astype(np.int32))


def batches_of(windows: Any, batch_size: int) -> list[Windows]:
  """Splits windows (see :func:`as_windows`) into consecutive batches of at most ``batch_size``."""
  w = as_windows(windows)
  n = len(w.inputs)
  return [Windows(w.inputs[i:i + batch_size], w.targets[i:i + batch_size]) for i in range(0, n, batch_size)]


def next_token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean negative log-likelihood of ``targets`` ``[B, T]`` under ``logits`` ``[B, T, V]``."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1))


def lm_loss(params: Any, cfg: ModelConfig, batch: Any) -> jax.Array:
  """Mean next-token negative log-likelihood of a batch of windows (see :func:`as_windows`)."""
  inputs, targets = as_windows(batch)
  return next_token_nll(forward(params, cfg, inputs).logits, targets)


@functools.lru_cache(maxsize=32)
def loss_fn_for(cfg: ModelConfig):
  """``(params, batch) -> loss`` for a model config; the same object per config, so jitted
  functions taking it as a static argument compile once."""
  return functools.partial(_loss, cfg=cfg)


def _loss(params, batch, *, cfg):
  return lm_loss(params, cfg, batch)
