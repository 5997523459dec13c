"""Abuse table of ``jaxserve serve``: hostile or careless requests against 16 greedy streams in flight.

For each case a server started on 127.0.0.1 (embedded stories260K) serves 16 greedy streaming
completions; once every stream has its first chunk, the case sends its bounded traffic (one bad
request, or a few dozen hostile connections). The table gives per case: the HTTP status (or what
happened to the connections), whether it is the expected one, whether the 16 streams stayed
correct (their text equal to ``LLM.generate``'s greedy text in this process) and the longest gap
between two chunks of any stream while the case ran. Results, with the CPU model and the load
average, go to ``benchmarks/results/abuse.json``.

  python benchmarks/abuse.py                 # every case, 16 streams of 400 tokens
  python benchmarks/abuse.py --smoke         # every case on small sizes, 4 streams of 32 tokens (seconds)
  python benchmarks/abuse.py --cases deep_json,slowloris
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import cpu_model, git_commit, isa  # noqa: E402
from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.loaders import EVAL_TEXT, load_model  # noqa: E402
from jaxserve.server.testing import HOST, ServerProcess  # noqa: E402

MODEL = "stories260K"


def server_args(smoke: bool) -> list[str]:
  if smoke:  # fewer batch buckets to compile at start-up, and quicker to give up on a stalled client
    return ["--max-num-seqs", "16", "--max-queued-requests", "256", "--header-timeout", "2", "--body-timeout", "4",
            "--stream-stall-timeout", "1", "--max-stream-buffer", "2000", "--shutdown-timeout", "5"]
  return ["--max-num-seqs", "64", "--max-queued-requests", "256", "--header-timeout", "2", "--body-timeout", "5",
          "--stream-stall-timeout", "5", "--shutdown-timeout", "5"]


# ---------------------------------------------------------------- the 16 greedy streams
def story_prompts(n: int) -> list[str]:
  with open(EVAL_TEXT, encoding="utf-8") as f:
    lines = [ln.strip() for ln in f if len(ln.split()) > 12]
  return [" ".join(lines[i].split()[:4 + i % 9]) for i in range(n)]


class Streams:
  """``n`` greedy streams on threads; ``texts`` and chunk arrival ``times`` per stream."""

  def __init__(self, url: str, prompts: list[str], max_tokens: int):
    self.url, self.prompts, self.max_tokens = url, prompts, max_tokens
    self.texts = [""] * len(prompts)
    self.times: list[list[float]] = [[] for _ in prompts]
    self.errors: list[str] = []
    self.first = [threading.Event() for _ in prompts]
    self.threads = [threading.Thread(target=self._one, args=(i,), daemon=True) for i in range(len(prompts))]

  def _one(self, i: int) -> None:
    body = {"model": MODEL, "prompt": self.prompts[i], "max_tokens": self.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    try:
      with httpx.Client(timeout=120) as h, h.stream("POST", self.url, json=body) as r:
        if r.status_code != 200:
          self.errors.append(f"stream {i}: HTTP {r.status_code}")
        for line in r.iter_lines():
          if line.startswith("data: ") and line != "data: [DONE]":
            self.times[i].append(time.monotonic())
            self.first[i].set()
            self.texts[i] += json.loads(line[6:])["choices"][0]["text"]
    except httpx.HTTPError as e:
      self.errors.append(f"stream {i}: {type(e).__name__}")
    finally:
      self.first[i].set()

  def start(self) -> "Streams":
    for t in self.threads:
      t.start()
    for f in self.first:
      f.wait(120)
    return self

  def join(self) -> None:
    for t in self.threads:
      t.join(300)

  def longest_gap(self, since: float) -> float:
    gaps = [b - a for ts in self.times for a, b in zip(ts, ts[1:]) if b >= since]
    return max(gaps, default=0.0)


# ---------------------------------------------------------------- raw sockets
def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
  s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  if rcvbuf is not None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
  s.connect((HOST, port))
  return s


def head(path: str, extra: str = "") -> bytes:
  return f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n{extra}\r\n".encode()


def status_of(data: bytes) -> int | str:
  if data.startswith(b"HTTP/1.1 "):
    return int(data[9:12])
  return "closed" if not data else "garbage"


def wait_closed(socks: list[socket.socket], timeout: float) -> int:
  """How many of ``socks`` the server closed within ``timeout`` seconds (reading what it sends)."""
  deadline, closed = time.monotonic() + timeout, set()
  for s in socks:
    s.setblocking(False)
  while len(closed) < len(socks) and time.monotonic() < deadline:
    for i, s in enumerate(socks):
      if i in closed:
        continue
      try:
        if not s.recv(1 << 16):
          closed.add(i)
      except BlockingIOError:
        pass
      except OSError:
        closed.add(i)
    time.sleep(0.05)
  for s in socks:
    s.close()
  return len(closed)


# ---------------------------------------------------------------- cases
def post_raw(srv: ServerProcess, raw: bytes, route: str = "/v1/completions") -> tuple[int, str]:
  r = httpx.post(srv.url(route), content=raw, headers={"Content-Type": "application/json"}, timeout=120)
  try:
    return r.status_code, r.json()["error"]["message"][:100]
  except (ValueError, KeyError, TypeError):
    return r.status_code, ""


def post_json(srv: ServerProcess, body: dict, route: str = "/v1/completions") -> tuple[int, str]:
  return post_raw(srv, json.dumps({"model": MODEL, **body}, separators=(",", ":")).encode(), route)


def chunked_body(srv: ServerProcess, size: int) -> tuple[int | str, str]:
  s = connect(srv.port)
  s.sendall(head("/v1/completions", "Transfer-Encoding: chunked\r\n"))
  chunk = b"[" + b"1," * 32000
  frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
  sent = 0
  s.settimeout(30)
  try:
    while sent < size:
      s.sendall(frame)
      sent += len(chunk)
  except OSError:
    pass
  data = b""
  try:
    while True:
      got = s.recv(1 << 16)
      if not got:
        break
      data += got
  except OSError:
    pass
  s.close()
  return status_of(data), f"{sent / 2**20:.1f} of {size / 2**20:.0f} MB sent before the answer"


def slowloris(srv: ServerProcess, count: int, timeout: float) -> tuple[str, str]:
  socks = []
  for i in range(count):
    s = connect(srv.port)
    kind = i % 4
    if kind == 1:
      s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # partial headers
    elif kind == 2:
      s.sendall(head("/v1/completions", "Content-Length: 1000\r\n") + b'{"prompt": ')  # partial body
    elif kind == 3:
      s.sendall(head("/v1/completions", "Transfer-Encoding: chunked\r\n") + b"1\r\n{\r\n")  # open chunked body
    socks.append(s)  # kind 0: idle
  t0 = time.monotonic()
  closed = wait_closed(socks, timeout)
  return f"{closed}/{count} closed", f"in {time.monotonic() - t0:.1f} s (idle, partial headers/body, open chunked)"


def unread_streams(srv: ServerProcess, count: int, max_tokens: int, timeout: float) -> tuple[str, str]:
  body = json.dumps({"model": MODEL, "prompt": ["Once", "Lily"], "max_tokens": max_tokens, "n": 8, "logprobs": 20,
                     "ignore_eos": True, "stream": True, "temperature": 0.8}).encode()
  socks = []
  for _ in range(count):
    s = connect(srv.port, rcvbuf=4096)
    s.sendall(head("/v1/completions", f"Content-Length: {len(body)}\r\n") + body)
    socks.append(s)
  t0 = time.monotonic()
  closed = wait_closed(socks, timeout)
  return f"{closed}/{count} cut", f"in {time.monotonic() - t0:.1f} s (clients read nothing of ~8 MB each)"


def flood(srv: ServerProcess, count: int) -> tuple[str, str]:
  body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "n": 8, "ignore_eos": True}
  codes: list[int] = []

  def one():
    try:
      codes.append(httpx.post(srv.url("/v1/completions"), json=body, timeout=120).status_code)
    except httpx.HTTPError:
      codes.append(0)

  threads = [threading.Thread(target=one) for _ in range(count)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(300)
  hist = {c: codes.count(c) for c in sorted(set(codes))}
  return "429" if 429 in hist else ",".join(map(str, hist)), " ".join(f"{c}: {k}" for c, k in hist.items())


def cases(smoke: bool) -> dict[str, tuple[Callable[[ServerProcess], tuple[Any, str]], set]]:
  """name -> (run, accepted statuses)."""
  mb = 2**20
  big = (2 if smoke else 8) * mb - 1000  # bodies just under the 8 MiB limit (smaller in --smoke)
  deep = 100_000
  return {
      # item 1: sampling fields out of the ranges their arrays hold
      "top_k_2e31": (lambda s: post_json(s, {"prompt": "Once", "max_tokens": 8, "temperature": 0.8, "top_k": 2**31}),
                     {200, 400}),
      "temperature_1e400": (lambda s: post_raw(s, b'{"prompt": "Once", "max_tokens": 8, "temperature": 1e400}'), {400}),
      # item 2: a stop string longer than the text so far
      "stop_longer_than_text": (lambda s: post_json(s, {"prompt": "Once upon a time", "max_tokens": 40,
                                                      "temperature": 0, "stop": "there was a little girl named Lily."}),
                                {200}),
      # item 4: bodies over the limit
      "chunked_body_50MB": (lambda s: chunked_body(s, (12 if smoke else 50) * mb), {413}),
      # item 5: work that must not run on the event loop
      "prompt_8MB": (lambda s: post_json(s, {"prompt": "a " * (big // 2), "max_tokens": 4}), {400}),
      "prompts_2M": (lambda s: post_json(s, {"prompt": ["a"] * (big // 4), "max_tokens": 4}), {400}),
      "token_ids_4M": (lambda s: post_json(s, {"prompt": [5] * (big // 2), "max_tokens": 4}), {400}),
      # item 7: stop lists
      "stop_strings_600k": (lambda s: post_json(s, {"prompt": "Once", "max_tokens": 8,
                                                  "stop": ["ab"] * (60_000 if smoke else 600_000)}), {400}),
      "stop_ids_1.6M": (lambda s: post_json(s, {"prompt": "Once", "max_tokens": 8,
                                              "stop_token_ids": [7] * (160_000 if smoke else 1_600_000)}),
                        {400}),
      # item 8: malformed but parseable JSON
      "json_nested_100k": (lambda s: post_raw(s, b'{"prompt": "a", "x": ' + b"[" * deep + b"]" * deep + b"}"), {400}),
      "json_int_5001_digits": (lambda s: post_raw(s, b'{"prompt": "a", "max_tokens": ' + b"7" * 5001 + b"}"), {400}),
      "lone_surrogate_prompt": (lambda s: post_raw(s, b'{"prompt": "a\\ud800", "max_tokens": 4}'), {400}),
      "lone_surrogate_model": (lambda s: post_raw(s, b'{"model": "\\udc00", "prompt": "a", "max_tokens": 4}'), {400}),
      # item 9: slow clients, queue flood, one request taking the pool
      "slowloris": (lambda s: slowloris(s, 8 if smoke else 50, 20), {"8/8 closed", "50/50 closed"}),
      "unread_streams": (lambda s: unread_streams(s, 1 if smoke else 16, 490, 90 if smoke else 240),
                         {"1/1 cut", "16/16 cut"}),
      "flood": (lambda s: flood(s, 60 if smoke else 200), {"429"}),
      "n_x_max_tokens": (lambda s: post_json(s, {"prompt": "Once", "n": 64, "max_tokens": 500}), {400}),
  }


# ---------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true", help="small sizes, 4 streams of 32 tokens: runs in seconds")
  ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
  ap.add_argument("--streams", type=int, default=None, help="greedy streams in flight (default 16; 4 with --smoke)")
  ap.add_argument("--max-tokens", type=int, default=None, help="tokens per stream (default 400; 32 with --smoke)")
  ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "abuse.json"))
  args = ap.parse_args(argv)
  n_streams = args.streams or (4 if args.smoke else 16)
  max_tokens = args.max_tokens or (32 if args.smoke else 400)
  table = cases(args.smoke)
  names = list(table) if args.cases is None else args.cases.split(",")
  unknown = [n for n in names if n not in table]
  if unknown:
    ap.error(f"unknown cases {unknown}; choose from {list(table)}")

  load_before = os.getloadavg()
  prompts = story_prompts(n_streams)
  llm = LLM(model=load_model(), max_num_seqs=64)
  want = [o.outputs[0].text for o in llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                         ignore_eos=True), use_tqdm=False)]
  del llm
  rows = []
  print(f"{'case':24} {'status':>14} {'expected':>8} {'streams ok':>10} {'longest gap s':>13}  detail")
  with ServerProcess(server_args(args.smoke)) as srv:
    for name in names:
      run, accepted = table[name]
      streams = Streams(srv.url("/v1/completions"), prompts, max_tokens).start()
      t0 = time.monotonic()
      try:
        status, detail = run(srv)
      except Exception as e:  # noqa: BLE001 - a case that breaks the client side is a row, not the end
        status, detail = "client error", f"{type(e).__name__}: {e}"[:200]
      took = time.monotonic() - t0
      streams.join()
      healthy = httpx.get(srv.url("/health"), timeout=30).status_code == 200
      row = {"case": name, "status": status, "expected": status in accepted, "detail": detail,
             "case_seconds": round(took, 2), "streams_correct": streams.texts == want and not streams.errors,
             "streams_equal": sum(a == b for a, b in zip(streams.texts, want)), "streams": n_streams,
             "longest_gap_s": round(streams.longest_gap(t0), 3), "healthy_after": healthy}
      rows.append(row)
      print(f"{name:24} {str(status):>14} {str(row['expected']):>8} "
            f"{row['streams_equal']:>4}/{n_streams:<5} {row['longest_gap_s']:>13.3f}  {detail}", flush=True)
    log = srv.log_text()
  result = {"benchmark": "abuse", "smoke": args.smoke, "model": MODEL, "streams": n_streams,
            "stream_max_tokens": max_tokens, "server_args": server_args(args.smoke), "cpu": cpu_model(), "isa": isa(),
            "cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "commit": git_commit(), "python": platform.python_version(),
            "tracebacks_in_server_log": log.count("Traceback"), "cases": rows}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out} (cpu: {result['cpu']}, load average {load_before} -> {result['load_average_after']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
