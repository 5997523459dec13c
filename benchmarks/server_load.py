"""Load benchmark of ``jaxserve serve``: concurrent streaming clients on loopback vs offline ``LLM.generate``.

Workload: ``--requests`` completions with prompts cut from the embedded TinyStories validation text
(lognormal lengths clipped to [8, 256] tokens) and lognormal output lengths clipped to [16, 128]
tokens, greedy, ``ignore_eos`` (so every request produces exactly its length). ``--clients``
closed-loop clients (one request at a time each, httpx, raw SSE) send them to a server started on
127.0.0.1 on a free port; one timed pass may take ``--max-duration`` seconds at most.

Measured on the client side: requests/s and output tokens/s over the wall time of a pass, time to
first token (request sent -> first text chunk) and inter-token latency (gap between consecutive
text chunks) percentiles p50/p90/p99. On the server side: its process's CPU time (all threads)
over the pass per output token, the server path's cost whatever else the machine runs. Offline
``LLM.generate`` runs the same requests in this process first (not at the same time as the server,
so they do not share the CPU); its texts are the reference every server completion is compared with.

Each side first runs an untimed warm-up workload of the same shape with other prompts, then timed
passes of the measured workload until one compiles no new jit program (at most ``--passes``). The
engine pads every step to a (decode slots, prefill slots, tokens) bucket; which buckets a server
meets depends on arrival timing, so its first timed pass may still compile (each compile stalls
every request for a second or more on a small CPU). The table shows the first and the last pass.

  python benchmarks/server_load.py                       # embedded stories260K, 32 clients, 128 requests
  python benchmarks/server_load.py --clients 8 --requests 32 --passes 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import cpu_model, git_commit, isa  # noqa: E402
from jaxserve.loaders import EVAL_TEXT, load_model  # noqa: E402
from jaxserve.server.testing import ServerProcess  # noqa: E402


def workload(tokenizer, n: int, seed: int, max_model_len: int) -> list[tuple[list[int], int]]:
  """``n`` (prompt token ids, output length) pairs, ShareGPT-like lognormal lengths."""
  rng = np.random.default_rng(seed)
  with open(EVAL_TEXT, encoding="utf-8") as f:
    ids = tokenizer.encode(f.read())
  p_len = np.clip(rng.lognormal(np.log(48), 0.8, n), 8, 256).astype(int)
  o_len = np.clip(rng.lognormal(np.log(48), 0.6, n), 16, 128).astype(int)
  out = []
  for pl, ol in zip(p_len, o_len):
    pl = min(int(pl), max_model_len - int(ol) - 1)
    start = int(rng.integers(0, len(ids) - pl))
    out.append(([tokenizer.bos_id] + ids[start:start + pl - 1], int(ol)))
  return out


def compiled_programs(metrics_text: str) -> int:
  line = next(ln for ln in metrics_text.splitlines() if ln.startswith("jaxserve:num_compiled_programs"))
  return int(float(line.rsplit(" ", 1)[1]))


def process_cpu_s(pid: int) -> float | None:
  """CPU seconds (user + system, all threads) process ``pid`` has used so far (Linux; else None)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float | None:
  return float(np.percentile(xs, q)) if xs else None


async def run_clients(url: str, model: str, reqs: list[tuple[list[int], int]], clients: int,
                      max_duration: float) -> dict:
  queue: asyncio.Queue = asyncio.Queue()
  for i, r in enumerate(reqs):
    queue.put_nowait((i, r))
  ttft, itl, e2e = [], [], []
  texts: dict[int, str] = {}
  tokens = 0
  errors: list[str] = []
  deadline = time.monotonic() + max_duration

  async def client(h: httpx.AsyncClient):
    nonlocal tokens
    while time.monotonic() < deadline:
      try:
        i, (prompt, out_len) = queue.get_nowait()
      except asyncio.QueueEmpty:
        return
      body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
              "stream": True, "stream_options": {"include_usage": True}}
      t0 = time.perf_counter()
      last, parts = None, []
      async with h.stream("POST", url, json=body) as r:
        if r.status_code != 200:
          errors.append(f"{r.status_code} {(await r.aread())[:200]!r}")
          continue
        async for line in r.aiter_lines():
          if not line.startswith("data: ") or line == "data: [DONE]":
            continue
          chunk = json.loads(line[6:])
          now = time.perf_counter()
          if chunk.get("usage"):
            tokens += chunk["usage"]["completion_tokens"]
          for ch in chunk["choices"]:
            if ch["text"]:
              parts.append(ch["text"])
              if last is None:
                ttft.append(now - t0)
              else:
                itl.append(now - last)
              last = now
      e2e.append(time.perf_counter() - t0)
      texts[i] = "".join(parts)

  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(timeout=httpx.Timeout(max_duration + 30), limits=limits) as h:
    t0 = time.perf_counter()
    await asyncio.gather(*(client(h) for _ in range(clients)))
    wall = time.perf_counter() - t0
  return {"wall_s": wall, "ttft": ttft, "itl": itl, "e2e": e2e, "texts": texts, "tokens": tokens, "errors": errors}


