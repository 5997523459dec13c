"""The engine's rooms one by one: input processor, sampling-batch builder, output processor, beam search; one
name per meaning (``kv_manager`` for block tables, ``kv_pools`` for device arrays)."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from jaxserve.engine import _beam_search, _input_batch
from jaxserve.engine._input_processor import InputProcessor
from jaxserve.engine._output_processor import OutputProcessor
from jaxserve.engine._request import Sequence
from jaxserve.engine._sampler import SamplerOutput
from jaxserve.engine._sampling_params import BeamSearchParams, SamplingParams
from jaxserve.engine._scheduler import ScheduledSeq
from jaxserve.testing import tiny_config

ENGINE = pathlib.Path(__file__).resolve().parents[1] / "jaxserve" / "engine"
VOCAB = 50


class CharTokenizer:
  """Token ``i`` is the character ``chr(ord('a') + i % 26)``; id 1 is EOS."""

  eos_id = 1

  def encode(self, text, add_bos=False):
    return [ord(c) - ord("a") for c in text]

  def decode(self, ids):
    return "".join(chr(ord("a") + i % 26) for i in ids)


def _processor(tokenizer=None, **kw):
  cfg = tiny_config(vocab_size=VOCAB, max_position_embeddings=64)
  args = dict(max_model_len=64, max_num_seqs=8, block_size=4, num_usable_blocks=100, seed=0) | kw
  return InputProcessor(cfg, tokenizer, **args)


def _request(params, prompt=(3, 4, 5), rid="r", tokenizer=None):
  ids = iter(range(1000))
  return _processor(tokenizer).make_request(rid, {"prompt_token_ids": list(prompt)}, params, next_seq_id=ids.__next__)


def _scheduled(req, seq=None):
  seq = seq or req.seqs[0]
  return ScheduledSeq(req, seq, 0, seq.num_tokens, ())


def test_every_engine_module_says_its_job_in_its_first_docstring_line():
  for path in sorted(ENGINE.glob("*.py")):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.splitlines()[0].endswith("."), f"{path.name}: no one-line summary docstring"


def test_kv_means_no_attribute_in_the_engine():
  """``kv_manager`` (host block tables) and ``kv_pools`` (device arrays); no bare ``.kv`` attribute is set or read
  in the engine (``out.kv``, the model's forward result, is the model's name)."""
  offenders = []
  for path in sorted(ENGINE.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Attribute) and node.attr == "kv" and not (
          isinstance(node.value, ast.Name) and node.value.id == "out"):
        offenders.append(f"{path.name}:{node.lineno}")
  assert not offenders, offenders


def test_input_processor_validates_before_it_counts_arrivals():
  proc = _processor()
  ids = iter(range(10))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    proc.make_request("a", [VOCAB], SamplingParams(), next_seq_id=ids.__next__)
  with pytest.raises(ValueError, match="n=9 exceeds max_num_seqs=8"):
    proc.make_request("a", [3], SamplingParams(n=9), next_seq_id=ids.__next__)
  with pytest.raises(ValueError, match="stop strings need a tokenizer"):
    proc.make_request("a", [3], SamplingParams(stop=["x"]), next_seq_id=ids.__next__)
  req = proc.make_request("a", [3, 4], SamplingParams(top_k=10**6, max_tokens=5), next_seq_id=ids.__next__)
  assert req.arrival == 0 and req.params.top_k == 0 and req.max_output_tokens == 5
  assert [s.seq_id for s in req.seqs] == [0] and req.seqs[0].token_ids == [3, 4]


def test_sampling_batch_gives_n_rows_to_an_unforked_prompt_and_neutral_padding():
  n3 = _request(SamplingParams(n=3, temperature=0.7, top_p=0.9, seed=5), rid="a")
  greedy = _request(SamplingParams(temperature=0), rid="b")
  batch = _input_batch.sampling_batch([(_scheduled(n3), 0), (_scheduled(greedy), 1)], vocab_size=VOCAB,
                                      num_padded_rows=lambda n: 8, eos_id=1, fail=None)
  t = batch.tensors
  assert batch.row_of == [0, 3] and not batch.plain and batch.cfg.vocab_arrays is False
  np.testing.assert_array_equal(t.row_index, [0, 0, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(t.counter[:4], [[0, 0], [1, 0], [2, 0], [0, 0]])
  np.testing.assert_allclose(t.temperature, [0.7] * 3 + [0] * 5, rtol=1e-6)
  np.testing.assert_allclose(t.top_p, [0.9] * 3 + [1] * 5, rtol=1e-6)
  np.testing.assert_array_equal(t.top_k, [VOCAB] * 8)
  np.testing.assert_array_equal(t.seed[:3], [[5, 0]] * 3)
  assert t.prompt_mask is None and not bool(t.logprobs)


def test_sampling_batch_of_greedy_rows_is_plain_and_penalties_bring_vocab_arrays():
  batch = _input_batch.sampling_batch([(_scheduled(_request(SamplingParams(temperature=0))), 0)], vocab_size=VOCAB,
                                      num_padded_rows=lambda n: 8, eos_id=1, fail=None)
  assert batch.plain
  req = _request(SamplingParams(temperature=0, presence_penalty=0.5, min_tokens=2, stop_token_ids=[7]),
                 prompt=(3, 3, 9))
  batch = _input_batch.sampling_batch([(_scheduled(req), 0)], vocab_size=VOCAB, num_padded_rows=lambda n: 8,
                                      eos_id=1, fail=None)
  t = batch.tensors
  assert batch.cfg.vocab_arrays and not batch.plain
  assert np.flatnonzero(t.prompt_mask[0]).tolist() == [3, 9] and np.flatnonzero(t.banned[0]).tolist() == [1, 7]
  assert not t.prompt_mask[1:].any() and t.presence_penalty[0] == np.float32(0.5)


def test_sampling_batch_fails_one_request_alone(monkeypatch):
  good, bad = _request(SamplingParams(temperature=0.5, seed=1), rid="good"), _request(SamplingParams(), rid="bad")
  real = _input_batch.fill_row

  def fill_row(t, i, req, seq, index, vocab_size):
    if req is bad:
      t["temperature"][i] = 3.0  # half written, then it fails: the row must be made neutral again
      raise OverflowError("boom")
    return real(t, i, req, seq, index, vocab_size)

  failed = []
  monkeypatch.setattr(_input_batch, "fill_row", fill_row)
  batch = _input_batch.sampling_batch([(_scheduled(good), 0), (_scheduled(bad), 1)], vocab_size=VOCAB,
                                      num_padded_rows=lambda n: 8, eos_id=1,
                                      fail=lambda req, msg: failed.append((req.request_id, msg)))
  assert failed == [("bad", "building this request's sampling inputs failed: OverflowError: boom")]
  assert batch.tensors.temperature[1] == 0 and batch.tensors.row_index[1] == 1
  assert batch.tensors.temperature[0] == np.float32(0.5)


def _out(tokens):
  return SamplerOutput(np.asarray(tokens, np.int32), None, None, None, None)


def test_output_processor_stops_on_stop_string_token_and_length():
  tok = CharTokenizer()
  proc = OutputProcessor(tok, tok.eos_id)
  req = _request(SamplingParams(stop=["cd"], max_tokens=10), prompt=(0, 1 + 26), tokenizer=tok)
  seq = req.seqs[0]
  assert [proc.append_token(req, seq, _out([t]), 0) for t in (2, 3)] == [False, True]
  assert (seq.finish_reason, seq.stop_reason, seq.text) == ("stop", "cd", "")
  req = _request(SamplingParams(stop_token_ids=[9], min_tokens=2, max_tokens=10), tokenizer=tok)
  seq = req.seqs[0]
  assert [proc.append_token(req, seq, _out([t]), 0) for t in (9, 9)] == [False, True]
  assert (seq.finish_reason, seq.stop_reason) == ("stop", 9)
  req = _request(SamplingParams(max_tokens=2), tokenizer=tok)
  seq = req.seqs[0]
  assert [proc.append_token(req, seq, _out([t]), 0) for t in (4, 5)] == [False, True]
  assert seq.finish_reason == "length" and proc.output(req).outputs[0].text == "ef"


def test_output_processor_holds_back_what_a_stop_string_could_still_cut():
  tok = CharTokenizer()
  proc = OutputProcessor(tok, tok.eos_id)
  req = _request(SamplingParams(stop=["xyz"], max_tokens=10), tokenizer=tok)
  for t in (0, 1 + 26, 23):  # "abx": "x" could start the stop, and "b" is not EOS (27 % 26 == 1 is "b")
    proc.append_token(req, req.seqs[0], _out([t]), 0)
  assert proc.output(req).outputs[0].text == "a"


def _finish(proc, req, tokens):
  """Appends ``tokens`` one at a time; returns which of them finished the sequence."""
  return [proc.append_token(req, req.seqs[0], _out([t]), 0) for t in tokens]


@pytest.mark.parametrize("stop", [(), ("zz",)])
def test_stop_token_text_is_left_out_of_the_text_as_vllm(stop):
  tok = CharTokenizer()
  proc = OutputProcessor(tok, tok.eos_id)
  for kw, tokens, want in [(dict(stop_token_ids=[3]), (4, 5, 3), "ef"), (dict(), (4, 5, 1), "ef"),
                           (dict(stop_token_ids=[3], include_stop_str_in_output=True), (4, 5, 3), "efd")]:
    req = _request(SamplingParams(max_tokens=10, stop=list(stop), **kw), tokenizer=tok)
    assert _finish(proc, req, tokens) == [False, False, True]
    out = proc.output(req).outputs[0]
    assert (out.text, out.token_ids, out.finish_reason) == (want, list(tokens), "stop"), kw


def test_min_tokens_stop_string_must_end_after_the_first_min_tokens_as_vllm():
  tok = CharTokenizer()
  proc = OutputProcessor(tok, tok.eos_id)
  req = _request(SamplingParams(stop=["c"], min_tokens=2, max_tokens=10), tokenizer=tok)
  assert _finish(proc, req, (2, 2, 2)) == [False, False, True]  # "c" in tokens 1 and 2 is ignored
  out = proc.output(req).outputs[0]
  assert (out.text, out.token_ids, out.stop_reason) == ("cc", [2, 2, 2], "c")


def test_logprob_decoded_token_keeps_its_leading_space_as_vllm():
  from jaxserve.loaders import DEFAULT_TOKENIZER
  from jaxserve.tokenizer import load_tokenizer
  tok = load_tokenizer(DEFAULT_TOKENIZER)
  there, nl = tok.encode("a there")[-1], tok.encode("a\n")[-1]
  proc = OutputProcessor(tok, 2)
  req = _request(SamplingParams(max_tokens=10, logprobs=1), tokenizer=tok)
  out = SamplerOutput(np.asarray([there], np.int32), np.asarray([-0.5], np.float32), np.asarray([2], np.int32),
                      np.asarray([[nl]], np.int32), np.asarray([[-0.1]], np.float32))
  proc.append_token(req, req.seqs[0], out, 0)
  entry = proc.output(req).outputs[0].logprobs[0]
  assert {i: lp.decoded_token for i, lp in entry.items()} == {there: " there", nl: "\n"}


def test_beam_score_is_vllms_length_normalised_logprob():
  p = BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=0.5)
  eos_end = Sequence(0, [3, 4, 5, 1], 2, cumulative_logprob=-2.0, finish_reason="stop")
  cut = Sequence(1, [3, 4, 5, 6], 2, cumulative_logprob=-2.0, finish_reason="length")
  assert _beam_search.beam_score(eos_end, p, eos_id=1) == pytest.approx(-2.0 / 3 ** 0.5)
  assert _beam_search.beam_score(cut, p, eos_id=1) == pytest.approx(-2.0 / 4 ** 0.5)
