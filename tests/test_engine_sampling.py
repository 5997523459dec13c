"""SamplingParams validation and the device sampler against its numpy specification."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.engine import BeamSearchParams, SamplingParams, _cpu_kernels
from jaxserve.engine._sampler import (SamplerConfig, SamplerOutput, SamplingTensors, _row_keys, apply_penalties,
                                      num_top_logprobs, reference_processed_logits, sample, sample_native, sample_xla,
                                      top_k_top_p_min_p)

V = 64


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), r"temperature must be a finite number in \[0, 100\]"),
    (dict(temperature=float("inf")), r"temperature must be a finite number in \[0, 100\].*inf"),
    (dict(temperature=1e30), r"temperature .*got 1e\+30"),
    (dict(temperature=float("nan")), "temperature .*nan"),
    (dict(top_p=0.0), r"top_p must be a finite number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a finite number in \(0, 1\]"),
    (dict(n=0), "n must be an int >= 1"),
    (dict(max_tokens=0), "max_tokens must be an int >= 1"),
    (dict(top_k=-2), "top_k must be"),
    (dict(min_p=1.5), r"min_p must be a finite number in \[0, 1\]"),
    (dict(repetition_penalty=0), r"repetition_penalty must be a finite number in \[0.01, 100\]"),
    (dict(repetition_penalty=float("inf")), r"repetition_penalty .*\[0.01, 100\].*inf"),
    (dict(repetition_penalty=1e-30), r"repetition_penalty .*\[0.01, 100\]"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty must be a finite number in \[-2, 2\]"),
    (dict(top_p=float("nan")), r"top_p .*\(0, 1\]"),
    (dict(min_p=float("-inf")), r"min_p .*\[0, 1\]"),
    (dict(seed=2**64), r"seed must be an int in \[-2\*\*63, 2\*\*64\)"),
    (dict(seed=-(2**63) - 1), r"seed must be an int in \[-2\*\*63, 2\*\*64\)"),
    (dict(stop=["x"] * 401), "stop must hold at most 400 strings, got 401"),
    (dict(stop=["x" * 5000, "y" * 5000]), "stop strings must total at most 8192 characters, got 10000"),
    (dict(stop=5), "stop must be a string or a list of strings"),
    (dict(stop_token_ids=[3] * 401), "stop_token_ids must hold at most 400 ids, got 401"),
    (dict(stop_token_ids=["3"]), "stop_token_ids must be a list of ints"),
    (dict(n="2"), "n must be an int"),
    (dict(presence_penalty=3), r"presence_penalty must be a finite number in \[-2, 2\]"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logprobs=50), "logprobs must be <= 20"),
    (dict(stop=[""]), "stop must be non-empty strings"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be >= 0"),
    (dict(seed=1.5), "seed must be an int"),
])
def test_bad_sampling_params_raise_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_beam_params_validation_and_normalisation():
  with pytest.raises(ValueError, match="beam_width must be an int >= 1"):
    BeamSearchParams(beam_width=0, max_tokens=4)
  with pytest.raises(ValueError, match="length_penalty must be a finite number"):
    BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=float("inf"))
  p = SamplingParams(stop="x", stop_token_ids=[5])
  assert p.stop == ("x",) and p.stop_token_ids == (5,)


def _tensors(rows, **overrides):
  base = dict(row_index=np.arange(rows, dtype=np.int32), temperature=np.ones(rows, np.float32),
              top_k=np.full(rows, V, np.int32), top_p=np.ones(rows, np.float32), min_p=np.zeros(rows, np.float32),
              repetition_penalty=np.ones(rows, np.float32), presence_penalty=np.zeros(rows, np.float32),
              frequency_penalty=np.zeros(rows, np.float32), seed=np.zeros((rows, 2), np.uint32),
              counter=np.stack([np.zeros(rows), np.arange(rows)], 1).astype(np.int32), prompt_mask=None,
              output_counts=None, banned=None, logprobs=np.bool_(False))
  base.update(overrides)
  return SamplingTensors(**base)


def test_processing_matches_reference():
  rng = np.random.default_rng(0)
  for trial in range(20):
    logits = rng.standard_normal(V).astype(np.float32) * 3
    prompt = list(rng.integers(0, V, 5))
    output = list(rng.integers(0, V, 6))
    kw = dict(temperature=float(rng.choice([0.5, 1.0, 1.7])), top_k=int(rng.choice([0, 1, 5, 20])),
              top_p=float(rng.choice([1.0, 0.9, 0.3])), min_p=float(rng.choice([0.0, 0.05, 0.3])),
              repetition_penalty=float(rng.choice([1.0, 1.3, 0.8])), presence_penalty=float(rng.choice([0, 0.5])),
              frequency_penalty=float(rng.choice([0, -0.4, 0.7])))
    ref = reference_processed_logits(logits, prompt=prompt, output=output, **kw)
    pm = np.zeros((1, V), bool)
    pm[0, prompt] = True
    oc = np.zeros((1, V), np.int32)
    np.add.at(oc[0], output, 1)
    x = apply_penalties(jnp.asarray(logits[None]), jnp.asarray(pm), jnp.asarray(oc),
                        jnp.float32([kw["repetition_penalty"]]), jnp.float32([kw["presence_penalty"]]),
                        jnp.float32([kw["frequency_penalty"]]))
    x = top_k_top_p_min_p(x / kw["temperature"], jnp.int32([kw["top_k"] or V]), jnp.float32([kw["top_p"]]),
                          jnp.float32([kw["min_p"]]))
    got = np.asarray(x[0], np.float64)
    assert np.array_equal(np.isinf(got), np.isinf(ref)), f"trial {trial}: kept sets differ ({kw})"
    np.testing.assert_allclose(got[~np.isinf(got)], ref[~np.isinf(ref)], rtol=1e-5, atol=1e-5)


def test_top1_sampling_equals_greedy_and_samples_follow_the_distribution():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((8, V)).astype(np.float32) * 2)
  greedy = sample(logits, _tensors(8, temperature=np.zeros(8, np.float32)), SamplerConfig())
  top1 = sample(logits, _tensors(8, top_k=np.ones(8, np.int32)), SamplerConfig())
  np.testing.assert_array_equal(greedy.tokens, jnp.argmax(logits, -1))
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  # 4000 draws of one row: empirical frequencies follow softmax(logits)
  n = 4000
  t = _tensors(n, row_index=np.zeros(n, np.int32), counter=np.stack([np.zeros(n), np.arange(n)], 1).astype(np.int32))
  draws = np.asarray(jax.jit(sample, static_argnums=2)(logits, t, SamplerConfig()).tokens)
  freq = np.bincount(draws, minlength=V) / n
  np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0])), atol=0.03)


def test_seeded_rows_are_reproducible_and_independent_of_batch():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.standard_normal((4, V)).astype(np.float32))
  cfg = SamplerConfig()
  seed = np.array([[7, 0]] * 4, np.uint32)
  a = sample(logits, _tensors(4, seed=seed), cfg).tokens
  b = sample(logits[::-1], _tensors(4, seed=seed, row_index=np.arange(4)[::-1].astype(np.int32)), cfg).tokens
  np.testing.assert_array_equal(a, b)  # same (seed, counter, logits) -> same token, wherever the row sits
  many = [sample(logits, _tensors(4, seed=np.array([[s, 0]] * 4, np.uint32)), cfg).tokens for s in range(12)]
  assert len({tuple(np.asarray(m)) for m in many}) > 1


def test_logprobs_ranks_and_top_k():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((3, V)).astype(np.float32))
  out = sample(logits, _tensors(3, temperature=np.zeros(3, np.float32), logprobs=np.bool_(True)), SamplerConfig())
  logp = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(out.logprob, logp.max(-1), rtol=1e-6)
  np.testing.assert_array_equal(out.rank, 1)
  np.testing.assert_array_equal(out.top_ids[:, :4], np.argsort(-logp, -1)[:, :4])


def test_ban_masks_stop_tokens():
  logits = jnp.zeros((2, V)).at[:, 2].set(10.0)
  banned = np.zeros((2, V), bool)
  banned[0, 2] = True
  out = sample(logits, _tensors(2, temperature=np.zeros(2, np.float32), banned=banned, prompt_mask=np.zeros((2, V), bool),
                                output_counts=np.zeros((2, V), np.int32)), SamplerConfig(vocab_arrays=True))
  assert int(out.tokens[0]) != 2 and int(out.tokens[1]) == 2


def test_masks_of_a_batch_match_the_reference_row_by_row():
  # the cut-offs are per-row bisections over the logits' integer keys: rows must not leak into each
  # other, and negative, huge, tiny and banned (-inf) logits must order as floats do
  rng = np.random.default_rng(7)
  rows, v = 24, 203
  x = (rng.standard_normal((rows, v)) * rng.choice([1e-3, 1.0, 30.0, 1e30], (rows, 1))).astype(np.float32)
  x[rng.random((rows, v)) < 0.2] = -np.inf
  x[:, 0] = rng.standard_normal(rows)  # every row keeps a finite logit
  x[3] = -np.abs(x[3])  # all negative
  top_k = rng.choice([0, 1, 2, 7, v, v + 5], rows).astype(np.int32)
  top_p = rng.choice([0.0, 1e-6, 0.3, 0.9, 0.999, 1.0], rows).astype(np.float32)
  min_p = rng.choice([0.0, 0.1], rows).astype(np.float32)
  got = np.asarray(top_k_top_p_min_p(jnp.asarray(x), jnp.asarray(np.where(top_k == 0, v, top_k)), jnp.asarray(top_p),
                                     jnp.asarray(min_p)), np.float64)
  for r in range(rows):
    ref = reference_processed_logits(x[r], prompt=[], output=[], temperature=1.0, top_k=int(top_k[r]),
                                     top_p=float(top_p[r]), min_p=float(min_p[r]), repetition_penalty=1.0,
                                     presence_penalty=0.0, frequency_penalty=0.0)
    assert np.array_equal(np.isinf(got[r]), np.isinf(ref)), (r, top_k[r], top_p[r], min_p[r])
    np.testing.assert_array_equal(got[r][~np.isinf(ref)], x[r][~np.isinf(ref)])


def test_tokens_tied_at_a_cut_off_are_kept_together():
  x = jnp.float32([[3.0, 1.0, 2.0, 2.0, 0.5, 2.0]])
  kept = lambda out: np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist()  # noqa: E731
  # top-2: the 2nd largest is 2.0, held by three tokens: all three stay
  assert kept(top_k_top_p_min_p(x, jnp.int32([2]), jnp.float32([1.0]), jnp.float32([0.0]))) == [0, 2, 3, 5]
  # top-p 0: only the most likely token
  assert kept(top_k_top_p_min_p(x, jnp.int32([6]), jnp.float32([0.0]), jnp.float32([0.0]))) == [0]


def test_argmax_equals_jnp_argmax_on_ties_infinities_and_nans():
  from jaxserve.engine._sampler import argmax
  rng = np.random.default_rng(0)
  x = rng.standard_normal((9, 1000)).astype(np.float32)
  x[1, [7, 300, 999]] = 50.0  # a tie: the first index wins
  x[2] = -np.inf  # nothing finite: index 0
  x[3, 5] = np.inf
  x[4, [10, 20]] = np.nan  # the first NaN, as jnp.argmax
  x[5, 999] = 1e30  # the last column
  x[6] = 3.0  # all tied
  x[7, :] = rng.integers(-2, 2, 1000).astype(np.float32)  # many ties at the max
  x[8, [0, 1]] = [np.nan, 1e38]
  got = np.asarray(jax.jit(argmax)(jnp.asarray(x)))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
  np.testing.assert_array_equal(got[:4], [int(np.argmax(x[0])), 7, 0, 5])
  assert got[4] == 10 and got[5] == 999 and got[6] == 0 and got[8] == 0
  np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(x[1]))), 7)  # one row, no batch axis


# ---- the C++ sampler for the CPU (csrc/sampler_cpu.cc) against the XLA sampler, its specification

native = pytest.mark.skipif(jax.default_backend() != "cpu" or not _cpu_kernels.available(),
                            reason="the C++ CPU kernels are not available")


def _poison_allocator(elements: int) -> None:
  """Leaves freed NaN-filled buffers about the size of a call's outputs behind: an output the kernel failed
  to write would likely read one of them."""
  for size in (elements, 2 * elements):
    jax.block_until_ready(jnp.full((size,), jnp.nan, jnp.float32)).delete()


def _random_batch(rng, rows: int, v: int, vocab: bool, n: int = 8) -> tuple[np.ndarray, SamplingTensors]:
  x = (rng.standard_normal((n, v)) * rng.choice([0.3, 3.0, 12.0], (n, 1))).astype(np.float32)
  x[rng.random((n, v)) < 0.02] = -np.inf
  x[0] = rng.integers(-3, 3, v)  # ties at every cut-off
  x[1] = 4 + rng.random(v) * 1e-3  # one crowded bucket of keys
  pick = lambda *values: rng.choice(values, rows)  # noqa: E731
  t = SamplingTensors(
      row_index=rng.integers(0, n, rows).astype(np.int32),
      temperature=pick(0.0, 0.0, 0.7, 1.0, 1.6, 1e-4, 60.0).astype(np.float32),
      top_k=pick(v, v, v + 9, 0, 1, 2, 7, 50, v - 1).astype(np.int32),
      top_p=pick(1.0, 1.0, 0.9, 0.5, 0.99, 1e-6).astype(np.float32),
      min_p=pick(0.0, 0.0, 0.05, 0.3).astype(np.float32),
      repetition_penalty=pick(1.0, 1.3, 0.8).astype(np.float32),
      presence_penalty=pick(0.0, 0.5, -0.3).astype(np.float32),
      frequency_penalty=pick(0.0, 0.7, -0.4).astype(np.float32),
      seed=rng.integers(0, 2**32, (rows, 2), dtype=np.uint32),
      counter=rng.integers(-2**31, 2**31 - 1, (rows, 2)).astype(np.int32),
      prompt_mask=rng.random((rows, v)) < 0.05 if vocab else None,
      output_counts=np.where(rng.random((rows, v)) < 0.05, rng.integers(0, 4, (rows, v)), 0).astype(np.int32)
      if vocab else None,
      banned=rng.random((rows, v)) < 0.01 if vocab else None,
      logprobs=np.bool_(rng.random() < 0.5))
  return x, t


@jax.jit
def _xla_processed(x: jax.Array, t: SamplingTensors) -> jax.Array:
  """The XLA sampler's logits before the noise: bans and penalties; sampled rows also temperature and masks."""
  raw = jnp.where(t.banned, -jnp.inf, x[t.row_index])
  raw = apply_penalties(raw, t.prompt_mask, t.output_counts, t.repetition_penalty, t.presence_penalty,
                        t.frequency_penalty)
  random = t.temperature > 0
  y = raw / jnp.where(random, t.temperature, 1.0)[:, None]
  return jnp.where(random[:, None], top_k_top_p_min_p(y, t.top_k, t.top_p, t.min_p), raw)


