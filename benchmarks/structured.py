"""Structured pruning benchmark: stories260K perplexity per importance, before/after LoRA, and decode throughput.

Part 1 (perplexity, stories260K): block-wise pruning of every layer's KV groups and MLP channels at
20% and 50%, local ranking, for each importance (l1, l2, random, and Taylor vectorize / param_first /
param_second / param_mix with the Fisher diagonal, param_second with Hutchinson's Hessian diagonal);
calibration: 32 random windows of 128 tokens of the TinyStories train text; then LoRA recovery
(rank 8, alpha 16, all projections, AdamW 5e-3 warmup+cosine, 100 steps of 16 x 128 tokens of the
train text). Perplexity: the embedded TinyStories validation text, 40 windows of 256 tokens with BOS.
Part 2 (the issue's reference protocol): 20% of the MLP channels only, 10 windows of 64 tokens;
Taylor param_first and param_second over four calibration draws, random over four seeds, l2.
Part 3 (throughput): jaxserve ``LLM`` decode throughput, dense vs pruned (25% of the block
parameters), same engine settings and workload (64 requests of 8 prompt tokens and 128 greedy
output tokens, ignore_eos; dense and pruned run in turns, median of 5), on stories260K and on the engine issue's 8-layer random LLaMA
(hidden 512, MLP 1408, 8 heads, 4 KV heads, vocab 8192, saved by transformers, torch seed 0).

Run: ``.venv/bin/python benchmarks/structured.py`` (``--part perplexity|reference|throughput``,
``--recovery-steps N``). Prints tables and writes benchmarks/results/structured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np

from jaxprune.eval import perplexity
from jaxprune.structured import (Importance, LoraConfig, StructuredConfig, calibration_windows, count_parameters,
                                 finetune_lora, prune_structured, text_token_ids)
from jaxserve.loaders import EVAL_TEXT, LoadedModel, load_model

IMPORTANCES = {
    "l1": Importance(kind="l1"),
    "l2": Importance(kind="l2"),
    "random": Importance(kind="random"),
    "taylor vectorize": Importance(taylor="vectorize", micro_batch=16),
    "taylor param_first": Importance(taylor="param_first", micro_batch=16),
    "taylor param_second (Fisher)": Importance(taylor="param_second", micro_batch=16),
    "taylor param_mix (Fisher)": Importance(taylor="param_mix", micro_batch=16),
    "taylor param_second (Hutchinson, 16 probes)": Importance(taylor="param_second", hessian="hutchinson",
                                                              hutchinson_probes=16, micro_batch=16),
}
RATIOS = (0.2, 0.5)
EVAL_WINDOWS, EVAL_SEQ = 40, 256


def _eval_ids(m: LoadedModel) -> list[int]:
  with open(EVAL_TEXT, encoding="utf-8") as f:
    return m.tokenizer.encode(f.read())


def part_perplexity(m: LoadedModel, calib_ids: np.ndarray, eval_ids: list[int], recovery_steps: int) -> dict:
  ppl = lambda p, c: perplexity(p, c, eval_ids, EVAL_SEQ, EVAL_WINDOWS)
  windows = calibration_windows(calib_ids, 32, 128, m.cfg.bos_token_id, seed=0)
  lora = LoraConfig(rank=8, alpha=16.0, steps=recovery_steps, learning_rate=5e-3, batch_size=16, micro_batch=8,
                    seq_len=128)
  dense = {"perplexity": ppl(m.params, m.cfg), "parameters": count_parameters(m.params)}
  print(f"\n## stories260K, block-wise (KV groups + MLP channels of every layer), local; dense ppl "
        f"{dense['perplexity']:.3f}, {dense['parameters']:,} parameters")
  print(f"| importance | ratio | block params removed | params | ppl pruned | ppl after LoRA ({recovery_steps} steps) "
        "| prune s | LoRA s |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  for ratio in RATIOS:
    for name, imp in IMPORTANCES.items():
      t = time.perf_counter()
      res = prune_structured(m.params, m.cfg, StructuredConfig(ratio=ratio, importance=imp), windows,
                             key=jax.random.PRNGKey(0))
      prune_s = time.perf_counter() - t
      before = ppl(res.params, res.cfg)
      t = time.perf_counter()
      tuned = finetune_lora(res.params, res.cfg, calib_ids, lora)
      lora_s = time.perf_counter() - t
      after = ppl(tuned.params, res.cfg)
      row = {"importance": name, "ratio": ratio, "block_removed_fraction": res.report["block_removed_fraction"],
             "parameters": res.report["parameters_after"], "perplexity_pruned": before, "perplexity_recovered": after,
             "prune_seconds": prune_s, "lora_seconds": lora_s, "kv_heads": res.cfg.num_kv_heads,
             "intermediate_size": res.cfg.intermediate_size}
      rows.append(row)
      print(f"| {name} | {ratio:.0%} | {row['block_removed_fraction']:.1%} | {row['parameters']:,} | {before:.2f} | "
            f"{after:.2f} | {prune_s:.1f} | {lora_s:.1f} |", flush=True)
  return {"dense": dense, "rows": rows, "calibration": "32 windows x 128 tokens", "lora": lora.__dict__}


def part_reference(m: LoadedModel, calib_ids: np.ndarray, eval_ids: list[int]) -> dict:
  ppl = lambda p, c: perplexity(p, c, eval_ids, EVAL_SEQ, EVAL_WINDOWS)
  sc = lambda imp, seed=0: StructuredConfig(ratio=0.2, attention_layers=(0, 0), importance=imp, seed=seed)
  out = {}
  print("\n## issue's reference protocol: 20% of the MLP channels of every layer, 10 windows of 64 tokens")
  print("| importance | perplexity (4 calibration draws / seeds) | min | max |")
  print("|---|---|---|---|")
  for name, imp in (("taylor param_first", Importance(taylor="param_first")),
                    ("taylor param_second (Fisher)", Importance(taylor="param_second")),
                    ("random", Importance(kind="random")), ("l2", Importance(kind="l2"))):
    values = []
    for draw in range(1 if imp.kind == "l2" else 4):
      windows = calibration_windows(calib_ids, 10, 64, m.cfg.bos_token_id, seed=draw)
      res = prune_structured(m.params, m.cfg, sc(imp, seed=draw), windows)
      values.append(ppl(res.params, res.cfg))
    out[name] = values
    print(f"| {name} | {', '.join(f'{v:.2f}' for v in values)} | {min(values):.2f} | {max(values):.2f} |", flush=True)
  return out


def _decode_throughput(models: list[LoadedModel], rounds: int = 5) -> list[tuple[list[float], list[float]]]:
  """(output tokens per wall second, per CPU second) of each model on 64 requests x (8 -> 128 greedy tokens), per round.

  Same engine settings for every model; after a warmup (compilation) the models run in turns
  (dense, pruned, dense, ...), ``rounds`` times; the median round counts (turns spread the noise
  of a shared machine; tokens per CPU second of this process are less sensitive to other
  processes than wall time).
  """
  from jaxserve.engine import LLM, SamplingParams
  rng = np.random.default_rng(0)
  prompts = [{"prompt_token_ids": rng.integers(3, models[0].cfg.vocab_size, 8).tolist()} for _ in range(64)]
  sp = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True, detokenize=False)
  llms = [LLM(model=m, block_size=16, max_num_seqs=64, max_num_batched_tokens=2048, max_model_len=256,
              num_kv_blocks=64 * 9, enable_prefix_caching=False, seed=0) for m in models]
  for llm in llms:
    llm.generate(prompts, sp, use_tqdm=False)  # compile
  wall, cpu = [[] for _ in llms], [[] for _ in llms]
  for _ in range(rounds):
    for i, llm in enumerate(llms):
      t, c = time.perf_counter(), time.process_time()
      outs = llm.generate(prompts, sp, use_tqdm=False)
      dt, dc = time.perf_counter() - t, time.process_time() - c
      n = sum(len(o.outputs[0].token_ids) for o in outs)
      wall[i].append(n / dt)
      cpu[i].append(n / dc)
  return list(zip(wall, cpu))


def _bench_model(tmp: str) -> LoadedModel:
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
  transformers.LlamaForCausalLM(cfg).float().save_pretrained(tmp, safe_serialization=True)
  return load_model(tmp)


def part_throughput(m: LoadedModel) -> list[dict]:
  rows = []
  print("\n## decode throughput in jaxserve (64 requests, 8 prompt + 128 output tokens, greedy), 25% of block params")
  print("| model | params dense | params pruned | KV heads | MLP | dense tok/s | pruned tok/s | speedup "
        "| dense tok/CPU-s | pruned tok/CPU-s | speedup (CPU time) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for name, model in (("stories260K", m), ("8-layer LLaMA (engine benchmark)", None)):
      model = model or _bench_model(tmp)
      res = prune_structured(model.params, model.cfg, StructuredConfig(ratio=0.25, importance=Importance(kind="l2")))
      (dense_runs, dense_cpu_runs), (pruned_runs, pruned_cpu_runs) = _decode_throughput(
          [model, LoadedModel(res.cfg, res.params, model.tokenizer)])
      dense_tps, dense_cpu, pruned_tps, pruned_cpu = map(float, map(np.median, (
          dense_runs, dense_cpu_runs, pruned_runs, pruned_cpu_runs)))
      row = {"model": name, "parameters_dense": count_parameters(model.params),
             "parameters_pruned": count_parameters(res.params),
             "block_removed_fraction": res.report["block_removed_fraction"],
             "kv_heads": f"{model.cfg.num_kv_heads}->{res.cfg.num_kv_heads}",
             "intermediate_size": f"{model.cfg.intermediate_size}->{res.cfg.intermediate_size}",
             "dense_tokens_per_s": dense_tps, "pruned_tokens_per_s": pruned_tps, "speedup": pruned_tps / dense_tps,
             "dense_tokens_per_cpu_s": dense_cpu, "pruned_tokens_per_cpu_s": pruned_cpu,
             "speedup_cpu_time": pruned_cpu / dense_cpu, "rounds": len(dense_runs),
             "dense_tokens_per_s_runs": dense_runs, "pruned_tokens_per_s_runs": pruned_runs,
             "dense_tokens_per_cpu_s_runs": dense_cpu_runs, "pruned_tokens_per_cpu_s_runs": pruned_cpu_runs,
             "loadavg": os.getloadavg()}
      rows.append(row)
      print(f"| {name} | {row['parameters_dense']:,} | {row['parameters_pruned']:,} | {row['kv_heads']} | "
            f"{row['intermediate_size']} | {dense_tps:.0f} | {pruned_tps:.0f} | {row['speedup']:.2f}x | "
            f"{dense_cpu:.0f} | {pruned_cpu:.0f} | {row['speedup_cpu_time']:.2f}x |", flush=True)
  return rows


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--part", choices=["all", "perplexity", "reference", "throughput"], default="all")
  ap.add_argument("--recovery-steps", type=int, default=100)
  args = ap.parse_args()
  t0 = time.perf_counter()
  m = load_model()
  calib_ids = text_token_ids(m.tokenizer)
  eval_ids = _eval_ids(m)
  result = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__} {jax.default_backend()}",
            "eval": f"TinyStories validation text, {EVAL_WINDOWS} windows x {EVAL_SEQ} tokens, BOS each"}
  if args.part in ("all", "perplexity"):
    result["perplexity"] = part_perplexity(m, calib_ids, eval_ids, args.recovery_steps)
  if args.part in ("all", "reference"):
    result["reference"] = part_reference(m, calib_ids, eval_ids)
  if args.part in ("all", "throughput"):
    result["throughput"] = part_throughput(m)
  result["seconds"] = time.perf_counter() - t0
  print(f"\ntotal {result['seconds']:.0f} s")
  os.makedirs("benchmarks/results", exist_ok=True)
  name = "structured" if args.part == "all" else f"structured_{args.part}"
  with open(f"benchmarks/results/{name}.json", "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