def summarize(res: dict, compiled: int, reference: list[str], cpu_s: float | None) -> dict:
  """One timed pass: throughput, latency percentiles, programs compiled, outputs equal to offline,
  the server process's CPU time per output token (``cpu_s``: its CPU seconds over the pass)."""
  ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731
  done = len(res["texts"])
  mismatches = []
  for i in sorted(res["texts"]):
    a, b = res["texts"][i], reference[i]
    if a != b:
      k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
      mismatches.append({"request": i, "first_diff_char": k, "server": a[max(0, k - 30):k + 30],
                         "offline": b[max(0, k - 30):k + 30]})
  return {
      "requests_completed": done, "errors": len(res["errors"]), "first_errors": res["errors"][:3],
      "compiled_programs": compiled, "wall_s": round(res["wall_s"], 3),
      "requests_per_s": round(done / res["wall_s"], 3), "output_tokens": res["tokens"],
      "output_tokens_per_s": round(res["tokens"] / res["wall_s"], 1),
      **{f"ttft_p{q}_ms": ms(pct(res["ttft"], q)) for q in (50, 90, 99)},
      **{f"itl_p{q}_ms": ms(pct(res["itl"], q)) for q in (50, 90, 99)},
      **{f"e2e_p{q}_ms": ms(pct(res["e2e"], q)) for q in (50, 90, 99)},
      "equal_to_offline": done - len(mismatches), "first_mismatches": mismatches[:5],
      "server_cpu_s": None if cpu_s is None else round(cpu_s, 3),
      "server_cpu_ms_per_output_token": None if cpu_s is None or not res["tokens"] else
      round(1000 * cpu_s / res["tokens"], 4),
  }


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default=None, help="model path (default: embedded stories260K)")
  ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (1..256)")
  ap.add_argument("--requests", type=int, default=128, help="requests in the workload (1..4096)")
  ap.add_argument("--passes", type=int, default=4,
                  help="timed passes at most; they stop at the first that compiles no new program (1..10)")
  ap.add_argument("--max-duration", type=float, default=180.0, help="seconds one timed pass may take at most")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_load.json"))
  args = ap.parse_args()
  load_at_start = list(os.getloadavg())
  for flag, value, lo, hi in (("--clients", args.clients, 1, 256), ("--requests", args.requests, 1, 4096),
                              ("--passes", args.passes, 1, 10), ("--max-duration", args.max_duration, 1, 3600)):
    if not lo <= value <= hi:
      raise SystemExit(f"{flag} must be in [{lo}, {hi}], got {value}")

  loaded = load_model(args.model)
  max_len = loaded.cfg.max_position_embeddings
  reqs = workload(loaded.tokenizer, args.requests, args.seed, max_len)
  warm = workload(loaded.tokenizer, args.requests, args.seed + 1, max_len)  # same shape, other prompts
  seqs = max(args.clients, 8)
  name = "stories260K" if args.model is None else Path(args.model).stem

  # Offline first (the reference texts), then the server; each side runs the warm-up workload
  # untimed, then timed passes of the measured one until a pass compiles nothing new. Prefix
  # caching is off on both sides, so repeated passes do not serve each other's prompts (cut at
  # random offsets of the text, the prompts share no prefix blocks anyway).
  from jaxserve import LLM, SamplingParams
  llm = LLM(model=loaded, max_num_seqs=seqs, enable_prefix_caching=False)
  run = lambda w: llm.generate([{"prompt_token_ids": p} for p, _ in w],  # noqa: E731
                               [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in w],
                               use_tqdm=False)
  run(warm)
  offline_passes, reference = [], None
  for _ in range(args.passes):
    c0 = llm.stats()["num_compiled_programs"]
    t0 = time.perf_counter()
    outs = run(reqs)
    wall = time.perf_counter() - t0
    texts = [o.outputs[0].text for o in outs]
    reference = reference or texts
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    offline_passes.append({"compiled_programs": llm.stats()["num_compiled_programs"] - c0, "wall_s": round(wall, 3),
                           "requests_per_s": round(len(reqs) / wall, 3), "output_tokens": tokens,
                           "output_tokens_per_s": round(tokens / wall, 1), "equal_to_first_pass": sum(
                               a == b for a, b in zip(texts, reference))})
    if offline_passes[-1]["compiled_programs"] == 0:
      break
  del llm

  server_passes = []
  with ServerProcess(["--max-num-seqs", str(seqs), "--no-prefix-caching"] +
                     (["--model", args.model] if args.model else [])) as srv:
    url = srv.url("/v1/completions")
    asyncio.run(run_clients(url, name, warm, args.clients, args.max_duration))
    for _ in range(args.passes):
      c0 = compiled_programs(httpx.get(srv.url("/metrics"), timeout=10).text)
      cpu0 = process_cpu_s(srv.proc.pid)
      res = asyncio.run(run_clients(url, name, reqs, args.clients, args.max_duration))
      cpu1 = process_cpu_s(srv.proc.pid)
      c1 = compiled_programs(httpx.get(srv.url("/metrics"), timeout=10).text)
      server_passes.append(summarize(res, c1 - c0, reference, None if cpu0 is None else cpu1 - cpu0))
      if c1 == c0:
        break

  srv_first, srv_last, off = server_passes[0], server_passes[-1], offline_passes[-1]
  result = {
      "benchmark": "server_load", "model": name, "clients": args.clients, "requests": args.requests,
      "max_num_seqs": seqs, "prefix_caching": False, "seed": args.seed,
      "workload": {"prompt_tokens_mean": round(float(np.mean([len(p) for p, _ in reqs])), 1),
                   "output_tokens_mean": round(float(np.mean([o for _, o in reqs])), 1),
                   "sampling": "greedy, ignore_eos"},
      "server_passes": server_passes, "offline_passes": offline_passes,
      "server_vs_offline_throughput": round(srv_last["output_tokens_per_s"] / off["output_tokens_per_s"], 3),
      "env": {"cpu": cpu_model(), "isa": isa(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "machine": platform.machine(), "git_commit": git_commit(), "loadavg_at_start": load_at_start,
              "loadavg_at_end": list(os.getloadavg())},
      "command": "python benchmarks/server_load.py " + " ".join(sys.argv[1:]),
  }
  print(f"\njaxserve serve load benchmark: {name}, {args.clients} streaming clients on 127.0.0.1, {args.requests} "
        f"requests (prompt ~{result['workload']['prompt_tokens_mean']} tok, output "
        f"~{result['workload']['output_tokens_mean']} tok, greedy, ignore_eos), {os.cpu_count()} CPUs\n")
  rows = [("", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms", "new jit programs",
           "server CPU ms/token")]
  for label, r in (("server, first timed pass", srv_first), (f"server, pass {len(server_passes)}", srv_last)):
    cpu = r["server_cpu_ms_per_output_token"]
    rows.append((label, f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.0f}",
                 "/".join(f"{r[f'ttft_p{q}_ms']:.0f}" for q in (50, 90, 99)),
                 "/".join(f"{r[f'itl_p{q}_ms']:.1f}" for q in (50, 90, 99)), str(r["compiled_programs"]),
                 "-" if cpu is None else f"{cpu:.3f}"))
  rows.append((f"offline LLM.generate, pass {len(offline_passes)}", f"{off['requests_per_s']:.2f}",
               f"{off['output_tokens_per_s']:.0f}", "-", "-", str(off["compiled_programs"]), "-"))
  if len(server_passes) == 1:
    rows.pop(2)
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
  equal = [f"{p['equal_to_offline']}/{p['requests_completed']}" for p in server_passes]
  print(f"\nserver / offline output tokens/s: {result['server_vs_offline_throughput']:.2f}; server completions equal "
        f"to offline greedy, per pass: {', '.join(equal)}; errors: {sum(p['errors'] for p in server_passes)}")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")
  ok = all(p["requests_completed"] == len(reqs) and not p["errors"] for p in server_passes)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
