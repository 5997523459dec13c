"""The CPU paged-attention kernel alone at the serving workload's decode shapes: time and K/V read rate.

One timed call is the engine's per-step attention for every layer: ``--layers`` calls of the fused
kernel (``write_paged_rows``: write the step's K/V into their slots, then attend), each over its
own layer's K/V pools (donated, updated in place, as in the engine's step), chained through
their outputs so that they run one after another. Shapes are ``benchmarks/serving.py``'s model
(8 heads, 4 KV heads, head dim 64, 8 layers, the engine's block size 16) at a decode batch of 64
whose context lengths are drawn as in ``benchmarks/step_breakdown.py`` (each request's prompt
plus half its output); each sequence's blocks sit at random places in a pool of ``--num-blocks``.
Read rate = K/V bytes the batch must read (every position of every sequence, K and V, every layer)
/ the time per call (the median, and the best: on a loaded machine the times come in steps of the
scheduler's slice). For comparison: a plain read of as many bytes (numpy's sum of a
contiguous float32 array, one thread), measured between the kernel's calls.

With ``--baseline FILE.cc`` (e.g. an earlier ``paged_attention_cpu.cc``: ``git show
REV:jaxserve/engine/csrc/paged_attention_cpu.cc > /tmp/old/paged_attention_cpu.cc``), that
source is also built (same flags, into a temporary directory) and its calls alternate with the
current kernel's in one process; reported: each one's median and the median of the per-pair ratios
(old / new). Output: a table and ``benchmarks/results/attention_cpu.json``.

  python benchmarks/attention_cpu.py [--dtype float32,bfloat16] [--reps 60] [--baseline FILE.cc] [--smoke]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from benchmarks._machine import file_at, write_results  # noqa: E402

from serving import make_workload  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK = 8, 4, 64, 8, 16


def build_baseline(source: Path, tmp: str) -> dict[str, str]:
  """Builds ``source`` (an attention kernel .cc) alone, registers its fused targets under new names."""
  import jax
  from jaxserve.engine import _cpu_kernels as ck
  lib_path = os.path.join(tmp, "baseline_attention.so")
  cmd = [ck._compiler(), *ck._compile_flags(), "-I", jax.ffi.include_dir(), "-I", str(ck._HEADERS[0].parent),
         "-I", str(source.parent), str(source), "-o", lib_path]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(f"building {source} failed:\n{proc.stderr[-2000:]}")
  lib = ctypes.cdll.LoadLibrary(lib_path)
  names = {"float32": "baseline_write_paged_attention_cpu", "bfloat16": "baseline_write_paged_attention_bf16_cpu"}
  jax.ffi.register_ffi_target(names["float32"], jax.ffi.pycapsule(lib.JaxserveWritePagedAttentionCpu),
                              platform="cpu")
  jax.ffi.register_ffi_target(names["bfloat16"], jax.ffi.pycapsule(lib.JaxserveWritePagedAttentionBf16Cpu),
                              platform="cpu")
  return names


def fused_call(target: str | None):
  """``write_paged_rows`` (target None), or the same call to another build's registered ``target``."""
  import jax
  import jax.numpy as jnp
  from jaxserve.engine import _cpu_kernels as ck
  if target is None:
    return ck.write_paged_rows

  def call(q, k_new, v_new, slots, k_pages, v_pages, tables, row_seq, row_len, *, scale, num_threads=0):
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                 jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype))
    f = jax.ffi.ffi_call(target, out_types, input_output_aliases={4: 1, 5: 2})
    return f(q, k_new, v_new, slots, k_pages, v_pages, tables, row_seq, row_len, scale=np.float32(scale),
             num_threads=np.int64(num_threads))
  return call


def make_step(fn, layers: int, threads: int):
  """A jitted step: ``layers`` fused calls chained through q, pools donated (the engine's pattern)."""
  import jax

  def step(q, k_new, v_new, slots, pools, tables, row_seq, row_len):
    new_pools = []
    for k_pages, v_pages in pools:
      out, k_pages, v_pages = fn(q, k_new, v_new, slots, k_pages, v_pages, tables, row_seq, row_len,
                                 scale=HEAD_DIM ** -0.5, num_threads=threads)
      q = out  # the next layer's queries depend on this one's output: calls run in order
      new_pools.append((k_pages, v_pages))
    return q, new_pools
  return jax.jit(step, donate_argnums=(4,))