@native
def test_native_noise_is_jax_random_bit_for_bit():
  rng = np.random.default_rng(11)
  v = 1003  # not a multiple of 16
  seed = np.concatenate([rng.integers(0, 2**32, (6, 2), dtype=np.uint32), np.uint32([[0, 0], [2**32 - 1, 7]])])
  counter = np.concatenate([rng.integers(-2**31, 2**31 - 1, (6, 2)), [[0, 0], [-1, 2**31 - 1]]]).astype(np.int32)
  bits, uniform, gumbel = jax.jit(_cpu_kernels.sample_noise, static_argnums=2)(seed, counter, v)
  keys = _row_keys(jnp.asarray(seed), jnp.asarray(counter))
  tiny = float(np.finfo(np.float32).tiny)
  np.testing.assert_array_equal(bits, jax.vmap(lambda k: jax.random.bits(k, (v,), jnp.uint32))(keys))
  np.testing.assert_array_equal(uniform, jax.vmap(lambda k: jax.random.uniform(k, (v,), jnp.float32, tiny, 1.0))(keys))
  # the noise: XLA's log may differ from the C library's in the last bit
  want = np.asarray(jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys))
  np.testing.assert_allclose(gumbel, want, rtol=2e-6, atol=2e-6)
  assert np.mean(np.asarray(gumbel) == want) > 0.5


