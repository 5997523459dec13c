"""Calibration and recovery windows: random token slices of a training text, BOS first."""

from __future__ import annotations

import numpy as np

from jaxserve.loaders import CALIB_TEXT

_DOC_SEPARATOR = "<|endoftext|>"


def text_token_ids(tokenizer, path: str | None = None) -> np.ndarray:
  """Token ids of a text file (default: the embedded TinyStories calibration text, never the evaluation text).

  ``<|endoftext|>`` separators become blank lines, the format of the evaluation text.
  """
  path = path or CALIB_TEXT
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"{path}: cannot read calibration text ({e.strerror})") from e
  text = "\n\n".join(part.strip() for part in text.split(_DOC_SEPARATOR) if part.strip())
  return np.asarray(tokenizer.encode(text), np.int32)


def calibration_windows(token_ids, num: int, seq_len: int, bos_id: int, seed: int = 0) -> np.ndarray:
  """``num`` windows ``[BOS] + ids[s : s + seq_len]`` at random offsets ``s``: int32 ``[num, seq_len + 1]``."""
  ids = np.asarray(token_ids, np.int32)
  if int(num) < 1 or int(seq_len) < 1:
    raise ValueError(f"need num >= 1 and seq_len >= 1 calibration tokens, got num={num}, seq_len={seq_len}")
  if len(ids) < seq_len:
    raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
  starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, size=int(num))
  body = ids[starts[:, None] + np.arange(seq_len)]
  return np.concatenate([np.full((int(num), 1), bos_id, np.int32), body], axis=1)
