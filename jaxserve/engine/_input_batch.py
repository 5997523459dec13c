"""Builds a step's inputs: the model's host arrays from the scheduled sequences, the sampler's per-row settings."""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence as Seq

import numpy as np

from jaxserve.engine._attention import make_meta
from jaxserve.engine._request import Request, Sequence
from jaxserve.engine._sampler import SamplerConfig, SamplingTensors
from jaxserve.engine._scheduler import ScheduledSeq


def step_arrays(seqs: Seq[ScheduledSeq], num_decode: int, key: tuple[str, int, int, int], *, block_size: int,
                table_width: int) -> tuple:
  """The step's host arrays ``(tokens, positions, meta, logits_index)`` for program ``key``.

  Sequence ``j`` takes logits slot ``j`` (in decode-only programs, all are decodes); ``num_decode``
  leading sequences are decodes batched apart when the program has decode slots.
  """
  _, num_tokens, slots, decode_slots = key
  tokens = np.zeros((1, num_tokens), np.int32)
  positions = np.zeros((1, num_tokens), np.int32)
  logits_index = np.zeros((1, slots), np.int32)
  row = 0
  for j, s in enumerate(seqs):
    end = s.start + s.num_tokens
    tokens[0, row:row + s.num_tokens] = s.seq.token_ids[s.start:end]
    positions[0, row:row + s.num_tokens] = np.arange(s.start, end)
    row += s.num_tokens
    logits_index[0, j] = row - 1
  meta = make_meta([(s.num_tokens, s.start + s.num_tokens, s.block_ids) for s in seqs],
                   num_decode if decode_slots else 0, num_tokens=num_tokens, decode_slots=decode_slots,
                   prefill_slots=slots - decode_slots, block_size=block_size, table_width=table_width)
  return tokens, positions, meta, logits_index


class SamplingBatch(NamedTuple):
  """The sampler's inputs for one step.

  Attributes:
    tensors: per-row settings (``R`` padded rows).
    cfg: the sampler program's static choice.
    row_of: for each sampled sequence, its first row (a prompt of ``n`` samples has ``n`` rows).
    plain: greedy without penalties or logprobs: the step's own argmax is the answer.
  """

  tensors: SamplingTensors
  cfg: SamplerConfig
  row_of: list[int]
  plain: bool


def sampling_batch(sampled: Seq[tuple[ScheduledSeq, int]], *, vocab_size: int, num_padded_rows: Callable[[int], int],
                   eos_id: int | None, fail: Callable[[Request, str], None]) -> SamplingBatch:
  """Per-row sampling arrays for the sampled sequences (each with its logits row).

  A request whose rows cannot be built is passed to ``fail`` alone; its rows stay neutral (greedy, ignored).
  """
  rows: list[tuple[Request, Sequence, int, int]] = []  # request, seq, logits row, completion index
  row_of = []
  for s, row in sampled:
    req = s.request
    row_of.append(len(rows))
    k = req.params.n if not req.is_beam and not req.forked else 1
    rows.extend((req, s.seq, row, s.seq.index + i) for i in range(k))
  r = num_padded_rows(len(rows))
  f32 = lambda v: np.full(r, v, np.float32)
  t = dict(row_index=np.zeros(r, np.int32), temperature=f32(0), top_k=np.full(r, vocab_size, np.int32), top_p=f32(1),
           min_p=f32(0), repetition_penalty=f32(1), presence_penalty=f32(0), frequency_penalty=f32(0),
           seed=np.zeros((r, 2), np.uint32), counter=np.zeros((r, 2), np.int32))
  neutral = {name: a[0].copy() for name, a in t.items()}
  for i, (req, seq, row, index) in enumerate(rows):
    t["row_index"][i] = row
    if req.finished:
      continue
    try:
      fill_row(t, i, req, seq, index, vocab_size)
    except Exception as e:  # noqa: BLE001 - this request alone fails
      for name, a in t.items():
        a[i] = row if name == "row_index" else neutral[name]
      fail(req, f"building this request's sampling inputs failed: {type(e).__name__}: {e}")
  live = [(i, req, seq) for i, (req, seq, _, _) in enumerate(rows) if not req.finished]
  want_logprobs = any(req.is_beam or req.params.logprobs is not None for _, req, _ in live)
  penalties = [(i, req, seq) for i, req, seq in live if not req.is_beam and req.params.has_penalties]
  bans = [(i, req, seq) for i, req, seq in live if not req.is_beam and seq.num_output_tokens < req.params.min_tokens]
  extra = dict(prompt_mask=None, output_counts=None, banned=None)
  if penalties or bans:
    extra = dict(prompt_mask=np.zeros((r, vocab_size), bool), output_counts=np.zeros((r, vocab_size), np.int32),
                 banned=np.zeros((r, vocab_size), bool))
    for i, req, seq in penalties:
      extra["prompt_mask"][i, req.prompt_token_ids] = True
      np.add.at(extra["output_counts"][i], seq.output_token_ids, 1)
    for i, req, seq in bans:
      p = req.params
      stops = list(p.stop_token_ids) + ([eos_id] if eos_id is not None and not p.ignore_eos else [])
      extra["banned"][i, stops] = True
  cfg = SamplerConfig(vocab_arrays=bool(penalties or bans))
  plain = not (cfg.vocab_arrays or want_logprobs or t["temperature"].any())
  return SamplingBatch(SamplingTensors(**t, **extra, logprobs=np.bool_(want_logprobs)), cfg, row_of, plain)


def fill_row(t: dict[str, np.ndarray], i: int, req: Request, seq: Sequence, index: int, vocab_size: int) -> None:
  """Writes one sampling row's settings (neutral values stand for a setting that is off)."""
  if req.is_beam:
    return
  p = req.params
  t["seed"][i] = (req.seed & 0xFFFFFFFF, req.seed >> 32)
  t["counter"][i] = (index, seq.num_output_tokens)
  t["temperature"][i] = p.temperature
  if p.temperature > 0:
    if p.top_k > 0 or p.top_p < 1:
      t["top_k"][i] = min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size
      t["top_p"][i] = p.top_p
    if p.min_p > 0:
      t["min_p"][i] = p.min_p
  if p.has_penalties:
    t["repetition_penalty"][i] = p.repetition_penalty
    t["presence_penalty"][i] = p.presence_penalty
    t["frequency_penalty"][i] = p.frequency_penalty
