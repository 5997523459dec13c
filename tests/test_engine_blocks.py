"""Block pool, KV cache manager and scheduler bookkeeping (host only: a fake model checks every KV slot)."""

from __future__ import annotations

import hashlib

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from jaxserve.engine._block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVBlock
from jaxserve.engine._engine import EngineCore
from jaxserve.engine._kv_cache_manager import KVCacheManager
from jaxserve.engine._sampler import SamplerOutput, num_top_logprobs
from jaxserve.engine._sampling_params import BeamSearchParams, SamplingParams
from jaxserve.testing import tiny_config

VOCAB = 40
EOS = 2


# ---------------------------------------------------------------- block pool
def test_free_queue_is_lru_and_supports_removal():
  blocks = [KVBlock(i) for i in range(5)]
  q = FreeBlockQueue(blocks)
  q.remove(blocks[2])
  assert [b.block_id for b in q] == [0, 1, 3, 4] and q.num_free == 4
  assert q.popleft() is blocks[0]
  q.append(blocks[2])
  assert [b.block_id for b in q] == [1, 3, 4, 2]
  with pytest.raises(RuntimeError):
    q.append(blocks[3])  # already queued


def test_null_block_is_never_allocated():
  pool = BlockPool(4)
  got = pool.get_new_blocks(3)
  assert NULL_BLOCK_ID not in [b.block_id for b in got]
  with pytest.raises(ValueError, match="only 0 free"):
    pool.get_new_blocks(1)
  pool.free_blocks(got)
  pool.check_invariants()
  with pytest.raises(RuntimeError, match="already 0"):
    pool.free_blocks(got[:1])


def test_cached_free_blocks_are_evicted_lru():
  pool = BlockPool(4)
  a, b, c = pool.get_new_blocks(3)
  for blk, h in ((a, b"a"), (b, b"b"), (c, b"c")):
    pool.cache_block(blk, h)
  pool.free_blocks([b, a, c])  # b freed first: least recently used
  assert pool.lookup(b"a") is a
  pool.touch([a])  # a prefix hit revives a free cached block
  assert a.ref_cnt == 1 and pool.num_free == 2
  (new,) = pool.get_new_blocks(1)
  assert new is b and pool.lookup(b"b") is None and pool.lookup(b"c") is c
  pool.check_invariants()


def test_manager_prefix_hit_fork_and_copy_on_write():
  kv = KVCacheManager(num_blocks=20, block_size=4)
  tokens = list(range(10))  # two full blocks and a partial one
  assert kv.allocate_slots(0, 0, 10) is not None
  kv.cache_full_blocks(0, tokens, 10)
  hit = kv.get_computed_blocks(1, tokens + [99])
  assert hit.num_tokens == 8 and [b.block_id for b in hit.blocks] == list(kv.block_ids(0)[:2])
  alloc = kv.allocate_slots(1, 8, 3, hit)
  assert alloc is not None and len(alloc.new_block_ids) == 1 and not alloc.copies
  assert kv.block_ids(1)[:2] == kv.block_ids(0)[:2]
  # a full, exactly block-aligned prompt leaves its last block to be recomputed (its logits are needed)
  assert kv.get_computed_blocks(2, tokens[:8]).num_tokens == 4
  kv.fork(0, 3)
  assert kv.block_ids(3) == kv.block_ids(0)
  used = kv.num_used_blocks
  alloc = kv.allocate_slots(3, 10, 1)  # writes into the shared partial block: copy-on-write
  assert alloc.copies == ((kv.block_ids(0)[2], kv.block_ids(3)[2]),)
  assert kv.num_used_blocks == used + 1 and kv.block_ids(3)[:2] == kv.block_ids(0)[:2]
  assert kv.allocate_slots(0, 10, 1).copies == ()  # the parent now owns its block alone
  kv.check_invariants()
  for s in (0, 1, 3):
    kv.free(s)
  kv.check_invariants()
  assert kv.num_used_blocks == 0


def test_allocation_failure_changes_nothing():
  kv = KVCacheManager(num_blocks=4, block_size=4)
  assert kv.allocate_slots(0, 0, 8) is not None
  before = (kv.pool.num_free, kv.block_ids(0))
  assert kv.allocate_slots(0, 8, 8) is None
  assert (kv.pool.num_free, kv.block_ids(0)) == before
  kv.check_invariants()


# ---------------------------------------------------------------- a fake model that checks the cache
def _token(context: tuple[int, ...], index: int) -> int:
  h = hashlib.blake2b(repr((context, index)).encode(), digest_size=8).digest()
  return int.from_bytes(h, "little") % VOCAB


