"""Where a step of the paged engine spends its time on the CPU (the serving benchmark's model).

Times one jitted model step of ``benchmarks/serving.py``'s model with the engine's attention
backend swapped: the C++ kernel (the default on the CPU; it also writes the step's K/V), the XLA
loops (``cpu_kernel=False``; K/V written by an XLA scatter), no attention (K/V still written by the
scatter), and neither. Two steps: a batch of 64 decodes with lengths
drawn like the serving workload's (prompt + half the output), and a 2048-token prefill of the
workload's first prompts. Also reported: the attention's read rate (K/V bytes the decodes must
read / (full step - step without attention; for the kernel, without attention or K/V write,
which it does itself)), a plain numpy read of 512 MiB for comparison, and
the prefill matmuls' GFLOP/s (2 x weight-matrix parameters x tokens / the step without attention).
Every variant runs the engine's packed C++ matmul; a last table times decode steps of 2, 8 and 64
sequences with it and with XLA's matmul on the unpacked weights. Median of ``--reps`` runs after one warm-up. Output: a table and
``benchmarks/results/step_breakdown.json`` (``step_breakdown_bfloat16.json`` with ``--dtype bfloat16``).

  python benchmarks/step_breakdown.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from benchmarks._machine import write_results  # noqa: E402

from serving import MAX_MODEL_LEN, make_model, make_workload  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "jaxserve-bench-llama-8l-512"))
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameters and KV pools")
  ap.add_argument("--out", default=None, help="default: benchmarks/results/step_breakdown[_bfloat16].json")
  args = ap.parse_args()
  suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
  args.out = args.out or str(ROOT / "benchmarks" / "results" / f"step_breakdown{suffix}.json")

  import jax
  import jax.numpy as jnp
  from jaxserve.engine import LLM
  from jaxserve import weights
  from jaxserve.engine._attention import PagedAttention, make_meta
  from jaxserve.engine._weight_forms import weight_formats

  class NoAttention(PagedAttention):
    def attend(self, q, k_pages, v_pages, meta):
      return q.astype(jnp.float32)

  class NoAttentionNoWrite(PagedAttention):
    def __call__(self, layer, q, k, v, layer_kv, meta):
      # k and v still used (else XLA drops their projections and the step looks cheaper than it is)
      return q + 0.0 * (k.sum() + v.sum()).astype(q.dtype), layer_kv

  llm = LLM(make_model(args.model_dir), max_model_len=MAX_MODEL_LEN, dtype=args.dtype,
            compile="lazy")  # its own programs, below
  runner, cfg = llm.engine.runner, llm.engine.runner.cfg
  bs, rng = runner.block_size, np.random.default_rng(0)
  perm = rng.permutation(np.arange(1, runner.num_blocks))
  workload = make_workload(64)

  def place(lengths, q_lens):
    seqs, used = [], 0
    for length, q_len in zip(lengths, q_lens):
      n = -(-int(length) // bs)
      seqs.append((int(q_len), int(length), tuple(int(b) for b in perm[used:used + n])))
      used += n
    return seqs

  # decode: sequences longest first (as the runner orders them); batch b takes every (64 / b)-th of 64
  all_lens = np.sort([len(w["prompt_token_ids"]) + w["max_tokens"] // 2 for w in workload])[::-1]

  def decode_inputs(b):
    lens = all_lens[::64 // b][:b]
    meta = make_meta(place(lens, [1] * b), b, num_tokens=b, decode_slots=b, prefill_slots=0, block_size=bs,
                     table_width=runner.table_width)
    return (rng.integers(3, cfg.vocab_size, (1, b)).astype(np.int32), (lens - 1)[None].astype(np.int32), meta,
            np.arange(b, dtype=np.int32)[None])

  lens, dec_inputs = all_lens, decode_inputs(64)
  # prefill: the first prompts, 2048 tokens in all
  plens, total = [], 0
  for w in workload:
    n = min(len(w["prompt_token_ids"]), 2048 - total)
    plens.append(n)
    total += n
    if total == 2048:
      break
  slots = 1 << (len(plens) - 1).bit_length()
  pre_meta = make_meta(place(plens, plens), 0, num_tokens=2048, decode_slots=0, prefill_slots=slots, block_size=bs,
                       table_width=runner.table_width)
  logits_index = np.zeros((1, slots), np.int32)
  logits_index[0, :len(plens)] = np.cumsum(plens) - 1
  pre_inputs = (rng.integers(3, cfg.vocab_size, (1, 2048)).astype(np.int32),
                np.concatenate([np.arange(n) for n in plens])[None].astype(np.int32), pre_meta, logits_index)

  packed_params = runner.params  # every packable kernel a PackedDense when the C++ kernels run

  def time_step(attn, inputs, params=packed_params):
    fwd = jax.jit(runner.step_function(attn), donate_argnums=(1, 2))
    times = []
    for i in range(args.reps + 1):
      t0 = time.perf_counter()
      greedy, runner.kv_pools, runner.logits = fwd(params, runner.kv_pools, runner.logits, *inputs)
      jax.block_until_ready(greedy)
      if i:
        times.append(time.perf_counter() - t0)
    return float(np.median(times))

  variants = {"C++ kernel": PagedAttention(), "XLA loops": PagedAttention(cpu_kernel=False),
              "no attention": NoAttention(cpu_kernel=False), "no attention, no KV write": NoAttentionNoWrite()}
  decode = {name: time_step(a, dec_inputs) for name, a in variants.items()}
  prefill = {name: time_step(variants[name], pre_inputs) for name in variants}
  # the decode step with the packed C++ matmul (the engine's) vs XLA's matmul on the unpacked weights
  matmul = {}
  if weight_formats(packed_params).get("packed"):
    unpacked = weights.densify(packed_params)
    for b in (2, 8, 64):
      inputs = decode_inputs(b)
      matmul[b] = {"packed C++ matmul": time_step(variants["C++ kernel"], inputs),
                   "XLA matmul": time_step(variants["C++ kernel"], inputs, unpacked)}

  itemsize = jnp.dtype(args.dtype).itemsize
  kv_bytes = int(lens.sum()) * sum(2 * cfg.kv_heads(i) * cfg.head_dim * itemsize for i in range(cfg.num_layers))
  # each path against the same step without its attention: the kernel does its own K/V write
  rate = {"C++ kernel": kv_bytes / (decode["C++ kernel"] - decode["no attention, no KV write"]) / 1e9,
          "XLA loops": kv_bytes / (decode["XLA loops"] - decode["no attention"]) / 1e9}
  big = np.ones(128 << 20, np.float32)
  big.sum()
  t0 = time.perf_counter()
  big.sum()
  plain_read = big.nbytes / (time.perf_counter() - t0) / 1e9
  matmul_params = sum(math.prod(x.shape) for path, x in
                      jax.tree_util.tree_flatten_with_path(runner.params, is_leaf=weights.is_typed)[0]
                      if len(x.shape) == 2 and "embed" not in jax.tree_util.keystr(path)
                      and "lm_head" not in jax.tree_util.keystr(path))
  # the step without attention or K/V write: its matmuls and the elementwise work between them (the
  # "no attention" variant writes K/V through XLA's scatter, slow for bfloat16, which the engine never runs)
  prefill_gflops = 2 * matmul_params * 2048 / prefill["no attention, no KV write"] / 1e9

  print(f"decode step, batch 64, mean context {lens.mean():.0f} ({kv_bytes / 1e6:.0f} MB of K/V to read):")
  for name, t in decode.items():
    print(f"  {name:<28} {t * 1e3:7.2f} ms")
  print(f"prefill step, {len(plens)} prompts, 2048 tokens:")
  for name, t in prefill.items():
    print(f"  {name:<28} {t * 1e3:7.1f} ms")
  print(f"attention read rate: C++ kernel {rate['C++ kernel']:.1f} GB/s, XLA loops {rate['XLA loops']:.1f} GB/s; "
        f"plain numpy read {plain_read:.1f} GB/s")
  print(f"prefill without attention or K/V write: {prefill_gflops:.0f} GFLOP/s over the matmuls' weights")
  for b, row in matmul.items():
    print(f"decode step, batch {b:>2}: " + ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in row.items()))
  res = dict(decode_ms={k: v * 1e3 for k, v in decode.items()}, prefill_ms={k: v * 1e3 for k, v in prefill.items()},
             decode_mean_context=float(lens.mean()), kv_bytes=kv_bytes, attention_read_GBps=rate,
             plain_read_GBps=plain_read, prefill_matmul_GFLOPs=prefill_gflops, reps=args.reps,
             decode_matmul_ms={b: {k: v * 1e3 for k, v in row.items()} for b, row in matmul.items()},
             dtype=args.dtype)
  write_results(args.out, res)


if __name__ == "__main__":
  main()
