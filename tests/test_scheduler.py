"""The scheduler's prompt budget (``max_num_prefill_tokens``): a burst's prompts are read one after another,
first come first served, steps fill a step size, decodes are never held back; the engine's tokens are unchanged."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from jaxserve.engine._kv_cache_manager import KVCacheManager
from jaxserve.engine._request import Request, Sequence
from jaxserve.engine._sampling_params import SamplingParams
from jaxserve.engine._scheduler import Scheduler

STEP_SIZES = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)  # the runner's token buckets up to 2048


def _scheduler(prefill=None, step_sizes=STEP_SIZES, budget=2048, num_blocks=2000):
  return Scheduler(KVCacheManager(num_blocks, 16, enable_caching=False), max_num_seqs=256,
                   max_num_batched_tokens=budget, max_num_prefill_tokens=prefill, step_sizes=step_sizes)


def _request(i, prompt_len=128, max_tokens=64):
  prompt = [3 + (7 * i + j) % 90 for j in range(prompt_len)]
  return Request(f"r{i}", None, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), i, 0, max_tokens,
                 seqs=[Sequence(i, list(prompt), prompt_len)])


def _step(sched):
  """One step with a fake model: every sampled sequence gets a token; finished requests leave.
  Returns the scheduler output and the ids of requests that sampled their first token."""
  out = sched.schedule()
  sched.update_after_step(out)
  first = []
  for s in out.seqs:
    if not s.samples:
      continue
    s.request.forked = True
    s.seq.token_ids.append(5)
    if s.seq.num_output_tokens == 1:
      first.append(s.request.request_id)
    if s.seq.num_output_tokens >= s.request.max_output_tokens:
      sched.finish_seq(s.request, s.seq)
      sched.finish_request(s.request)
  return out, first


def _first_token_steps(sched, n):
  """Adds ``n`` requests of 128 prompt tokens at once; the step at which each samples its first token."""
  for i in range(n):
    sched.add(_request(i))
  steps, k = {}, 0
  while len(steps) < n:
    _, first = _step(sched)
    steps.update({rid: k for rid in first})
    k += 1
  return [steps[f"r{i}"] for i in range(n)]


@pytest.mark.parametrize("n", [8, 32])
def test_a_burst_is_read_one_prompt_after_another_in_arrival_order(n):
  # the old policy: the whole burst (up to max_num_batched_tokens) in one step, so every request waits for all
  assert _first_token_steps(_scheduler(None), 8) == [0] * 8
  steps = _first_token_steps(_scheduler(128), n)
  # 128 prompt tokens a step: a request's first token the step its own prompt is read, in arrival order; later
  # steps also carry the decodes of those before, so a prompt can spill into a second step, never a third
  assert steps == sorted(steps) and len(set(steps)) == n
  assert steps[0] == 0 and all(1 <= b - a <= 2 for a, b in zip(steps, steps[1:]))
  # mean first-token step: about half the burst's reading time, against the whole of it in one big step
  assert np.mean(steps) < 0.65 * n


def test_prompt_share_fills_a_step_size_decodes_included():
  sched = _scheduler(128)
  for i in range(8):
    sched.add(_request(i, prompt_len=16))
  _step(sched)  # eight 16-token prompts in one 128-token step; from now on eight decodes
  sched.add(_request(8))
  out, _ = _step(sched)
  assert out.num_decode == 8 and out.num_tokens == 128  # 8 decodes + 120 prompt tokens: the 128-token program
  out, first = _step(sched)
  assert out.num_tokens == 8 + 8 and first == ["r8"]  # its last 8 prompt tokens beside the 8 decodes
  # no step size in (decodes, decodes + budget]: the budget as it is
  assert _scheduler(128, step_sizes=()).prefill_budget(8) == 128
  # many decodes: the largest step size within decodes + budget, so prompts still move
  assert _scheduler(128).prefill_budget(200) == 56 and _scheduler(128).prefill_budget(256) == 128


def test_decodes_are_not_held_back_by_the_prompt_budget():
  sched = _scheduler(16)
  for i in range(40):
    sched.add(_request(i, prompt_len=1, max_tokens=8))
  out, _ = _step(sched)
  assert out.num_tokens == 16  # 16 one-token prompts
  _step(sched)
  _step(sched)
  out, _ = _step(sched)
  assert out.num_decode == 40  # all 40 decodes run in one step: the 16-token prompt budget holds back none


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 12), st.integers(0, 20)), min_size=1, max_size=24),
       st.sampled_from([None, 16, 64, 128, 256]), st.booleans())
def test_budgets_hold_and_every_request_finishes(specs, prefill, aligned):
  sched = _scheduler(prefill, STEP_SIZES if aligned else (), budget=512, num_blocks=4000)
  pending = sorted(((at, i, p, m) for i, (p, m, at) in enumerate(specs)))
  step = 0
  while pending or sched.has_unfinished():
    while pending and pending[0][0] <= step:
      _, i, p, m = pending.pop(0)
      sched.add(_request(i, prompt_len=p, max_tokens=m))
    decodes = sum(1 for r in sched.running for s in r.seqs if s.num_uncomputed == 1)
    out, _ = _step(sched)
    prompt_tokens = sum(s.num_tokens for s in out.seqs if s.num_tokens > 1)
    assert out.num_tokens <= 512
    assert prompt_tokens <= sched.prefill_budget(decodes)
    if prefill is not None and aligned and prompt_tokens and out.num_tokens > decodes:
      # a step that reads prompts ends on a step size whenever one lies within decodes + budget
      if any(decodes < t <= decodes + prefill for t in STEP_SIZES) and sched.waiting:
        assert out.num_tokens in STEP_SIZES
    step += 1
    assert step < 5000, "no progress"
  assert sched.kv_manager.num_used_blocks == 0 and not sched.requests


def test_llm_gives_the_same_greedy_tokens_with_a_prompt_budget():
  from jaxserve.engine import LLM
  from jaxserve.loaders import LoadedModel
  from jaxserve.testing import tiny_model

  cfg, params = tiny_model(vocab_size=97, max_position_embeddings=256)
  loaded = LoadedModel(cfg, params, None)
  rng = np.random.default_rng(0)
  prompts = [{"prompt_token_ids": [int(t) for t in rng.integers(3, 97, n)]} for n in (5, 40, 70, 9, 23, 64, 1, 33)]
  greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
  kw = dict(block_size=8, max_num_seqs=8, max_num_batched_tokens=128, compilation_cache=False)
  ref = LLM(loaded, **kw).generate(prompts, greedy, use_tqdm=False)
  budgeted = LLM(loaded, max_num_prefill_tokens=32, **kw)
  out = budgeted.generate(prompts, greedy, use_tqdm=False)
  assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in ref]
  stats = budgeted.stats()  # prompts read in chunks of a step size still waste only partial last blocks
  assert stats["kv_waste_fraction"] == stats["kv_waste_floor_fraction"]
  # the same fixed program set: the budget only changes which compiled step sizes the steps use
  assert budgeted.stats()["num_compiled_programs"] == LLM(loaded, **kw).stats()["num_compiled_programs"]
  with pytest.raises(ValueError, match="max_num_prefill_tokens"):
    LLM(loaded, max_num_prefill_tokens=256, **kw)


def test_serve_flag_defaults_to_the_servers_prompt_budget():
  from jaxserve._cli_serve import SERVE_PREFILL_TOKENS, llm_kwargs
  from jaxserve.cli import build_parser

  def kw(*argv):
    return llm_kwargs(build_parser().parse_args(["serve", *argv]))["max_num_prefill_tokens"]

  assert kw() == SERVE_PREFILL_TOKENS == 128
  assert kw("--max-num-prefill-tokens", "256") == 256
  assert kw("--max-num-prefill-tokens", "0") is None  # no limit but --max-num-batched-tokens: LLM's default
  assert kw("--max-num-batched-tokens", "64") == 64  # the default never exceeds the step budget
  with pytest.raises(ValueError, match="max-num-prefill-tokens"):
    kw("--max-num-prefill-tokens", "-1")
