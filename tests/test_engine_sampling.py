"""SamplingParams validation and the device sampler against its numpy specification."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxserve.engine import BeamSearchParams, SamplingParams
from jaxserve.engine._sampler import (SamplerConfig, SamplingTensors, apply_penalties, reference_processed_logits,
                                      sample, top_k_top_p_min_p)

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
