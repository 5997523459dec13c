"""Sparse execution benchmark: a pruned model served compressed (N:M, bitmask) vs dense, in one run.

Model: the serving benchmark's random-weight LLaMA (``benchmarks/serving.py``: vocab 8192, hidden
512, 8 layers, 8 heads, 4 KV heads, MLP 1408, float32), pruned with magnitude scores (the blocks'
projection kernels; embeddings and the LM head stay dense) to 2:4, 50% and 70% unstructured, and
saved by ``jaxprune.checkpoint.save`` (compressed). Each model is served from its directory the
way a user would (``LLM(model=DIR)``: the engine executes the sparsity) and, for the pruned ones,
also with ``sparse_weights="off"`` (the same pruned weights run dense) to check the tokens.

Figures, every variant in the same process, measured in turns (variant A, B, C, D, then again):
* weight bytes held by the engine (``llm.stats()["weight_bytes"]``), total and of the pruned kernels,
  and the checkpoint's bytes on disk;
* decode step time at batch 1 and 8: ``llm.step()`` wall time of decode-only steps (16-token
  prompts, greedy, ignore_eos), median over ``--steps`` steps in each of ``--repeats`` turns;
* the 64-request serving workload of ``benchmarks/serving.py``: output tok/s, median of
  ``--repeats`` passes after a warm-up pass; greedy tokens compared with the same model run dense;
* the decode step of the same model without its blocks (embedding, norm, LM head, sampling, the
  step's fixed work): the part of a step that pruning the blocks cannot shrink.

Usage: ``.venv/bin/python benchmarks/sparse_serving.py`` (``--quick`` for a short check). Prints a
table and writes ``benchmarks/results/sparse_serving.json`` with the CPU model and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serving import MAX_MODEL_LEN, make_model, make_workload  # noqa: E402
from benchmarks._machine import cpu_model, git_commit, machine  # noqa: E402

VARIANTS = ("dense", "2:4", "50%", "70%")


def save_variants(model_dir: str, out_root: str) -> dict[str, str]:
  """Prunes the model (magnitude) and saves each variant; returns ``{variant: directory}``."""
  import jaxprune
  from jaxprune import checkpoint
  from jaxserve.loaders import load_model
  m = load_model(model_dir)
  scores = jaxprune.magnitude_scores(m.params)
  dirs = {}
  for name in VARIANTS:
    d = os.path.join(out_root, name.replace(":", "-").replace("%", "pct"))
    dirs[name] = d
    if name == "dense":
      masks = jaxprune.dense_masks(m.params)
    elif name == "2:4":
      masks = jaxprune.nm_masks(scores, "2:4")
    else:
      masks = jaxprune.topk_masks(scores, int(name[:-1]) / 100)
    checkpoint.save(d, jaxprune.apply_masks(m.params, masks), masks, cfg=m.cfg, tokenizer=m.tokenizer,
                    metadata={"method": "magnitude", "target": name})
  return dirs


def dir_bytes(path: str) -> int:
  return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def kernel_bytes(params) -> int:
  """Bytes of the blocks' projection kernels (the pruned leaves), as held."""
  import jax
  from jaxserve import weights
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=weights.is_typed)[0]
  keys = lambda p: [getattr(k, "key", "") for k in p]
  return sum(weights.nbytes(x) for p, x in flat
             if keys(p)[0].startswith("layers_") and keys(p)[-1] == "kernel")


def decode_steps(llm, batch: int, steps: int, seed: int, prompt_len: int = 16, vocab: int = 8000) -> list[float]:
  """Wall seconds of ``steps`` decode-only ``llm.step()`` calls with ``batch`` sequences of ``prompt_len``-token
  prompts (after every prompt's prefill, chunked where the prompts are long); the requests are aborted after."""
  from jaxserve.engine import SamplingParams
  rng = np.random.default_rng(seed)
  # room to decode while the other prompts prefill, then ``steps`` more (aborted after the timing)
  sp = SamplingParams(temperature=0, max_tokens=llm.max_model_len - prompt_len, ignore_eos=True, detokenize=False)
  ids = [f"d{seed}-{i}" for i in range(batch)]
  for rid in ids:
    llm.add_request(rid, {"prompt_token_ids": rng.integers(3, vocab, prompt_len).tolist()}, sp)
  started: set[str] = set()
  while len(started) < batch:
    started.update(o.request_id for o in llm.step() if o.outputs and o.outputs[0].token_ids)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    llm.step()
    times.append(time.perf_counter() - t0)
  llm.abort_request(ids)
  return times


