"""What the server returns equals what ``LLM.generate`` returns: stop strings, one stream chunk per token,
sampling fields at the edges of their ranges, incremental detokenization and stop search.

The app runs in-process (``TestClient``) around a real engine on the embedded stories260K; a
second engine gives the offline reference.
"""

from __future__ import annotations

import json
import random

import pytest
from starlette.testclient import TestClient

from jaxserve import LLM, SamplingParams
from jaxserve.engine._detokenizer import find_stop
from jaxserve.engine._request import Sequence
from jaxserve.loaders import load_model
from jaxserve.server import ServerConfig, create_app
from jaxserve.server import _protocol as proto

PROMPT = "Once upon a time"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def offline():
  return LLM(model=load_model(), max_num_seqs=8)


@pytest.fixture(scope="module")
def served():
  llm = LLM(model=load_model(), max_num_seqs=8)
  config = ServerConfig(model_name="m", max_model_len=llm.max_model_len, vocab_size=llm.model.cfg.vocab_size)
  with TestClient(create_app(llm, llm.tokenizer, config)) as c:
    yield c


def generate(llm: LLM, prompt, **kw):
  params = SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)
  return llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]


def stream_events(c: TestClient, route: str, body: dict) -> list[dict]:
  with c.stream("POST", route, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
    assert r.status_code == 200, r.read()
    lines = [ln for ln in r.iter_lines() if ln]
  assert lines[-1] == "data: [DONE]"
  return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def server_texts(c: TestClient, prompt: str, **kw) -> dict[str, tuple[str, str]]:
  """(text, finish_reason) of completions and chat, streamed and not."""
  body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **kw}
  out = {}
  r = c.post("/v1/completions", json=body)
  assert r.status_code == 200, r.text
  ch = r.json()["choices"][0]
  out["completions"] = (ch["text"], ch["finish_reason"])
  events = stream_events(c, "/v1/completions", body)
  choices = [e["choices"][0] for e in events if e["choices"]]
  out["completions stream"] = ("".join(ch["text"] for ch in choices), choices[-1]["finish_reason"])
  chat = {k: v for k, v in body.items() if k != "prompt"}
  chat["messages"] = [{"role": "user", "content": prompt}]
  r = c.post("/v1/chat/completions", json=chat)
  assert r.status_code == 200, r.text
  ch = r.json()["choices"][0]
  out["chat"] = (ch["message"]["content"], ch["finish_reason"])
  events = stream_events(c, "/v1/chat/completions", chat)
  choices = [e["choices"][0] for e in events if e["choices"]]
  out["chat stream"] = ("".join(ch["delta"].get("content", "") for ch in choices), choices[-1]["finish_reason"])
  return out


def chat_ids(llm: LLM, prompt: str) -> dict:
  req = proto.parse_body(json.dumps({"messages": [{"role": "user", "content": prompt}]}).encode(),
                         proto.ChatCompletionRequest)
  return {"prompt_token_ids": proto.chat_prompt(req, llm.tokenizer)}


# ---------------------------------------------------------------- stop strings (issue 14, item 2)
def stop_cases(base: str) -> list[dict]:
  """Stop settings cut out of the greedy text: each case exercises one way the old streaming went wrong."""
  words = base.split(" ")
  assert len(base) > 60 and len(words) > 8, base
  mid = len(base) // 2
  return [
      {"stop": base[3:45]},  # longer than the text before it (the streamed delta's end went negative)
      {"stop": "there was a little girl named Lily."},  # the issue's report
      {"stop": base[mid - 3:mid + 4]},  # spanning tokens
      {"stop": ["zzzz", base[mid:mid + 5], base[10:14]]},  # several: the earliest match wins
      {"stop": base[:3]},  # at the very start: empty text
      {"stop": [base[mid:mid + 6]], "include_stop_str_in_output": True},
      {"stop": "x" * 300},  # never matches, longer than the whole output: nothing may be lost
      {"stop": base[-4:]},  # at the very end
  ]


@pytest.mark.parametrize("case", range(8))
def test_server_text_equals_generate_for_stop_strings(offline, served, case):
  base = generate(offline, PROMPT).text
  kw = stop_cases(base)[case]
  want = generate(offline, PROMPT, **kw)
  want_chat = generate(offline, chat_ids(offline, PROMPT), **kw)
  got = server_texts(served, PROMPT, **kw)
  assert got["completions"] == got["completions stream"] == (want.text, want.finish_reason), (kw, got, want.text)
  assert got["chat"] == got["chat stream"] == (want_chat.text, want_chat.finish_reason), (kw, got, want_chat.text)


def test_stop_in_the_issue_gives_generates_text(offline, served):
  want = generate(offline, PROMPT, stop="there was a little girl named Lily.")
  got = server_texts(served, PROMPT, stop="there was a little girl named Lily.")
  assert {v[0] for v in got.values()} >= {want.text}
  assert got["completions stream"][0] == want.text and "girl" not in want.text