class FakeRunner:
  """Stands in for the device: keeps (token, position) per KV slot and checks every read."""

  num_compiled_programs = 0

  def __init__(self, num_blocks: int, block_size: int):
    self.bs = block_size
    self.slots = np.full((num_blocks, block_size, 2), -1, np.int64)
    self.contexts: list[tuple[int, ...]] = []

  def execute(self, sched):
    for src, dst in sched.copies:
      assert dst != NULL_BLOCK_ID and src != NULL_BLOCK_ID
      self.slots[dst] = self.slots[src]
    self.contexts = []
    for s in sched.seqs:
      assert NULL_BLOCK_ID not in s.block_ids
      end = s.start + s.num_tokens
      assert len(s.block_ids) * self.bs >= end
      for pos in range(s.start, end):
        self.slots[s.block_ids[pos // self.bs], pos % self.bs] = (s.seq.token_ids[pos], pos)
      for pos in range(end):  # attention reads every earlier slot: it must hold this sequence's token
        got = tuple(self.slots[s.block_ids[pos // self.bs], pos % self.bs])
        assert got == (s.seq.token_ids[pos], pos), f"seq {s.seq.seq_id} reads {got} at position {pos}"
      self.contexts.append(tuple(s.seq.token_ids[:end]))
    greedy = np.array([_token(c, 0) for c in self.contexts] + [0] * 8, np.int32)  # padded like real slots
    return None, greedy, list(range(len(sched.seqs)))

  def sample(self, logits, t, cfg):
    del logits
    rows = len(t.row_index)
    tokens = np.array([_token(self.contexts[t.row_index[i]], int(t.counter[i, 0])) for i in range(rows)], np.int32)
    k = num_top_logprobs(VOCAB) if t.logprobs else 0
    top_ids = np.zeros((rows, k), np.int32)
    top_lp = np.zeros((rows, k), np.float32)
    for i in range(rows):
      ctx = self.contexts[t.row_index[i]]
      rng = np.random.default_rng(abs(hash(ctx)) % 2**32)
      lp = np.log(rng.dirichlet(np.ones(VOCAB)))
      order = np.argsort(-lp)[:k]
      top_ids[i], top_lp[i] = order, lp[order]
    return SamplerOutput(tokens, np.zeros(rows, np.float32), np.ones(rows, np.int32), top_ids, top_lp)


def make_engine(num_blocks, block_size=4, caching=True, max_num_seqs=8, max_tokens_per_step=16, max_model_len=64):
  cfg = tiny_config(vocab_size=VOCAB, eos_token_id=EOS, max_position_embeddings=max_model_len)
  runner = FakeRunner(num_blocks, block_size)
  return EngineCore(cfg, runner, None, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max_tokens_per_step, max_model_len=max_model_len,
                    enable_prefix_caching=caching, seed=0)


def run(engine, specs, aborts=(), check=True):
  """Adds requests at their arrival step, aborts some, runs to the end; returns outputs by id."""
  outputs, step = {}, 0
  pending = sorted(enumerate(specs), key=lambda x: x[1]["at"])
  while pending or engine.has_unfinished():
    while pending and pending[0][1]["at"] <= step:
      i, spec = pending.pop(0)
      try:
        engine.add(engine.make_request(f"r{i}", {"prompt_token_ids": spec["prompt"]}, spec["params"]))
      except ValueError as e:  # too big for this pool: refused up front, the others go on
        assert "KV blocks" in str(e)
        outputs[f"r{i}"] = "refused"
    for i, at in aborts:
      if at == step:
        req = engine.abort(f"r{i}")
        if req is not None:
          outputs[f"r{i}"] = engine.output(req)
    for req in engine.step():
      if req.finished:
        outputs[req.request_id] = engine.output(req)
    if check:
      engine.kv_manager.check_invariants()
    step += 1
    assert step < 2000, "no progress"
  return outputs


@st.composite
def workloads(draw):
  prefixes = [draw(st.lists(st.integers(3, VOCAB - 1), min_size=4, max_size=12)) for _ in range(2)]
  specs = []
  for _ in range(draw(st.integers(1, 8))):
    prompt = draw(st.sampled_from(prefixes)) if draw(st.integers(0, 3)) else []
    prompt = prompt + draw(st.lists(st.integers(0, VOCAB - 1), min_size=0 if prompt else 1, max_size=10))
    kind = draw(st.sampled_from(["single", "n", "beam"]))
    max_tokens = draw(st.integers(1, 10))
    if kind == "beam":
      params = BeamSearchParams(beam_width=draw(st.integers(1, 3)), max_tokens=max_tokens)
    else:
      n = draw(st.integers(2, 3)) if kind == "n" else 1
      params = SamplingParams(temperature=1.0 if n > 1 else 0.0, max_tokens=max_tokens, n=n,
                              ignore_eos=draw(st.booleans()))
    specs.append(dict(prompt=prompt, params=params, at=draw(st.sampled_from([0, 0, 0, 2, 5, 9]))))
  aborts = draw(st.lists(st.tuples(st.integers(0, len(specs) - 1), st.integers(0, 15)), max_size=2))
  return specs, aborts


def _tokens(outputs):
  return {rid: o if o == "refused" else [(c.index, c.token_ids, c.finish_reason) for c in o.outputs]
          for rid, o in outputs.items()}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.integers(8, 24), st.sampled_from([2, 4]), st.booleans())
def test_block_accounting_under_random_workloads(workload, num_blocks, block_size, caching):
  specs, aborts = workload
  engine = make_engine(num_blocks, block_size, caching, max_num_seqs=16, max_tokens_per_step=24)
  outputs = run(engine, specs, aborts)
  # every block is free once every request finished or was aborted; nothing leaked
  assert engine.kv_manager.num_used_blocks == 0
  assert engine.kv_manager.pool.num_free == num_blocks - 1
  assert all(b.ref_cnt == 0 for b in engine.kv_manager.pool.blocks)
  assert not engine.scheduler.requests
  # the same requests on a pool that never preempts, without prefix caching, give the same tokens
  if not aborts:
    refused = [i for i in range(len(specs)) if outputs[f"r{i}"] == "refused"]
    big = _tokens(run(make_engine(400, block_size, False), specs))
    assert _tokens(outputs) == {k: "refused" if int(k[1:]) in refused else v for k, v in big.items()}


def test_forced_preemption_recomputes_to_the_same_tokens():
  specs = [dict(prompt=list(range(3, 3 + 9 + i)), params=SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                at=0) for i in range(4)]
  for caching in (False, True):
    engine = make_engine(num_blocks=12, block_size=4, caching=caching)  # 11 usable: barely more than one
    out = run(engine, specs)
    assert engine.scheduler.num_preemptions > 0
    ref = run(make_engine(400, 4, False), specs)
    assert _tokens(out) == _tokens(ref)
    assert all(len(o.outputs[0].token_ids) == 12 for o in out.values())


def test_n_samples_share_prompt_blocks():
  prompt = list(range(3, 3 + 37))  # 9 full blocks of 4 and one partial
  params = SamplingParams(temperature=1.0, n=4, max_tokens=1, ignore_eos=True)
  engine = make_engine(num_blocks=200, block_size=4, max_tokens_per_step=64)
  req = engine.make_request("x", {"prompt_token_ids": prompt}, params)
  engine.add(req)
  engine.step()  # prefill + first sample: forked into 4, every block shared
  assert req.finished and engine.kv_manager.num_used_blocks == 0
  params = SamplingParams(temperature=1.0, n=4, max_tokens=3, ignore_eos=True)
  engine = make_engine(num_blocks=200, block_size=4, max_tokens_per_step=64)
  req = engine.make_request("y", {"prompt_token_ids": prompt}, params)
  engine.add(req)
  engine.step()
  assert len(req.seqs) == 4 and engine.kv_manager.num_used_blocks == 10
  tables = [engine.kv_manager.block_ids(s.seq_id) for s in req.seqs]
  assert len(set(tables)) == 1 and engine.kv_manager.pool.blocks[tables[0][0]].ref_cnt == 4
  engine.step()  # each sample writes its token into the shared partial block: three copies
  tables = [engine.kv_manager.block_ids(s.seq_id) for s in req.seqs]
  assert len({t[:9] for t in tables}) == 1 and len({t[9] for t in tables}) == 4
  assert engine.kv_manager.num_copies == 3 and engine.kv_manager.num_used_blocks == 13
  outs = [c.token_ids for c in engine.output(req).outputs]
  assert len({tuple(o) for o in outs}) > 1  # the samples went their own ways


def test_stats_count_waste_and_hits():
  engine = make_engine(num_blocks=100, block_size=4)
  spec = dict(prompt=list(range(3, 20)), params=SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), at=0)
  run(engine, [spec])
  engine.reset_stats()
  run(engine, [dict(spec, at=0)])
  s = engine.stats()
  assert s["prefix_cache_hits"] == 16 and s["prefix_cache_queries"] == 17
  assert 0 < s["kv_waste_fraction"] < 0.5
  # no block is allocated ahead of its tokens: the waste is that of the partial last block alone
  assert s["kv_waste_floor_fraction"] == s["kv_waste_fraction"]
  assert 17 <= s["kv_mean_tokens_per_seq"] <= 21


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=12), st.integers(1, 8),
                          st.integers(1, 2)), min_size=3, max_size=8),
       st.integers(9, 14), st.booleans())
def test_preemption_under_pressure_keeps_accounting_and_tokens(reqs, num_blocks, caching):
  specs = [dict(prompt=p, params=SamplingParams(temperature=1.0, max_tokens=m, n=n, ignore_eos=True), at=0)
           for p, m, n in reqs]
  engine = make_engine(num_blocks, 2, caching, max_num_seqs=16, max_tokens_per_step=24)
  outputs = run(engine, specs)
  assert engine.kv_manager.pool.num_free == num_blocks - 1 and not engine.scheduler.requests
  refused = {f"r{i}" for i in range(len(specs)) if outputs[f"r{i}"] == "refused"}
  big = _tokens(run(make_engine(400, 2, False), specs))
  assert _tokens(outputs) == {k: "refused" if k in refused else v for k, v in big.items()}
