"""Host-side request and sequence state (plain Python, never traced)."""

from __future__ import annotations

import dataclasses
import enum

from jaxserve.engine._detokenizer import IncrementalDetokenizer
from jaxserve.engine._outputs import Logprob
from jaxserve.engine._sampling_params import BeamSearchParams, SamplingParams


class RequestStatus(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
  """One token stream of a request: the prompt's, a sample of ``n`` or a beam.

  ``token_ids`` is prompt + output; the KV of the first ``num_computed_tokens`` is in the cache
  (the last sampled token's KV is computed by the next step).
  """

  seq_id: int
  token_ids: list[int]
  num_prompt_tokens: int
  index: int = 0  # completion index (n) or beam slot
  num_computed_tokens: int = 0
  cumulative_logprob: float = 0.0
  logprobs: list[dict[int, Logprob]] | None = None
  finish_reason: str | None = None
  stop_reason: int | str | None = None
  text: str | None = None  # set when a stop string cut the text
  detok: IncrementalDetokenizer | None = None  # the output text, grown token by token (not for beams)
  beam_candidates: list[tuple[int, float]] | None = None  # a beam's proposals, waiting for its siblings

  @property
  def num_tokens(self) -> int:
    return len(self.token_ids)

  @property
  def output_token_ids(self) -> list[int]:
    return self.token_ids[self.num_prompt_tokens:]

  @property
  def num_output_tokens(self) -> int:
    return len(self.token_ids) - self.num_prompt_tokens

  @property
  def num_uncomputed(self) -> int:
    return len(self.token_ids) - self.num_computed_tokens


@dataclasses.dataclass(eq=False)
class Request:
  """A request and its live sequences (one until the prompt is sampled, then ``n`` or the beams)."""

  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  params: SamplingParams | BeamSearchParams
  arrival: int
  seed: int  # the request's random stream (its own seed, or derived from the engine's)
  max_output_tokens: int  # max_tokens clipped to the context left after the prompt
  seqs: list[Sequence] = dataclasses.field(default_factory=list)
  finished_seqs: list[Sequence] = dataclasses.field(default_factory=list)
  status: RequestStatus = RequestStatus.WAITING
  forked: bool = False  # the prompt's sequence has been split into n samples / beams
  num_cached_tokens: int = 0
  error: str | None = None  # why the engine failed this request (finish_reason "error")

  @property
  def is_beam(self) -> bool:
    return isinstance(self.params, BeamSearchParams)

  @property
  def width(self) -> int:
    """Sequences this request will run at once (what it needs of ``max_num_seqs``)."""
    if self.is_beam:
      return self.params.beam_width
    return len(self.seqs) if self.forked else self.params.n

  @property
  def finished(self) -> bool:
    return self.status is RequestStatus.FINISHED
