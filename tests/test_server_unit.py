"""Server pieces without a model: request validation, chat template, SSE framing, metrics, engine-loop faults.

The in-process tests drive the FastAPI app with a deterministic engine double (``ScriptedEngine``)
so that faults the real engine never shows (a ``step`` that raises) can be injected; the live
tests with the real engine and the official ``openai`` client are in ``test_server_live.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import types

import pytest
from starlette.testclient import TestClient

from jaxserve import SamplingParams
from jaxserve.loaders import DEFAULT_TOKENIZER
from jaxserve.server import ServerConfig, create_app, render_plain
from jaxserve.server import _protocol as proto
from jaxserve.server._chat_template import chat_prompt_ids
from jaxserve.server._async_engine import AsyncEngine
from jaxserve.server._errors import APIError
from jaxserve.server._metrics import ServerMetrics
from jaxserve.server._responses import ChunkEncoder, TokenText, chat_logprobs
from jaxserve.tokenizer import load_tokenizer

TOK = load_tokenizer(DEFAULT_TOKENIZER)
CFG = ServerConfig(model_name="m", max_model_len=64, vocab_size=TOK.vocab_size)


class ScriptedEngine:
  """Engine double: each completion emits one token per step, ``(last + 1 + index) % vocab``.

  ``fail_on_step`` makes that step (1-based) raise, as an engine bug would.
  """

  def __init__(self, fail_on_step: int | None = None):
    self.reqs: dict[str, dict] = {}
    self.steps = 0
    self.fail_on_step = fail_on_step
    self.aborted: list[str] = []
    self.lock = threading.Lock()

  def add_request(self, request_id, prompt, params):
    ids = prompt["prompt_token_ids"]
    if ids[0] == 0:
      raise ValueError("prompt must not start with token 0")
    self.reqs[request_id] = {"prompt": ids, "params": params, "out": [[] for _ in range(params.n)]}

  def abort_request(self, request_id):
    self.aborted.append(request_id)
    self.reqs.pop(request_id, None)

  def has_unfinished_requests(self):
    return bool(self.reqs)

  def step(self):
    self.steps += 1
    if self.steps == self.fail_on_step:
      raise RuntimeError("injected engine failure")
    outs = []
    for rid, r in list(self.reqs.items()):
      choices = []
      for i, toks in enumerate(r["out"]):
        last = toks[-1] if toks else r["prompt"][-1]
        toks.append((last + 1 + i) % TOK.vocab_size)
        done = len(toks) >= r["params"].max_tokens
        logprobs = None  # the sampled token and two others, as the engine's {token_id: logprob} entries
        if r["params"].logprobs is not None:
          logprobs = [{t: -0.5, (t + 1) % TOK.vocab_size: -1.5, (t + 2) % TOK.vocab_size: -2.5} for t in toks]
        choices.append(types.SimpleNamespace(index=i, token_ids=list(toks), text=TOK.decode(toks),
                                             logprobs=logprobs, finish_reason="length" if done else None))
      finished = all(c.finish_reason for c in choices)
      outs.append(types.SimpleNamespace(request_id=rid, outputs=choices, finished=finished))
      if finished:
        del self.reqs[rid]
    return outs

  def stats(self):
    self.stats_calls = getattr(self, "stats_calls", 0) + 1
    return {"kv_blocks_total": 10, "kv_blocks_used": len(self.reqs), "num_running_requests": len(self.reqs),
            "num_waiting_requests": 0, "total_preemptions": 0}


def expected_tokens(prompt, n_tokens, index=0):
  toks, last = [], prompt[-1]
  for _ in range(n_tokens):
    last = (last + 1 + index) % TOK.vocab_size
    toks.append(last)
  return toks


def client(engine, **cfg):
  app = create_app(engine, TOK, ServerConfig(**{**CFG.__dict__, **cfg}), SamplingParams)
  return TestClient(app)


# ---------------------------------------------------------------- validation (pure)
@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "a", "max_tokens": -1}, "max_tokens", ">= 1"),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"prompt": "a", "temperature": -0.5}, "temperature", "[0, 100]"),
    ({"prompt": "a", "top_p": 1.5}, "top_p", "(0, 1]"),
    ({"prompt": "a", "n": 0}, "n", "[1, 64]"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": "a", "stop": [1]}, "stop", "list of strings"),
    ({}, "prompt", "required"),
    ({"prompt": [[1, 2], []]}, "prompt", "empty"),
    ({"prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
    ({"prompt": "a", "logprobs": 50}, "logprobs", "<= 20"),
    ({"prompt": "a", "max_tokens": 10_000}, "max_tokens", "maximum context length is 64"),
    ({"prompt": "a " * 100}, "prompt", "maximum context length is 64"),
    ({"prompt": "a", "stream": "yes"}, "stream", "valid boolean"),
    ({"prompt": "a", "logit_bias": {"5": 1.0}}, "logit_bias", "not supported"),
])
def test_completion_validation_names_the_field(body, param, words):
  with pytest.raises(APIError) as e:
    req = proto.parse_body(json.dumps(body).encode(), proto.CompletionRequest)
    for p in proto.completion_prompts(req, TOK, TOK.vocab_size):
      proto.sampling_params(req, len(p), 64, SamplingParams)
  assert e.value.status == 400 and e.value.param == param, e.value.body()
  assert words in e.value.message, e.value.message


@pytest.mark.parametrize("body, param, words", [
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", "'system'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content", "must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages.0.content", "image_url"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs", "'logprobs': true"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools", "not supported"),
])
def test_chat_validation_names_the_field(body, param, words):
  with pytest.raises(APIError) as e:
    req = proto.parse_body(json.dumps(body).encode(), proto.ChatCompletionRequest)
    proto.sampling_params(req, len(proto.chat_prompt(req, TOK)), 64, SamplingParams)
  assert e.value.status == 400 and e.value.param == param, e.value.body()
  assert words in e.value.message, e.value.message


def test_invalid_json_and_non_object_bodies():
  for raw, words in ((b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON")):
    with pytest.raises(APIError, match=words) as e:
      proto.parse_body(raw, proto.CompletionRequest)
    assert e.value.status == 400


def test_valid_request_maps_to_sampling_params():
  for prompt, ids in (([[5, 6], [7]], [[5, 6], [7]]), ([5, 6], [[5, 6]]),
                      (["Once", "Hi"], [TOK.encode("Once", add_bos=True), TOK.encode("Hi", add_bos=True)])):
    req = proto.parse_body(json.dumps({"prompt": prompt}).encode(), proto.CompletionRequest)
    assert proto.completion_prompts(req, TOK, TOK.vocab_size) == ids
  req = proto.parse_body(json.dumps({"prompt": "Once", "max_tokens": 7, "temperature": 0, "top_k": 3,
                                     "stop": "x", "seed": 4, "n": 2, "logprobs": 2}).encode(),
                         proto.CompletionRequest)
  sp = proto.sampling_params(req, 2, 64, SamplingParams)
  assert (sp.max_tokens, sp.temperature, sp.top_k, sp.stop, sp.seed, sp.n, sp.logprobs) == (7, 0, 3, ("x",), 4, 2, 2)
  chat = proto.parse_body(json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
                          proto.ChatCompletionRequest)
  # chat without max_tokens may use the rest of the context
  assert proto.sampling_params(chat, 10, 64, SamplingParams).max_tokens == 54


# ---------------------------------------------------------------- chat template
def test_plain_chat_template():
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Tell a story"}]
  text = render_plain(msgs)
  assert text == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: Tell a story\nAssistant:"
  assert chat_prompt_ids(TOK, msgs) == TOK.encode(text, add_bos=True)


def test_tokenizer_chat_template_is_used_when_present():
  class Templated:
    chat_template = "x"

    def apply_chat_template(self, messages):
      return "|".join(m["content"] for m in messages) + "|>"

    def encode(self, text, add_bos=False, parse_special=False):
      return [ord(c) for c in text] + ([1] if add_bos else [])

  assert chat_prompt_ids(Templated(), [{"role": "user", "content": "ab"}]) == [ord(c) for c in "ab|>"]


# ---------------------------------------------------------------- metrics
def test_metrics_counters_follow_engine_totals():
  m = ServerMetrics("m")
  m.update_engine({"kv_blocks_total": 8, "kv_blocks_used": 2, "num_running_requests": 1, "num_waiting_requests": 3,
                   "total_preemptions": 2, "prefix_cache_queries": 10, "prefix_cache_hits": 4})
  m.update_engine({"kv_blocks_total": 8, "kv_blocks_used": 0, "num_running_requests": 0, "num_waiting_requests": 0,
                   "total_preemptions": 5, "prefix_cache_queries": 30, "prefix_cache_hits": 4})
  text = m.render().decode()
  assert 'jaxserve:kv_cache_usage_perc{model_name="m"} 0.0' in text
  assert 'jaxserve:num_preemptions_total{model_name="m"} 5.0' in text
  assert 'jaxserve:prefix_cache_queries_total{model_name="m"} 30.0' in text
  assert 'jaxserve:num_requests_waiting{model_name="m"} 0.0' in text
  for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "prompt_tokens_total",
               "generation_tokens_total", "prefix_cache_hits_total", "num_requests_running"):
    assert f"jaxserve:{name}" in text


# ---------------------------------------------------------------- app with the engine double
def test_completion_stream_framing_and_usage():
  with client(ScriptedEngine()) as c:
    prompt = [5, 6, 7]
    r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [ch["text"] for ch in body["choices"]] == [TOK.decode(expected_tokens(prompt, 4, i)) for i in (0, 1)]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    with c.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "stream": True,
                                                   "stream_options": {"include_usage": True}}) as r:
      assert r.headers["content-type"].startswith("text/event-stream")
      events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(ch["usage"] is None for ch in chunks[:-1])
    assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == TOK.decode(expected_tokens(prompt, 4))
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_engine_step_failure_fails_requests_in_flight_and_loop_goes_on():
  engine = ScriptedEngine(fail_on_step=2)
  with client(engine) as c:
    r = c.post("/v1/completions", json={"prompt": [5], "max_tokens": 5})
    assert r.status_code == 500 and "injected engine failure" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"prompt": [5], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == TOK.decode(expected_tokens([5], 3))
    assert c.get("/health").status_code == 200
    assert engine.reqs == {}


def test_add_request_error_is_a_400_and_other_prompts_are_aborted():
  engine = ScriptedEngine()
  with client(engine) as c:
    r = c.post("/v1/completions", json={"prompt": [[5, 6], [0, 1]], "max_tokens": 50})
    assert r.status_code == 400 and "must not start with token 0" in r.json()["error"]["message"]
    deadline = time.monotonic() + 5
    while engine.reqs and time.monotonic() < deadline:
      time.sleep(0.01)
    assert engine.reqs == {}


def test_auth_unknown_model_and_unknown_route():
  with client(ScriptedEngine(), api_key="sekret") as c:
    r = c.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = c.post("/v1/completions", json={"prompt": "a"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    ok = {"Authorization": "Bearer sekret"}
    r = c.post("/v1/completions", json={"prompt": [5], "model": "gpt-4", "max_tokens": 1}, headers=ok)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert c.post("/v1/completions", json={"prompt": [5], "model": "m", "max_tokens": 1}, headers=ok).status_code == 200
    assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == "m"
    assert c.get("/metrics").status_code == 200  # metrics and health stay open
    r = c.get("/v1/nothing", headers=ok)
    assert r.status_code == 404 and "error" in r.json()


def test_stream_sends_a_chunk_for_every_token_even_with_empty_text():
  # special tokens (<s>, </s>) decode to "": each still gets its chunk (as vLLM sends them)
  prompt = [TOK.vocab_size - 3]
  want = expected_tokens(prompt, 6)
  assert sum(TOK.decode([t]) == "" for t in want) >= 2
  with client(ScriptedEngine()) as c:
    for route, body, text_of in (
        ("/v1/completions", {"prompt": prompt}, lambda ch: ch["text"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, lambda ch: ch["delta"]["content"])):
      with c.stream("POST", route, json={**body, "max_tokens": 6, "stream": True,
                                         "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln and ln != "data: [DONE]"]
      chunks = [e for e in events if e["choices"] and e["choices"][0].get("delta", {}).get("role") is None]
      assert len(chunks) == events[-1]["usage"]["completion_tokens"] == 6, (route, chunks)
      if route == "/v1/completions":
        assert [text_of(e["choices"][0]) for e in chunks] == [TOK.decode(want[:k + 1])[len(TOK.decode(want[:k])):]
                                                               for k in range(6)]


# ---------------------------------------------------------------- served names, /tokenize, /detokenize
def test_every_served_name_is_listed_and_served_and_echoed():
  with client(ScriptedEngine(), model_name="/models/my model", aliases=("short", "other")) as c:
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["/models/my model", "short", "other"]
    for name in ("/models/my model", "short", "other"):
      r = c.post("/v1/completions", json={"prompt": [5], "model": name, "max_tokens": 2})
      assert r.status_code == 200 and r.json()["model"] == name
      r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "model": name,
                                               "max_tokens": 2})
      assert r.status_code == 200 and r.json()["model"] == name
      assert c.get(f"/v1/models/{name}").json()["id"] == name
    r = c.post("/v1/completions", json={"prompt": [5], "model": "my model", "max_tokens": 2})
    assert r.status_code == 404 and "'/models/my model', 'short', 'other'" in r.json()["error"]["message"]
    assert c.post("/v1/completions", json={"prompt": [5], "max_tokens": 2}).json()["model"] == "/models/my model"


def test_tokenize_and_detokenize_round_trip_with_vllm_shapes():
  with client(ScriptedEngine(), api_key="k") as c:
    auth = {"Authorization": "Bearer k"}
    text = "Once upon a time, Café ☃"
    r = c.post("/tokenize", json={"model": "m", "prompt": text}, headers=auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == TOK.encode(text, add_bos=True) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == CFG.max_model_len and body["token_strs"] is None
    back = c.post("/detokenize", json={"model": "m", "tokens": body["tokens"]}, headers=auth)
    assert back.status_code == 200 and back.json() == {"prompt": text}
    r = c.post("/tokenize", json={"prompt": text, "add_special_tokens": False, "return_token_strs": True},
               headers=auth).json()
    assert r["tokens"] == TOK.encode(text) and r["token_strs"] == [TOK.id_to_piece(t) for t in r["tokens"]]
    # messages: the ids the chat route runs (the completion route's prompt_tokens agree)
    msgs = [{"role": "user", "content": "hi there"}]
    r = c.post("/tokenize", json={"messages": msgs}, headers=auth).json()
    assert r["tokens"] == chat_prompt_ids(TOK, msgs)
    usage_ = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}, headers=auth).json()["usage"]
    assert usage_["prompt_tokens"] == r["count"]
    no_gen = c.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}, headers=auth).json()
    assert no_gen["tokens"] == TOK.encode("User: hi there\n", add_bos=True)
    # errors
    assert c.post("/tokenize", json={"prompt": text}).status_code == 401
    for body, param, words in (({"tokens": [1, 99999]}, "tokens", "outside the vocabulary"),
                               ({"tokens": "abc"}, "tokens", "valid list")):
      r = c.post("/detokenize", json=body, headers=auth)
      assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
    r = c.post("/tokenize", json={"prompt": "a", "messages": msgs}, headers=auth)
    assert r.status_code == 400 and "exactly one of 'prompt'" in r.json()["error"]["message"]
    r = c.post("/tokenize", json={"prompt": "a", "model": "nope"}, headers=auth)
    assert r.status_code == 404


# ---------------------------------------------------------------- the per-token path: one hand-off a step, SSE bytes
def test_engine_thread_hands_the_loop_one_batch_per_step(monkeypatch):
  """8 requests (16 completions) in flight: each engine iteration wakes the event loop once, with
  every request's update of that step (it used to be one ``call_soon_threadsafe`` per request)."""
  engine = AsyncEngine(ScriptedEngine(), ServerMetrics("m"))

  async def run():
    loop = asyncio.get_running_loop()
    calls = []
    real = loop.call_soon_threadsafe
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a: calls.append(a) or real(*a))
    got: dict[int, list] = {tag: [] for tag in range(8)}
    for tag in range(8):
      engine.add(f"r{tag}", [5 + tag], SamplingParams(n=2, max_tokens=4), tag=tag, sink=got[tag].append,
                 arrival=0.0)
    per_iteration = []
    for _ in range(4):
      before, seen = len(calls), sum(map(len, got.values()))
      engine._iteration()  # the engine thread's work, run here (the thread is not started)
      await asyncio.sleep(0)  # the loop runs the hand-off
      per_iteration.append((len(calls) - before, sum(map(len, got.values())) - seen))
    return per_iteration, got

  per_iteration, got = asyncio.run(run())
  # the first iteration acknowledges the 8 adds and runs the first step: 16 updates, one hand-off
  assert per_iteration == [(1, 16), (1, 8), (1, 8), (1, 8)], per_iteration
  for tag, updates in got.items():
    assert updates[0].num_prompt_tokens == 1 and updates[-1].finished
    for i in range(2):
      ids = [t for u in updates[1:] for d in u.choices if d.index == i for t in d.token_ids]
      assert ids == expected_tokens([5 + tag], 4, i)


