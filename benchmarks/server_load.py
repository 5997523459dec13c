"""Load benchmark of ``jaxserve serve``: concurrent streaming clients on loopback vs offline ``LLM.generate``.

Workload: ``--requests`` completions with prompts cut from the embedded TinyStories validation text
(lognormal lengths clipped to [8, 256] tokens) and lognormal output lengths clipped to [16, 128]
tokens, greedy, ``ignore_eos`` (so every request produces exactly its length). ``--clients``
closed-loop clients (one request at a time each, httpx, raw SSE) send them to a server started on
127.0.0.1 on a free port; the run stops after ``--max-duration`` seconds whatever is left.

Measured on the client side: requests/s and output tokens/s over the wall time of the run,
time to first token (request sent -> first text chunk) and inter-token latency (gap between
consecutive text chunks) percentiles p50/p90/p99. Then, with the server stopped (so the two do
not share the CPU), the same requests go through offline ``LLM.generate`` in this process;
its throughput and whether each server completion equals the offline one are reported too.
Both sides first run a warm-up workload of the same shape with other prompts (jit compilation
is not timed, and the prefix cache does not hold the measured prompts).

  python benchmarks/server_load.py                       # embedded stories260K, 32 clients, 128 requests
  python benchmarks/server_load.py --clients 8 --requests 32 --max-duration 60
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


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default=None, help="model path (default: embedded stories260K)")
  ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (1..256)")
  ap.add_argument("--requests", type=int, default=128, help="requests in the workload (1..4096)")
  ap.add_argument("--max-duration", type=float, default=180.0, help="seconds the measured run may take at most")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--warmup-passes", type=int, default=3, help="untimed warm-up workloads run first on each side")
  ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "server_load.json"))
  args = ap.parse_args()
  if not 1 <= args.clients <= 256:
    raise SystemExit(f"--clients must be in [1, 256], got {args.clients}")
  if not 1 <= args.requests <= 4096:
    raise SystemExit(f"--requests must be in [1, 4096], got {args.requests}")
  if not 0 < args.max_duration <= 3600:
    raise SystemExit(f"--max-duration must be in (0, 3600], got {args.max_duration}")

  loaded = load_model(args.model)
  reqs = workload(loaded.tokenizer, args.requests, args.seed, loaded.cfg.max_position_embeddings)
  # Warm-up: workloads of the same shape but other prompts (so the prefix cache does not serve
  # the measured prompts), run in full on each side first so that jit compiles the shape buckets
  # (the programs still compiled during the measured run are reported).
  warm = [workload(loaded.tokenizer, args.requests, args.seed + k, loaded.cfg.max_position_embeddings)
          for k in range(1, args.warmup_passes + 1)]
  engine_args = ["--max-num-seqs", str(max(args.clients, 8))]
  server_args = engine_args + (["--model", args.model] if args.model else [])
  name = "stories260K" if args.model is None else Path(args.model).stem

  with ServerProcess(server_args) as srv:
    url = srv.url("/v1/completions")
    for w in warm:
      asyncio.run(run_clients(url, name, w, args.clients, 600))
    compiled0 = compiled_programs(httpx.get(srv.url("/metrics"), timeout=10).text)
    res = asyncio.run(run_clients(url, name, reqs, args.clients, args.max_duration))
    metrics_text = httpx.get(srv.url("/metrics"), timeout=10).text
    compiled_during_run = compiled_programs(metrics_text) - compiled0
  done = len(res["texts"])

  from jaxserve.engine import LLM, SamplingParams
  llm = LLM(model=loaded, max_num_seqs=max(args.clients, 8))
  params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
  prompts = [{"prompt_token_ids": p} for p, _ in reqs]
  for w in warm:
    llm.generate([{"prompt_token_ids": p} for p, _ in w],
                 [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in w], use_tqdm=False)
  compiled0 = llm.stats()["num_compiled_programs"]
  t0 = time.perf_counter()
  offline = llm.generate(prompts, params, use_tqdm=False)
  off_wall = time.perf_counter() - t0
  off_compiled = llm.stats()["num_compiled_programs"] - compiled0
  off_tokens = sum(len(o.outputs[0].token_ids) for o in offline)
  same = sum(res["texts"][i] == offline[i].outputs[0].text for i in res["texts"])

  ms = lambda x: None if x is None else round(1000 * x, 2)  # noqa: E731
  server = {
      "requests_completed": done, "errors": len(res["errors"]), "compiled_during_run": compiled_during_run, "wall_s": round(res["wall_s"], 3),
      "requests_per_s": round(done / res["wall_s"], 3), "output_tokens": res["tokens"],
      "output_tokens_per_s": round(res["tokens"] / res["wall_s"], 1),
      **{f"ttft_p{q}_ms": ms(pct(res["ttft"], q)) for q in (50, 90, 99)},
      **{f"itl_p{q}_ms": ms(pct(res["itl"], q)) for q in (50, 90, 99)},
      **{f"e2e_p{q}_ms": ms(pct(res["e2e"], q)) for q in (50, 90, 99)},
  }
  off = {"requests": len(reqs), "compiled_during_run": off_compiled, "wall_s": round(off_wall, 3), "requests_per_s": round(len(reqs) / off_wall, 3),
         "output_tokens": off_tokens, "output_tokens_per_s": round(off_tokens / off_wall, 1)}
  result = {
      "benchmark": "server_load", "model": name, "clients": args.clients, "requests": args.requests,
      "max_duration_s": args.max_duration, "seed": args.seed,
      "workload": {"prompt_tokens_mean": round(float(np.mean([len(p) for p, _ in reqs])), 1),
                   "output_tokens_mean": round(float(np.mean([o for _, o in reqs])), 1),
                   "sampling": "greedy, ignore_eos"},
      "server": server, "offline_generate": off,
      "server_vs_offline_throughput": round(server["output_tokens_per_s"] / off["output_tokens_per_s"], 3),
      "server_outputs_equal_offline": f"{same}/{done}",
      "first_errors": res["errors"][:3],
      "env": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
      "command": "python benchmarks/server_load.py " + " ".join(sys.argv[1:]),
  }
  print(f"\njaxserve serve load benchmark: {name}, {args.clients} streaming clients, {args.requests} requests "
        f"(prompt ~{result['workload']['prompt_tokens_mean']} tok, output ~{result['workload']['output_tokens_mean']} "
        f"tok, greedy, ignore_eos), {os.cpu_count()} CPUs\n")
  rows = [("", "req/s", "out tok/s", "TTFT p50/p90/p99 ms", "ITL p50/p90/p99 ms"),
          ("server (HTTP, streaming)", f"{server['requests_per_s']:.2f}", f"{server['output_tokens_per_s']:.0f}",
           "/".join(str(server[f"ttft_p{q}_ms"]) for q in (50, 90, 99)),
           "/".join(str(server[f"itl_p{q}_ms"]) for q in (50, 90, 99))),
          ("offline LLM.generate", f"{off['requests_per_s']:.2f}", f"{off['output_tokens_per_s']:.0f}", "-", "-")]
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
  print(f"\nserver / offline throughput: {result['server_vs_offline_throughput']:.2f}; completed {done}/{len(reqs)}, "
        f"errors {len(res['errors'])}; server text == offline text: {same}/{done}; jit programs compiled "
        f"during the timed runs: server {compiled_during_run}, offline {off_compiled}")
  prom = [ln for ln in metrics_text.splitlines() if ln.startswith(("jaxserve:num_preemptions_total",
                                                                   "jaxserve:prefix_cache_hits_total"))]
  print("server metrics at the end: " + "; ".join(prom))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {args.out}")
  return 0 if done == len(reqs) and not res["errors"] else 1


if __name__ == "__main__":
  sys.exit(main())
