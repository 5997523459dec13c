"""Beam search over a request's live beams: each step keeps the best continuations; vLLM's final ranking."""

from __future__ import annotations

from typing import Callable

from jaxserve.engine._request import Request, Sequence
from jaxserve.engine._sampler import SamplerOutput
from jaxserve.engine._sampling_params import BeamSearchParams
from jaxserve.engine._scheduler import Scheduler


def set_candidates(seq: Sequence, out: SamplerOutput, row: int, beam_width: int) -> None:
  """Stores a beam's ``2 * beam_width`` best next tokens (and their logprobs) until its siblings have theirs."""
  k = 2 * beam_width
  seq.beam_candidates = list(zip(out.top_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist()))


def ready(req: Request) -> bool:
  """Whether every live beam of ``req`` has proposed its candidates."""
  return not req.finished and all(seq.beam_candidates is not None for seq in req.seqs)


def beam_step(req: Request, scheduler: Scheduler, *, eos_id: int | None, next_seq_id: Callable[[], int]) -> None:
  """Keeps the best ``beam_width`` continuations of all live beams; EOS continuations finish.

  The kept beams are new sequences that share their parent's KV blocks (forked in the scheduler's
  cache manager); the parents are dropped. When no beam is left or they reach the length limit,
  the request finishes with its ``beam_width`` best finished beams, best first.
  """
  p: BeamSearchParams = req.params
  cands = [(seq.cumulative_logprob + lp, n, seq, tok) for seq in req.seqs
           for n, (tok, lp) in enumerate(seq.beam_candidates)]
  cands.sort(key=lambda c: -c[0])
  keep = []
  for score, _, parent, tok in cands:
    if tok == eos_id and not p.ignore_eos:
      done = Sequence(-1, parent.token_ids + [tok], parent.num_prompt_tokens, cumulative_logprob=score,
                      finish_reason="stop")
      req.finished_seqs.append(done)
    elif len(keep) < p.beam_width:
      keep.append((score, parent, tok))
  new = []
  for score, parent, tok in keep:
    child = Sequence(next_seq_id(), parent.token_ids + [tok], parent.num_prompt_tokens,
                     num_computed_tokens=parent.num_computed_tokens, cumulative_logprob=score)
    scheduler.kv_manager.fork(parent.seq_id, child.seq_id)
    new.append(child)
  for seq in list(req.seqs):
    scheduler.drop_seq(req, seq)
  req.seqs.extend(new)
  rank = lambda seqs: sorted(seqs, key=lambda s: -beam_score(s, p, eos_id))[:p.beam_width]
  req.finished_seqs = rank(req.finished_seqs)
  if not new or new[0].num_output_tokens >= req.max_output_tokens:
    for seq in list(req.seqs):
      seq.finish_reason = "length"
      scheduler.finish_seq(req, seq)
    ranked = rank(req.finished_seqs)
    for i, seq in enumerate(ranked):
      seq.index = i
    req.finished_seqs = ranked
    scheduler.finish_request(req)


def beam_score(seq: Sequence, p: BeamSearchParams, eos_id: int | None) -> float:
  """vLLM's ranking: cumulative logprob over (prompt + output length, final EOS not counted) ** penalty."""
  n = seq.num_tokens - (1 if seq.token_ids[-1] == eos_id and seq.finish_reason == "stop" else 0)
  return seq.cumulative_logprob / (n ** p.length_penalty)
