"""A LLaMA-2-7B-shaped model served and pruned on one GPU (issue: GPU at real scale).

Parts (``all`` runs them in this order, each within what is left of ``--budget-s``):

* ``serve``: random bfloat16 weights built on the device (no download, no host copy), served by the
  paged engine (``attention_backend="pallas"`` on a GPU) on a ShareGPT-like workload (the serving
  benchmark's lognormal lengths scaled to prompts up to 1024 and outputs up to 512; greedy,
  ``ignore_eos``): output tok/s; the decode step time at batch 1, 32, 128 and 256 against its
  memory floor, (weight bytes + K/V bytes read in the step) / the read rate of a device copy
  measured in the same run (a copy of N bytes reads N and writes N; its read rate is N / time);
  and greedy tokens of the Pallas backend against the XLA backend for a few requests.
* ``prune``: Wanda and SparseGPT (50% and 2:4) on the same model shape with 128 calibration windows
  of 2048 random tokens, layer by layer: wall seconds per method and peak device memory.

Usage::

  python benchmarks/gpu_scale.py all [--budget-s 480]      # on an H100/H200
  python benchmarks/gpu_scale.py serve --smoke             # tiny shapes on the CPU, seconds (a test runs it)

Writes ``$OUT/gpu_scale.json`` when ``OUT`` is set, else ``benchmarks/results/gpu_scale.json``
(``--out`` overrides; smoke runs never write into ``benchmarks/results``), and prints tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.sparse_serving import decode_steps  # noqa: E402

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, head_dim=128, max_position_embeddings=4096)
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16, max_position_embeddings=512)


def scale(smoke: bool) -> dict[str, Any]:
  """Every size of the run: the issue's at full scale, tiny ones for ``--smoke``."""
  if smoke:
    return dict(model=SMOKE, requests=6, max_prompt=48, max_output=24, prompt_median=16, output_median=8,
                batches=(1, 4), decode_prompt=32, decode_steps=4, kv_bytes=8 << 20, max_model_len=128,
                check_requests=2, check_tokens=6, calib=(4, 64), max_num_seqs=8, max_batched=128)
  return dict(model=LLAMA2_7B, requests=256, max_prompt=1024, max_output=512, prompt_median=256, output_median=192,
              batches=(1, 32, 128, 256), decode_prompt=512, decode_steps=32, kv_bytes=80 << 30, max_model_len=1536,
              check_requests=4, check_tokens=32, calib=(128, 2048), max_num_seqs=256, max_batched=4096)


def model_config(sizes: dict[str, Any]):
  from jaxserve.config import ModelConfig
  return ModelConfig(**sizes, dtype="bfloat16")


def random_params(cfg, seed: int = 0):
  """bfloat16 parameters drawn on the device leaf by leaf (normal * 0.02; norms at one): no host copy."""
  from jaxserve.model import param_shapes
  shapes = param_shapes(cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)

  @jax.jit
  def draw(key):
    leaves = []
    for i, (path, s) in enumerate(flat):
      name = jax.tree_util.keystr(path)
      if "norm" in name:
        leaves.append(jnp.ones(s.shape, jnp.bfloat16))
      else:
        leaves.append((0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32)).astype(jnp.bfloat16))
    return jax.tree_util.tree_unflatten(treedef, leaves)

  return jax.block_until_ready(draw(jax.random.PRNGKey(seed)))


def param_bytes(params) -> int:
  from jaxserve import weights
  return sum(weights.nbytes(x) for x in jax.tree_util.tree_leaves(params, is_leaf=weights.is_typed))


