"""The engine's programs: a fixed set compiled in the constructor, none added by any workload or
sampling setting, and a persistent cache that a second process loads instead of compiling."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
from jax import monitoring

from jaxserve.engine import LLM, BeamSearchParams, SamplingParams
from jaxserve.engine._block_pool import KVBlock
from jaxserve.loaders import LoadedModel
from jaxserve.model import init_params
from jaxserve.testing import tiny_config

ROOT = Path(__file__).resolve().parents[1]
_COMPILES = {"n": 0}


def _count(event: str, duration: float, **kw) -> None:
  del duration, kw
  if event == "/jax/core/compile/backend_compile_duration":  # every XLA compile (or cache load) in the process
    _COMPILES["n"] += 1


monitoring.register_event_duration_secs_listener(_count)


def _tiny() -> LoadedModel:
  cfg = tiny_config(vocab_size=101, max_position_embeddings=128)
  return LoadedModel(cfg, init_params(cfg, seed=0), None)


@pytest.fixture(scope="module")
def llm():
  return LLM(_tiny(), block_size=8, max_num_seqs=16, max_num_batched_tokens=64, compilation_cache=False)


def _compiles_during(fn):
  before = _COMPILES["n"]
  out = fn()
  return out, _COMPILES["n"] - before


def test_eager_construction_compiles_the_whole_fixed_set(llm):
  runner = llm.engine.runner
  keys = runner.program_keys()
  assert llm.stats()["num_compiled_programs"] == len(keys) == len(set(keys))
  steps = [k for k in keys if k[0] == "step"]
  # one step program per padded token count (plus decode-only ones where the attention wants them)
  assert len(steps) == len(runner.token_buckets) + (len({runner.step_key(n, True) for n in range(1, 17)})
                                                    if runner.split_decodes else 0)
  assert llm.warmup() == 0


def test_a_mixed_workload_compiles_nothing_after_construction(llm):
  rng = np.random.default_rng(0)
  programs = llm.stats()["num_compiled_programs"]
  for batch in (1, 3, 7, 16, 25):
    lengths = rng.integers(1, 100, batch)
    prompts = [{"prompt_token_ids": rng.integers(3, 101, n).tolist()} for n in lengths]
    params = [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True) for m in rng.integers(1, 20, batch)]
    _, n = _compiles_during(lambda: llm.generate(prompts, params, use_tqdm=False))
    assert n == 0, f"batch {batch}: {n} XLA compiles after construction"
  _, n = _compiles_during(lambda: llm.beam_search([{"prompt_token_ids": [5, 6, 7]}],
                                                  BeamSearchParams(beam_width=3, max_tokens=4)))
  assert n == 0
  assert llm.stats()["num_compiled_programs"] == programs


def _random_params(rng) -> SamplingParams:
  kw = dict(max_tokens=int(rng.integers(1, 4)), ignore_eos=bool(rng.integers(2)), n=int(rng.integers(1, 4)))
  if rng.random() < 0.8:
    kw["temperature"] = float(rng.choice([0.0, rng.uniform(0.05, 2.0)]))
  if rng.random() < 0.5:
    kw["top_k"] = int(rng.choice([-1, 0, 1, rng.integers(1, 200), 2**40]))
  if rng.random() < 0.5:
    kw["top_p"] = float(rng.uniform(0.05, 1.0))
  if rng.random() < 0.3:
    kw["min_p"] = float(rng.uniform(0, 1))
  if rng.random() < 0.3:
    kw["repetition_penalty"] = float(rng.uniform(0.5, 2.0))
  if rng.random() < 0.3:
    kw["presence_penalty"] = float(rng.uniform(-2, 2))
  if rng.random() < 0.3:
    kw["frequency_penalty"] = float(rng.uniform(-2, 2))
  if rng.random() < 0.5:
    kw["seed"] = int(rng.integers(-(2**63), 2**63))
  if rng.random() < 0.4:
    kw["logprobs"] = int(rng.integers(0, 21))
  if rng.random() < 0.2:
    kw["min_tokens"] = int(rng.integers(0, kw["max_tokens"] + 1))
  return SamplingParams(**kw)


def test_200_random_sampling_configurations_add_no_program(llm):
  rng = np.random.default_rng(14)
  configs = [_random_params(rng) for _ in range(200)]
  programs = llm.stats()["num_compiled_programs"]
  before = _COMPILES["n"]
  for i in range(0, len(configs), 10):  # ten requests in flight at a time, every mix of settings in a batch
    batch = configs[i:i + 10]
    for j, p in enumerate(batch):
      llm.add_request(f"cfg-{i + j}", {"prompt_token_ids": rng.integers(3, 101, int(rng.integers(1, 30))).tolist()}, p)
    finished = set()
    while llm.has_unfinished_requests():
      for out in llm.step():
        assert out.error is None, out.error
        if out.finished:
          finished.add(out.request_id)
          for c in out.outputs:
            assert c.finish_reason in ("stop", "length")
    assert len(finished) == len(batch)
  assert _COMPILES["n"] - before == 0
  assert llm.stats()["num_compiled_programs"] == programs


def test_lazy_compile_and_bad_settings():
  loaded = _tiny()
  lazy = LLM(loaded, block_size=8, max_num_seqs=8, max_num_batched_tokens=32, compile="lazy", compilation_cache=False)
  assert lazy.stats()["num_compiled_programs"] == 0
  lazy.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
  assert 0 < lazy.stats()["num_compiled_programs"] < len(lazy.engine.runner.program_keys())
  with pytest.raises(ValueError, match="compile must be 'eager' or 'lazy', got 'fast'"):
    LLM(loaded, compile="fast")
  with pytest.raises(ValueError, match="compilation_cache must be True, False or a directory path, got 3"):
    LLM(loaded, compilation_cache=3)


_PROCESS = textwrap.dedent("""
    import json, sys
    import jax
    from jax import monitoring
    counts = {"compiles": 0, "hits": 0}
    def on_duration(event, duration, **kw):
      if event == "/jax/core/compile/backend_compile_duration":
        counts["compiles"] += 1
    def on_event(event, **kw):
      if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
    monitoring.register_event_duration_secs_listener(on_duration)
    monitoring.register_event_listener(on_event)
    sys.path.insert(0, sys.argv[2])
    from tests.test_engine_compile import _tiny
    from jaxserve.engine import LLM, SamplingParams
    llm = LLM(_tiny(), block_size=8, max_num_seqs=8, max_num_batched_tokens=32, compilation_cache=sys.argv[1])
    engine = dict(counts, programs=llm.stats()["num_compiled_programs"], loaded=llm.engine.runner.program_cache.hits)
    out = llm.generate([[3, 4, 5], [6, 7]], [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       SamplingParams(temperature=0.9, top_p=0.8, seed=3, max_tokens=4, ignore_eos=True,
                                      repetition_penalty=1.2)], use_tqdm=False)  # the sampler program runs too
    # the engine leaves JAX's settings alone: a user's own compile afterwards is not cached by it
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    files = len(list(__import__("pathlib").Path(sys.argv[1]).iterdir()))
    jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(7)).block_until_ready()
    after_user = len(list(__import__("pathlib").Path(sys.argv[1]).iterdir()))
    # ... and a cache directory the user configures afterwards is used (JAX decides once per process
    # whether its cache is on; the engine's compiles must not have decided "off" for the process)
    user_dir = jax.config.jax_compilation_cache_dir
    mine = __import__("pathlib").Path(sys.argv[1] + "-user")
    jax.config.update("jax_compilation_cache_dir", str(mine))
    jax.jit(lambda x: x * 5 - 2)(jax.numpy.ones(9)).block_until_ready()
    print(json.dumps(dict(engine=engine, tokens=[o.outputs[0].token_ids for o in out], files=files,
                          user_dir=user_dir, files_after_user_compile=after_user,
                          users_own_cache_files=len(list(mine.iterdir())) if mine.exists() else 0)))
