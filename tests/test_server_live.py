"""``jaxserve serve`` on 127.0.0.1 driven by the official ``openai`` client and raw HTTP.

One server (embedded stories260K, with an API key) serves every test but the SIGTERM one, which
starts its own. Greedy outputs are compared with ``LLM.generate`` run in this process.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.loaders import EVAL_TEXT, load_model
from jaxserve.server import render_plain
from jaxserve.server.testing import ServerProcess

KEY = "test-key"
MODEL = "stories260K"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
  with ServerProcess(["--api-key", KEY, "--max-num-seqs", "64"]) as srv:
    yield srv


@pytest.fixture(scope="module")
def offline():
  loaded = load_model()
  return loaded.tokenizer, LLM(model=loaded, max_num_seqs=64)


def story_prompts(n: int) -> list[str]:
  """``n`` distinct prompts: the first words of lines of the TinyStories validation text."""
  with open(EVAL_TEXT, encoding="utf-8") as f:
    lines = [ln.strip() for ln in f if len(ln.split()) > 12]
  return [" ".join(lines[i].split()[:4 + i % 9]) for i in range(n)]


def greedy(llm: LLM, prompts, max_tokens: int, **kw) -> list:
  """Offline greedy completions (``CompletionOutput``: ``.text``, ``.token_ids``)."""
  outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw), use_tqdm=False)
  return [o.outputs[0] for o in outs]


def metric(text: str, name: str, labels: str = "", default: float | None = None) -> float:
  m = re.search(rf"^jaxserve:{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$", text, re.M)
  if m is None and default is not None:
    return default
  assert m, f"jaxserve:{name} {labels} missing from /metrics"
  return float(m.group(1))


def client(server: ServerProcess, **kw) -> openai.OpenAI:
  return openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=60, **kw)


# ---------------------------------------------------------------- openai client, unchanged
def test_openai_completions_and_chat_equal_offline_greedy(server, offline):
  tok, llm = offline
  prompts = story_prompts(3)
  outs = greedy(llm, prompts, 24)
  want = [o.text for o in outs]
  c = client(server)
  assert [m.id for m in c.models.list().data] == [MODEL]
  r = c.completions.create(model=MODEL, prompt=prompts, max_tokens=24, temperature=0)
  assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == want
  assert r.usage.completion_tokens == sum(len(o.token_ids) for o in outs)
  assert r.usage.prompt_tokens == sum(len(tok.encode(p, add_bos=True)) for p in prompts)
  # token ids as the prompt give the same completion
  r = c.completions.create(model=MODEL, prompt=tok.encode(prompts[0], add_bos=True), max_tokens=24, temperature=0)
  assert r.choices[0].text == want[0]
  for i, p in enumerate(prompts):
    stream = c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want[i]
    assert chunks[-1].usage.prompt_tokens == len(tok.encode(p, add_bos=True))
    assert chunks[-1].usage.completion_tokens == len(outs[i].token_ids)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")

  messages = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "A cat and a dog"}]
  chat_want = greedy(llm, [{"prompt_token_ids": tok.encode(render_plain(messages), add_bos=True)}], 20)[0].text
  r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
  assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == chat_want
  stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True)
  chunks = list(stream)
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat_want
  assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_sampling_options(server):
  c = client(server)
  p = story_prompts(1)[0]
  a = c.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0.9, seed=7, n=3)
  b = c.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0.9, seed=7, n=3)
  assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # a seed reproduces
  assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
  r = c.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, logprobs=3, echo=False)
  lp = r.choices[0].logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
  assert all(lp.token_logprobs[i] == pytest.approx(max(lp.top_logprobs[i].values())) for i in range(len(lp.tokens)))
  r = c.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, echo=True)
  assert r.choices[0].text.startswith(p)
  r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                temperature=0, logprobs=True, top_logprobs=2)
  assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
  r = c.completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0, stop=["."])
  assert "." not in r.choices[0].text


# ---------------------------------------------------------------- concurrency
def test_64_concurrent_streams_equal_offline_greedy(server, offline):
  _, llm = offline
  prompts = story_prompts(64)
  want = [o.text for o in greedy(llm, prompts, 32)]

  async def one(c: openai.AsyncOpenAI, i: int):
    stream = await c.completions.create(model=MODEL, prompt=prompts[i], max_tokens=32, temperature=0, stream=True)
    ids, parts, reasons = set(), [], []
    async for ch in stream:
      ids.add(ch.id)
      for choice in ch.choices:
        assert choice.index == 0
        parts.append(choice.text)
        reasons.append(choice.finish_reason)
    return ids, "".join(parts), [r for r in reasons if r]

  async def main():
    async with openai.AsyncOpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0, timeout=120,
                                  http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64))) as c:
      return await asyncio.wait_for(asyncio.gather(*(one(c, i) for i in range(64))), 150)

  results = asyncio.run(main())
  all_ids = [next(iter(ids)) for ids, _, _ in results]
  assert all(len(ids) == 1 for ids, _, _ in results) and len(set(all_ids)) == 64  # one id per request, none shared
  assert [len(reasons) for _, _, reasons in results] == [1] * 64  # each stream finished exactly once
  mismatched = [i for i, (_, text, _) in enumerate(results) if text != want[i]]
  assert not mismatched, f"{len(mismatched)} streams differ from offline greedy, e.g. #{mismatched[0]}"


def _idle_kv(server) -> tuple[float, float]:
  text = httpx.get(server.url("/metrics"), timeout=10).text
  return metric(text, "num_requests_running"), metric(text, "kv_cache_usage_perc")


def test_disconnecting_clients_free_their_requests(server):
  deadline = time.monotonic() + 30
  while _idle_kv(server)[0] and time.monotonic() < deadline:
    time.sleep(0.1)
  running0, usage0 = _idle_kv(server)
  assert running0 == 0
  aborted0 = metric(httpx.get(server.url("/metrics")).text, "request_success_total", 'finished_reason="abort"', 0.0)
  body = {"model": MODEL, "prompt": story_prompts(1)[0], "max_tokens": 400, "temperature": 0, "ignore_eos": True,
          "stream": True}
  go = threading.Barrier(20, timeout=60)
  mid_stream = []

  def disconnect_after_two_chunks():
    go.wait()  # the 20 clients start together and overlap
    with httpx.Client(timeout=30) as h:
      with h.stream("POST", server.url("/v1/completions"), json=body, headers=AUTH) as r:
        assert r.status_code == 200
        chunks = []
        for line in r.iter_lines():
          if line.startswith("data: "):
            chunks.append(json.loads(line[6:]))
          if len(chunks) == 2:
            break  # leaves the stream unread: httpx closes the connection, the client is gone mid-stream
    mid_stream.append(all(c["choices"][0]["finish_reason"] is None for c in chunks))

  threads = [threading.Thread(target=disconnect_after_two_chunks) for _ in range(20)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  assert mid_stream == [True] * 20
  deadline = time.monotonic() + 30
  while _idle_kv(server) != (0.0, usage0) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _idle_kv(server) == (0.0, usage0)
  text = httpx.get(server.url("/metrics"), timeout=10).text
  assert metric(text, "request_success_total", 'finished_reason="abort"') - aborted0 == 20

  # non-streaming clients that give up (read timeout) are aborted too
  def give_up():
    with pytest.raises(httpx.ReadTimeout):
      httpx.post(server.url("/v1/completions"), json={**body, "stream": False}, headers=AUTH, timeout=0.3)

  threads = [threading.Thread(target=give_up) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  deadline = time.monotonic() + 30
  while _idle_kv(server) != (0.0, usage0) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert _idle_kv(server) == (0.0, usage0)
  text = httpx.get(server.url("/metrics"), timeout=10).text
  assert metric(text, "request_success_total", 'finished_reason="abort"') - aborted0 == 23
  assert metric(text, "num_requests_waiting") == 0
  assert httpx.get(server.url("/health")).status_code == 200


# ---------------------------------------------------------------- bad inputs
OK_PROMPT = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD = [  # (route, body or raw bytes, headers, status, param, words in the message)
    ("completions", b"{\"prompt\": ", AUTH, 400, None, "not valid JSON"),
    ("completions", {**OK_PROMPT, "max_tokens": "four"}, AUTH, 400, "max_tokens", "valid integer"),
    ("completions", {**OK_PROMPT, "prompt": {"text": "hi"}}, AUTH, 400, "prompt", "must be a string"),
    ("completions", {**OK_PROMPT, "max_tokens": -3}, AUTH, 400, "max_tokens", ">= 1"),
    ("completions", {**OK_PROMPT, "temperature": -1}, AUTH, 400, "temperature", "[0, 100]"),
    ("completions", {**OK_PROMPT, "top_p": 1.5}, AUTH, 400, "top_p", "(0, 1]"),
    ("completions", {**OK_PROMPT, "n": 0}, AUTH, 400, "n", "[1, 64]"),
    ("completions", {**OK_PROMPT, "prompt": "once upon a time " * 200}, AUTH, 400, "prompt", "maximum context length"),
    ("completions", {**OK_PROMPT, "prompt": [1, 5000]}, AUTH, 400, "prompt", "outside the vocabulary"),
    ("completions", {**OK_PROMPT, "max_tokens": 10**12}, AUTH, 400, "max_tokens", "maximum context length is 512"),
    ("completions", {**OK_PROMPT, "model": "gpt-4o"}, AUTH, 404, "model", "does not exist"),
    ("completions", OK_PROMPT, {}, 401, None, "API key"),
    ("completions", OK_PROMPT, {"Authorization": "Bearer nope"}, 401, None, "API key"),
    ("chat/completions", {**OK_CHAT, "messages": []}, AUTH, 400, "messages", "non-empty list"),
    ("chat/completions", {**OK_CHAT, "messages": [{"role": "user"}]}, AUTH, 400, "messages.0.content", "required"),
    ("chat/completions", {**OK_CHAT, "temperature": "hot"}, AUTH, 400, "temperature", "valid number"),
    ("chat/completions", {**OK_CHAT, "max_completion_tokens": 100000}, AUTH, 400, "max_completion_tokens",
     "maximum context length"),
    ("chat/completions", {**OK_CHAT, "stream": True, "n": -1}, AUTH, 400, "n", "[1, 64]"),
]


@pytest.mark.parametrize("route, body, headers, status, param, words", BAD,
                         ids=[f"{i}-{b[0]}-{b[3]}-{b[4]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_documented_4xx(server, route, body, headers, status, param, words):
  kw = {"content": body, "headers": {**headers, "Content-Type": "application/json"}} if isinstance(body, bytes) \
      else {"json": body, "headers": headers}
  r = httpx.post(server.url(f"/v1/{route}"), timeout=30, **kw)
  assert r.status_code == status, r.text
  err = r.json()["error"]
  assert err["param"] == param and words in err["message"], err
  assert set(err) == {"message", "type", "param", "code"}
  ok = httpx.post(server.url("/v1/completions"), json=OK_PROMPT, headers=AUTH, timeout=30)  # still serving
  assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_bad_inputs_through_openai_client(server):
  c = client(server)
  with pytest.raises(openai.BadRequestError, match="top_p"):
    c.completions.create(model=MODEL, prompt="hi", top_p=2.0)
  with pytest.raises(openai.NotFoundError):
    c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()


# ---------------------------------------------------------------- shutdown
def test_sigterm_during_load_exits_zero_and_no_request_hangs():
  """16 long streams, SIGTERM after each has tokens: the server stops accepting, gives them
  ``--shutdown-timeout`` 2 s, aborts the rest (their streams still end with a finish reason and
  ``[DONE]``) and exits 0."""
  results: dict[int, str] = {}
  prompts = story_prompts(16)

  def stream_one(i: int, url: str, first: threading.Event):
    body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    outcome, finish = "cut", None
    try:
      with httpx.Client(timeout=httpx.Timeout(30)) as h:
        with h.stream("POST", url, json=body, headers=AUTH) as r:
          assert r.status_code == 200
          for line in r.iter_lines():
            first.set()
            if line == "data: [DONE]":
              outcome = "done"
            elif line.startswith("data: "):
              finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
    except httpx.HTTPError as e:
      outcome = f"error {type(e).__name__}"
    results[i] = f"{outcome} {finish}"

  with ServerProcess(["--api-key", KEY, "--shutdown-timeout", "2"]) as srv:
    firsts = [threading.Event() for _ in range(16)]
    threads = [threading.Thread(target=stream_one, args=(i, srv.url("/v1/completions"), firsts[i]))
               for i in range(16)]
    for t in threads:
      t.start()
    for f in firsts:
      assert f.wait(60)
    t0 = time.monotonic()
    srv.terminate()
    assert srv.wait(60) == 0, srv.log_text()[-3000:]
    for t in threads:
      t.join(30)
    assert not any(t.is_alive() for t in threads), "a client request hung after shutdown"
    assert time.monotonic() - t0 < 30
    # every stream ended properly: finished ("length") or aborted at the deadline ("abort")
    assert sorted(results) == list(range(16)) and all(r in ("done length", "done abort") for r in results.values()), \
        results
    log = srv.log_text()
    assert "engine stopped" in log and "Traceback" not in log, log[-3000:]
    with pytest.raises(httpx.ConnectError):
      httpx.get(srv.url("/health"), timeout=5)


def test_served_under_the_path_as_given_with_tokenize_and_a_chunk_per_token():
  from jaxserve.loaders import DEFAULT_MODEL, DEFAULT_TOKENIZER
  with ServerProcess([DEFAULT_MODEL, "--tokenizer", DEFAULT_TOKENIZER, "--no-warmup", "--max-num-seqs", "4"]) as srv:
    c = openai.OpenAI(base_url=srv.url("/v1"), api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in c.models.list().data] == [DEFAULT_MODEL]
    r = c.completions.create(model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r.model == DEFAULT_MODEL and r.usage.completion_tokens == 12
    chunks = list(c.completions.create(model=DEFAULT_MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                       stream=True))
    assert len(chunks) == 12 and "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    tok = httpx.post(srv.url("/tokenize"), json={"model": DEFAULT_MODEL, "prompt": "Once upon a time"}).json()
    assert tok["count"] == r.usage.prompt_tokens and tok["max_model_len"] > 0
    back = httpx.post(srv.url("/detokenize"), json={"model": DEFAULT_MODEL, "tokens": tok["tokens"]}).json()
    assert back == {"prompt": "Once upon a time"}