def copy_read_gbps(nbytes: int, reps: int = 10) -> dict[str, float]:
  """Read rate of a device copy of ``nbytes`` (reads N, writes N), best and median over ``reps``."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda a: a + 1.0)  # one read, one write; a plain copy could be elided
  jax.block_until_ready(copy(x))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(copy(x))
    times.append(time.perf_counter() - t0)
  return dict(bytes_read=float(nbytes), read_GBps_best=nbytes / min(times) / 1e9,
              read_GBps_median=nbytes / float(np.median(times)) / 1e9)


def workload(sc: dict[str, Any], vocab: int, seed: int = 0) -> list[dict]:
  """The serving benchmark's lognormal lengths, scaled to the run's limits."""
  rng = np.random.default_rng(seed)
  n = sc["requests"]
  prompts = np.clip(np.round(rng.lognormal(np.log(sc["prompt_median"]), 0.9, n)), 4, sc["max_prompt"]).astype(int)
  outputs = np.clip(np.round(rng.lognormal(np.log(sc["output_median"]), 0.7, n)), 8, sc["max_output"]).astype(int)
  return [dict(prompt_token_ids=rng.integers(3, vocab, p).tolist(), max_tokens=int(o)) for p, o in zip(prompts, outputs)]


def _greedy(llm, reqs: list[dict]) -> tuple[list[list[int]], float]:
  from jaxserve.engine import SamplingParams
  prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs]
  sps = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True, detokenize=False) for r in reqs]
  t0 = time.perf_counter()
  outs = llm.generate(prompts, sps, use_tqdm=False)
  return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t0


def run_serve(sc: dict[str, Any], backend: str, interpret: bool) -> dict[str, Any]:
  from jaxserve.engine import LLM
  from jaxserve.loaders import LoadedModel
  cfg = model_config(sc["model"])
  t0 = time.perf_counter()
  params = random_params(cfg)
  build_s = time.perf_counter() - t0
  model = LoadedModel(cfg, params, None, "random LLaMA-2-7B shape" if sc["model"] is LLAMA2_7B else "smoke")
  wbytes = param_bytes(params)
  copy = copy_read_gbps(min(1 << 30, max(1 << 20, wbytes // 8)))
  res: dict[str, Any] = dict(weight_bytes=wbytes, build_params_s=build_s, copy=copy, backend=backend)

  # greedy tokens: the kernel backend against XLA's path, a few requests, small pools
  check = [dict(r, max_tokens=sc["check_tokens"]) for r in workload(sc, cfg.vocab_size, seed=1)[:sc["check_requests"]]]
  # lazy compiles: the warm-up pass compiles what the workload needs (eager would compile every bucket)
  small = dict(max_model_len=sc["max_model_len"], kv_cache_memory_bytes=max(sc["kv_bytes"] // 16, 1 << 20),
               compile="lazy")
  xla_llm = LLM(model, attention_backend="xla", **small)
  want, _ = _greedy(xla_llm, check)
  del xla_llm
  kern_llm = LLM(model, attention_backend=backend, pallas_interpret=interpret, **small)
  got, _ = _greedy(kern_llm, check)
  del kern_llm
  res["greedy_equal_to_xla"] = f"{sum(a == b for a, b in zip(got, want))}/{len(check)}"

  llm = LLM(model, attention_backend=backend, pallas_interpret=interpret, max_model_len=sc["max_model_len"],
            kv_cache_memory_bytes=sc["kv_bytes"], max_num_seqs=sc["max_num_seqs"],
            max_num_batched_tokens=sc["max_batched"], compile="lazy")
  reqs = workload(sc, cfg.vocab_size)
  _, warm_s = _greedy(llm, reqs)  # compiles the step programs the workload needs
  llm.reset_prefix_cache()
  _, serve_s = _greedy(llm, reqs)
  out_tokens = sum(r["max_tokens"] for r in reqs)
  res["serving"] = dict(requests=len(reqs), prompt_tokens=sum(len(r["prompt_token_ids"]) for r in reqs),
                        output_tokens=out_tokens, warmup_s=warm_s, seconds=serve_s, output_tok_s=out_tokens / serve_s,
                        num_preemptions=llm.stats().get("num_preemptions"))

  kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, bfloat16
  rows = []
  for b in sc["batches"]:
    decode_steps(llm, b, 2, seed=99, prompt_len=sc["decode_prompt"], vocab=cfg.vocab_size)  # compile
    times = decode_steps(llm, b, sc["decode_steps"], seed=b, prompt_len=sc["decode_prompt"], vocab=cfg.vocab_size)
    ctx = sc["decode_prompt"] + 1 + sc["decode_steps"] / 2  # mean context over the timed steps (approximately)
    read = wbytes + b * ctx * kv_per_token
    floor_s = read / (copy["read_GBps_best"] * 1e9)
    step_s = float(np.median(times))
    rows.append(dict(batch=b, context=ctx, step_ms=1e3 * step_s, bytes_read=read, floor_ms=1e3 * floor_s,
                     vs_floor=step_s / floor_s))
  res["decode"] = rows
  return res


def _device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def run_prune(sc: dict[str, Any], budget_end: float) -> list[dict[str, Any]]:
  import jaxprune
  cfg = model_config(sc["model"])
  params = random_params(cfg, seed=1)
  n, t = sc["calib"]
  rng = np.random.default_rng(0)
  toks = rng.integers(3, cfg.vocab_size, (n, t + 1)).astype(np.int32)
  calib = (jnp.asarray(toks[:, :-1]), jnp.asarray(toks[:, 1:]))
  rows = []
  for method, target in (("wanda", "50%"), ("sparsegpt", "50%"), ("wanda", "2:4"), ("sparsegpt", "2:4")):
    if time.time() > budget_end:
      rows.append(dict(method=method, target=target, skipped="out of the time budget"))
      continue
    pc = jaxprune.PruneConfig(method=method, **({"pattern": target} if ":" in target else {"sparsity": 0.5}))
    t0 = time.perf_counter()
    result = jaxprune.prune(params, cfg, pc, calib)
    jax.block_until_ready(result.params)
    secs = time.perf_counter() - t0
    rows.append(dict(method=method, target=target, seconds=secs, sparsity=float(jaxprune.sparsity(result.masks).total),
                     peak_device_bytes=_device_peak_bytes()))
    del result
  return rows


def _print(res: dict[str, Any]) -> None:
  s = res.get("serve")
  if s:
    print(f"\nserve ({s['backend']}): weights {s['weight_bytes'] / 2**30:.2f} GiB, copy read "
          f"{s['copy']['read_GBps_best']:.0f} GB/s, greedy = XLA {s['greedy_equal_to_xla']}, "
          f"{s['serving']['output_tok_s']:.0f} output tok/s over {s['serving']['requests']} requests")
    print("| batch | context | step ms | floor ms | step / floor |\n| --- | --- | --- | --- | --- |")
    for r in s["decode"]:
      print(f"| {r['batch']} | {r['context']:.0f} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['vs_floor']:.2f}x |")
  if res.get("prune"):
    print("\n| method | target | seconds | peak device GiB |\n| --- | --- | --- | --- |")
    for r in res["prune"]:
      peak = r.get("peak_device_bytes")
      print(f"| {r['method']} | {r['target']} | {r.get('seconds', float('nan')):.1f} | "
            f"{'-' if peak is None else f'{peak / 2**30:.1f}'} | {r.get('skipped', '')}")


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("part", choices=("serve", "prune", "all"))
  ap.add_argument("--smoke", action="store_true", help="tiny shapes on any backend (CPU: Pallas in interpret mode)")
  ap.add_argument("--budget-s", type=float, default=480.0, help="skip pruning runs that would start after this")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  start = time.time()
  sc = scale(args.smoke)
  gpu = jax.default_backend() == "gpu"
  if not gpu and not args.smoke:
    raise SystemExit("the full run needs a GPU; use --smoke on the CPU")
  res: dict[str, Any] = dict(command="python benchmarks/gpu_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                             jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind,
                             host=platform.node() and platform.machine(), smoke=args.smoke,
                             model={k: v for k, v in sc["model"].items()})
  if args.part in ("serve", "all"):
    res["serve"] = run_serve(sc, backend="pallas", interpret=not gpu)
  if args.part in ("prune", "all"):
    res["prune"] = run_prune(sc, start + args.budget_s)
  res["seconds"] = time.time() - start
  _print(res)
  if args.out:
    out = Path(args.out)
  elif os.environ.get("OUT"):
    out = Path(os.environ["OUT"]) / "gpu_scale.json"
  elif args.smoke:
    out = None
  else:
    out = ROOT / "benchmarks" / "results" / "gpu_scale.json"
  if out is not None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