def serve(llm, workload) -> tuple[float, list[list[int]]]:
  from jaxserve.engine import SamplingParams
  prompts = [{"prompt_token_ids": w["prompt_token_ids"]} for w in workload]
  params = [SamplingParams(temperature=0, max_tokens=w["max_tokens"], ignore_eos=True, detokenize=False)
            for w in workload]
  llm.reset_prefix_cache()
  t0 = time.perf_counter()
  outs = llm.generate(prompts, params, use_tqdm=False)
  return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "jaxserve-bench-llama-8l-512"))
  ap.add_argument("--num-requests", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=5, help="turns of every measurement (medians reported)")
  ap.add_argument("--steps", type=int, default=60, help="decode steps timed per turn and batch size")
  ap.add_argument("--quick", action="store_true", help="16 requests, 1 turn, 20 steps (a check, not a result)")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_serving.json"))
  args = ap.parse_args()
  if args.quick:
    args.num_requests, args.repeats, args.steps = 16, 1, 20

  from jaxserve.engine import LLM
  res = dict(machine=machine(), git_commit=git_commit(),
             model="benchmarks/serving.py's 8-layer LLaMA, hidden 512, float32", pruning="magnitude, per layer",
             num_requests=args.num_requests, repeats=args.repeats, decode_steps=args.steps)
  model_dir = make_model(args.model_dir)
  workload = make_workload(args.num_requests)
  out_tokens = sum(w["max_tokens"] for w in workload)
  with tempfile.TemporaryDirectory() as tmp:
    dirs = save_variants(model_dir, tmp)
    kv = dict(max_model_len=MAX_MODEL_LEN)  # the serving benchmark's engine settings
    engines = {name: LLM(d, **kv) for name, d in dirs.items()}
    rows = {}
    for name, llm in engines.items():
      s = llm.stats()
      rows[name] = dict(weight_bytes=s["weight_bytes"], kernel_bytes=kernel_bytes(llm.engine.runner.params),
                        disk_bytes=dir_bytes(os.path.join(dirs[name], "params")), formats=s["weight_formats"],
                        step_b1=[], step_b8=[], serve_s=[])
      serve(llm, workload)  # warm-up: compiles the workload's programs
      for b in (1, 8):
        decode_steps(llm, b, 4, seed=99)
    for turn in range(args.repeats):
      for name, llm in engines.items():
        rows[name]["step_b1"] += decode_steps(llm, 1, args.steps, seed=turn)
        rows[name]["step_b8"] += decode_steps(llm, 8, args.steps, seed=turn)
        elapsed, tokens = serve(llm, workload)
        rows[name]["serve_s"].append(elapsed)
        rows[name]["tokens"] = tokens
      print(f"turn {turn + 1}/{args.repeats} done", flush=True)
    # the part of a step no pruning of the blocks can shrink: the same model with no blocks
    # (embedding, final norm, LM head, sampling, the step's fixed work)
    from jaxserve.loaders import LoadedModel, load_model
    m = load_model(model_dir)
    head = LoadedModel(m.cfg.replace(num_layers=0), {k: v for k, v in m.params.items() if not k.startswith("layers_")},
                       None)
    del m
    no_blocks = LLM(head, num_kv_blocks=256, **kv)  # a model with no layers has no KV bytes to size a pool by
    for b in (1, 8):
      decode_steps(no_blocks, b, 4, seed=99)
    res["no_blocks_step_b1_ms"] = float(np.median(sum((decode_steps(no_blocks, 1, args.steps, seed=t)
                                                       for t in range(args.repeats)), []))) * 1e3
    res["no_blocks_step_b8_ms"] = float(np.median(sum((decode_steps(no_blocks, 8, args.steps, seed=t)
                                                       for t in range(args.repeats)), []))) * 1e3
    del no_blocks
    # the same pruned weights run dense: the tokens the sparse kernels must reproduce
    for name in VARIANTS[1:]:
      off = LLM(dirs[name], sparse_weights="off", **kv)
      _, tokens = serve(off, workload)
      same = sum(a == b for a, b in zip(tokens, rows[name]["tokens"]))
      rows[name]["same_tokens_as_dense_run"] = f"{same}/{len(tokens)}"
      rows[name]["weight_bytes_dense_run"] = off.stats()["weight_bytes"]
      del off

  med = lambda xs: float(np.median(xs))
  for r in rows.values():
    r.pop("tokens")
    r["step_b1_ms"], r["step_b8_ms"] = med(r.pop("step_b1")) * 1e3, med(r.pop("step_b8")) * 1e3
    r["tok_s"] = out_tokens / med(r["serve_s"])
  base = rows["dense"]
  for r in rows.values():
    for key in ("weight_bytes", "kernel_bytes", "disk_bytes"):
      r[f"{key}_vs_dense"] = r[key] / base[key]
    r["speedup_b1"] = base["step_b1_ms"] / r["step_b1_ms"]
    r["speedup_b8"] = base["step_b8_ms"] / r["step_b8_ms"]
    r["speedup_serving"] = r["tok_s"] / base["tok_s"]
  res["variants"] = rows
  res["machine"]["loadavg_at_end"] = os.getloadavg()

  print(f"\n{cpu_model()}, load {res['machine']['loadavg_at_start'][0]:.2f} -> {os.getloadavg()[0]:.2f}\n")
  print("| model | kernel bytes | all weights | on disk | decode b=1 ms | b=8 ms | serving tok/s | same tokens |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, r in rows.items():
    print(f"| {name} | {r['kernel_bytes_vs_dense']:.3f}x | {r['weight_bytes_vs_dense']:.3f}x | "
          f"{r['disk_bytes_vs_dense']:.3f}x | {r['step_b1_ms']:.2f} ({r['speedup_b1']:.2f}x) | "
          f"{r['step_b8_ms']:.2f} ({r['speedup_b8']:.2f}x) | {r['tok_s']:.0f} ({r['speedup_serving']:.2f}x) | "
          f"{r.get('same_tokens_as_dense_run', '-')} |")
  for b in (1, 8):
    fixed = res[f"no_blocks_step_b{b}_ms"]
    print(f"batch {b}: the model without its blocks steps in {fixed:.2f} ms; the blocks alone: "
          + ", ".join(f"{name} {r[f'step_b{b}_ms'] - fixed:.2f} ms" for name, r in rows.items()))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=2)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