def test_engine_stats_are_read_once_per_interval_and_when_idle():
  """``llm.stats()`` walks the weights: the engine thread reads it at most once per
  ``metrics_interval`` while requests run (it was once per step), and always when they are done."""
  llm = ScriptedEngine()
  engine = AsyncEngine(llm, ServerMetrics("m"))
  engine.metrics_interval = 3600.0

  async def run():
    got = []
    for tag in range(2):
      engine.add(f"r{tag}", [5], SamplingParams(max_tokens=6), tag=tag, sink=got.append, arrival=0.0)
    iterations = 0
    while True:
      assert engine._iteration()  # the engine thread's work, run here (the thread is not started)
      iterations += 1
      if not engine._streams:
        return iterations
      assert 'jaxserve:num_requests_running{model_name="m"} 2.0' in engine.metrics.render().decode()

  assert asyncio.run(run()) == 6  # one step per token
  assert llm.stats_calls == 2  # the first step, and when the requests were done
  assert 'jaxserve:num_requests_running{model_name="m"} 0.0' in engine.metrics.render().decode()


def _old_sse(obj) -> str:
  """The event as the server wrote it before its chunk encoder: ``json.dumps`` of the chunk's dict."""
  return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def test_chunk_encoder_is_byte_for_byte_the_chunk_dict():
  rng = random.Random(0)
  alphabet = ["a", " ", '"', "\\", "\n", "\t", "\x00", "\x1f", "é", "☃", "😀", "\u2028", "</s>", "\ufffd"]
  head = {"id": "cmpl-1", "object": "text_completion", "created": 17, "model": 'a "quoted" /path ☃'}
  enc = ChunkEncoder(head)
  for _ in range(300):
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(5)))
    index = rng.randrange(70)
    reason = rng.choice([None, "stop", "length", "abort"])
    lp = rng.choice([None, {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": [{text: -0.5, "b": -9999.0}],
                            "text_offset": [3]}])
    want = _old_sse({**head, "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": reason}],
                     "usage": None})
    assert enc.completion(index, text, lp, reason) == want
    chat_lp = None if lp is None else {"content": [{"token": text, "logprob": -0.5, "bytes": list(text.encode()),
                                                    "top_logprobs": []}]}
    for content in (text, None):
      delta = {} if content is None else {"content": content}
      want = _old_sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": chat_lp,
                                            "finish_reason": reason}], "usage": None})
      assert enc.chat(index, content, chat_lp, reason) == want


