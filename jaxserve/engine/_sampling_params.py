"""Per-request sampling and beam-search parameters, validated at construction (mirrors vLLM)."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# Logprobs beyond this many per token are refused (vLLM's default ``max_logprobs``).
MAX_LOGPROBS = 20
# Ranges of the float fields beyond the obvious ones: the values must be finite and stay meaningful
# in float32 (a temperature of 1e30 or a penalty of 1e-30 turns logits into inf / NaN).
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
SEED_RANGE = (-(2**63), 2**64)  # what a signed or unsigned 64-bit seed can hold
# Stop lists: at most this many strings, this many token ids, this many characters in all.
MAX_STOP_STRINGS = 400
MAX_STOP_TOKEN_IDS = 400
MAX_STOP_CHARS = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
  """How to sample the completions of one request.

  Attributes:
    n: number of completions; they share the prompt's KV blocks (copy-on-write on the last one).
    temperature: 0 means greedy; otherwise logits are divided by it before sampling.
    top_p: nucleus mass in (0, 1]; 1 disables.
    top_k: keep the k most likely tokens; 0 or -1 disables (so does any k >= the vocabulary size).
    min_p: drop tokens whose probability is below ``min_p`` times the most likely one's; 0 disables.
    seed: per-request seed: the same seed and prompt give the same completions whatever else runs.
    repetition_penalty: > 1 discourages tokens already in the prompt or output (HF/vLLM rule:
      positive logits are divided by it, negative ones multiplied).
    presence_penalty: subtracted from the logit of every token already generated.
    frequency_penalty: subtracted once per earlier occurrence in the output.
    max_tokens: generate at most this many tokens (None: up to the model's context).
    min_tokens: the first this many tokens are never EOS or stop tokens (those are masked), and
      a stop string must end in the text of a later token (vLLM's rule).
    stop: strings that end the completion when they appear in its text (excluded from ``text``
      unless ``include_stop_str_in_output``).
    stop_token_ids: token ids that end the completion (kept in ``token_ids``; their text, like
      EOS's, is left out of ``text`` unless ``include_stop_str_in_output``).
    ignore_eos: keep generating past the EOS token.
    logprobs: also return the log-probabilities of the ``logprobs`` most likely tokens at each
      step, plus the sampled one's (0: only the sampled one's). None: no logprobs, and
      ``cumulative_logprob`` stays None.
    include_stop_str_in_output: keep the matched stop string (or the stop token's text) in ``text``.
    detokenize: ``False`` leaves ``text`` empty, which saves host time when only ids are needed
      (special tokens are always left out of the text).
  """

  n: int = 1
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  seed: int | None = None
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  max_tokens: int | None = 16
  min_tokens: int = 0
  stop: str | Sequence[str] | None = None
  stop_token_ids: Sequence[int] | None = None
  ignore_eos: bool = False
  logprobs: int | None = None
  include_stop_str_in_output: bool = False
  detokenize: bool = True

  def __post_init__(self):
    stop = self.stop
    if stop is not None and not isinstance(stop, (str, Sequence)):
      raise ValueError(f"stop must be a string or a list of strings, got {_short(stop)}")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    object.__setattr__(self, "stop", stop)
    _check_stops(stop, self.stop_token_ids)
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in (self.stop_token_ids or ())))
    _check_int("n", self.n, 1)
    _check_real("temperature", self.temperature, 0.0, MAX_TEMPERATURE, "[0, {hi:g}] (0: greedy)")
    _check_real("top_p", self.top_p, 0.0, 1.0, "(0, 1]", open_lo=True)
    if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
      raise ValueError(f"top_k must be an int, -1 or 0 (disabled) or >= 1, got {self.top_k!r}")
    _check_real("min_p", self.min_p, 0.0, 1.0, "[0, 1]")
    if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                  or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
      raise ValueError(f"seed must be an int in [-2**63, 2**64) or None, got {self.seed!r}")
    _check_real("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY,
                "[{lo:g}, {hi:g}] (1: off)")
    for name in ("presence_penalty", "frequency_penalty"):
      _check_real(name, getattr(self, name), -2.0, 2.0, "[-2, 2]")
    if self.max_tokens is not None:
      _check_int("max_tokens", self.max_tokens, 1)
    _check_int("min_tokens", self.min_tokens, 0)
    if self.max_tokens is not None and self.min_tokens > self.max_tokens:
      raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
    if any(t < 0 for t in self.stop_token_ids):
      raise ValueError(f"stop_token_ids must be >= 0, got {_short(list(self.stop_token_ids))}")
    if self.logprobs is not None:
      _check_int("logprobs", self.logprobs, 0)
      if self.logprobs > MAX_LOGPROBS:
        raise ValueError(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}")

  @property
  def greedy(self) -> bool:
    """True when sampling reduces to argmax (temperature 0 or top_k 1)."""
    return self.temperature == 0 or self.top_k == 1

  @property
  def has_penalties(self) -> bool:
    return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class BeamSearchParams:
  """Beam search (as vLLM's ``LLM.beam_search``): keep the ``beam_width`` best partial sequences.

  Each step every live beam proposes its ``2 * beam_width`` most likely next tokens; candidates
  ending in EOS (unless ``ignore_eos``) are set aside as finished, the best ``beam_width`` others
  continue. At the end finished and live beams are ranked by
  ``cumulative_logprob / num_output_tokens ** length_penalty``. Beams share KV blocks.
  """

  beam_width: int
  max_tokens: int
  ignore_eos: bool = False
  length_penalty: float = 1.0
  detokenize: bool = True

  def __post_init__(self):
    _check_int("beam_width", self.beam_width, 1)
    if 2 * self.beam_width > 2 * MAX_LOGPROBS:
      raise ValueError(f"beam_width must be <= {MAX_LOGPROBS}, got {self.beam_width}")
    _check_int("max_tokens", self.max_tokens, 1)
    _check_real("length_penalty", self.length_penalty, -100.0, 100.0, "[-100, 100]")


def _check_int(name: str, value: object, lo: int) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < lo:
    raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _check_real(name: str, value: object, lo: float, hi: float, shown: str, *, open_lo: bool = False) -> None:
  """``value`` must be a finite real in [lo, hi] ((lo, hi] with ``open_lo``); ``shown`` is the range as written."""
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or not (lo < value if open_lo else lo <= value) or not value <= hi:
    raise ValueError(f"{name} must be a finite number in {shown.format(lo=lo, hi=hi)}, got {value!r}")


def _check_stops(stop: tuple, stop_token_ids: object) -> None:
  """Bounds the stop lists (each is checked against every new token's text or id)."""
  if any(not isinstance(s, str) or not s for s in stop):
    raise ValueError(f"stop must be non-empty strings, got {_short(stop)}")
  if len(stop) > MAX_STOP_STRINGS:
    raise ValueError(f"stop must hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
  chars = sum(len(s) for s in stop)
  if chars > MAX_STOP_CHARS:
    raise ValueError(f"stop strings must total at most {MAX_STOP_CHARS} characters, got {chars}")
  ids = stop_token_ids or ()
  if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
    raise ValueError(f"stop_token_ids must be a list of ints, got {_short(ids)}")
  if len(ids) > MAX_STOP_TOKEN_IDS:
    raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
  if any(not isinstance(t, (int, np.integer)) or isinstance(t, bool) for t in ids):
    raise ValueError(f"stop_token_ids must be a list of ints, got {_short(ids)}")


def _short(value: object, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."