# ---------------------------------------------------------------- one chunk per token (issue 19, item 1)
def test_one_stream_chunk_per_token_and_texts_agree(served):
  for route, prompt_key, text_of in (("/v1/completions", "prompt", lambda ch: ch["text"]),
                                     ("/v1/chat/completions", "messages", lambda ch: ch["delta"].get("content", ""))):
    body = {"max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": "x" * 50}
    body[prompt_key] = PROMPT if prompt_key == "prompt" else [{"role": "user", "content": PROMPT}]
    events = stream_events(served, route, body)
    usage = events[-1]["usage"]
    token_chunks = [e for e in events if e["choices"] and "role" not in e["choices"][0].get("delta", {})]
    assert len(token_chunks) == usage["completion_tokens"] == 24, route
    # with a 50-character stop string held back, the early chunks carry empty text and still come
    assert any(text_of(e["choices"][0]) == "" for e in token_chunks), route
    whole = served.post(route, json=body).json()["choices"][0]
    assert "".join(text_of(e["choices"][0]) for e in token_chunks) == whole.get("text", whole.get("message", {}).get(
        "content")), route


# ---------------------------------------------------------------- numeric fields at their edges (issue 14, item 1)
@pytest.mark.parametrize("top_k", [2**31, 2**63, 10**30])
def test_top_k_beyond_int32_is_served_as_the_whole_vocabulary(offline, served, top_k):
  body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.8, "top_k": top_k, "seed": 7}
  r = served.post("/v1/completions", json=body)
  assert r.status_code == 200, r.text
  same = served.post("/v1/completions", json={**body, "top_k": -1})
  assert r.json()["choices"][0]["text"] == same.json()["choices"][0]["text"]
  out = offline.generate(PROMPT, SamplingParams(temperature=0.8, top_k=top_k, seed=7, max_tokens=8), use_tqdm=False)
  assert out[0].outputs[0].text == r.json()["choices"][0]["text"]


@pytest.mark.parametrize("raw, param, words", [
    ('"temperature": 1e400', "temperature", "[0, 100]"),
    ('"temperature": Infinity', "temperature", "finite"),
    ('"temperature": 1e30', "temperature", "[0, 100]"),
    ('"repetition_penalty": 1e400', "repetition_penalty", "[0.01, 100]"),
    ('"repetition_penalty": NaN', "repetition_penalty", "finite"),
    ('"presence_penalty": -Infinity', "presence_penalty", "[-2, 2]"),
    ('"frequency_penalty": NaN', "frequency_penalty", "[-2, 2]"),
    ('"top_p": NaN', "top_p", "(0, 1]"),
    ('"min_p": Infinity', "min_p", "[0, 1]"),
    ('"seed": 36893488147419103232', "seed", "[-2**63, 2**64)"),
    ('"n": 36893488147419103232', "n|prompt", "64"),  # (the per-request completion bound may answer first)
    ('"logprobs": 36893488147419103232', "logprobs", "<= 20"),
    ('"best_of": 36893488147419103232', "best_of", "must equal 'n'"),
    ('"max_tokens": 36893488147419103232', "max_tokens", "maximum context length"),
    ('"min_tokens": 36893488147419103232', "min_tokens", "must be <= max_tokens"),
    ('"stop": %s' % json.dumps(["ab"] * 401), "stop", "at most 400 strings, got 401"),
    ('"stop": %s' % json.dumps(["a" * 5000, "b" * 4000]), "stop", "at most 8192 characters"),
    ('"stop_token_ids": %s' % json.dumps([5] * 401), "stop_token_ids", "at most 400 ids, got 401"),
])
def test_out_of_range_fields_are_400s_naming_the_range(served, raw, param, words):
  body = '{"prompt": "Once", "max_tokens": 4, %s}' % raw
  r = served.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"})
  assert r.status_code == 400, (raw, r.status_code, r.text[:300])
  err = r.json()["error"]
  assert err["param"] in param.split("|") and words in err["message"], err
  assert served.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}).status_code == 200


def test_stop_token_id_outside_the_vocabulary_is_a_400(served):
  r = served.post("/v1/completions", json={"prompt": "Once", "max_tokens": 4, "stop_token_ids": [2**70]})
  assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]


# ---------------------------------------------------------------- incremental work per token (issue 14, item 7)
class CountingTokenizer:
  """Wraps a tokenizer and records the length of every decode call."""

  def __init__(self, tok):
    self.tok = tok
    self.lengths: list[int] = []
    self.bos_id, self.eos_id, self.vocab_size = tok.bos_id, tok.eos_id, tok.vocab_size

  def encode(self, text, add_bos=False, **kw):
    return self.tok.encode(text, add_bos, **kw)

  def decode(self, ids):
    self.lengths.append(len(ids))
    return self.tok.decode(ids)