CHOICE_KEYS = {"/v1/completions": ["index", "text", "logprobs", "finish_reason"],
               "/v1/chat/completions": ["index", "delta", "logprobs", "finish_reason"]}


@pytest.mark.parametrize("route", list(CHOICE_KEYS))
def test_streamed_body_is_the_old_events_and_agrees_with_the_whole_response(route):
  """Streaming with logprobs and n = 2 (special tokens with empty text among them): every event is
  what ``json.dumps`` of the old chunk dict wrote, in the old key order, and the streamed texts and
  logprobs equal the non-streamed response's."""
  prompt = [TOK.vocab_size - 4]
  if route == "/v1/completions":
    body = {"prompt": prompt, "logprobs": 2}
  else:
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2}
  body = {**body, "max_tokens": 6, "n": 2}
  with client(ScriptedEngine()) as c:
    whole = c.post(route, json=body).json()
    with c.stream("POST", route, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
      raw = r.read().decode()
  events = raw.split("\n\n")
  assert events[-2:] == ["data: [DONE]", ""]
  chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
  assert raw == "".join(_old_sse(ch) for ch in chunks) + "data: [DONE]\n\n"
  token_chunks = [ch for ch in chunks if ch["choices"] and "role" not in ch["choices"][0].get("delta", {})]
  assert len(token_chunks) == 12 == chunks[-1]["usage"]["completion_tokens"]
  for ch in token_chunks:
    assert list(ch) == ["id", "object", "created", "model", "choices", "usage"] and ch["usage"] is None
    assert list(ch["choices"][0]) == CHOICE_KEYS[route]
  for i in range(2):
    mine = [ch["choices"][0] for ch in token_chunks if ch["choices"][0]["index"] == i]
    if route == "/v1/completions":
      assert "".join(m["text"] for m in mine) == whole["choices"][i]["text"]
      for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for m in mine for x in m["logprobs"][key]] == whole["choices"][i]["logprobs"][key]
    else:
      assert "".join(m["delta"]["content"] for m in mine) == whole["choices"][i]["message"]["content"]
      assert [x for m in mine for x in m["logprobs"]["content"]] == whole["choices"][i]["logprobs"]["content"]
    assert mine[-1]["finish_reason"] == "length" and all(m["finish_reason"] is None for m in mine[:-1])


