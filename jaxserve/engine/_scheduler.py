"""FCFS continuous-batching scheduler: chunked prefill mixed with decodes, preemption by recompute."""

from __future__ import annotations

import bisect
import collections
import dataclasses
from typing import Sequence as Seq

from jaxserve.engine._kv_cache_manager import KVCacheManager, PrefixHit
from jaxserve.engine._request import Request, RequestStatus, Sequence


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
  """One sequence's share of a step: tokens ``start:start + num_tokens`` with this block table."""

  request: Request
  seq: Sequence
  start: int
  num_tokens: int
  block_ids: tuple[int, ...]

  @property
  def samples(self) -> bool:
    """True when the chunk reaches the end of the sequence, so its last logits are sampled."""
    return self.start + self.num_tokens == self.seq.num_tokens


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
  """What to run this step: decodes first, then prefill chunks; block copies to do before."""

  seqs: tuple[ScheduledSeq, ...]
  copies: tuple[tuple[int, int], ...]
  preempted: tuple[str, ...]

  @property
  def num_tokens(self) -> int:
    return sum(s.num_tokens for s in self.seqs)

  @property
  def num_decode(self) -> int:
    return sum(1 for s in self.seqs if s.num_tokens == 1)


class Scheduler:
  """Decides each step which sequences run and how many of their tokens.

  Running requests are served first (oldest first), each sequence getting all its uncomputed
  tokens up to the step's token budget, so a long prompt is prefilled in chunks alongside
  the decodes of others. When the pool runs out, the newest running request is preempted:
  its blocks are freed and it goes back to the front of the waiting queue, to be recomputed
  (with prefix caching, mostly from cached blocks). Waiting requests are admitted in arrival
  order while sequences, budget and blocks allow, and not in a step that preempted.

  ``max_num_prefill_tokens`` (None: no limit but ``max_num_batched_tokens``) bounds the prompt
  tokens of one step, so that prompts arriving together are read one after another (first come,
  first served) and each request samples its first token as soon as its own prompt is read,
  instead of all of them after the whole burst. With ``step_sizes`` (the padded token counts of
  the step programs), the prompt share is cut so that the step, decodes included, ends on the
  largest step size within ``decodes + max_num_prefill_tokens``: no padding is run for it.
  """

  def __init__(self, kv_manager: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int,
               max_num_prefill_tokens: int | None = None, step_sizes: Seq[int] = ()):
    self.kv_manager = kv_manager
    self.max_num_seqs = max_num_seqs
    self.max_num_batched_tokens = max_num_batched_tokens
    self.max_num_prefill_tokens = max_num_prefill_tokens
    self.step_sizes = tuple(sorted(step_sizes))
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: list[Request] = []  # sorted by arrival
    self.requests: dict[str, Request] = {}
    self.num_preemptions = 0

  # ---- queue management
  def add(self, req: Request) -> None:
    self.requests[req.request_id] = req
    self.waiting.append(req)

  def has_unfinished(self) -> bool:
    return bool(self.waiting or self.running)

  @property
  def num_running_seqs(self) -> int:
    """Sequences the running requests hold or will once forked (``n`` samples, beams): what
    ``max_num_seqs`` bounds."""
    return sum(r.width for r in self.running)

  def finish_seq(self, req: Request, seq: Sequence) -> None:
    """Moves a finished sequence out of the live set and frees its blocks."""
    self.kv_manager.free(seq.seq_id)
    req.seqs.remove(seq)
    req.finished_seqs.append(seq)

  def drop_seq(self, req: Request, seq: Sequence) -> None:
    """Frees a sequence that leaves no output (a beam that lost)."""
    self.kv_manager.free(seq.seq_id)
    req.seqs.remove(seq)

  def finish_request(self, req: Request) -> None:
    for seq in list(req.seqs):
      self.kv_manager.free(seq.seq_id)
    if req.status is RequestStatus.RUNNING:
      self.running.remove(req)
    elif req.status is RequestStatus.WAITING:
      self.waiting.remove(req)
    req.status = RequestStatus.FINISHED
    del self.requests[req.request_id]

  # ---- scheduling
  def prefill_budget(self, num_decodes: int) -> int:
    """Prompt tokens a step with ``num_decodes`` decodes may take (see the class docstring)."""
    cap = self.max_num_prefill_tokens
    if cap is None:
      return self.max_num_batched_tokens
    fits = [t for t in self.step_sizes if num_decodes < t <= num_decodes + cap]
    return fits[-1] - num_decodes if fits else cap

  def schedule(self) -> SchedulerOutput:
    budget = self.max_num_batched_tokens
    prompt_budget = self.prefill_budget(
        sum(1 for r in self.running for s in r.seqs if s.num_uncomputed == 1))
    chosen: dict[int, ScheduledSeq] = {}
    copies: dict[int, tuple[tuple[int, int], ...]] = {}
    preempted: list[str] = []

    def drop(req: Request) -> int:
      freed = 0
      for seq in req.seqs:
        if seq.seq_id in chosen:
          freed += chosen.pop(seq.seq_id).num_tokens
          copies.pop(seq.seq_id, None)
      return freed

    i = 0
    while i < len(self.running) and budget > 0:
      req = self.running[i]
      for seq in req.seqs:
        prompt = seq.num_uncomputed > 1
        limit = min(budget, prompt_budget) if prompt else budget
        if seq.num_uncomputed == 0 or limit == 0:
          continue
        scheduled = None
        while scheduled is None:
          scheduled = self._try_schedule(req, seq, limit, chosen, copies)
          if scheduled is None:
            victim = self.running.pop()
            budget += drop(victim)
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
              break
        if scheduled is None:
          break
        budget -= scheduled
        if prompt:
          prompt_budget -= scheduled
      if req.status is RequestStatus.RUNNING:
        i += 1
      else:
        break

    while not preempted and self.waiting and min(budget, prompt_budget) > 0:
      req = self.waiting[0]
      if self.num_running_seqs + req.width > self.max_num_seqs:
        break
      admitted = False
      for seq in req.seqs:
        if min(budget, prompt_budget) == 0:
          break
        scheduled = self._try_schedule(req, seq, min(budget, prompt_budget), chosen, copies)
        if scheduled is None:
          break
        budget -= scheduled
        prompt_budget -= scheduled
        admitted = True
      if not admitted:
        break
      self.waiting.popleft()
      req.status = RequestStatus.RUNNING
      bisect.insort(self.running, req, key=lambda r: r.arrival)

    ordered = sorted(chosen.values(), key=lambda s: s.num_tokens != 1)  # decodes first (stable)
    return SchedulerOutput(tuple(ordered), tuple(c for s in ordered for c in copies.get(s.seq.seq_id, ())),
                           tuple(preempted))

  def _try_schedule(self, req: Request, seq: Sequence, budget: int, chosen: dict, copies: dict) -> int | None:
    """Allocates slots for the sequence's next chunk; returns its token count, or None if out of blocks."""
    hit = PrefixHit()
    fresh = not self.kv_manager.has(seq.seq_id)
    if fresh and seq.num_computed_tokens == 0:
      hit = self.kv_manager.get_computed_blocks(seq.seq_id, seq.token_ids)
    start = max(seq.num_computed_tokens, hit.num_tokens)
    n = min(seq.num_tokens - start, budget)
    alloc = self.kv_manager.allocate_slots(seq.seq_id, start, n, hit)
    if alloc is None:
      return None
    if fresh:
      self.kv_manager.record_lookup(seq.num_tokens, hit)
      if not req.forked:
        req.num_cached_tokens = hit.num_tokens
    seq.num_computed_tokens = start
    chosen[seq.seq_id] = ScheduledSeq(req, seq, start, n, self.kv_manager.block_ids(seq.seq_id))
    if alloc.copies:
      copies[seq.seq_id] = alloc.copies
    return n

  def preempt_all(self) -> None:
    """Sends every running request back to the waiting queue (in arrival order) with its blocks freed:
    after a failed step, whose lost pools held their KV."""
    for req in reversed(list(self.running)):
      self.running.remove(req)
      self._preempt(req)

  def _preempt(self, req: Request) -> None:
    for seq in req.seqs:
      self.kv_manager.free(seq.seq_id)
      seq.num_computed_tokens = 0
    req.status = RequestStatus.WAITING
    self.num_preemptions += 1
    self.waiting.appendleft(req)

  def update_after_step(self, out: SchedulerOutput) -> None:
    """Marks the scheduled tokens computed and registers newly full blocks in the prefix cache."""
    for s in out.seqs:
      s.seq.num_computed_tokens = s.start + s.num_tokens
      if self.kv_manager.has(s.seq.seq_id):
        self.kv_manager.cache_full_blocks(s.seq.seq_id, s.seq.token_ids, s.seq.num_computed_tokens)
