"""The paged engine on a GPU: Pallas kernels vs XLA attention, end to end.

Runs the serving benchmark's model and workload (``benchmarks/serving.py``: random-weight LLaMA,
8 layers, head_dim 64, 64 greedy requests) through ``LLM`` twice, once with
``attention_backend="xla"`` and once with ``"pallas"``, and checks that both give the same greedy
tokens as ``transformers`` on the same GPU. float32 matmuls run at full precision
(``jax_default_matmul_precision=highest``, no TF32 in torch) so that the comparison is exact.

Usage (on a GPU machine; the CPU run only checks the script)::

  python benchmarks/engine_gpu.py [--num-requests 64] [--out PATH]

Timing: each backend runs the workload once to compile, then once timed (prefix cache reset).
Output tokens/s = requested output tokens / wall time. Results: a table on stdout and JSON
(``$OUT/engine_gpu.json`` if ``OUT`` is set, else ``benchmarks/results/engine_gpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving import _match, make_model, make_workload, run_jaxserve  # noqa: E402


def hf_greedy_gpu(model_dir: str, workload: list[dict]) -> tuple[list[list[int]], float]:
  """Greedy tokens of transformers on the GPU (one request at a time: no padding effects)."""
  import torch
  import transformers
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
  tokens = []
  t0 = time.perf_counter()
  with torch.no_grad():
    for w in workload:
      ids = torch.tensor([w["prompt_token_ids"]], device=dev)
      n = w["max_tokens"]
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
      tokens.append(out[0, ids.shape[1]:].tolist())
  return tokens, time.perf_counter() - t0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--num-requests", type=int, default=64)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")
  workload = make_workload(args.num_requests)
  out_tokens = sum(w["max_tokens"] for w in workload)
  env = {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
  print(f"jax {env['jax']} on {env['device']}; {len(workload)} requests, {out_tokens} output tokens", flush=True)
  rows, tokens = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = make_model(os.path.join(tmp, "model"))
    for backend in ("xla", "pallas"):
      t0 = time.perf_counter()
      r = run_jaxserve(model_dir, workload, attention_backend=backend)
      tokens[backend] = r["tokens"]
      rows.append(dict(engine=f"jaxserve {backend}", tok_s=out_tokens / r["elapsed_s"], elapsed_s=r["elapsed_s"],
                       warmup_s=r["warmup_s"], programs=r["stats"]["num_compiled_programs"],
                       recompiled_after_warmup=r["recompiled_after_warmup"]))
      print(f"  {backend}: {rows[-1]['tok_s']:.0f} tok/s, warm-up {r['warmup_s']:.0f} s, "
            f"{rows[-1]['programs']} programs (total {time.perf_counter() - t0:.0f} s)", flush=True)
    hf_tokens, hf_s = hf_greedy_gpu(model_dir, workload)
    rows.append(dict(engine="transformers (batch 1)", tok_s=out_tokens / hf_s, elapsed_s=hf_s))
  match = {"pallas_vs_xla": _match(tokens["pallas"], tokens["xla"]),
           "xla_vs_transformers": _match(tokens["xla"], hf_tokens),
           "pallas_vs_transformers": _match(tokens["pallas"], hf_tokens)}
  print("\n| engine | tok/s | timed s | warm-up s | programs |\n|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['engine']} | {r['tok_s']:.0f} | {r['elapsed_s']:.2f} | {r.get('warmup_s', float('nan')):.1f} "
          f"| {r.get('programs', '-')} |")
  print(f"greedy token agreement (fraction of requests identical): {match}")
  dest = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "engine_gpu.json" if os.environ.get("OUT")
                                          else ROOT / "benchmarks" / "results" / "engine_gpu.json")
  dest.parent.mkdir(parents=True, exist_ok=True)
  dest.write_text(json.dumps({"env": env, "rows": rows, "match": match}, indent=1))
  print(f"wrote {dest}")
  return 0 if all(v == 1.0 for v in match.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