def test_detokenization_and_stop_search_do_not_redecode_the_output():
  loaded = load_model()
  counting = CountingTokenizer(loaded.tokenizer)
  llm = LLM(model=loaded._replace(tokenizer=counting), max_num_seqs=4)
  plain = LLM(model=load_model(), max_num_seqs=4)
  stops = ["zq%d" % i for i in range(400)]
  params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, stop=stops)
  got = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
  assert len(got.token_ids) == 200
  # every decode covers a few tokens: the window, not the whole output (that would reach ~200)
  assert max(counting.lengths) <= 16, max(counting.lengths)
  # and the text equals decoding the whole output at once
  ref = plain.generate(PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True), use_tqdm=False)
  prompt_ids = ref[0].prompt_token_ids
  whole = Sequence(0, prompt_ids + got.token_ids, len(prompt_ids))
  assert got.text == ref[0].outputs[0].text == plain.engine.decode_output(whole)
  # the incremental API (the server's) reads the text every step, stop strings or not: still short windows
  counting.lengths.clear()
  llm.add_request("r", PROMPT, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
  texts = []
  while llm.has_unfinished_requests():
    texts += [o.outputs[0].text for o in llm.step()]
  assert max(counting.lengths) <= 16, max(counting.lengths)
  assert texts[-1] == got.text and all(got.text.startswith(t) for t in texts)


def test_find_stop_searches_only_the_new_text_and_its_tail():
  text = "abcXYZdefXYZ"
  assert find_stop(text, 3, ["XYZ"]) == (9, "XYZ")  # in the new text
  assert find_stop(text, 1, ["ZX"]) is None  # "ZX" is not in the text at all
  assert find_stop("abcXY" + "Z", 1, ["XYZ"]) == (3, "XYZ")  # spans the old tail and the new character
  assert find_stop(text, 2, ["abc"]) is None  # ended before the new text: found (or not) earlier
  assert find_stop(text, 6, ["XYZ", "def"]) == (6, "def")  # the first to complete wins
  assert find_stop("xabcd", 4, ["abcd", "bc"]) == (2, "bc")  # ... even if another starts earlier (vLLM's rule)
  assert find_stop("xabcd", 4, ["cd", "bcd"]) == (3, "cd")  # ties on the end go to the stop listed first
  assert find_stop(text, 0, ["XYZ"]) is None
  # against a naive search over every position whose match ends in the new text
  rng = random.Random(0)
  for _ in range(500):
    t = "".join(rng.choice("ab") for _ in range(rng.randint(1, 12)))
    new = rng.randint(0, len(t))
    stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
    naive = [(i, s) for s in stops for i in range(len(t)) if t.startswith(s, i) and i + len(s) > len(t) - new]
    want = min(naive, key=lambda h: (h[0] + len(h[1]), stops.index(h[1]))) if naive else None
    assert find_stop(t, new, stops) == want, (t, new, stops)


def _whole(tok, ids, num_prompt):
  """The reference: the output decoded at once after a few prompt tokens (the engine's ``decode_output``)."""
  ctx = ids[max(0, num_prompt - 4):num_prompt]
  prefix, full = tok.decode(ctx), tok.decode(ctx + ids[num_prompt:])
  return full[len(prefix):] if full.startswith(prefix) else tok.decode(ids[num_prompt:])


def test_incremental_detokenizer_equals_whole_decode(tmp_path):
  import os

  import numpy as np

  from jaxserve.engine._detokenizer import IncrementalDetokenizer, anchor_ids
  from jaxserve.loaders import ASSETS, EVAL_TEXT, save_hf
  from jaxserve.tokenizer import Llama2cTokenizer, SentencePieceTokenizer, load_tokenizer
  sp = SentencePieceTokenizer(os.path.join(ASSETS, "tok512.model"))
  m = load_model()
  hf = load_tokenizer(save_hf(m.cfg, m.params, str(tmp_path / "hf"), sp))
  rng = np.random.default_rng(0)
  lines = [ln for ln in open(EVAL_TEXT, encoding="utf-8").read()[:20000].split("\n") if ln.strip()]
  for tok in (Llama2cTokenizer(os.path.join(ASSETS, "tok512.bin"), 512), sp, hf):
    for trial in range(60):
      num_prompt = int(rng.integers(1, 8))
      if tok is hf:  # real text with multi-byte characters (random byte tokens are not prefix-stable in HF's decoder)
        line = lines[trial % len(lines)]
        cut = int(rng.integers(0, len(line)))
        ids = sp.encode(line[:cut] + "  Café ☃ naïve 日本 " + line[cut:], add_bos=True)
        num_prompt = min(num_prompt, len(ids) - 1)
      else:  # text prompt tokens, then anything: byte pieces, specials, words
        ids = [1] + rng.integers(259, 512, num_prompt - 1).tolist() + rng.integers(0, 512, 30).tolist()
        if trial % 2:
          ids = ids[:num_prompt] + rng.choice(np.r_[0:259, 300:320], 30).tolist()
      whole = _whole(tok, ids, num_prompt)
      d = IncrementalDetokenizer(num_prompt, anchor_ids(tok))
      step = int(rng.integers(1, 4))  # one or several tokens per call
      for k in range(num_prompt + 1, len(ids) + 1, step):
        d.step(tok, ids[:k])
        assert whole.startswith(d.text), (type(tok).__name__, ids, k)
      d.finish(tok, ids)
      assert d.text == whole, (type(tok).__name__, ids)
