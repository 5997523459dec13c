"""The LLM engine end to end on small models: paged greedy equals contiguous decode and transformers."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxserve.engine import LLM, BeamSearchParams, SamplingParams
from jaxserve.generate import generate
from jaxserve.loaders import load_model
from jaxserve.model import forward

VOCAB = 97
N_OUT = 14
GREEDY = SamplingParams(temperature=0, max_tokens=N_OUT, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  torch.manual_seed(1)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 initializer_range=0.5, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval().float()
  path = os.path.join(tmp_path_factory.mktemp("hf"), "llama")
  model.save_pretrained(path, safe_serialization=True)
  return model, load_model(path)


def _prompts(seed=0, lengths=(1, 5, 8, 9, 23, 40, 70)):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(3, VOCAB, n)] for n in lengths]


def _ids(outputs):
  return [[c.token_ids for c in o.outputs] for o in outputs]


def test_mixed_batch_equals_contiguous_decode_and_transformers(hf_model):
  hf, loaded = hf_model
  prompts = _prompts()
  # 8-token blocks and a 32-token step budget: prompts span several blocks and are prefilled in chunks
  llm = LLM(loaded, block_size=8, max_num_batched_tokens=32, max_num_seqs=4)
  out = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
  ours = [o.outputs[0].token_ids for o in out]
  contiguous = [generate(loaded.params, loaded.cfg, [p], N_OUT)[0] for p in prompts]
  assert ours == contiguous
  for p, got in list(zip(prompts, ours))[::3]:
    with torch.no_grad():
      ref = hf.generate(torch.tensor([p]), max_new_tokens=N_OUT, min_new_tokens=N_OUT, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    assert got == ref[0, len(p):].tolist()
  assert all(o.outputs[0].finish_reason == "length" for o in out)
  assert llm.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("caching", [False, True])
def test_forced_preemption_and_prefix_cache_give_the_same_tokens(hf_model, caching):
  _, loaded = hf_model
  prompts = _prompts(1, (30, 31, 33, 40))
  want = [[generate(loaded.params, loaded.cfg, [p], N_OUT)[0]] for p in prompts]
  # 8 blocks of 8 = 64 slots: one 60-token sequence fits, two do not
  llm = LLM(loaded, block_size=8, num_kv_blocks=8, max_model_len=64, enable_prefix_caching=caching)
  got = _ids(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False))
  assert got == want
  assert llm.stats()["num_preemptions"] > 0
  assert llm.stats()["kv_blocks_used"] == 0
  # again: with caching the prompts' blocks are found in the cache (hit), without they are recomputed (miss)
  if not caching:
    assert llm.stats()["prefix_cache_hit_rate"] == 0.0
  # the last prompt's blocks were freed last, so they are still cached: a hit with caching, a miss without
  again = _ids(llm.generate([{"prompt_token_ids": p} for p in prompts[-1:]], GREEDY, use_tqdm=False))
  assert again == want[-1:]
  assert (llm.stats()["prefix_cache_hit_rate"] > 0.5) == caching


@functools.lru_cache
def _logprob_fn(cfg):
  return jax.jit(lambda p, t: jax.nn.log_softmax(forward(p, cfg, t).logits[0]))


def _full_logprobs(loaded, tokens, width=64):
  """log_softmax of a plain causal forward over ``tokens`` (right-padded to a fixed width: one compile)."""
  padded = np.zeros((1, width), np.int32)
  padded[0, :len(tokens)] = tokens
  return np.asarray(_logprob_fn(loaded.cfg)(loaded.params, padded))[:len(tokens)]


def _model_logprobs(loaded, prompt, output):
  logp = _full_logprobs(loaded, prompt + output)
  return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(output)]


def test_parallel_samples_share_blocks_and_stay_independent(hf_model):
  _, loaded = hf_model
  prompt = _prompts(2, (45,))[0]  # 5 full blocks of 8 and a partial one
  llm = LLM(loaded, block_size=8, max_num_batched_tokens=64)
  params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, logprobs=0)
  llm.add_request("n4", {"prompt_token_ids": prompt}, params)
  llm.step()  # prefill and first samples: 4 sequences on the prompt's 6 blocks
  assert llm.stats()["kv_blocks_used"] == 6
  llm.step()  # each writes into the shared partial block: 3 copies
  assert llm.stats()["kv_blocks_used"] == 9 and llm.stats()["num_block_copies"] == 3
  while llm.has_unfinished_requests():
    outs = llm.step()
  (out,) = outs
  assert out.finished and len({tuple(c.token_ids) for c in out.outputs}) > 1
  for c in out.outputs:  # each sample's logprobs are those of a model that saw only its own tokens
    np.testing.assert_allclose([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)],
                               _model_logprobs(loaded, prompt, c.token_ids), atol=2e-4)
    assert c.cumulative_logprob == pytest.approx(sum(lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)))


def test_top1_equals_greedy_and_seed_reproduces(hf_model):
  _, loaded = hf_model
  prompts = [{"prompt_token_ids": p} for p in _prompts(3, (4, 12, 20))]
  llm = LLM(loaded, block_size=8)
  greedy = _ids(llm.generate(prompts, GREEDY, use_tqdm=False))
  top1 = _ids(llm.generate(prompts, SamplingParams(temperature=0.8, top_k=1, max_tokens=N_OUT, ignore_eos=True),
                           use_tqdm=False))
  assert top1 == greedy
  seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=N_OUT, ignore_eos=True)
  a = _ids(llm.generate(prompts, seeded, use_tqdm=False))
  b = _ids(llm.generate(prompts[::-1], seeded, use_tqdm=False))[::-1]  # another batch order
  c = _ids(llm.generate(prompts[:1], seeded, use_tqdm=False))
  assert a == b and a[0] == c[0] and a != greedy


def _reference_beam_search(loaded, prompt, width, max_tokens, eos):
  """vLLM's algorithm with full recomputation: the specification of the engine's beam search."""
  beams, done = [(list(prompt), 0.0)], []
  for _ in range(max_tokens):
    cands = []
    for toks, cum in beams:
      logp = _full_logprobs(loaded, toks)[-1]
      for t in np.argsort(-logp, kind="stable")[:2 * width]:
        cands.append((toks + [int(t)], cum + float(logp[t])))
    cands.sort(key=lambda c: -c[1])
    beams = []
    for toks, cum in cands:
      if toks[-1] == eos:
        done.append((toks, cum))
      elif len(beams) < width:
        beams.append((toks, cum))
  score = lambda b: b[1] / (len(b[0]) - (b[0][-1] == eos))
  return sorted(done + beams, key=lambda b: -score(b))[:width]


def test_beam_search_returns_the_best_beams_in_order(hf_model):
  _, loaded = hf_model
  llm = LLM(loaded, block_size=8)
  prompts = _prompts(4, (6, 19))
  outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(beam_width=3, max_tokens=8))
  for p, out in zip(prompts, outs):
    ref = _reference_beam_search(loaded, p, 3, 8, loaded.cfg.eos_token_id)
    assert [c.token_ids for c in out.outputs] == [toks[len(p):] for toks, _ in ref]
    np.testing.assert_allclose([c.cumulative_logprob for c in out.outputs], [cum for _, cum in ref], atol=1e-3)
    scores = [c.cumulative_logprob / (len(p) + len(c.token_ids)) for c in out.outputs]
    assert scores == sorted(scores, reverse=True)
  assert llm.stats()["kv_blocks_used"] == 0


@pytest.fixture(scope="module")
def small_llm(hf_model):
  return LLM(hf_model[1], block_size=8, max_model_len=64, max_num_seqs=8)


@pytest.mark.parametrize("prompt, params, match", [
    ({"prompt_token_ids": list(range(3, 70))}, SamplingParams(), "max_model_len is 64"),
    ({"prompt_token_ids": [5, VOCAB]}, SamplingParams(), f"token id {VOCAB} is outside the vocabulary"),
    ({"prompt_token_ids": []}, SamplingParams(), "empty"),
    ("text", SamplingParams(), "text prompts need a tokenizer"),
    ({"prompt_token_ids": [5]}, SamplingParams(n=9), "n=9 exceeds max_num_seqs=8"),
    ({"prompt_token_ids": [5]}, "greedy", "must be a SamplingParams"),
])
def test_bad_requests_fail_alone(small_llm, hf_model, prompt, params, match):
  _, loaded = hf_model
  llm = small_llm
  good = _prompts(5, (7,))[0]
  want = generate(loaded.params, loaded.cfg, [good], N_OUT)[0]
  llm.add_request("good", {"prompt_token_ids": good}, GREEDY)
  with pytest.raises(ValueError, match=match):
    llm.add_request("bad", prompt, params)
  outs = []
  while llm.has_unfinished_requests():  # the good request, added before the bad one, is served
    outs += [o for o in llm.step() if o.finished]
  assert [o.request_id for o in outs] == ["good"] and outs[0].outputs[0].token_ids == want
  with pytest.raises(ValueError, match=f"prompt 1: .*{match}"):
    llm.generate([{"prompt_token_ids": good}, prompt], [GREEDY, params], use_tqdm=False)
  assert not llm.has_unfinished_requests()  # nothing of the refused batch was queued
  assert _ids(llm.generate([{"prompt_token_ids": good}], GREEDY, use_tqdm=False)) == [[want]]


def test_prompt_containers_and_bad_engine_arguments(small_llm, hf_model):
  """None or a number as prompts raised TypeError ('not iterable'); a numpy array of token ids was split
  into one-token 'prompts' and refused; a bad abort id raised TypeError; enable_prefix_caching="no"
  turned caching on, and seed="x" or block_size=True were taken."""
  llm = small_llm
  for bad in (None, 5, 2.5):
    with pytest.raises(ValueError, match="prompts must be a prompt"):
      llm.generate(bad, GREEDY, use_tqdm=False)
  prompts = _prompts(9, (5, 5))
  want = _ids(llm.generate(prompts, GREEDY, use_tqdm=False))
  assert _ids(llm.generate(np.array(prompts), GREEDY, use_tqdm=False)) == want  # [N, T]: a batch
  assert _ids(llm.generate(np.array(prompts[0]), GREEDY, use_tqdm=False)) == want[:1]  # [T]: one prompt
  assert _ids(llm.generate([np.int64(t) for t in prompts[0]], GREEDY, use_tqdm=False)) == want[:1]
  for bad in (None, 5):
    with pytest.raises(ValueError, match="request_id must be a request id string"):
      llm.abort_request(bad)
  for kw, match in ((dict(model={"a": 1}), "model must be a path, a LoadedModel or None"),
                    (dict(enable_prefix_caching="no"), "enable_prefix_caching must be True or False"),
                    (dict(seed="x"), "seed must be an int"), (dict(block_size=True), "block_size must be an int")):
    with pytest.raises(ValueError, match=match):
      LLM(**{"model": hf_model[1], "compile": "lazy", **kw})


def test_bad_params_values_are_refused():
  for kw in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=1.5), dict(top_p=0.0), dict(n=0)):
    with pytest.raises(ValueError):
      SamplingParams(**kw)


def test_abort_frees_blocks_and_no_recompilation_after_warmup(hf_model):
  _, loaded = hf_model
  llm = LLM(loaded, block_size=8, max_num_batched_tokens=64, compilation_cache=False)
  prompts = [{"prompt_token_ids": p} for p in _prompts(6, (3, 17, 33, 50, 9))]
  runner = llm.engine.runner
  jit_cache = lambda: len(runner._executables) + sum(f._cache_size() for f in (runner._forward, runner._sample, runner._copy))
  warm, cached = llm.stats()["num_compiled_programs"], jit_cache()
  assert warm == len(runner.program_keys())  # the constructor compiled the whole set
  first = _ids(llm.generate(prompts, GREEDY, use_tqdm=False))
  llm.reset_prefix_cache()  # else the second run hits the cache and its steps have other shapes
  assert _ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == first
  assert llm.stats()["num_compiled_programs"] == warm and jit_cache() == cached  # nothing recompiled
  llm.add_request("a", prompts[3], SamplingParams(temperature=0, max_tokens=50))
  llm.add_request("b", prompts[1], SamplingParams(temperature=0, max_tokens=50))
  llm.step()
  llm.step()
  assert llm.stats()["kv_blocks_used"] > 0
  llm.abort_request("a")
  llm.abort_request("b")
  assert not llm.has_unfinished_requests() and llm.stats()["kv_blocks_used"] == 0


def test_lazy_background_compile_never_blocks_a_step(hf_model):
  _, loaded = hf_model
  prompts = [{"prompt_token_ids": p} for p in _prompts(7, (3, 17, 33, 50, 9, 26, 61, 4))]
  params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (14, 3, 9, 20, 5, 11, 2, 17)]
  kw = dict(block_size=8, max_num_batched_tokens=64, max_num_seqs=16, compile="lazy", compilation_cache=False)
  plain = LLM(loaded, **kw)
  assert plain.stats()["num_compiled_programs"] == 0  # lazy: nothing compiled before the first step
  want = _ids(plain.generate(prompts, params, use_tqdm=False))
  assert plain.engine.runner.num_blocking_compiles > 0 and plain.engine.runner.num_fallback_steps == 0

  llm = LLM(loaded, background_compile=True, **kw)
  runner = llm.engine.runner
  runner._compile(runner.step_key(64, decode_only=False))  # the largest step program holds every step
  for _ in range(2):
    assert _ids(llm.generate(prompts, params, use_tqdm=False)) == want
    llm.reset_prefix_cache()
  assert runner.num_blocking_compiles == 0  # every step ran at once, in its program or a compiled larger one
  assert runner.num_fallback_steps > 0
  for f in list(runner._compiling.values()):
    f.result(timeout=120)
  assert len(runner._executables) > 1  # the steps' own programs were compiled on the helper thread
  left = len(runner.program_keys()) - len(runner._executables)
  assert llm.warmup() == left and llm.warmup() == 0 and llm.stats()["num_compiled_programs"] == len(runner.program_keys())

  with pytest.raises(ValueError, match="max_num_seqs must be an int >= 1"):
    llm.warmup(max_num_seqs=0)


def test_stop_conditions_and_text_on_stories260k():
  llm = LLM(max_num_seqs=8)
  tok = llm.get_tokenizer()
  base = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0].outputs[0]
  assert base.text and base.finish_reason in ("length", "stop")
  word = base.text.split()[5]
  cut = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=60, stop=[word]),
                     use_tqdm=False)[0].outputs[0]
  assert cut.finish_reason == "stop" and cut.stop_reason == word and word not in cut.text
  assert base.text.startswith(cut.text)
  third = base.token_ids[2]
  by_id = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=60, stop_token_ids=[third]),
                       use_tqdm=False)[0].outputs[0]
  assert by_id.token_ids == base.token_ids[:3] and by_id.stop_reason == third
  short = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0].outputs[0]
  assert short.token_ids == base.token_ids[:4] and short.finish_reason == "length"
  assert tok.decode(short.token_ids) == short.text


def test_min_tokens_and_eos(hf_model):
  _, loaded = hf_model
  llm = LLM(loaded, block_size=8)
  prompt = {"prompt_token_ids": _prompts(7, (5,))[0]}
  base = llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
  eos = base[3]  # pretend the 4th greedy token is EOS
  loaded_eos = loaded._replace(cfg=loaded.cfg.replace(eos_token_id=eos))
  llm = LLM(loaded_eos, block_size=8)
  stop = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
  assert stop.token_ids == base[:4] and stop.finish_reason == "stop"
  late = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, min_tokens=6), use_tqdm=False)[0]
  assert eos not in late.outputs[0].token_ids[:6] and len(late.outputs[0].token_ids) >= 6


def test_pallas_backend_in_interpret_mode_equals_xla(hf_model):
  _, loaded = hf_model
  prompts = [{"prompt_token_ids": p} for p in _prompts(8, (3, 26))]
  params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
  xla = LLM(loaded, block_size=8, max_num_batched_tokens=16, attention_backend="xla")
  pallas = LLM(loaded, block_size=8, max_num_batched_tokens=16, attention_backend="pallas", pallas_interpret=True)
  assert _ids(pallas.generate(prompts, params, use_tqdm=False)) == _ids(xla.generate(prompts, params, use_tqdm=False))