@native
@pytest.mark.parametrize("vocab", [False, True])
def test_native_sampler_equals_the_xla_sampler(vocab):
  rng = np.random.default_rng(12 + vocab)
  cfg = SamplerConfig(vocab_arrays=vocab)
  xla, cpp = jax.jit(sample_xla, static_argnums=2), jax.jit(sample_native, static_argnums=2)
  same = total = 0
  for trial, rows in enumerate([1, 2, 7, 16, 33, 64] * 2):
    v = [203, 1003][trial % 2]
    x, t = _random_batch(rng, rows, v, vocab)
    x = jnp.asarray(x)
    want = xla(x, t, cfg)
    _poison_allocator(rows * (v + 2 * num_top_logprobs(v)))
    got = cpp(x, t, cfg)
    for name, a, b in zip(SamplerOutput._fields, want, got):
      assert a.shape == b.shape and a.dtype == b.dtype, name
    same += int(np.sum(np.asarray(got.tokens) == np.asarray(want.tokens)))
    total += rows
    if t.logprobs:
      np.testing.assert_allclose(got.logprob, want.logprob, rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(got.rank, want.rank)
      np.testing.assert_array_equal(got.top_ids, want.top_ids)
      np.testing.assert_allclose(got.top_logprobs, want.top_logprobs, rtol=1e-5, atol=1e-5)
    else:
      for out in got[1:]:
        assert not np.any(np.asarray(out)), "logprobs off: zeros"
    # the processed logits (the masks' survivors and their values) exactly
    if not vocab:
      t = t._replace(prompt_mask=np.zeros((rows, v), bool), output_counts=np.zeros((rows, v), np.int32),
                     banned=np.zeros((rows, v), bool))
    arrays = [t.row_index, t.temperature, t.top_k, t.top_p, t.min_p, t.seed, t.counter, t.logprobs]
    vocab_arrays = dict(repetition_penalty=t.repetition_penalty, presence_penalty=t.presence_penalty,
                        frequency_penalty=t.frequency_penalty, prompt_mask=t.prompt_mask,
                        output_counts=t.output_counts, banned=t.banned)
    call = jax.jit(lambda x, *a, **kw: _cpu_kernels.sample(x, *a, num_top_logprobs=num_top_logprobs(v),
                                                             processed=True, **kw))
    processed = np.asarray(call(x, *arrays, **vocab_arrays)[5])
    np.testing.assert_array_equal(processed, np.asarray(_xla_processed(x, t)), err_msg=f"trial {trial}")
  # a draw can flip only where XLA's log and the C library's differ in the last bit at a near-tie
  assert same >= 0.99 * total, (same, total)


@native
def test_native_sampler_on_rows_with_infinities_and_nans():
  rng = np.random.default_rng(13)
  v = 515
  x = rng.standard_normal((8, v)).astype(np.float32) * 2
  x[0] = -np.inf  # nothing finite: token 0
  x[1, rng.random(v) < 0.5] = -np.inf
  x[2, [17, 400]] = np.inf  # the first +inf, sampled or not
  x[3, [40, 300]] = np.nan  # the first NaN, sampled or not
  x[4, 510] = np.nan
  x[5] = 1.0  # all tied
  x[6] = rng.integers(-2, 2, v)
  x[7, 0] = np.nan
  settings = [(0.0, v, 1.0, 0.0), (1.0, v, 1.0, 0.0), (0.8, 5, 1.0, 0.0), (1.2, v, 0.6, 0.0), (0.9, 3, 0.9, 0.1),
              (1.0, v, 1.0, 0.3), (1e-4, v, 0.9, 0.0), (50.0, 40, 1.0, 0.0)]
  rows = np.repeat(np.arange(8), len(settings)).astype(np.int32)
  temperature, top_k, top_p, min_p = (np.array([s[i] for s in settings] * 8) for i in range(4))
  t = _tensors(rows.size, row_index=rows, temperature=temperature.astype(np.float32), top_k=top_k.astype(np.int32),
               top_p=top_p.astype(np.float32), min_p=min_p.astype(np.float32), logprobs=np.bool_(True),
               seed=rng.integers(0, 2**32, (rows.size, 2), dtype=np.uint32))
  got = jax.jit(sample_native, static_argnums=2)(jnp.asarray(x), t, SamplerConfig())
  want = jax.jit(sample_xla, static_argnums=2)(jnp.asarray(x), t, SamplerConfig())
  tokens = np.asarray(got.tokens).reshape(8, len(settings))
  assert np.all(tokens[0] == 0) and np.all(tokens[2] == 17) and np.all(tokens[3] == 40)
  assert np.all(tokens[4] == 510) and np.all(tokens[7] == 0)
  assert np.all(np.isfinite(x[1, tokens[1]]))
  # XLA's row reductions on the CPU can miss a NaN (its argmax then differs): compare rows without NaN
  finite = ~np.isnan(x[rows]).any(1)
  np.testing.assert_array_equal(np.asarray(got.tokens)[finite], np.asarray(want.tokens)[finite])
  np.testing.assert_array_equal(np.asarray(got.rank)[finite], np.asarray(want.rank)[finite])
  np.testing.assert_allclose(got.logprob, want.logprob, rtol=1e-5, atol=1e-5, equal_nan=True)
  # top ids where the logprobs are numbers (a NaN or +inf logit makes them all NaN, in an order of NaN bit patterns)
  numbers = ~np.isnan(x[rows]).any(1) & ~np.isposinf(x[rows]).any(1) & ~np.isneginf(x[rows]).all(1)
  np.testing.assert_array_equal(np.asarray(got.top_ids)[numbers], np.asarray(want.top_ids)[numbers])


@native
def test_native_argmax_is_the_first_maximum_or_the_first_nan():
  rng = np.random.default_rng(14)
  for rows, v in [(1, 1), (1, 31), (3, 32), (70, 1003), (2, 32000), (5, 20000), (64, 515)]:
    x = rng.standard_normal((rows, v)).astype(np.float32)
    x[rng.random((rows, v)) < 0.01] = np.nan
    x[rng.random((rows, v)) < 0.01] = np.inf
    x[:, -1][rng.random(rows) < 0.3] = np.nan  # in the tail after the vector loop
    if rows > 2:
      x[0] = -np.inf
      x[1] = 2.0
      x[2, :] = rng.integers(-2, 2, v)
    got = np.asarray(jax.jit(_cpu_kernels.argmax)(jnp.asarray(x)))
    assert got.dtype == np.int32 and got.shape == (rows,)
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1), err_msg=f"{rows} x {v}")
  x = jnp.asarray(rng.standard_normal((2, 3, 77)).astype(np.float32))
  np.testing.assert_array_equal(_cpu_kernels.argmax(x), jnp.argmax(x, -1))
  np.testing.assert_array_equal(_cpu_kernels.argmax(x.astype(jnp.bfloat16)), jnp.argmax(x.astype(jnp.bfloat16), -1))