class _Group:
  """The parts of a RequestGroup a streaming response uses."""

  ids = ["cmpl-x-0"]

  def __init__(self):
    self.aborts = 0

  def abort(self):
    self.aborts += 1


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_stream_gives_up_on_a_write_blocked_past_the_stall_timeout(spec_version, caplog):
  """A write that blocks 0.3 s past a 0.2 s stall timeout is cancelled: the requests are aborted and
  the connection cut; writes that each block less than the timeout stream to the end."""
  from jaxserve.server._app import ABORT_CONNECTION, _GroupStreamingResponse

  async def run(write_delay, block_at):
    sent, cut = [], []

    async def body():
      for i in range(6):
        yield f"data: {i}\n\n"

    async def send(message):
      if message["type"] == "http.response.body" and len(sent) == block_at:
        await asyncio.sleep(3600)  # the client reads nothing
      await asyncio.sleep(write_delay)
      sent.append(message)

    async def receive():
      await asyncio.sleep(3600)

    group = _Group()
    scope = {"type": "http", "asgi": {"spec_version": spec_version},
             "extensions": {ABORT_CONNECTION: lambda: cut.append(True)}}
    response = _GroupStreamingResponse(group, 0.2, body(), media_type="text/event-stream")
    t0 = time.monotonic()
    await asyncio.wait_for(response(scope, receive, send), 10)
    return sent, cut, group.aborts, time.monotonic() - t0

  sent, cut, aborts, took = asyncio.run(run(0.0, block_at=3))
  assert len(sent) == 3 and cut == [True] and aborts >= 1 and 0.2 <= took < 1.0, (len(sent), cut, took)
  assert "the client read nothing for 0.2 s" in caplog.text
  sent, cut, _, took = asyncio.run(run(0.1, block_at=None))  # 8 writes of 0.1 s each: 0.8 s, no write stalled
  assert len(sent) == 8 and sent[-1]["more_body"] is False and cut == [], (len(sent), cut)