""")


def _process(cache_dir: Path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _PROCESS, str(cache_dir), str(ROOT)], capture_output=True, text=True,
                        env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_programs_from_the_persistent_cache(tmp_path):
  cache = tmp_path / "xla"
  first = _process(cache)
  assert first["engine"]["hits"] == first["engine"]["loaded"] == 0 and first["files"] > 0
  # programs stored by a process whose compiles could have come from JAX's own cache still run
  # (JAX serializes an executable it loaded from its cache without its code)
  shutil.rmtree(cache / "jaxserve-executables")
  again = _process(cache)
  assert again["engine"]["loaded"] == 0 and again["tokens"] == first["tokens"]
  second = _process(cache)
  programs = second["engine"]["programs"]
  # every engine program came from disk whole (the executable cache: not even traced), none was compiled
  assert second["engine"]["loaded"] == programs == first["engine"]["programs"] > 0
  assert second["engine"]["compiles"] - second["engine"]["hits"] <= first["engine"]["compiles"] - programs
  assert len(list((cache / "jaxserve-executables").glob("*.exe"))) == programs
  assert second["tokens"] == first["tokens"]
  for run in (first, second):
    assert run["user_dir"] is None  # JAX's process-wide setting untouched
    assert run["files_after_user_compile"] == run["files"]  # the user's program did not land in the engine's cache
    assert run["users_own_cache_files"] > 0  # a cache the user configures afterwards is on
  assert (os.stat(cache).st_mode & 0o777) == 0o700


def test_serve_and_generate_pass_the_compile_flags_to_the_engine():
  from jaxserve._cli_serve import llm_kwargs
  from jaxserve.cli import build_parser
  default = build_parser().parse_args(["serve"])
  assert llm_kwargs(default)["compile"] == "eager" and llm_kwargs(default)["compilation_cache"] is True
  lazy = build_parser().parse_args(["serve", "--compile", "lazy", "--no-compilation-cache"])
  assert llm_kwargs(lazy)["compile"] == "lazy" and llm_kwargs(lazy)["compilation_cache"] is False
  gen = build_parser().parse_args(["generate", "hi", "--compile", "eager", "--no-compilation-cache"])
  assert (gen.compile, gen.compilation_cache) == ("eager", False)
  assert build_parser().parse_args(["generate", "hi"]).compile == "lazy"  # one prompt compiles what it runs


def test_a_users_jax_cache_dir_is_used_not_replaced(tmp_path):
  import jax
  from jaxserve.engine import _compile_cache
  user = tmp_path / "user-cache"
  jax.config.update("jax_compilation_cache_dir", str(user))
  try:
    assert _compile_cache.resolve(True) == str(user) == _compile_cache.resolve(str(tmp_path / "mine"))
    llm = LLM(_tiny(), block_size=8, max_num_seqs=8, max_num_batched_tokens=16)
    assert jax.config.jax_compilation_cache_dir == str(user)
    assert len(list(user.iterdir())) >= llm.stats()["num_compiled_programs"] > 0  # the engine's programs went there
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    from jax._src import compilation_cache as jax_cache
    jax_cache.reset_cache()  # JAX's cache object stays bound to that directory otherwise (later tests' compiles)
  assert _compile_cache.resolve(False) is None
  with pytest.raises(ValueError, match="compilation_cache must be True, False or a directory path"):
    _compile_cache.resolve(3)


def test_step_buckets_are_powers_of_two_where_padding_is_skipped(llm):
  """On the C++ CPU kernels (which multiply only a step's real rows) steps pad to powers of two (8, 16, 32, ...);
  elsewhere decode batches pad to multiples of 8 (then 32), token counts with 1.5x steps from 384 on. Either
  set holds every token count up to the budget."""
  from jaxserve.engine._model_runner import step_token_buckets
  coarse, fine = step_token_buckets(256, 2048, cheap_padding=True), step_token_buckets(256, 2048)
  assert coarse == (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
  assert {24, 40, 96, 160, 384, 768, 1536} <= set(fine) and len(fine) == 20
  for buckets in (coarse, fine):
    assert all(any(b >= n for b in buckets) for n in range(1, 2049))
  runner = llm.engine.runner
  if runner.uses_cpu_kernels:
    assert runner.token_buckets == step_token_buckets(16, 64, cheap_padding=True) == (8, 16, 32, 64)


def test_the_executable_cache_hits_only_the_same_program_and_trusts_only_private_entries(tmp_path):
  """Programs stored whole come back for the same model and settings (same tokens); other settings miss;
  a corrupt entry is a miss (compiled again, same tokens); a directory others can write to is not used."""
  cache = tmp_path / "cache"
  kw = dict(block_size=8, max_num_seqs=8, max_num_batched_tokens=16, compilation_cache=str(cache))
  greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
  run = lambda llm: [o.outputs[0].token_ids for o in llm.generate([[3, 4, 5], [9]], greedy, use_tqdm=False)]
  first = LLM(_tiny(), **kw)
  programs, want = first.stats()["num_compiled_programs"], run(first)
  assert first.engine.runner.program_cache.hits == 0
  again = LLM(_tiny(), **kw)
  assert again.engine.runner.program_cache.hits == programs and run(again) == want
  other = LLM(_tiny(), **dict(kw, block_size=16))  # another pool shape: nothing of the first may be reused
  assert other.engine.runner.program_cache.hits == 0 and run(other) == want
  for entry in (cache / "jaxserve-executables").glob("*.exe"):
    entry.write_bytes(b"not a program")
  corrupt = LLM(_tiny(), **kw)
  assert corrupt.engine.runner.program_cache.hits == 0 and run(corrupt) == want
  os.chmod(cache / "jaxserve-executables", 0o777)
  try:
    shared = LLM(_tiny(), **kw)
    assert shared.engine.runner.program_cache is None  # not trusted: JAX's own cache there instead
    assert run(shared) == want
  finally:
    os.chmod(cache / "jaxserve-executables", 0o700)


def test_the_executable_cache_evicts_the_least_recently_used_entries(tmp_path):
  """The directory stays under its bound: a store past it removes the entries used longest ago (a load counts
  as a use)."""
  import jax
  import jax.numpy as jnp

  from jaxserve.engine._executable_cache import ExecutableCache
  compiled = [jax.jit((lambda c: lambda x: x * c)(float(i))).lower(jnp.ones(4)).compile() for i in (2, 3, 5)]
  cache = ExecutableCache(str(tmp_path))
  cache.store("a", compiled[0])
  size = (cache.dir / "a.exe").stat().st_size
  cache.max_bytes = int(2.5 * size)  # room for two entries
  cache.store("b", compiled[1])
  os.utime(cache.dir / "a.exe", (1, 1))
  os.utime(cache.dir / "b.exe", (2, 2))
  assert cache.load("a") is not None  # "a" used now: "b" is the oldest
  cache.store("c", compiled[2])
  assert sorted(p.name for p in cache.dir.glob("*.exe")) == ["a.exe", "c.exe"]
  assert float(cache.load("c")(jnp.ones(4))[0]) == 5.0
  cache.max_bytes = 0  # below one entry: everything goes, also the one stored last
  cache.evict()
  assert list(cache.dir.glob("*.exe")) == []


def _live(cls) -> int:
  return sum(type(o) is cls for o in gc.get_objects())


@pytest.mark.parametrize("kw", [{}, {"background_compile": True}, {"tensor_parallel_size": 2}],
                         ids=["eager", "background", "tp2"])
def test_a_dropped_engine_frees_its_programs_without_a_garbage_collection(kw):
  # Python's full collection runs rarely in a big process: anything of the engine's kept alive only
  # by a reference cycle (its compiled programs' code is mapped memory, its KV pools device memory)
  # stayed until then; a process building engine after engine ran out of memory maps (CI died so).
  gc.collect()
  gc.disable()
  try:
    blocks_before = _live(KVBlock)
    llm = LLM(_tiny(), block_size=8, max_num_seqs=4, max_num_batched_tokens=32, compilation_cache=False, **kw)
    out = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 5 for o in out)
    runner = weakref.ref(llm.engine.runner)
    forward = weakref.ref(llm.engine.runner._forward)
    pools = [weakref.ref(k) for k, _ in llm.engine.runner.kv_pools]
    del llm, out
    assert runner() is None, "the model runner outlived its engine (a reference cycle holds it)"
    assert forward() is None, "the jitted step (and its compiled programs) outlived the engine"
    assert all(p() is None for p in pools), "the KV pools outlived the engine"
    assert _live(KVBlock) == blocks_before, "the block pool's blocks outlived the engine"
  finally:
    gc.enable()


def test_loading_and_preparing_a_model_lowers_no_program(tmp_path):
  """Reading a Hugging Face directory, packing and fusing its kernels run on the host: an eager jnp
  op (a transpose, ``jnp.asarray`` of a host array) lowers and compiles a program for each new shape,
  which cost a warm start about a third of its construction."""
  import dataclasses

  from jaxserve.engine._weight_forms import prepare_params, weight_formats
  import jax

  from jaxserve.loaders import load_model, save_hf
  from jaxserve.weights import on_device

  cfg = dataclasses.replace(tiny_config(vocab_size=211, max_position_embeddings=64), intermediate_size=80)
  save_hf(cfg, init_params(cfg, seed=3), str(tmp_path / "hf"))  # shapes no other test compiles for
  lowered = []

  def on_lower(event: str, duration: float, **kw) -> None:
    del duration, kw
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(event)

  def pruned(params, zero):  # the blocks' kernels with zeros where zero(kernel) says
    def one(path, x):
      name = jax.tree_util.keystr(path)
      return on_device(np.where(zero(np.asarray(x)), 0, x)) if "layers_" in name and "kernel" in name else x
    return jax.tree_util.tree_map_with_path(one, params)

  rng = np.random.default_rng(0)
  two_four = lambda w: (np.arange(w.shape[0]) % 4 < 2)[:, None] & np.ones(w.shape, bool)  # noqa: E731
  seventy = lambda w: rng.random(w.shape) < 0.7  # noqa: E731
  monitoring.register_event_duration_secs_listener(on_lower)
  try:
    loaded = load_model(str(tmp_path / "hf"))
    params = prepare_params(loaded.params, native=True, fuse=True)
    after_dense = list(lowered)
    sparse = [prepare_params(p, native=True, fuse=True) for p in
              [pruned(loaded.params, z) for z in (two_four, seventy)]]
  finally:
    monitoring.unregister_event_duration_listener(on_lower)
  assert after_dense == [] and lowered == []  # also joining compressed (2:4, bitmask) kernels
  assert weight_formats(params).get("packed", 0) > 0
  assert "qkv_proj" in params["layers_0"]["self_attn"] and "gate_up_proj" in params["layers_0"]["mlp"]
  assert weight_formats(sparse[0]).get("2:4", 0) > 0 and weight_formats(sparse[1]).get("bitmask", 0) > 0
  assert "qkv_proj" in sparse[0]["layers_0"]["self_attn"] and "gate_up_proj" in sparse[1]["layers_0"]["mlp"]


def test_programs_jax_cache_may_have_served_are_not_stored(tmp_path):
  """JAX's cache object stays bound after jax_compilation_cache_dir is unset (by the user's code, or by an
  earlier test): a compile may then be a hit there, and JAX serializes such an executable without its code,
  so the executable cache must not store it (the next process would fail with "Function ... not found")."""
  import jax
  from jax._src import compilation_cache as jax_cache
  from jaxserve.engine import _compile_cache
  jax_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users-jax-cache"))
  try:
    jax.jit(lambda x: x * 7 + 1)(jax.numpy.ones(5)).block_until_ready()  # binds JAX's cache there
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
  try:
    assert _compile_cache.jax_cache_may_serve()
    cache = tmp_path / "mine"
    llm = LLM(_tiny(), block_size=8, max_num_seqs=8, max_num_batched_tokens=16, compilation_cache=str(cache))
    runner = llm.engine.runner
    assert runner.program_cache is not None and runner.program_cache.skipped == llm.stats()["num_compiled_programs"] > 0
    assert not list((cache / "jaxserve-executables").glob("*.exe"))
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
  finally:
    jax_cache.reset_cache()
  assert not _compile_cache.jax_cache_may_serve()
  stored = LLM(_tiny(), block_size=8, max_num_seqs=8, max_num_batched_tokens=16, compilation_cache=str(tmp_path / "b"))
  assert stored.engine.runner.program_cache.skipped == 0
  assert len(list((tmp_path / "b" / "jaxserve-executables").glob("*.exe"))) == stored.stats()["num_compiled_programs"]