@native
def test_native_sampler_reads_penalties_only_with_vocab_arrays():
  # as sample_xla: without vocab arrays the penalty fields may be None
  x = jnp.asarray(np.random.default_rng(15).standard_normal((4, 40)).astype(np.float32))
  t = _tensors(4, repetition_penalty=None, presence_penalty=None, frequency_penalty=None)
  np.testing.assert_array_equal(sample_native(x, t, SamplerConfig()).tokens, sample_xla(x, t, SamplerConfig()).tokens)


@native
def test_native_sampler_rejects_bad_inputs_clearly():
  x = jnp.zeros((4, 32), jnp.float32)
  t = _tensors(3)
  args = lambda t: (t.row_index, t.temperature, t.top_k, t.top_p, t.min_p, t.seed, t.counter,  # noqa: E731
                    t.logprobs)
  with pytest.raises(ValueError, match=r"logits must be float32 \[N, V\]"):
    _cpu_kernels.sample(x.astype(jnp.bfloat16), *args(t), num_top_logprobs=4)
  with pytest.raises(ValueError, match=r"seed must be uint32 \[3, 2\], got int32"):
    _cpu_kernels.sample(x, *args(t._replace(seed=t.seed.astype(np.int32))), num_top_logprobs=4)
  with pytest.raises(ValueError, match=r"top_p must be float32 \[3\]"):
    _cpu_kernels.sample(x, *args(t._replace(top_p=np.ones(2, np.float32))), num_top_logprobs=4)
  with pytest.raises(ValueError, match=r"num_top_logprobs must be in \[1, 32\]"):
    _cpu_kernels.sample(x, *args(t), num_top_logprobs=33)
  with pytest.raises(ValueError, match="together"):
    _cpu_kernels.sample(x, *args(t), num_top_logprobs=4, banned=np.zeros((3, 32), bool))
  vocab = dict(repetition_penalty=t.repetition_penalty, presence_penalty=t.presence_penalty,
               frequency_penalty=t.frequency_penalty, output_counts=np.zeros((3, 32), np.int32),
               banned=np.zeros((3, 32), bool))
  with pytest.raises(ValueError, match=r"prompt_mask must be bool \[3, 32\]"):
    _cpu_kernels.sample(x, *args(t), num_top_logprobs=4, prompt_mask=np.zeros((3, 31), bool), **vocab)
  with pytest.raises(ValueError, match=r"argmax: x must be float32 or bfloat16"):
    _cpu_kernels.argmax(jnp.zeros((2, 0)))
