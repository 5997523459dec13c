"""Validates a prompt and its sampling parameters into a new Request (vLLM's input processor)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Mapping, Sequence as Seq

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine._kv_cache_manager import cdiv
from jaxserve.engine._request import Request, Sequence
from jaxserve.engine._sampling_params import BeamSearchParams, SamplingParams

PromptType = str | Mapping[str, Any] | Seq[int]


class InputProcessor:
  """Checks each request against the model and the engine's limits before it touches any engine state."""

  def __init__(self, cfg: ModelConfig, tokenizer: Any, *, max_model_len: int, max_num_seqs: int, block_size: int,
               num_usable_blocks: int, seed: int):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.max_model_len = max_model_len
    self.max_num_seqs = max_num_seqs
    self.block_size = block_size
    self.num_usable_blocks = num_usable_blocks
    self.seed = seed
    self._arrivals = itertools.count()

  def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams | BeamSearchParams, *,
                   next_seq_id: Callable[[], int]) -> Request:
    """A new request with its prompt's sequence, or ValueError naming the problem."""
    if not isinstance(params, (SamplingParams, BeamSearchParams)):
      raise ValueError(f"sampling_params must be a SamplingParams or BeamSearchParams, got {type(params).__name__}")
    text, ids = self.prompt_ids(prompt)
    if len(ids) >= self.max_model_len:
      raise ValueError(f"prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: at most "
                       f"{self.max_model_len - 1} prompt tokens leave room to generate")
    beam = isinstance(params, BeamSearchParams)
    if getattr(params, "stop", ()) and self.tokenizer is None:
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
    if blocks > self.num_usable_blocks:
      raise ValueError(f"this request may need {blocks} KV blocks ({width} sequence(s) of up to "
                       f"{len(ids) + max_out} tokens) but the pool has {self.num_usable_blocks}; lower "
                       f"max_tokens or n, or give the engine more KV memory")
    arrival = next(self._arrivals)
    seed = params.seed if not beam and params.seed is not None else hash((self.seed, arrival)) & (2**63 - 1)
    req = Request(request_id, text, ids, params, arrival, seed % 2**64, max_out)
    req.seqs.append(Sequence(next_seq_id(), list(ids), len(ids),
                             logprobs=[] if not beam and params.logprobs is not None else None))
    return req

  def prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
    """The prompt's text (if any) and token ids, checked against the vocabulary."""
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
