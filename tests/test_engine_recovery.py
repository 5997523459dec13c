"""Failures: a failed device step costs its requests only and the engine serves on; a request whose
own host work fails fails alone."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine import LLM, EngineStepError, SamplingParams
from jaxserve.engine import _input_batch
from jaxserve.loaders import LoadedModel
from jaxserve.model import init_params
from jaxserve.testing import tiny_config

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded():
  cfg = tiny_config(vocab_size=101, max_position_embeddings=128)
  return LoadedModel(cfg, init_params(cfg, seed=3), None)


@pytest.fixture(scope="module")
def reference(loaded):
  """An engine that never fails."""
  return LLM(loaded, block_size=8, max_num_seqs=8, max_num_batched_tokens=128, compilation_cache=False)


def _engine(loaded):
  return LLM(loaded, block_size=8, max_num_seqs=8, max_num_batched_tokens=128, compilation_cache=False)


def _prompts(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [{"prompt_token_ids": rng.integers(3, 101, n).tolist()} for n in lengths]


def _ids(outs):
  return [o.outputs[0].token_ids for o in outs]


def _fail_once_after_dispatch(monkeypatch, runner):
  """The next step program runs (taking the donated pools) and then raises, once."""
  real, state = runner._run_step, {"armed": True, "donated": None}

  def run_step(exe, args):
    out = real(exe, args)
    if state["armed"]:
      state["armed"] = False
      state["donated"] = runner.kv_pools[0][0]
      raise RuntimeError("injected device failure")
    return out

  monkeypatch.setattr(runner, "_run_step", run_step)
  return state


def test_a_failed_step_fails_its_requests_and_the_engine_serves_the_next_correctly(loaded, reference, monkeypatch):
  prompts = _prompts((5, 30, 17))
  want = _ids(reference.generate(prompts, GREEDY, use_tqdm=False))
  llm = _engine(loaded)
  llm.generate(prompts, GREEDY, use_tqdm=False)  # fills the prefix cache with these prompts' blocks
  for i, p in enumerate(prompts[:2]):
    llm.add_request(f"r{i}", p, GREEDY)
  llm.step()
  llm.step()
  state = _fail_once_after_dispatch(monkeypatch, llm.engine.runner)
  with pytest.raises(EngineStepError, match="injected device failure") as err:
    llm.step()
  assert sorted(err.value.request_ids) == ["r0", "r1"]
  assert state["donated"].is_deleted()  # the failure came after the pools were donated to the step
  assert not llm.has_unfinished_requests()
  stats = llm.stats()
  assert stats["kv_blocks_used"] == 0
  # fresh pools and an empty prefix cache: the same prompts give the untouched engine's tokens
  assert _ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
  assert llm.stats()["prefix_cache_hits"] == 0


def test_generate_raises_on_a_failed_step_and_leaves_the_engine_idle(loaded, reference, monkeypatch):
  prompts = _prompts((9, 3), seed=1)
  want = _ids(reference.generate(prompts, GREEDY, use_tqdm=False))
  llm = _engine(loaded)
  _fail_once_after_dispatch(monkeypatch, llm.engine.runner)
  with pytest.raises(EngineStepError):
    llm.generate(prompts, GREEDY, use_tqdm=False)
  assert not llm.has_unfinished_requests() and llm.stats()["kv_blocks_used"] == 0
  assert _ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == want


def test_running_requests_outside_the_failed_step_are_recomputed(loaded, reference, monkeypatch):
  """A request not in the failed step loses its KV too; it goes back to the queue and finishes correctly."""
  prompts = _prompts((40, 6), seed=2)
  want = _ids(reference.generate(prompts, GREEDY, use_tqdm=False))
  llm = _engine(loaded)
  llm.add_request("long", prompts[0], GREEDY)
  llm.step()
  llm.add_request("short", prompts[1], GREEDY)
  scheduler = llm.engine.scheduler
  real = scheduler.schedule

  def only_short():  # 'long' keeps its blocks but sits this step out, as a token budget can make it
    sched = real()
    for s in sched.seqs:
      if s.request.request_id != "short":
        s.seq.num_computed_tokens = s.start
    return type(sched)(tuple(s for s in sched.seqs if s.request.request_id == "short"), (), sched.preempted)

  monkeypatch.setattr(scheduler, "schedule", only_short)
  _fail_once_after_dispatch(monkeypatch, llm.engine.runner)
  with pytest.raises(EngineStepError) as err:
    llm.step()
  assert err.value.request_ids == ["short"]
  monkeypatch.setattr(scheduler, "schedule", real)
  assert llm.get_num_unfinished_requests() == 1 and llm.stats()["kv_blocks_used"] == 0
  outs = {}
  while llm.has_unfinished_requests():
    outs.update({o.request_id: o for o in llm.step() if o.finished})
  assert outs["long"].outputs[0].token_ids == want[0]


def test_a_request_whose_step_inputs_fail_fails_alone(loaded, reference, monkeypatch):
  prompts = _prompts((5, 9, 37, 20), seed=4)
  want = _ids(reference.generate(prompts, GREEDY, use_tqdm=False))
  llm = _engine(loaded)
  real = _input_batch.make_meta

  def make_meta(seqs, *args, **kw):  # host metadata of the 37-token prompt cannot be built
    if any(kv_len == 37 for _, kv_len, _ in seqs):
      raise ValueError("injected metadata failure")
    return real(seqs, *args, **kw)

  monkeypatch.setattr(_input_batch, "make_meta", make_meta)
  for i, p in enumerate(prompts):
    llm.add_request(f"r{i}", p, GREEDY)
  outs = {}
  while llm.has_unfinished_requests():
    outs.update({o.request_id: o for o in llm.step() if o.finished})
  bad = outs.pop("r2")
  assert bad.outputs[0].finish_reason == "error" and "injected metadata failure" in bad.error
  assert [outs[f"r{i}"].outputs[0].token_ids for i in (0, 1, 3)] == [want[i] for i in (0, 1, 3)]
  assert all(o.error is None for o in outs.values())
  assert llm.stats()["kv_blocks_used"] == 0
  with pytest.raises(RuntimeError, match="1 of 4 prompts failed; prompt 2: .*injected metadata failure"):
    llm.generate(prompts, GREEDY, use_tqdm=False)
  assert not llm.has_unfinished_requests()


def test_a_request_whose_sampling_inputs_fail_fails_alone(loaded, reference, monkeypatch):
  prompts = _prompts((5, 9, 12), seed=5)
  sampled = [SamplingParams(temperature=0.8, top_k=2**40, seed=i, max_tokens=12, ignore_eos=True) for i in range(3)]
  want = _ids(reference.generate(prompts, sampled, use_tqdm=False))
  llm = _engine(loaded)
  real = _input_batch.fill_row

  def fill_row(t, i, req, seq, index, vocab_size):
    if req.request_id == "r1" and seq.num_output_tokens == 4:
      raise OverflowError("injected row failure")
    return real(t, i, req, seq, index, vocab_size)

  monkeypatch.setattr(_input_batch, "fill_row", fill_row)
  for i, (p, sp) in enumerate(zip(prompts, sampled)):
    llm.add_request(f"r{i}", p, sp)
  outs = {}
  while llm.has_unfinished_requests():
    outs.update({o.request_id: o for o in llm.step() if o.finished})
  assert outs["r1"].outputs[0].finish_reason == "error" and "OverflowError: injected row failure" in outs["r1"].error
  assert len(outs["r1"].outputs[0].token_ids) == 4
  assert [outs["r0"].outputs[0].token_ids, outs["r2"].outputs[0].token_ids] == [want[0], want[2]]
  assert llm.stats()["kv_blocks_used"] == 0
