"""Transport hardening of ``jaxserve serve``: body size and read limits, cheap bounds before tokenizing,
malformed JSON, slow clients, the queue bound, the per-request token cap and SIGTERM with hostile
connections open. Each test drives a live server on 127.0.0.1 (small limits, so they run in seconds)
with raw sockets where a well-behaved client library would not do what a hostile client does.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
import types

import httpx
import pytest
from starlette.testclient import TestClient

from jaxserve import SamplingParams
from jaxserve.loaders import DEFAULT_TOKENIZER
from jaxserve.server import APIError, ServerConfig, create_app
from jaxserve.server import _protocol as proto
from jaxserve.server._async_engine import AsyncEngine, ChoiceDelta, ClientDisconnected, RequestGroup, Update
from jaxserve.server._limits import TransportLimits, check_sizes, check_unicode, parse_json, read_body
from jaxserve.server._metrics import ServerMetrics
from jaxserve.server.testing import HOST, ServerProcess
from jaxserve.tokenizer import load_tokenizer

MODEL = "stories260K"
LIMIT_ARGS = ["--max-num-seqs", "16", "--max-queued-requests", "4", "--max-tokens-per-request", "8000",
              "--header-timeout", "1", "--body-timeout", "2", "--stream-stall-timeout", "1",
              "--max-stream-buffer", "2000"]
OK = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server():
  with ServerProcess(LIMIT_ARGS) as srv:
    yield srv


def post(server, body, **kw) -> httpx.Response:
  kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
  return httpx.post(server.url("/v1/completions"), timeout=60, **kw)


def still_serving(server) -> None:
  r = post(server, OK)
  assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text


def metric(server, name: str, labels: str = "") -> float:
  for line in httpx.get(server.url("/metrics"), timeout=10).text.splitlines():
    if line.startswith(f"jaxserve:{name}{{") and labels in line:
      return float(line.rsplit(" ", 1)[1])
  return 0.0


def wait_idle(server, timeout: float = 30.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if metric(server, "num_requests_running") == 0 and metric(server, "kv_cache_blocks_used") == 0:
      return True
    time.sleep(0.1)
  return False


def connect(server, rcvbuf: int | None = None) -> socket.socket:
  s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  if rcvbuf is not None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
  s.connect((HOST, server.port))
  return s


def request_head(path: str, extra: str = "") -> bytes:
  return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n{extra}\r\n").encode()


def closed_within(sock: socket.socket, timeout: float) -> bytes | None:
  """What the server sent before closing ``sock``, or None if it is still open after ``timeout``."""
  sock.settimeout(0.2)
  got, deadline = b"", time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      data = sock.recv(65536)
    except socket.timeout:
      continue
    except OSError:
      return got
    if not data:
      return got
    got += data
  return None


class HealthProbe:
  """Polls ``/health`` on a thread; ``worst`` is its slowest answer (a failure counts as infinite)."""

  def __init__(self, server):
    self.server, self.times, self._stop = server, [], threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    with httpx.Client(timeout=30) as h:
      while not self._stop.is_set():
        t0 = time.monotonic()
        try:
          ok = h.get(self.server.url("/health")).status_code == 200
        except httpx.HTTPError:
          ok = False
        self.times.append(time.monotonic() - t0 if ok else float("inf"))
        time.sleep(0.02)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join(60)

  @property
  def worst(self) -> float:
    return max(self.times)


# ---------------------------------------------------------------- the pieces, without a server
def test_read_body_stops_reading_at_the_limit():
  pulled = []

  async def endless():
    while True:
      pulled.append(1000)
      yield b"x" * 1000

  with pytest.raises(APIError) as e:
    asyncio.run(read_body(endless(), 10_000))
  assert e.value.status == 413 and sum(pulled) == 11_000  # not one chunk more than needed to know


@pytest.mark.parametrize("kw", [{"max_body_bytes": 0}, {"body_timeout": 0.0}, {"header_timeout": math.nan},
                                {"max_in_flight_seqs": 0}, {"max_stream_buffer": -1}])
def test_limits_refuse_values_that_bound_nothing(kw):
  with pytest.raises(ValueError, match=next(iter(kw))):
    TransportLimits(**kw)


def test_parse_json_and_size_checks_name_what_is_wrong():
  with pytest.raises(APIError, match="nested too deeply"):
    parse_json(b"[" * 100_000 + b"]" * 100_000)
  with pytest.raises(APIError, match="must be a JSON object, got list"):
    parse_json(b"[1]")
  with pytest.raises(APIError, match="4300 digits"):
    parse_json(b'{"n": ' + b"1" * 5001 + b"}")
  with pytest.raises(APIError, match="'prompt.1' has 600 items"):
    check_sizes({"prompt": [[1], [2] * 600]}, 512)
  with pytest.raises(APIError, match="'messages.0' has 513 items"):
    check_sizes({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 513}]}, 512)
  check_sizes({"prompt": [[1] * 512] * 64, "stop": ["a"] * 400}, 512)


def test_lone_surrogates_are_found_wherever_they_are():
  raw = b'{"prompt": "ok", "stop": ["a", "b\\\\ud800"], "user": "\\ud83d\\ude00"}'
  check_unicode(raw, proto.parse_body(raw, proto.CompletionRequest))  # escaped backslash, a pair: both text
  raw = b'{"prompt": "ok", "user": "\\ud83d\\ude00", "x": "\\udfff"}'
  check_unicode(raw, proto.parse_body(raw, proto.CompletionRequest))  # an ignored field is never used
  raw = b'{"prompt": "ok", "stop": ["a", "b\\ud800"]}'
  with pytest.raises(APIError, match="'stop.1' holds a lone UTF-16 surrogate"):
    check_unicode(raw, proto.parse_body(raw, proto.CompletionRequest))


def test_lone_surrogate_search_passes_over_what_is_never_read():
  # a message's extra fields, tools and response_format are never read: their strings are not searched
  # (a search through a million items of theirs held the event loop for seconds)
  junk = [{"a": 1}] * 1000 + [[1] * 1000, ["x"] * 1000]
  for extra in ({"messages": [{"role": "user", "content": "hi", "junk": junk, "s": "\ud800"}]},
                {"messages": [{"role": "user", "content": "hi"}], "tools": [{"junk": junk, "s": "\ud800"}]},
                {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "\udc00"}}):
    raw = json.dumps(extra).encode()
    check_unicode(raw, proto.parse_body(raw, proto.ChatCompletionRequest))
  # what is read still is, behind lists of numbers and of valid strings
  parts = [{"type": "text", "text": "a"}] * 300 + [{"type": "text", "text": "b\ud800"}]
  raw = json.dumps({"messages": [{"role": "user", "content": parts}], "stop_token_ids": [1] * 500}).encode()
  with pytest.raises(APIError, match="'messages.0.content.300.text' holds a lone UTF-16 surrogate"):
    check_unicode(raw, proto.parse_body(raw, proto.ChatCompletionRequest))
  raw = json.dumps({"prompt": ["a", "é", "b\ud800"], "stop": ["x", "yé"]}).encode()
  with pytest.raises(APIError, match="'prompt.2' holds a lone UTF-16 surrogate"):
    check_unicode(raw, proto.parse_body(raw, proto.CompletionRequest))


class OneTokenEngine:
  """Engine double: every request ends with one token (id 7) at its first step."""

  def __init__(self):
    self.reqs: dict[str, object] = {}

  def add_request(self, request_id, prompt, params):
    self.reqs[request_id] = params

  def abort_request(self, request_id):
    self.reqs.pop(request_id, None)

  def has_unfinished_requests(self):
    return bool(self.reqs)

  def step(self):
    outs = [types.SimpleNamespace(request_id=rid, finished=True, outputs=[
        types.SimpleNamespace(index=i, token_ids=[7], text="x", logprobs=None, finish_reason="length")
        for i in range(p.n)]) for rid, p in self.reqs.items()]
    self.reqs.clear()
    return outs

  def stats(self):
    return {}


class SlowTokenizer:
  """The stories260K tokenizer, with an ``encode`` that holds its thread for a second (a long prompt)."""

  def __init__(self):
    self._tok = load_tokenizer(DEFAULT_TOKENIZER)
    self.vocab_size, self.bos_id, self.eos_id = self._tok.vocab_size, self._tok.bos_id, self._tok.eos_id
    self.chat_template = None

  def encode(self, text, add_bos=False):
    time.sleep(1.0)
    return self._tok.encode(text, add_bos=add_bos)

  def decode(self, ids):
    return self._tok.decode(ids)


def test_stream_buffer_counts_tokens_and_logprobs_and_aborts_past_its_bound():
  engine = AsyncEngine(OneTokenEngine(), ServerMetrics("m"), TransportLimits(max_stream_buffer=20))
  group = RequestGroup(engine, "cmpl-x", [[1, 2]], [SamplingParams(n=2, max_tokens=8)], arrival=0.0)

  async def run():
    group._unfinished.add(0)  # as start() leaves it once the engine acknowledged the request
    engine.in_flight_seqs, group._admitted = 2, 2
    lp = {5: 0.0, 6: -1.0, 7: -2.0}  # the sampled token and two more: 3 entries
    for _ in range(3):  # 2 completions x 1 token x (1 + 3) = 8 entries an update: 8, 16, then 24 > 20
      group._put(Update(0, tuple(ChoiceDelta(i, (5,), "a", (lp,), None) for i in range(2))))
    assert group.stalled and engine.in_flight_seqs == 0  # aborted and released
    got = []
    with pytest.raises(ClientDisconnected):
      async for u in group.updates():
        got.append(u)
    return got

  assert asyncio.run(run()) == []
  cmds = []
  while not engine._cmds.empty():
    cmds.append(engine._cmds.get_nowait())
  assert cmds == [("abort", "cmpl-x-0")]


def test_tokenizing_does_not_hold_the_event_loop():
  tok = SlowTokenizer()
  app = create_app(OneTokenEngine(), tok, ServerConfig(model_name="m", max_model_len=64, vocab_size=tok.vocab_size),
                   SamplingParams)
  with TestClient(app) as c:
    done = []
    body = {"prompt": "Once", "max_tokens": 1}
    t = threading.Thread(target=lambda: done.append(c.post("/v1/completions", json=body)))
    t.start()
    time.sleep(0.3)  # the completion is being tokenized now
    t0 = time.monotonic()
    assert c.get("/health").status_code == 200
    waited = time.monotonic() - t0
    t.join(30)
  assert done[0].status_code == 200 and done[0].json()["choices"][0]["text"] == "x", done[0].text
  assert waited < 0.5, waited  # on the event loop, /health would have waited for the 1 s encode


# ---------------------------------------------------------------- 14.4: the body limit while reading
def test_chunked_body_over_the_limit_gets_413_before_it_is_all_sent(server):
  total = 50 * 1024 * 1024
  sock = connect(server)
  sock.sendall(request_head("/v1/completions", "Transfer-Encoding: chunked\r\n"))
  chunk = b"[" + b"1," * 32000
  frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
  sent = 0
  sock.settimeout(10)
  try:
    while sent < total:
      sock.sendall(frame)
      sent += len(chunk)
  except OSError:  # the server answered and closed the connection
    pass
  answer = closed_within(sock, 30)
  sock.close()
  assert answer is not None and answer.startswith(b"HTTP/1.1 413"), answer[:200] if answer else answer
  assert b"over the limit of 8388608 bytes" in answer
  assert sent < total, "the server read the whole 50 MB body"
  still_serving(server)


def test_content_length_over_the_limit_gets_413(server):
  sock = connect(server)
  sock.sendall(request_head("/v1/completions", "Content-Length: 9000000\r\n"))
  answer = closed_within(sock, 10)
  assert answer is not None and answer.startswith(b"HTTP/1.1 413"), answer
  sock.close()


# ---------------------------------------------------------------- 14.5: cheap bounds first, tokenizing off the loop
@pytest.mark.parametrize("case", ["8MB prompt", "2M prompts", "4M token ids", "8MB chat message", "2M messages",
                                  "4M detokenize ids"])
def test_huge_prompts_get_400_while_health_answers(server, case):
  big = 8 * 1024 * 1024 - 1000
  route, body, words = "/v1/completions", None, None
  if case == "8MB prompt":
    body, words = {**OK, "prompt": "a " * (big // 2)}, "characters"
  elif case == "2M prompts":
    body, words = {**OK, "prompt": ["a"] * (big // 4)}, f"'prompt' has {big // 4} items"
  elif case == "4M token ids":
    body, words = {**OK, "prompt": [5] * (big // 2)}, f"'prompt' has {big // 2} items"
  elif case == "2M messages":
    route = "/v1/chat/completions"
    body, words = {"messages": [{"role": "user"}] * (big // 16)}, f"'messages' has {big // 16} items"
  elif case == "4M detokenize ids":
    route = "/detokenize"
    body, words = {"tokens": [5] * (big // 2)}, f"'tokens' has {big // 2} items"
  else:
    route = "/v1/chat/completions"
    body, words = {"model": MODEL, "messages": [{"role": "user", "content": "a " * (big // 2)}]}, "characters"
  raw = json.dumps(body, separators=(",", ":")).encode()
  with HealthProbe(server) as probe:
    time.sleep(0.2)
    t0 = time.monotonic()
    r = httpx.post(server.url(route), content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    elapsed = time.monotonic() - t0
    time.sleep(0.2)
  assert r.status_code == 400 and words in r.json()["error"]["message"], r.text[:300]
  # /health kept answering: no step of the request held the event loop for long (it took 7.5-30 s before)
  assert probe.worst < 2.0, (probe.worst, elapsed)
  still_serving(server)


def test_prompts_within_the_cheap_bounds_are_checked_in_full(server):
  """Under the character and item bounds, prompts are tokenized (or checked id by id) and refused
  for their real size; 65 prompts are over the 64 completions a request may start."""
  r = post(server, {**OK, "prompt": "Once upon a time " * 300})
  assert r.status_code == 400 and "maximum context length is 512" in r.json()["error"]["message"], r.text
  r = post(server, {**OK, "prompt": [5] * 511 + [5000]})
  assert r.status_code == 400 and "maximum context length is 512" in r.json()["error"]["message"], r.text
  r = post(server, {**OK, "prompt": ["a"] * 65})
  assert r.status_code == 400 and "at most 64 per request" in r.json()["error"]["message"], r.text


# ---------------------------------------------------------------- 14.8: malformed but parseable JSON
@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"prompt": "a", "max_tokens": ' + b"7" * 5001 + b"}", "not valid JSON"),
    (b'{"prompt": "a\\ud800b", "max_tokens": 4}', "'prompt' holds a lone UTF-16 surrogate"),
    (b'{"prompt": ["ok", "\\udfff"], "max_tokens": 4}', "'prompt.1' holds a lone UTF-16 surrogate"),
    (b'{"model": "\\ud800", "prompt": "a", "max_tokens": 4}', "'model' holds a lone UTF-16 surrogate"),
], ids=["deep", "5001 digits", "surrogate in prompt", "surrogate in a prompt list", "surrogate in model"])
def test_malformed_json_gets_400(server, raw, words):
  r = post(server, raw)
  assert r.status_code == 400, r.text[:300]
  assert words in r.json()["error"]["message"], r.text[:300]
  still_serving(server)


def test_surrogate_pair_escapes_are_text(server):
  r = post(server, b'{"prompt": "a \\ud83d\\ude00 b", "max_tokens": 2}')
  assert r.status_code == 200, r.text
  r = httpx.post(server.url("/v1/chat/completions"), timeout=60, headers={"Content-Type": "application/json"},
                 content=b'{"messages": [{"role": "user", "content": "x\\udc00"}], "max_tokens": 2}')
  assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content", r.text


# ---------------------------------------------------------------- 14.9: slow clients
def test_slowloris_and_idle_connections_are_closed(server):
  """--header-timeout 1, --body-timeout 2: every hostile socket is closed within a few seconds."""
  idle = connect(server)
  partial_headers = connect(server)
  partial_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
  partial_body = connect(server)
  partial_body.sendall(request_head("/v1/completions", "Content-Length: 1000\r\n") + b'{"prompt": ')
  open_chunked = connect(server)
  open_chunked.sendall(request_head("/v1/completions", "Transfer-Encoding: chunked\r\n") + b"3\r\n{\"p\r\n")
  socks = {"idle": idle, "partial headers": partial_headers, "partial body": partial_body,
           "open chunked body": open_chunked}
  results: dict[str, bytes | None] = {}

  def dribble():  # one header byte every 0.3 s would keep uvicorn's keep-alive timer from ever firing
    s = connect(server)
    for b in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
      try:
        s.sendall(bytes([b]))
      except OSError:
        break
      time.sleep(0.3)
    results["dribbled headers"] = closed_within(s, 0.5)
    s.close()

  t = threading.Thread(target=dribble)
  t.start()
  t0 = time.monotonic()
  for name, s in socks.items():
    results[name] = closed_within(s, max(0.1, 8 - (time.monotonic() - t0)))
    s.close()
  t.join(90)
  assert all(v is not None for v in results.values()), {k: v for k, v in results.items() if v is None}
  assert results["idle"] == b"" and results["partial headers"] == b""
  for name in ("partial body", "open chunked body"):
    assert results[name].startswith(b"HTTP/1.1 408"), (name, results[name])
  still_serving(server)


def test_keep_alive_connection_dribbling_after_its_response_is_closed(server):
  sock = connect(server)
  body = json.dumps(OK).encode()
  sock.sendall(request_head("/v1/completions", f"Content-Length: {len(body)}\r\n") + body)
  sock.settimeout(30)
  assert sock.recv(65536).startswith(b"HTTP/1.1 200")
  for _ in range(3):  # bytes of a next request's headers, slowly: not enough to keep the connection
    sock.sendall(b"G")
    time.sleep(0.4)
  assert closed_within(sock, 3) is not None
  sock.close()


def test_stream_that_is_never_read_is_aborted_and_frees_its_blocks(server):
  assert wait_idle(server)
  aborted0 = metric(server, "request_success_total", 'finished_reason="abort"')
  # ~8 MB of events: more than the socket buffers hold (~3 MB on loopback), so the server's writes block
  body = json.dumps({**OK, "prompt": ["Once", "Lily"], "max_tokens": 490, "n": 8, "logprobs": 20,
                     "ignore_eos": True, "stream": True, "temperature": 0.8, "seed": 1}).encode()
  sock = connect(server, rcvbuf=4096)
  sock.sendall(request_head("/v1/completions", f"Content-Length: {len(body)}\r\n") + body)
  deadline = time.monotonic() + 30
  while metric(server, "num_requests_running") == 0 and time.monotonic() < deadline:
    time.sleep(0.05)
  # the client reads nothing; the server must give up on it (2000 entries buffered: 6 steps; or 1 s stalled)
  assert wait_idle(server, 30), "the unread stream still holds KV blocks"
  assert metric(server, "request_success_total", 'finished_reason="abort"') == aborted0 + 2
  answer = closed_within(sock, 30)  # reading now, the client gets the rest, then the server closes
  sock.close()
  assert answer is not None, "the server kept the stalled connection open"
  assert b"the client read too slowly" in answer or b"data: [DONE]" not in answer
  assert "tokens and logprobs queued up; aborting its requests" in server.log_text()  # the buffer bound acted
  still_serving(server)


def test_queue_bound_gives_429_with_retry_after(server):
  """--max-num-seqs 16 --max-queued-requests 4: 20 sequences in flight at most."""
  assert wait_idle(server)
  body = {**OK, "max_tokens": 500, "n": 5, "ignore_eos": True, "stream": True, "prompt": "Once"}
  with httpx.Client(timeout=60) as h:
    streams = [h.stream("POST", server.url("/v1/completions"), json=body) for _ in range(4)]
    responses = [s.__enter__() for s in streams]
    try:
      assert [r.status_code for r in responses] == [200] * 4
      r = h.post(server.url("/v1/completions"), json={**body, "n": 1, "stream": False})
      assert r.status_code == 429, r.text
      assert r.headers["Retry-After"] == "1" and "busy" in r.json()["error"]["message"]
    finally:
      for s in streams:
        s.__exit__(None, None, None)
  assert wait_idle(server)
  still_serving(server)


def test_per_request_token_cap(server):
  r = post(server, {**OK, "n": 16, "max_tokens": 501})
  assert r.status_code == 400, r.text
  err = r.json()["error"]
  assert err["param"] == "max_tokens" and "8016 tokens" in err["message"] and "8000" in err["message"], err
  r = post(server, {**OK, "prompt": ["a", "b", "c"], "n": 8, "max_tokens": 400})
  assert r.status_code == 400 and "9600 tokens" in r.json()["error"]["message"]
  assert post(server, {**OK, "n": 4, "max_tokens": 100}).status_code == 200
  r = post(server, {**OK, "n": 21, "max_tokens": 4})  # more than one step batches: the request's error on 'n'
  assert r.status_code == 400 and r.json()["error"]["param"] == "n" and "[1, 16]" in r.json()["error"]["message"]
  r = post(server, {**OK, "prompt": ["a", "b"], "n": 11, "max_tokens": 4})  # more than the server holds at once
  assert r.status_code == 400 and "22 sequences" in r.json()["error"]["message"], r.text


# ---------------------------------------------------------------- 14.10: SIGTERM with hostile connections
def test_sigterm_with_hostile_connections_exits_zero_within_the_timeout():
  with ServerProcess(["--max-num-seqs", "64", "--shutdown-timeout", "2", "--header-timeout", "60",
                      "--body-timeout", "60", "--stream-stall-timeout", "60"]) as srv:
    hostile = [connect(srv) for _ in range(4)]  # idle
    for s in hostile[:2]:
      s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # partial headers
    for _ in range(3):  # open chunked bodies
      s = connect(srv)
      s.sendall(request_head("/v1/completions", "Transfer-Encoding: chunked\r\n") + b"1\r\n{\r\n")
      hostile.append(s)
    body = json.dumps({**OK, "max_tokens": 500, "n": 16, "logprobs": 5, "ignore_eos": True, "stream": True,
                       "temperature": 1.0, "prompt": "Once"}).encode()
    for _ in range(3):  # streams nobody reads
      s = connect(srv, rcvbuf=4096)
      s.sendall(request_head("/v1/completions", f"Content-Length: {len(body)}\r\n") + body)
      hostile.append(s)
    time.sleep(1.0)
    t0 = time.monotonic()
    srv.terminate()
    code = srv.wait(60)
    took = time.monotonic() - t0
    for s in hostile:
      s.close()
    log = srv.log_text()
    assert code == 0, log[-3000:]
    # the 2 s shutdown timeout, the 1 s close grace and the process's exit (~1 s), not 2 x 2 + 5 s and more
    assert took < 2 + 1 + 3, (took, log[-3000:])
    assert "Traceback" not in log and "engine stopped" in log, log[-3000:]
