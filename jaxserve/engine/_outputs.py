"""Result objects returned by ``LLM.generate`` and ``LLM.step`` (mirroring vLLM's)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Logprob:
  """Log-probability of one token under the model (before temperature and penalties), and its rank."""

  logprob: float
  rank: int | None = None
  decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
  """One completion of a request.

  Attributes:
    index: position among the request's ``n`` completions (or beams, best first).
    text: decoded output (stop string removed unless asked to keep it).
    token_ids: generated token ids (a final EOS or stop token id included).
    cumulative_logprob: sum of the sampled tokens' logprobs (None unless logprobs were asked for;
      always set for beam search).
    logprobs: per generated token, ``{token_id: Logprob}`` for the sampled token and the top ones.
    finish_reason: ``"stop"`` (EOS, stop token or stop string), ``"length"``, ``"abort"`` or
      ``"error"`` (the engine failed the request: :attr:`RequestOutput.error` says why); None while running.
    stop_reason: the stop token id or stop string that ended it, if any.
  """

  index: int
  text: str
  token_ids: list[int]
  cumulative_logprob: float | None
  logprobs: list[dict[int, Logprob]] | None
  finish_reason: str | None = None
  stop_reason: int | str | None = None

  def finished(self) -> bool:
    return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
  """Everything generated so far for one request (cumulative, like vLLM's default)."""

  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
  num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
  error: str | None = None  # why the engine failed this request (its completions end with finish_reason "error")
