"""The engine core: each step schedules a batch, runs it on the model runner and processes what it sampled."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine import _beam_search, _input_batch
from jaxserve.engine._input_processor import InputProcessor, PromptType
from jaxserve.engine._kv_cache_manager import KVCacheManager
from jaxserve.engine._model_runner import ModelRunner, SequenceInputError, pad_rows
from jaxserve.engine._output_processor import OutputProcessor
from jaxserve.engine._outputs import RequestOutput
from jaxserve.engine._request import Request, Sequence
from jaxserve.engine._sampler import SamplerOutput
from jaxserve.engine._sampling_params import BeamSearchParams, SamplingParams
from jaxserve.engine._scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from jaxserve.engine._stats import EngineStats

__all__ = ["EngineCore", "EngineStepError", "PromptType"]


class EngineStepError(RuntimeError):
  """A device step failed; the requests it ran (``request_ids``) failed with it. The engine has
  recovered (fresh KV pools) and serves the next step normally."""

  def __init__(self, request_ids: list[str], cause: BaseException):
    super().__init__(f"the engine step failed ({type(cause).__name__}: {cause}); failed requests: {request_ids}")
    self.request_ids = request_ids


class EngineCore:
  """Host-side engine over a :class:`ModelRunner`: one :meth:`step` schedules and runs one batch.

  Its parts: the :class:`InputProcessor` (validates new requests), the :class:`Scheduler` over a
  :class:`KVCacheManager` (``kv_manager``: block tables; the device pools are the runner's
  ``kv_pools``), ``_input_batch`` (a step's sampling rows), the :class:`OutputProcessor` (tokens,
  stops, text, outputs), ``_beam_search`` and :class:`EngineStats`.
  """

  def __init__(self, cfg: ModelConfig, runner: ModelRunner, tokenizer: Any, *, block_size: int, num_blocks: int,
               max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, enable_prefix_caching: bool,
               seed: int, max_num_prefill_tokens: int | None = None, step_sizes: tuple[int, ...] = ()):
    self.cfg, self.runner, self.tokenizer = cfg, runner, tokenizer
    self.max_num_seqs = max_num_seqs
    self.kv_manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    self.scheduler = Scheduler(self.kv_manager, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_num_batched_tokens,
                               max_num_prefill_tokens=max_num_prefill_tokens, step_sizes=step_sizes)
    self.eos_id = tokenizer.eos_id if tokenizer is not None and tokenizer.eos_id is not None else cfg.eos_token_id
    self.input_processor = InputProcessor(cfg, tokenizer, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                          block_size=block_size, num_usable_blocks=self.kv_manager.pool.num_usable,
                                          seed=seed)
    self.output_processor = OutputProcessor(tokenizer, self.eos_id)
    self.step_stats = EngineStats(self.scheduler, block_size=block_size, max_model_len=max_model_len)
    self._seq_ids = itertools.count()

  # ---- requests
  def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams | BeamSearchParams) -> Request:
    """Validates one request (ValueError naming the problem) without touching the engine's state."""
    if not isinstance(request_id, str) or not request_id:
      raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    if request_id in self.scheduler.requests:
      raise ValueError(f"request_id {request_id!r} is already in use")
    return self.input_processor.make_request(request_id, prompt, params, next_seq_id=self._seq_ids.__next__)

  def add(self, req: Request) -> None:
    self.scheduler.add(req)

  def abort(self, request_id: str) -> Request | None:
    """Stops a request and frees its blocks; returns it (None if unknown or already finished)."""
    req = self.scheduler.requests.get(request_id)
    if req is None:
      return None
    self._finish(req, "abort")
    return req

  def has_unfinished(self) -> bool:
    return self.scheduler.has_unfinished()

  def output(self, req: Request) -> RequestOutput:
    """The request's cumulative output (finished completions first, in index order)."""
    return self.output_processor.output(req)

  def decode_output(self, seq: Sequence) -> str:
    """The output's text decoded at once after a few prompt tokens (what the incremental text equals)."""
    return self.output_processor.decode_output(seq)

  # ---- the step
  def step(self) -> list[Request]:
    """Schedules and runs one batch; returns the requests that made progress (finished ones included).

    A request whose own host-side work fails (building its step inputs, sampling rows or output)
    finishes with ``finish_reason="error"`` and its ``error`` set; the others run on. A failed
    device step costs the KV pools (donated to it): the step's requests fail, the other running
    ones go back to the queue to be recomputed, the engine starts over with fresh pools and an
    empty prefix cache, and :class:`EngineStepError` is raised; the next step serves normally.
    """
    sched = self.scheduler.schedule()
    if not sched.seqs:
      if self.scheduler.has_unfinished() and not sched.preempted:
        raise RuntimeError("the scheduler could not place any request; the KV pool is too small")
      return []
    touched: dict[str, Request] = {s.request.request_id: s.request for s in sched.seqs}
    try:
      while True:
        try:
          logits, greedy, rows = self.runner.execute(sched)
          break
        except SequenceInputError as e:  # nothing ran: drop those requests and build the step again
          for i in e.indices:
            self._fail(sched.seqs[i].request, f"building this request's step inputs failed: {e}")
          sched = dataclasses.replace(sched, seqs=tuple(s for s in sched.seqs if not s.request.finished))
          if not sched.seqs:
            return list(touched.values())
      self.scheduler.update_after_step(sched)
      sampled = [(s, row) for s, row in zip(sched.seqs, rows) if s.samples]
      if sampled:
        batch = _input_batch.sampling_batch(sampled, vocab_size=self.cfg.vocab_size, eos_id=self.eos_id,
                                            num_padded_rows=lambda n: pad_rows(n, self.max_num_seqs),
                                            fail=self._fail)
        if batch.plain:  # greedy without penalties or logprobs: the argmax computed with the step is the answer
          out = SamplerOutput(np.asarray(greedy)[batch.tensors.row_index], None, None, None, None)
        else:
          out = self.runner.sample(logits, batch.tensors, batch.cfg)
      else:
        np.asarray(greedy)  # wait for the step: a failure shows here, not in the next one
    except Exception as e:  # noqa: BLE001 - the device step failed: its pools are gone
      failed = self._recover(sched, e)
      raise EngineStepError(failed, e) from e
    if sampled:
      self._process(sampled, out, batch.row_of)
    self.step_stats.record_step(sched)
    return list(touched.values())

  def _finish(self, req: Request, reason: str) -> None:
    """Ends every live sequence of ``req`` with ``reason`` and frees its blocks."""
    for seq in req.seqs:
      seq.finish_reason = reason
    req.finished_seqs.extend(req.seqs)
    self.scheduler.finish_request(req)
    req.seqs.clear()

  def _fail(self, req: Request, error: str) -> None:
    """Finishes a request that cannot go on: ``finish_reason="error"``, ``error`` says why; frees its blocks."""
    if req.finished:
      return
    req.error = error
    self._finish(req, "error")

  def _recover(self, sched: SchedulerOutput, exc: BaseException) -> list[str]:
    """After a failed device step: fails the step's requests, sends the other running ones back to be
    recomputed, forgets the prefix cache and gives the runner fresh pools. Returns the failed ids."""
    failed = []
    for s in sched.seqs:
      if not s.request.finished:
        self._fail(s.request, f"the engine step running this request failed: {type(exc).__name__}: {exc}")
        failed.append(s.request.request_id)
    self.scheduler.preempt_all()  # their KV was in the lost pools
    self.kv_manager.pool.reset_prefix_cache()
    if self.kv_manager.num_used_blocks:
      raise RuntimeError(f"{self.kv_manager.num_used_blocks} KV blocks still in use after recovering from a "
                         "failed step")
    self.runner.reset_device_state()
    return failed

  # ---- processing the samples
  def _process(self, sampled: list[tuple[ScheduledSeq, int]], out: SamplerOutput, row_of: list[int]) -> None:
    """Appends the sampled tokens; a request whose own host work raises fails alone."""
    beams: dict[str, Request] = {}
    for (s, _), row in zip(sampled, row_of):
      if s.request.finished:
        continue
      try:
        self._process_one(s, out, row, beams)
      except Exception as e:  # noqa: BLE001 - one request's failure is not the others'
        self._fail(s.request, f"processing this request's sampled tokens failed: {type(e).__name__}: {e}")
    for req in beams.values():
      if _beam_search.ready(req):
        try:
          _beam_search.beam_step(req, self.scheduler, eos_id=self.eos_id, next_seq_id=self._seq_ids.__next__)
        except Exception as e:  # noqa: BLE001
          self._fail(req, f"this request's beam step failed: {type(e).__name__}: {e}")

  def _process_one(self, s: ScheduledSeq, out: SamplerOutput, row: int, beams: dict[str, Request]) -> None:
    req, seq = s.request, s.seq
    if req.is_beam:
      _beam_search.set_candidates(seq, out, row, req.params.beam_width)
      beams[req.request_id] = req
      return
    seqs = [seq] if req.forked else self._fork(req, seq)
    for i, child in enumerate(seqs):
      if self.output_processor.append_token(req, child, out, row + i):
        self.scheduler.finish_seq(req, child)
    if not req.seqs:
      self.scheduler.finish_request(req)

  def _fork(self, req: Request, seq: Sequence) -> list[Sequence]:
    """Splits the prompt's sequence into its ``n`` samples (sharing its KV blocks); returns them in order."""
    req.forked = True
    children = [seq]
    for i in range(1, req.params.n):
      child = Sequence(next(self._seq_ids), list(seq.token_ids), seq.num_prompt_tokens, index=i,
                       num_computed_tokens=seq.num_computed_tokens, logprobs=None if seq.logprobs is None else [])
      self.kv_manager.fork(seq.seq_id, child.seq_id)
      req.seqs.append(child)
      children.append(child)
    return children

  # ---- statistics
  def reset_stats(self) -> None:
    self.step_stats.reset()

  def stats(self) -> dict[str, Any]:
    return self.step_stats.snapshot(self.runner.num_compiled_programs)