def decode_batch(batch: int, num_blocks: int, rng: np.random.Generator):
  """Context lengths (the workload's, longest first), block tables at random blocks, each row's slot."""
  lens = np.sort([len(w["prompt_token_ids"]) + w["max_tokens"] // 2 for w in make_workload(64)])[::-1]
  lens = lens[::max(1, 64 // batch)][:batch].astype(np.int32)
  per_seq = -(-lens // BLOCK)
  if per_seq.sum() >= num_blocks:
    raise ValueError(f"--num-blocks must exceed the {per_seq.sum()} blocks the batch uses, got {num_blocks}")
  perm = rng.permutation(np.arange(1, num_blocks))
  width = int(per_seq.max())
  tables = np.zeros((batch, width), np.int32)
  used = 0
  for s, n in enumerate(per_seq):
    tables[s, :n] = perm[used:used + n]
    used += n
  slots = tables[np.arange(batch), (lens - 1) // BLOCK] * BLOCK + (lens - 1) % BLOCK
  return lens, tables, slots.astype(np.int32)


def plain_read_seconds(buf: np.ndarray) -> float:
  t0 = time.perf_counter()
  buf.sum()
  return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dtype", default="float32,bfloat16", help="pool dtypes, comma separated")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--layers", type=int, default=LAYERS)
  ap.add_argument("--num-blocks", type=int, default=2048, help="blocks in each layer's pool")
  ap.add_argument("--threads", type=int, default=0, help="the kernel's num_threads (0: XLA's pool)")
  ap.add_argument("--reps", type=int, default=60)
  ap.add_argument("--baseline", type=Path, default=None, help="another paged_attention_cpu.cc to compare with")
  ap.add_argument("--baseline-rev", default=None,
                  help="a git revision whose paged_attention_cpu.cc is the baseline (instead of --baseline)")
  ap.add_argument("--smoke", action="store_true", help="a quick check that it runs (few reps, 2 layers)")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "attention_cpu.json"))
  args = ap.parse_args()
  if args.smoke:
    args.reps, args.layers, args.num_blocks = 3, 2, 1024

  import jax
  import jax.numpy as jnp
  from jaxserve.engine import _cpu_kernels as ck
  if not ck.available():
    raise SystemExit(f"the CPU kernels are unavailable: {ck.info()['error']}")
  rng = np.random.default_rng(0)
  lens, tables, slots = decode_batch(args.batch, args.num_blocks, rng)
  row_seq = np.arange(args.batch, dtype=np.int32)
  with tempfile.TemporaryDirectory() as tmp:
    if args.baseline_rev:
      args.baseline = Path(tmp) / "baseline_src" / "paged_attention_cpu.cc"
      args.baseline.parent.mkdir()
      args.baseline.write_bytes(file_at(args.baseline_rev, "jaxserve/engine/csrc/paged_attention_cpu.cc"))
    baseline = build_baseline(args.baseline, tmp) if args.baseline else None
    results = {}
    for dtype in args.dtype.split(","):
      dt = jnp.dtype(dtype)
      names = {"new": None, **({"old": baseline[dtype]} if baseline else {})}
      shape = (args.num_blocks, KV_HEADS, BLOCK, HEAD_DIM)
      layers = [(jnp.asarray(rng.standard_normal(shape), dt), jnp.asarray(rng.standard_normal(shape), dt))
                for _ in range(args.layers)]
      pools = {name: [(jnp.copy(k), jnp.copy(v)) for k, v in layers] for name in names}  # same contents each
      del layers
      q = jnp.asarray(rng.standard_normal((args.batch, HEADS, HEAD_DIM)), jnp.float32)
      k_new = jnp.asarray(rng.standard_normal((args.batch, KV_HEADS, HEAD_DIM)), dt)
      v_new = jnp.asarray(rng.standard_normal((args.batch, KV_HEADS, HEAD_DIM)), dt)
      steps = {name: make_step(fused_call(target), args.layers, args.threads) for name, target in names.items()}
      inputs = (q, k_new, v_new, jnp.asarray(slots), jnp.asarray(tables), jnp.asarray(row_seq), jnp.asarray(lens))
      kv_bytes = int(lens.sum()) * 2 * KV_HEADS * HEAD_DIM * dt.itemsize * args.layers
      plain = np.ones(kv_bytes // 4, np.float32)
      times = {name: [] for name in names}
      times["plain read"] = []
      outs = {}
      for rep in range(args.reps + 2):
        order = list(names) if rep % 2 == 0 else list(names)[::-1]
        for name in order:
          t0 = time.perf_counter()
          out, pools[name] = steps[name](*inputs[:4], pools[name], *inputs[4:])
          out.block_until_ready()
          if rep >= 2:
            times[name].append(time.perf_counter() - t0)
          outs[name] = out
        if rep >= 2:
          times["plain read"].append(plain_read_seconds(plain))
      med = {name: float(np.median(t)) for name, t in times.items()}
      best = {name: float(np.min(t)) for name, t in times.items()}
      row = {"ms": {name: m * 1e3 for name, m in med.items()},
             "GBps": {name: kv_bytes / m / 1e9 for name, m in med.items()},
             "best_ms": {name: m * 1e3 for name, m in best.items()},
             "kv_bytes": kv_bytes}
      if baseline:
        row["old_over_new"] = float(np.median(np.array(times["old"]) / np.array(times["new"])))
        # same inputs and pools: the two builds' outputs (after every layer and rep) should agree
        row["max_abs_diff_old_new"] = float(np.max(np.abs(np.asarray(outs["old"]) - np.asarray(outs["new"]))))
      results[dtype] = row
      print(f"{dtype}: batch {args.batch}, mean context {lens.mean():.0f}, {args.layers} layers, "
            f"{kv_bytes / 1e6:.1f} MB of K/V")
      for name in times:
        print(f"  {name:<12} median {med[name] * 1e3:8.3f} ms {kv_bytes / med[name] / 1e9:6.1f} GB/s, "
              f"best {best[name] * 1e3:8.3f} ms {kv_bytes / best[name] / 1e9:6.1f} GB/s")
      if baseline:
        print(f"  old / new (median of {args.reps} interleaved pairs): {row['old_over_new']:.3f}; "
              f"outputs differ by at most {row['max_abs_diff_old_new']:.2e}")
  res = dict(results=results, batch=args.batch, layers=args.layers, num_blocks=args.num_blocks,
             block_size=BLOCK, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
             mean_context=float(lens.mean()), threads=args.threads, reps=args.reps,
             baseline=str(args.baseline) if args.baseline else None, baseline_commit=args.baseline_rev,
             isa=ck.info()["isa"], smoke=args.smoke)
  write_results(args.out, res)


if __name__ == "__main__":
  main()
