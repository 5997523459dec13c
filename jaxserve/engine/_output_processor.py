"""Turns sampled tokens into outputs: logprobs, stop checks, incremental detokenization, RequestOutputs."""

from __future__ import annotations

from typing import Any

from jaxserve.engine._detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer, anchor_ids, find_stop, holdback
from jaxserve.engine._outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.engine._request import Request, Sequence
from jaxserve.engine._sampler import SamplerOutput
from jaxserve.engine._sampling_params import SamplingParams


class OutputProcessor:
  """Appends each sampled token to its sequence, decides whether the sequence finished (and why),
  and builds the cumulative :class:`RequestOutput` of a request (its text through the sequence's
  :class:`IncrementalDetokenizer`)."""

  def __init__(self, tokenizer: Any, eos_id: int | None):
    self.tokenizer = tokenizer
    self.eos_id = eos_id
    self._anchor = anchor_ids(tokenizer) if tokenizer is not None else ()
    self._anchor_text = tokenizer.decode(list(self._anchor)) if self._anchor else ""

  # ---- per token
  def append_token(self, req: Request, seq: Sequence, out: SamplerOutput, row: int) -> bool:
    """Appends sampler row ``row``'s token to ``seq``; returns True when it finished the sequence
    (``finish_reason`` and ``stop_reason`` set; freeing it is the caller's)."""
    p: SamplingParams = req.params
    token = int(out.tokens[row])
    seq.token_ids.append(token)
    if p.logprobs is not None:
      seq.cumulative_logprob += float(out.logprob[row])
      seq.logprobs.append(self._logprob_entry(out, row, token, p.logprobs))
    n_out = seq.num_output_tokens
    reason = None
    if n_out >= p.min_tokens:
      if token == self.eos_id and not p.ignore_eos:
        reason = ("stop", None)
      elif token in p.stop_token_ids:
        reason = ("stop", token)
    if reason is None and p.stop:  # a stop token's own text is not searched (nor shown, see _text)
      num_new_chars = self.detokenizer(seq).step(self.tokenizer, seq.token_ids)
      if n_out > p.min_tokens:  # the stop must end in the text of a token after the first min_tokens
        reason = self._check_stop_strings(seq, p, num_new_chars)
    if reason is None and n_out >= req.max_output_tokens:
      reason = ("length", None)
    if reason is None:
      return False
    seq.finish_reason, seq.stop_reason = reason
    return True

  def _logprob_entry(self, out: SamplerOutput, row: int, token: int, k: int) -> dict[int, Logprob]:
    dec = self._decode_token if self.tokenizer is not None else (lambda i: None)
    entry = {token: Logprob(float(out.logprob[row]), int(out.rank[row]), dec(token))}
    for j in range(k):
      tid = int(out.top_ids[row, j])
      if tid not in entry:
        entry[tid] = Logprob(float(out.top_logprobs[row, j]), j + 1, dec(tid))
    return entry

  def _decode_token(self, token: int) -> str:
    """One token's text as it reads inside a text, leading space included (decoded after the
    anchor: sentencepiece drops the space of a decoded run's first token; vLLM restores it too)."""
    if self._anchor:
      full = self.tokenizer.decode([*self._anchor, token])
      if full.startswith(self._anchor_text):
        return full[len(self._anchor_text):]
    return self.tokenizer.decode([token])

  def _check_stop_strings(self, seq: Sequence, p: SamplingParams, num_new_chars: int) -> tuple[str, str] | None:
    """Searches only the new text (and the tail a stop could span): O(new text + longest stop) per token."""
    text = seq.detok.text
    hit = find_stop(text, num_new_chars, p.stop)
    if hit is None:
      return None
    at, stop = hit
    seq.text = text[:at + len(stop)] if p.include_stop_str_in_output else text[:at]
    return ("stop", stop)

  def detokenizer(self, seq: Sequence) -> IncrementalDetokenizer:
    """The sequence's incremental detokenizer. It advances with every token when stop strings need
    the text, else when the text is read (each step for a server, once at the end for ``generate``)."""
    if seq.detok is None:
      seq.detok = IncrementalDetokenizer(seq.num_prompt_tokens, self._anchor)
    return seq.detok

  # ---- outputs
  def output(self, req: Request) -> RequestOutput:
    """The request's cumulative output (finished completions first, in index order)."""
    seqs = sorted(req.finished_seqs + req.seqs, key=lambda s: s.index)
    detok = self.tokenizer is not None and req.params.detokenize
    outs = []
    for seq in seqs:
      text = self._text(seq, req) if detok else ""
      cum = seq.cumulative_logprob if req.is_beam or seq.logprobs is not None else None
      outs.append(CompletionOutput(seq.index, text, list(seq.output_token_ids), cum, seq.logprobs,
                                   seq.finish_reason, seq.stop_reason))
    return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), outs, req.finished,
                         req.num_cached_tokens, req.error)

  def decode_output(self, seq: Sequence) -> str:
    """The output's text as it continues the prompt (decoded after a few prompt tokens, so that
    a leading space of the first output token is kept, as sentencepiece drops it at the start)."""
    ctx = seq.token_ids[max(0, seq.num_prompt_tokens - CONTEXT_TOKENS):seq.num_prompt_tokens]
    prefix = self.tokenizer.decode(ctx)
    full = self.tokenizer.decode(ctx + seq.output_token_ids)
    return full[len(prefix):] if full.startswith(prefix) else self.tokenizer.decode(seq.output_token_ids)

  def _text(self, seq: Sequence, req: Request) -> str:
    """The completion's text; while it runs, without the tail a stop string could still cut off."""
    if seq.text is not None:  # cut by a stop string
      return seq.text
    if req.is_beam:  # beams are new sequences every step: decoded whole
      return self.decode_output(seq) if seq.num_output_tokens else ""
    detok = self.detokenizer(seq)
    if seq.finish_reason is not None:
      # a stop token (EOS or one of stop_token_ids) is kept in token_ids but not in the text (as vLLM)
      by_token = seq.finish_reason == "stop" and not req.params.include_stop_str_in_output
      detok.finish(self.tokenizer, seq.token_ids[:-1] if by_token else seq.token_ids)
      return detok.text
    detok.step(self.tokenizer, seq.token_ids)
    text = detok.text
    return text[:max(0, len(text) - holdback(req.params.stop, req.params.include_stop_str_in_output))]
