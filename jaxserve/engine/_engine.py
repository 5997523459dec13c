"""The engine loop: validates requests, schedules, runs the model, samples, forks, stops, tracks statistics."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence as Seq

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine._detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer, anchor_ids, find_stop, holdback
from jaxserve.engine._kv_cache_manager import KVCacheManager, cdiv
from jaxserve.engine._model_runner import ModelRunner, SequenceInputError, pad_rows
from jaxserve.engine._outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.engine._request import Request, RequestStatus, Sequence
from jaxserve.engine._sampler import SamplerConfig, SamplerOutput, SamplingTensors
from jaxserve.engine._sampling_params import BeamSearchParams, SamplingParams
from jaxserve.engine._scheduler import ScheduledSeq, Scheduler, SchedulerOutput

PromptType = str | Mapping[str, Any] | Seq[int]


class EngineStepError(RuntimeError):
  """A device step failed; the requests it ran (``request_ids``) failed with it. The engine has
  recovered (fresh KV pools) and serves the next step normally."""

  def __init__(self, request_ids: list[str], cause: BaseException):
    super().__init__(f"the engine step failed ({type(cause).__name__}: {cause}); failed requests: {request_ids}")
    self.request_ids = request_ids


class EngineCore:
  """Host-side engine over a :class:`ModelRunner`: one :meth:`step` schedules and runs one batch."""

  def __init__(self, cfg: ModelConfig, runner: ModelRunner, tokenizer: Any, *, block_size: int, num_blocks: int,
               max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, enable_prefix_caching: bool,
               seed: int):
    self.cfg, self.runner, self.tokenizer = cfg, runner, tokenizer
    self.block_size = block_size
    self.max_model_len = max_model_len
    self.max_num_seqs = max_num_seqs
    self.seed = seed
    self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    self.scheduler = Scheduler(self.kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    self.eos_id = tokenizer.eos_id if tokenizer is not None and tokenizer.eos_id is not None else cfg.eos_token_id
    self._anchor = anchor_ids(tokenizer) if tokenizer is not None else ()  # for incremental detokenization
    self._seq_ids = itertools.count()
    self._arrivals = itertools.count()
    self.reset_stats()

  # ---- requests
  def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams | BeamSearchParams) -> Request:
    """Validates one request (ValueError naming the problem) without touching the engine's state."""
    if not isinstance(request_id, str) or not request_id:
      raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    if request_id in self.scheduler.requests:
      raise ValueError(f"request_id {request_id!r} is already in use")
    if not isinstance(params, (SamplingParams, BeamSearchParams)):
      raise ValueError(f"sampling_params must be a SamplingParams or BeamSearchParams, got {type(params).__name__}")
    text, ids = self._prompt_ids(prompt)
    if len(ids) >= self.max_model_len:
      raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: at most "
                       f"{self.max_model_len - 1} prompt tokens leave room to generate")
    beam = isinstance(params, BeamSearchParams)
    needs_text = bool(getattr(params, "stop", ()))
    if needs_text and self.tokenizer is None:
      raise ValueError("stop strings need a tokenizer, and this model has none; use stop_token_ids")
    if not beam:
      bad = [t for t in params.stop_token_ids if t >= self.cfg.vocab_size]
      if bad:
        raise ValueError(f"stop_token_ids {bad[:8]} are outside the vocabulary [0, {self.cfg.vocab_size})")
      if params.top_k >= self.cfg.vocab_size:  # keeps every token: the same as no top-k, and fits int32
        params = dataclasses.replace(params, top_k=0)
    width = params.beam_width if beam else params.n
    if width > self.max_num_seqs:
      raise ValueError(f"{'beam_width' if beam else 'n'}={width} exceeds max_num_seqs={self.max_num_seqs}")
    max_out = self.max_model_len - len(ids)
    if params.max_tokens is not None:
      max_out = min(max_out, params.max_tokens)
    blocks = width * cdiv(len(ids) + max_out, self.block_size)
    if blocks > self.kv.pool.num_usable:
      raise ValueError(f"this request may need {blocks} KV blocks ({width} sequence(s) of up to "
                       f"{len(ids) + max_out} tokens) but the pool has {self.kv.pool.num_usable}; lower "
                       f"max_tokens or n, or give the engine more KV memory")
    arrival = next(self._arrivals)
    seed = params.seed if not beam and params.seed is not None else hash((self.seed, arrival)) & (2**63 - 1)
    req = Request(request_id, text, ids, params, arrival, seed % 2**64, max_out)
    req.seqs.append(Sequence(next(self._seq_ids), list(ids), len(ids),
                             logprobs=[] if not beam and params.logprobs is not None else None))
    return req

  def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("text prompts need a tokenizer, and this model has none; pass "
                         "{'prompt_token_ids': [...]} instead")
      text, ids = prompt, self.tokenizer.encode(prompt, add_bos=True)
    elif isinstance(prompt, Mapping):
      if "prompt_token_ids" not in prompt:
        raise ValueError(f"a prompt dict needs 'prompt_token_ids', got keys {sorted(prompt)}")
      text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
    elif isinstance(prompt, Seq) and not isinstance(prompt, bytes):
      text, ids = None, prompt
    else:
      raise ValueError(f"a prompt must be a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
    if isinstance(ids, np.ndarray):
      ids = ids.tolist()
    if not isinstance(ids, Seq) or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
      raise ValueError("prompt_token_ids must be a list of ints")
    ids = [int(t) for t in ids]
    if not ids:
      raise ValueError("the prompt is empty: it needs at least one token")
    bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
    return text, ids

  def add(self, req: Request) -> None:
    self.scheduler.add(req)

  def abort(self, request_id: str) -> Request | None:
    """Stops a request and frees its blocks; returns it (None if unknown or already finished)."""
    req = self.scheduler.requests.get(request_id)
    if req is None:
      return None
    for seq in req.seqs:
      seq.finish_reason = "abort"
    req.finished_seqs.extend(req.seqs)
    self.scheduler.finish_request(req)
    req.seqs.clear()
    return req

  def has_unfinished(self) -> bool:
    return self.scheduler.has_unfinished()

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
        tensors, cfg, row_of, plain = self._sampling_inputs(sampled)
        if plain:  # greedy without penalties or logprobs: the argmax computed with the step is the answer
          out = SamplerOutput(np.asarray(greedy)[tensors.row_index], None, None, None, None)
        else:
          out = self.runner.sample(logits, tensors, cfg)
      else:
        np.asarray(greedy)  # wait for the step: a failure shows here, not in the next one
    except Exception as e:  # noqa: BLE001 - the device step failed: its pools are gone
      failed = self._recover(sched, e)
      raise EngineStepError(failed, e) from e
    if sampled:
      self._apply(sampled, out, row_of)
    self._record_step(sched)
    return list(touched.values())

  def _fail(self, req: Request, error: str) -> None:
    """Finishes a request that cannot go on: ``finish_reason="error"``, ``error`` says why; frees its blocks."""
    if req.finished:
      return
    for seq in req.seqs:
      seq.finish_reason = "error"
    req.finished_seqs.extend(req.seqs)
    req.error = error
    self.scheduler.finish_request(req)
    req.seqs.clear()

  def _recover(self, sched: SchedulerOutput, exc: BaseException) -> list[str]:
    """After a failed device step: fails the step's requests, sends the other running ones back to be
    recomputed, forgets the prefix cache and gives the runner fresh pools. Returns the failed ids."""
    failed = []
    for s in sched.seqs:
      if not s.request.finished:
        self._fail(s.request, f"the engine step running this request failed: {type(exc).__name__}: {exc}")
        failed.append(s.request.request_id)
    for req in reversed(list(self.scheduler.running)):  # their KV was in the lost pools
      self.scheduler.running.remove(req)
      self.scheduler._preempt(req)
    self.kv.pool.reset_prefix_cache()
    if self.kv.num_used_blocks:
      raise RuntimeError(f"{self.kv.num_used_blocks} KV blocks still in use after recovering from a failed step")
    self.runner.reset_device_state()
    return failed

  def _sampling_inputs(self, sampled: list[tuple[ScheduledSeq, int]]):
    """Per-row sampling arrays; a prompt of ``n`` samples gets ``n`` rows on its logits row.

    Returns ``(tensors, cfg, row_of, plain)``: ``plain`` when the forward's argmax is the answer. A
    request whose rows cannot be built fails alone (its rows stay neutral: greedy, ignored).
    """
    rows: list[tuple[Request, Sequence, int, int]] = []  # request, seq, logits row, completion index
    row_of = []
    for s, row in sampled:
      req = s.request
      row_of.append(len(rows))
      k = req.params.n if not req.is_beam and not req.forked else 1
      rows.extend((req, s.seq, row, s.seq.index + i) for i in range(k))
    r = pad_rows(len(rows), self.max_num_seqs)
    vocab = self.cfg.vocab_size
    f32 = lambda v: np.full(r, v, np.float32)
    t = dict(row_index=np.zeros(r, np.int32), temperature=f32(0), top_k=np.full(r, vocab, np.int32), top_p=f32(1),
             min_p=f32(0), repetition_penalty=f32(1), presence_penalty=f32(0), frequency_penalty=f32(0),
             seed=np.zeros((r, 2), np.uint32), counter=np.zeros((r, 2), np.int32))
    neutral = {name: a[0].copy() for name, a in t.items()}
    for i, (req, seq, row, index) in enumerate(rows):
      t["row_index"][i] = row
      if req.finished:
        continue
      try:
        self._fill_row(t, i, req, seq, index)
      except Exception as e:  # noqa: BLE001 - this request alone fails
        for name, a in t.items():
          a[i] = row if name == "row_index" else neutral[name]
        self._fail(req, f"building this request's sampling inputs failed: {type(e).__name__}: {e}")
    live = [(i, req, seq) for i, (req, seq, _, _) in enumerate(rows) if not req.finished]
    want_logprobs = any(req.is_beam or req.params.logprobs is not None for _, req, _ in live)
    penalties = [(i, req, seq) for i, req, seq in live if not req.is_beam and req.params.has_penalties]
    bans = [(i, req, seq) for i, req, seq in live
            if not req.is_beam and seq.num_output_tokens < req.params.min_tokens]
    extra = dict(prompt_mask=None, output_counts=None, banned=None)
    if penalties or bans:
      extra = dict(prompt_mask=np.zeros((r, vocab), bool), output_counts=np.zeros((r, vocab), np.int32),
                   banned=np.zeros((r, vocab), bool))
      for i, req, seq in penalties:
        extra["prompt_mask"][i, req.prompt_token_ids] = True
        np.add.at(extra["output_counts"][i], seq.output_token_ids, 1)
      for i, req, seq in bans:
        p = req.params
        stops = list(p.stop_token_ids) + ([self.eos_id] if self.eos_id is not None and not p.ignore_eos else [])
        extra["banned"][i, stops] = True
    cfg = SamplerConfig(vocab_arrays=bool(penalties or bans))
    plain = not (cfg.vocab_arrays or want_logprobs or t["temperature"].any())
    return SamplingTensors(**t, **extra, logprobs=np.bool_(want_logprobs)), cfg, row_of, plain

  def _fill_row(self, t: dict[str, np.ndarray], i: int, req: Request, seq: Sequence, index: int) -> None:
    """Writes one sampling row's settings (neutral values stand for a setting that is off)."""
    if req.is_beam:
      return
    p = req.params
    t["seed"][i] = (req.seed & 0xFFFFFFFF, req.seed >> 32)
    t["counter"][i] = (index, seq.num_output_tokens)
    t["temperature"][i] = p.temperature
    if p.temperature > 0:
      if p.top_k > 0 or p.top_p < 1:
        t["top_k"][i] = min(p.top_k, self.cfg.vocab_size) if p.top_k > 0 else self.cfg.vocab_size
        t["top_p"][i] = p.top_p
      if p.min_p > 0:
        t["min_p"][i] = p.min_p
    if p.has_penalties:
      t["repetition_penalty"][i] = p.repetition_penalty
      t["presence_penalty"][i] = p.presence_penalty
      t["frequency_penalty"][i] = p.frequency_penalty

  def _apply(self, sampled: list[tuple[ScheduledSeq, int]], out: SamplerOutput, row_of: list[int]) -> None:
    """Appends the sampled tokens; a request whose own host work raises fails alone."""
    beams: dict[str, Request] = {}
    for (s, _), row in zip(sampled, row_of):
      if s.request.finished:
        continue
      try:
        self._apply_one(s, out, row, beams)
      except Exception as e:  # noqa: BLE001 - one request's failure is not the others'
        self._fail(s.request, f"processing this request's sampled tokens failed: {type(e).__name__}: {e}")
    for req in beams.values():
      if not req.finished and all(seq.beam_candidates is not None for seq in req.seqs):
        try:
          self._beam_step(req)
        except Exception as e:  # noqa: BLE001
          self._fail(req, f"this request's beam step failed: {type(e).__name__}: {e}")

  def _apply_one(self, s: ScheduledSeq, out: SamplerOutput, row: int, beams: dict[str, Request]) -> None:
    req, seq = s.request, s.seq
    if req.is_beam:
      k = 2 * req.params.beam_width
      seq.beam_candidates = list(zip(out.top_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist()))
      beams[req.request_id] = req
      return
    if not req.forked:
      req.forked = True
      children = [seq]
      for i in range(1, req.params.n):
        child = Sequence(next(self._seq_ids), list(seq.token_ids), seq.num_prompt_tokens, index=i,
                         num_computed_tokens=seq.num_computed_tokens,
                         logprobs=None if seq.logprobs is None else [])
        self.kv.fork(seq.seq_id, child.seq_id)
        req.seqs.append(child)
        children.append(child)
      for i, child in enumerate(children):
        self._append(req, child, out, row + i)
    else:
      self._append(req, seq, out, row)
    if not req.seqs:
      self.scheduler.finish_request(req)

  def _logprob_entry(self, out: SamplerOutput, row: int, token: int, k: int) -> dict[int, Logprob]:
    dec = (lambda i: self.tokenizer.decode([i])) if self.tokenizer is not None else (lambda i: None)
    entry = {token: Logprob(float(out.logprob[row]), int(out.rank[row]), dec(token))}
    for j in range(k):
      tid = int(out.top_ids[row, j])
      if tid not in entry:
        entry[tid] = Logprob(float(out.top_logprobs[row, j]), j + 1, dec(tid))
    return entry

  def _append(self, req: Request, seq: Sequence, out: SamplerOutput, row: int) -> None:
    p: SamplingParams = req.params
    token = int(out.tokens[row])
    seq.token_ids.append(token)
    if p.logprobs is not None:
      seq.cumulative_logprob += float(out.logprob[row])
      seq.logprobs.append(self._logprob_entry(out, row, token, p.logprobs))
    num_new_chars = self._detok(seq).step(self.tokenizer, seq.token_ids) if p.stop else 0
    n_out = seq.num_output_tokens
    reason = None
    if n_out >= p.min_tokens:
      if token == self.eos_id and not p.ignore_eos:
        reason = ("stop", None)
      elif token in p.stop_token_ids:
        reason = ("stop", token)
      elif p.stop:
        reason = self._check_stop_strings(seq, p, num_new_chars)
    if reason is None and n_out >= req.max_output_tokens:
      reason = ("length", None)
    if reason is not None:
      seq.finish_reason, seq.stop_reason = reason
      self.scheduler.finish_seq(req, seq)

  def _detok(self, seq: Sequence) -> IncrementalDetokenizer:
    """The sequence's incremental detokenizer. It advances with every token when stop strings need
    the text, else when the text is read (each step for a server, once at the end for ``generate``)."""
    if seq.detok is None:
      seq.detok = IncrementalDetokenizer(seq.num_prompt_tokens, self._anchor)
    return seq.detok

  def decode_output(self, seq: Sequence) -> str:
    """The output's text as it continues the prompt (decoded after a few prompt tokens, so that
    a leading space of the first output token is kept, as sentencepiece drops it at the start)."""
    ctx = seq.token_ids[max(0, seq.num_prompt_tokens - CONTEXT_TOKENS):seq.num_prompt_tokens]
    prefix = self.tokenizer.decode(ctx)
    full = self.tokenizer.decode(ctx + seq.output_token_ids)
    return full[len(prefix):] if full.startswith(prefix) else self.tokenizer.decode(seq.output_token_ids)

  def _check_stop_strings(self, seq: Sequence, p: SamplingParams, num_new_chars: int) -> tuple[str, str] | None:
    """Searches only the new text (and the tail a stop could span): O(new text + longest stop) per token."""
    text = seq.detok.text
    hit = find_stop(text, num_new_chars, p.stop)
    if hit is None:
      return None
    at, stop = hit
    seq.text = text[:at + len(stop)] if p.include_stop_str_in_output else text[:at]
    return ("stop", stop)

  def _beam_step(self, req: Request) -> None:
    """Keeps the best ``beam_width`` continuations of all live beams; EOS continuations finish."""
    p: BeamSearchParams = req.params
    cands = [(seq.cumulative_logprob + lp, n, seq, tok) for seq in req.seqs
             for n, (tok, lp) in enumerate(seq.beam_candidates)]
    cands.sort(key=lambda c: -c[0])
    keep = []
    for score, _, parent, tok in cands:
      if tok == self.eos_id and not p.ignore_eos:
        done = Sequence(-1, parent.token_ids + [tok], parent.num_prompt_tokens, cumulative_logprob=score,
                        finish_reason="stop")
        req.finished_seqs.append(done)
      elif len(keep) < p.beam_width:
        keep.append((score, parent, tok))
    new = []
    for score, parent, tok in keep:
      child = Sequence(next(self._seq_ids), parent.token_ids + [tok], parent.num_prompt_tokens,
                       num_computed_tokens=parent.num_computed_tokens, cumulative_logprob=score)
      self.kv.fork(parent.seq_id, child.seq_id)
      new.append(child)
    for seq in list(req.seqs):
      self.scheduler.drop_seq(req, seq)
    req.seqs.extend(new)
    req.finished_seqs = sorted(req.finished_seqs, key=lambda s: -self._beam_score(s, p))[:p.beam_width]
    if not new or new[0].num_output_tokens >= req.max_output_tokens:
      for seq in list(req.seqs):
        seq.finish_reason = "length"
        self.scheduler.finish_seq(req, seq)
      ranked = sorted(req.finished_seqs, key=lambda s: -self._beam_score(s, p))[:p.beam_width]
      for i, seq in enumerate(ranked):
        seq.index = i
      req.finished_seqs = ranked
      self.scheduler.finish_request(req)

  def _beam_score(self, seq: Sequence, p: BeamSearchParams) -> float:
    """vLLM's ranking: cumulative logprob over (prompt + output length, final EOS not counted) ** penalty."""
    n = seq.num_tokens - (1 if seq.token_ids[-1] == self.eos_id and seq.finish_reason == "stop" else 0)
    return seq.cumulative_logprob / (n ** p.length_penalty)

  # ---- outputs and statistics
  def output(self, req: Request) -> RequestOutput:
    """The request's cumulative output (finished completions first, in index order)."""
    seqs = sorted(req.finished_seqs + req.seqs, key=lambda s: s.index)
    detok = self.tokenizer is not None and req.params.detokenize
    outs = []
    for seq in seqs:
      ids = seq.output_token_ids
      text = self._text(seq, req) if detok else ""
      cum = seq.cumulative_logprob if req.is_beam or seq.logprobs is not None else None
      outs.append(CompletionOutput(seq.index, text, list(ids), cum, seq.logprobs, seq.finish_reason,
                                   seq.stop_reason))
    return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), outs, req.finished,
                         req.num_cached_tokens, req.error)

  def _text(self, seq: Sequence, req: Request) -> str:
    """The completion's text; while it runs, without the tail a stop string could still cut off."""
    if seq.text is not None:  # cut by a stop string
      return seq.text
    if req.is_beam:  # beams are new sequences every step: decoded whole
      return self.decode_output(seq) if seq.num_output_tokens else ""
    detok = self._detok(seq)
    if seq.finish_reason is not None:
      detok.finish(self.tokenizer, seq.token_ids)
      return detok.text
    detok.step(self.tokenizer, seq.token_ids)
    text = detok.text
    return text[:max(0, len(text) - holdback(req.params.stop, req.params.include_stop_str_in_output))]

  def reset_stats(self) -> None:
    self._steps = 0
    self._slots_allocated = 0
    self._slots_filled = 0
    self._slots_nonempty = 0
    self._preemptions0 = self.scheduler.num_preemptions
    self._queries0, self._hits0 = self.kv.prefix_queries, self.kv.prefix_hits
    self._copies0 = self.kv.num_copies
    self._peak_seqs = 0
    self._peak_blocks = 0
    self._tokens = 0
    self._seq_steps = 0

  def _record_step(self, sched: SchedulerOutput) -> None:
    live = {seq.seq_id: seq.num_computed_tokens for r in self.scheduler.running for seq in r.seqs}
    allocated, filled, nonempty = self.kv.slot_usage(live)
    self._steps += 1
    self._slots_allocated += allocated
    self._slots_filled += filled
    self._slots_nonempty += nonempty
    self._tokens += sched.num_tokens
    self._seq_steps += len(live)
    self._peak_seqs = max(self._peak_seqs, self.scheduler.num_running_seqs)
    self._peak_blocks = max(self._peak_blocks, self.kv.num_used_blocks)

  def stats(self) -> dict[str, Any]:
    queries = self.kv.prefix_queries - self._queries0
    hits = self.kv.prefix_hits - self._hits0
    return {
        "kv_blocks_total": self.kv.pool.num_usable,
        "kv_blocks_used": self.kv.num_used_blocks,
        "kv_block_size": self.block_size,
        "kv_waste_fraction": 1 - self._slots_filled / self._slots_allocated if self._slots_allocated else 0.0,
        # the least any block-granular cache could waste on the same steps: only the partial last blocks
        "kv_waste_floor_fraction": 1 - self._slots_filled / self._slots_nonempty if self._slots_nonempty else 0.0,
        "kv_mean_tokens_per_seq": self._slots_filled / self._seq_steps if self._seq_steps else 0.0,
        # what a cache reserving max_model_len slots per running sequence would have wasted on the same steps
        "kv_contiguous_waste_fraction":
            1 - self._slots_filled / (self._seq_steps * self.max_model_len) if self._seq_steps else 0.0,
        "num_preemptions": self.scheduler.num_preemptions - self._preemptions0,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "num_compiled_programs": self.runner.num_compiled_programs,
        "num_steps": self._steps,
        "num_batched_tokens": self._tokens,
        "num_block_copies": self.kv.num_copies - self._copies0,
        "peak_running_seqs": self._peak_seqs,
        "peak_kv_blocks_used": self._peak_blocks,
        "num_running_requests": len(self.scheduler.running),
        "num_waiting_requests": len(self.scheduler.waiting),
        "total_preemptions": self.scheduler.num_preemptions,
    }