# ---------------------------------------------------------------- hostile-client findings
def test_unknown_route_and_wrong_method_say_what_is_served():
  with client(ScriptedEngine()) as c:
    r = c.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers  # RFC 9110: a 405 lists the methods
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "GET" in err["message"] and "/v1/completions" in err["message"] and "POST" in err["message"], err
    r = c.post("/v1/embeddings", json={"input": "a"})
    assert r.status_code == 404
    msg = r.json()["error"]["message"]
    assert "POST /v1/embeddings" in msg and "/v1/chat/completions" in msg and "/v1/completions" in msg, msg


@pytest.mark.parametrize("prompt", [["a", "b"], [1, 2], 5])
def test_tokenize_prompt_error_asks_for_a_string(prompt):
  with client(ScriptedEngine()) as c:
    r = c.post("/tokenize", json={"prompt": prompt})
  err = r.json()["error"]
  assert r.status_code == 400 and err["param"] == "prompt", err
  assert "'prompt' must be a string, got" in err["message"] and "list" not in err["message"].split(", got")[0], err


@pytest.mark.parametrize("route, body", [("/v1/completions", {"prompt": [5]}),
                                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_stream_options_need_stream_true(route, body):
  # OpenAI and vLLM refuse stream_options without "stream": true (400), rather than ignore them
  with client(ScriptedEngine()) as c:
    for stream in (False, None):
      r = c.post(route, json={**body, "max_tokens": 2, "stream": stream, "stream_options": {"include_usage": True}})
      err = r.json()["error"]
      assert r.status_code == 400 and err["param"] == "stream_options" and "'stream': true" in err["message"], err
    assert c.post(route, json={**body, "max_tokens": 2, "stream_options": None}).status_code == 200
    r = c.post(route, json={**body, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and '"usage":{"prompt_tokens"' in r.text


def test_chat_logprob_bytes_are_the_tokens_bytes():
  # byte-fallback tokens (<0xF0> ...) decode to U+FFFD alone; their "bytes" must still be the raw byte,
  # so that a client joining the bytes of consecutive tokens gets the character back (OpenAI's contract)
  text = " 😀 café ☃"
  ids = TOK.encode(text)
  assert any(TOK.id_to_piece(t).startswith("<0x") for t in ids)
  entries = [{t: -0.5, (t + 1) % TOK.vocab_size: -1.0} for t in ids]
  items = chat_logprobs(TokenText(TOK), 2, ids, entries)
  assert bytes(b for item in items for b in item["bytes"]) == text.encode("utf-8")
  for t, item in zip(ids, items):
    piece = TOK.id_to_piece(t)
    if piece.startswith("<0x"):
      assert item["bytes"] == [int(piece[3:5], 16)] and item["top_logprobs"][0]["bytes"] == item["bytes"]


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "a", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2}),
])
def test_n_is_bounded_by_the_engines_sequences_per_step(route, body):
  """An ``n`` the engine cannot batch is the request's error, on 'n', with the bound that holds."""
  with client(ScriptedEngine(), max_num_seqs=4) as c:
    r = c.post(route, json={**body, "n": 5})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n" and "[1, 4]" in err["message"] and "got 5" in err["message"], err
    assert c.post(route, json={**body, "n": 4}).status_code == 200


def test_create_app_takes_the_bound_on_n_from_a_jaxserve_engine():
  engine = ScriptedEngine()
  engine.engine = types.SimpleNamespace(max_num_seqs=3)  # where jaxserve.LLM keeps it
  with client(engine) as c:
    r = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "n": 4})
  assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "[1, 3]" in r.json()["error"]["message"]
