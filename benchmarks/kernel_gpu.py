"""GPU benchmark of the Pallas paged-attention kernels: check, then time vs XLA.

Steps (one process, one device):
  1. Correctness on fresh random inputs (seed printed): decode and ragged
     kernels vs the jnp references, outputs poisoned (NaN) before each run,
     unused KV slots filled with NaN; one small case vs a float64 oracle.
  2. Copy bandwidth of the card (one large read+write, bytes counted twice).
  3. Decode timings for batch {1, 8, 64} x context {512, 2048, 8192}, 32 query
     heads, 8 KV heads, head_dim 128, page size 16, bfloat16: the kernel, the
     XLA reference path (`paged_attention_reference` under jit) and, if
     importable, `jax.experimental.pallas.ops.gpu.paged_attention`.
     Achieved bandwidth = bytes of K/V/Q/O that must move / time.
  4. A small tuning sweep of the kernel's knobs at three sizes, and two ragged
     rows (pure decode; prefill chunks mixed with decodes).

Timing: each measured call is unrolled `n` times inside one jitted program
(distinct queries, KV sets rotated so that the working set exceeds L2), the
program is run `reps` times after a warm-up, and the median wall time over
`n` is reported. Usage:

  python benchmarks/kernel_gpu.py            # on a GPU (bash kernel_gpu.sh)
  python benchmarks/kernel_gpu.py --smoke    # tiny sizes, interpret mode, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels_pallas as kp  # noqa: E402
from kernels_pallas import _compat  # noqa: E402
from kernels_pallas import testing as kt  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """Problem sizes and timing effort of one benchmark run."""

  batches: tuple[int, ...]
  contexts: tuple[int, ...]
  num_heads: int
  num_kv_heads: int
  head_dim: int
  page_size: int
  dtype: str
  interpret: bool
  copy_bytes: int
  l2_rotate_bytes: int  # rotate KV sets until this many bytes are touched
  target_bytes_per_program: int  # unroll until a program moves this much
  max_unroll: int
  reps: int
  tune_sizes: tuple[tuple[int, int], ...]
  tune_grid: tuple[dict, ...]


GPU = Setup(
    batches=(1, 8, 64), contexts=(512, 2048, 8192), num_heads=32,
    num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16",
    interpret=False, copy_bytes=2 << 30, l2_rotate_bytes=256 << 20,
    target_bytes_per_program=2 << 30, max_unroll=48, reps=7,
    tune_sizes=((64, 2048), (8, 2048), (1, 8192)),
    tune_grid=tuple(
        dict(pages_per_compute_block=p, num_warps=w, num_stages=s)
        for p in (4, 8, 16) for w in (4, 8) for s in (2, 3))
    + tuple(dict(num_splits=n) for n in (1, 2, 4, 8, 16, 32)),
)
SMOKE = Setup(
    batches=(1, 2), contexts=(32, 64), num_heads=4, num_kv_heads=2,
    head_dim=32, page_size=16, dtype="bfloat16", interpret=True,
    copy_bytes=8 << 20, l2_rotate_bytes=1 << 20,
    target_bytes_per_program=1 << 20, max_unroll=2, reps=2,
    tune_sizes=((2, 64),),
    tune_grid=(dict(pages_per_compute_block=1, num_warps=4, num_stages=2),
               dict(pages_per_compute_block=2, num_warps=4, num_stages=2),
               dict(num_splits=2)),
)


# ----------------------------------------------------------------- helpers
def rel_err(got, want) -> float:
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  if not np.isfinite(got).all():
    return float("nan")
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


REL_TOL = {"float32": 1e-4, "bfloat16": 1e-2}


def decode_bytes(batch, ctx, s: Setup) -> int:
  item = jnp.dtype(s.dtype).itemsize
  kv = 2 * batch * ctx * s.num_kv_heads * s.head_dim * item
  qo = 2 * batch * s.num_heads * s.head_dim * item
  return kv + qo


def make_decode_inputs(key, batch, ctx, s: Setup, copies: int):
  """One pool holding `copies` disjoint page sets; one block table per set.

  Rotating tables (not pools) moves the working set past L2 without copies.
  Every sequence has length ctx.
  """
  pages_per_seq = ctx // s.page_size
  num_pages = copies * batch * pages_per_seq + 1  # + null page 0
  shape = (s.num_kv_heads, num_pages, s.page_size, s.head_dim)
  kk, kv_, kt_ = jax.random.split(key, 3)
  k = jax.random.normal(kk, shape, s.dtype)
  v = jax.random.normal(kv_, shape, s.dtype)
  perm = jax.random.permutation(kt_, num_pages - 1) + 1
  tables = perm.reshape(copies, batch, pages_per_seq).astype(jnp.int32)
  lengths = jnp.full((batch,), ctx, jnp.int32)
  return k, v, list(tables), lengths


def time_program(call, qs, tables, fixed, reps):
  """Median and min seconds per call of `call(q, *fixed, table)`.

  The calls are unrolled len(qs) times in one jitted program (XLA compiles
  the identical kernels once), with distinct queries and rotating tables.
  """

  @jax.jit
  def program(qs, tables, fixed):
    return [call(q, *fixed, tables[i % len(tables)]) for i, q in enumerate(qs)]

  with _compat.quiet_backend_warnings():
    jax.block_until_ready(program(qs, tables, fixed))  # compile + warm up
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(program(qs, tables, fixed))
      times.append(time.perf_counter() - t0)
  return statistics.median(times) / len(qs), min(times) / len(qs)


def copy_bandwidth(s: Setup) -> dict:
  n = s.copy_bytes // 2
  x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
  f = jax.jit(lambda x: x + jnp.bfloat16(1))
  jax.block_until_ready(f(x))
  times = []
  for _ in range(max(5, s.reps)):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    times.append(time.perf_counter() - t0)
  t = statistics.median(times)
  return {"bytes_moved": 2 * n * 2, "seconds": t,
          "GBps": 2 * n * 2 / t / 1e9}


# ------------------------------------------------------------- correctness
def correctness(s: Setup, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  interp = s.interpret
  out = []

  def record(name, dtype, got, want, tol=None):
    err = rel_err(got, want)
    tol = REL_TOL[dtype] if tol is None else tol
    ok = bool(np.isfinite(err) and err <= tol)
    out.append({"check": name, "dtype": dtype, "rel_err": err, "tol": tol,
                "ok": ok})
    print(f"  {'ok ' if ok else 'BAD'} {name:<46s} {dtype:<8s} "
          f"rel_err={err:.2e} (tol {tol:.0e})", flush=True)

  big = not s.interpret
  h, kvh, d = s.num_heads, s.num_kv_heads, s.head_dim
  ps = s.page_size
  long_len = 2000 if big else 70
  lengths = [1, ps, ps + 1, long_len, 0, 3 * ps + 5, long_len // 2, 7]
  for dtype in ("bfloat16", "float32"):
    b = kt.decode_batch(rng, lengths, num_heads=h, num_kv_heads=kvh,
                        head_dim=d, page_size=ps, dtype=dtype)
    args = (b.q, b.k_pages, b.v_pages, b.block_tables, b.kv_lens)
    ref = kp.paged_attention_reference(*args)
    for knobs in ({}, {"num_splits": 1}, {"num_splits": 8}):
      got = kp.paged_attention(*args, interpret=interp, poison_outputs=True,
                               **knobs)
      record(f"decode H{h}/KVH{kvh} D{d} ps{ps} {knobs or 'auto'}", dtype,
             got, ref)
  # A mini sweep of page sizes / head dims / GQA ratios.
  for ps_, d_, g in ((8, 64, 1), (32, 64, 8), (16, 128, 2)):
    b = kt.decode_batch(rng, [1, ps_, ps_ + 1, long_len // 2], num_heads=2 * g,
                        num_kv_heads=2, head_dim=d_, page_size=ps_,
                        dtype="bfloat16")
    args = (b.q, b.k_pages, b.v_pages, b.block_tables, b.kv_lens)
    record(f"decode G{g} D{d_} ps{ps_}", "bfloat16",
           kp.paged_attention(*args, interpret=interp, poison_outputs=True),
           kp.paged_attention_reference(*args))
  # Ragged: prefill chunks (fresh and continued) mixed with decodes.
  q_lens = [37, 1, 1, 64, 1, 0, 5] if big else [9, 1, 1, 12, 0]
  kv_lens = [37, 900, 17, 300, 2, 40, 5] if big else [9, 40, 17, 30, 5]
  for dtype in ("bfloat16", "float32"):
    b = kt.ragged_batch(rng, q_lens, kv_lens, num_heads=h, num_kv_heads=kvh,
                        head_dim=d, page_size=ps, dtype=dtype,
                        num_tokens=sum(q_lens) + 5,
                        num_seqs_max=len(q_lens) + 2)
    args = (b.q, b.k_pages, b.v_pages, b.block_tables, b.kv_lens,
            b.cu_q_lens, b.num_seqs)
    ref = kp.ragged_paged_attention_reference(*args)
    for knobs in ({}, {"num_splits": 4, "block_q": 4}):
      got = kp.ragged_paged_attention(*args, interpret=interp,
                                      poison_outputs=True, **knobs)
      record(f"ragged mixed {knobs or 'auto'}", dtype, got, ref)
    if dtype == "float32":  # the reference itself vs a float64 oracle
      record("ragged reference vs float64 oracle", dtype, ref,
             kt.ragged_oracle(*args), tol=1e-5)
  # JAX's own op on garbage-free inputs (it does not mask unused V slots;
  # it applies no softmax scale, so the query is pre-scaled).
  op = _compat.reference_paged_attention_op()
  if op is not None:
    b = kt.decode_batch(rng, [ps * 32] * 4, num_heads=h, num_kv_heads=kvh,
                        head_dim=d, page_size=ps, dtype="bfloat16",
                        nan_garbage=False, extra_cols=0)
    args = (b.q, b.k_pages, b.v_pages, b.block_tables, b.kv_lens)
    try:
      with _compat.quiet_backend_warnings():
        got = _jax_op_call(*args, op=op, interpret=interp)
      record("jax.experimental paged_attention (baseline)", "bfloat16", got,
             kp.paged_attention_reference(*args))
    except Exception as e:  # noqa: BLE001 - a baseline may not run
      print(f"  --- jax op check skipped: {type(e).__name__}: {e}")
  return out


# ------------------------------------------------------------------ timing
def unroll_counts(nbytes: int, s: Setup) -> tuple[int, int]:
  copies = max(1, min(s.max_unroll, math.ceil(s.l2_rotate_bytes / nbytes)))
  n = max(copies, min(s.max_unroll,
                      math.ceil(s.target_bytes_per_program / nbytes)))
  return copies, max(3, n) if not s.interpret else max(1, n)


def time_decode(batch, ctx, s: Setup, impls: dict, key) -> dict:
  nbytes = decode_bytes(batch, ctx, s)
  copies, n = unroll_counts(nbytes, s)
  k, v, tables, lengths = make_decode_inputs(key, batch, ctx, s, copies)
  qs = [jax.random.normal(jax.random.fold_in(key, 1000 + i),
                          (batch, s.num_heads, s.head_dim), s.dtype)
        for i in range(n)]
  row = {"batch": batch, "context": ctx, "bytes": nbytes, "unroll": n,
         "kv_sets": copies}
  for name, fn in impls.items():
    try:
      med, best = time_program(functools.partial(_reorder, fn), qs, tables,
                               (k, v, lengths), s.reps)
      row[name] = {"us": med * 1e6, "us_min": best * 1e6,
                   "GBps": nbytes / med / 1e9}
    except Exception as e:  # noqa: BLE001 - report, keep going
      row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  del k, v, qs
  return row


def _reorder(fn, q, k, v, lengths, table):
  return fn(q, k, v, table, lengths)


def decode_impls(s: Setup, **knobs) -> dict:
  kernel = functools.partial(_kernel_call, interpret=s.interpret, **knobs)
  impls = {"kernel": kernel,
           "xla_reference": _reference_call}
  op = _compat.reference_paged_attention_op()
  if op is not None and not knobs:
    impls["jax_op"] = functools.partial(_jax_op_call, op=op,
                                        interpret=s.interpret)
  return impls


def _kernel_call(q, k, v, tables, lengths, **kw):
  return kp.paged_attention(q, k, v, tables, lengths, **kw)


def _reference_call(q, k, v, tables, lengths):
  return kp.paged_attention_reference(q, k, v, tables, lengths)


def _jax_op_call(q, k, v, tables, lengths, *, op, interpret):
  """JAX's op with its default knobs; it has no sm_scale: scale q first."""
  pages = tables.shape[1]
  k_splits = 16 if pages % 16 == 0 else 1
  q = (q * (1.0 / math.sqrt(q.shape[-1]))).astype(q.dtype)
  return op(q, k, v, tables, lengths, k_splits=k_splits, interpret=interpret)


def time_ragged(s: Setup, key) -> list[dict]:
  """Ragged kernel on a pure-decode batch and on prefill chunks + decodes."""
  rows = []
  ctx = 2048 if not s.interpret else 64
  cases = {
      "ragged pure decode 64x2048" if not s.interpret else "ragged decode":
          ([1] * (64 if not s.interpret else 2),),
      "ragged 4x512 prefill + 60 decodes @2048" if not s.interpret else
      "ragged mixed": ([512 if not s.interpret else 16] * 4
                       + [1] * (60 if not s.interpret else 2),),
  }
  item = jnp.dtype(s.dtype).itemsize
  for name, (q_lens,) in cases.items():
    nseq = len(q_lens)
    k, v, (tables,), _ = make_decode_inputs(key, nseq, ctx, s, 1)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kv_lens = jnp.full((nseq,), ctx, jnp.int32)
    tokens = int(sum(q_lens))
    qs = [jax.random.normal(jax.random.fold_in(key, 7 + i),
                            (tokens, s.num_heads, s.head_dim), s.dtype)
          for i in range(3 if not s.interpret else 1)]
    nbytes = (2 * nseq * ctx * s.num_kv_heads * s.head_dim * item +
              2 * tokens * s.num_heads * s.head_dim * item)

    def call(q, k, v, kv_lens, cu, tables, nseq=nseq):
      return kp.ragged_paged_attention(q, k, v, tables, kv_lens, cu, nseq,
                                       interpret=s.interpret)

    try:
      med, best = time_program(call, qs, [tables], (k, v, kv_lens, cu),
                               s.reps)
      rows.append({"case": name, "tokens": tokens, "seqs": nseq,
                   "us": med * 1e6, "us_min": best * 1e6,
                   "GBps_kv_once": nbytes / med / 1e9})
    except Exception as e:  # noqa: BLE001
      rows.append({"case": name, "error": f"{type(e).__name__}: {e}"[:300]})
  return rows


def tune(s: Setup, key, deadline: float) -> list[dict]:
  results = []
  for batch, ctx in s.tune_sizes:
    for knobs in s.tune_grid:
      if time.time() > deadline:
        print("  tuning stopped: time budget reached", flush=True)
        return results
      impls = {"kernel": functools.partial(_kernel_call,
                                           interpret=s.interpret, **knobs)}
      row = time_decode(batch, ctx, s, impls, key)
      results.append({"batch": batch, "context": ctx, "knobs": knobs,
                      **row["kernel"]})
      r = row["kernel"]
      print(f"  B={batch:<3d} ctx={ctx:<5d} {knobs} -> "
            f"{r.get('us', float('nan')):9.1f} us "
            f"{r.get('GBps', float('nan')):7.0f} GB/s", flush=True)
  return results


# -------------------------------------------------------------------- main
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true",
                  help="tiny sizes in interpret mode (CPU)")
  ap.add_argument("--no-tune", action="store_true", help="skip the sweep")
  ap.add_argument("--budget-s", type=float, default=420.0,
                  help="stop optional work after this many seconds")
  ap.add_argument("--out", default=None,
                  help="JSON path (default $OUT/kernel_gpu.json, else "
                  "benchmarks/results/kernel_gpu[_smoke].json)")
  ap.add_argument("--seed", type=int, default=None)
  args = ap.parse_args(argv)
  t_start = time.time()
  s = SMOKE if args.smoke else GPU
  if not args.smoke and not _compat.on_gpu():
    print("no GPU backend: run with --smoke on the CPU", file=sys.stderr)
    return 2
  seed = args.seed if args.seed is not None else int.from_bytes(
      os.urandom(4), "little")
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "devices": [str(d) for d in jax.devices()],
         "device_kind": jax.devices()[0].device_kind,
         "python": platform.python_version(), "seed": seed,
         "setup": dataclasses.asdict(s)}
  print(f"jax {env['jax']} on {env['device_kind']} ({env['backend']}), "
        f"seed {seed}", flush=True)

  print("1. correctness on fresh random inputs", flush=True)
  checks = correctness(s, seed)
  all_ok = all(c["ok"] for c in checks if "baseline" not in c["check"])

  print("2. copy bandwidth", flush=True)
  copy = copy_bandwidth(s)
  print(f"  {copy['GBps']:.0f} GB/s (read + write of "
        f"{copy['bytes_moved'] / 2**30:.2f} GiB)", flush=True)

  print("3. decode timings", flush=True)
  key = jax.random.key(seed)
  rows = []
  for batch in s.batches:
    for ctx in s.contexts:
      row = time_decode(batch, ctx, s, decode_impls(s), key)
      rows.append(row)
      print("  " + _row_text(row, copy["GBps"]), flush=True)

  print("4. ragged kernel", flush=True)
  ragged = time_ragged(s, key)
  for r in ragged:
    print(f"  {r}", flush=True)

  tuning = []
  if not args.no_tune:
    print("5. tuning sweep (kernel knobs)", flush=True)
    tuning = tune(s, key, t_start + args.budget_s)

  targets = evaluate_targets(rows, copy, s)
  result = {"env": env, "correctness": checks, "correct": all_ok,
            "copy_bandwidth": copy, "decode": rows, "ragged": ragged,
            "tuning": tuning, "targets": targets,
            "seconds": time.time() - t_start}
  path = _out_path(args)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1, default=str))

  print()
  print(_table(rows, copy["GBps"], tuning))
  print(f"correctness: {'PASS' if all_ok else 'FAIL'}; targets: {targets}")
  print(f"wrote {path} in {time.time() - t_start:.0f} s")
  return 0 if all_ok else 1


def evaluate_targets(rows, copy, s: Setup) -> dict:
  out = {}
  for r in rows:
    if (r["batch"], r["context"]) == (64, 2048) and "us" in r["kernel"]:
      frac = r["kernel"]["GBps"] / copy["GBps"]
      out["bw_fraction_64x2048"] = round(frac, 3)
      out["bw_target_0.8_met"] = frac >= 0.8
  faster = [("us" in r["kernel"] and "us" in r["xla_reference"]
             and r["kernel"]["us"] < r["xla_reference"]["us"]) for r in rows]
  out["faster_than_xla_everywhere"] = bool(rows) and all(faster)
  if s.interpret:
    out["note"] = "interpret mode on CPU: timings are not meaningful"
  return out


def _fmt(r, key="us"):
  if "error" in r:
    return "error"
  return f"{r[key]:.1f}"


def _row_text(row, copy_gbps):
  k = row["kernel"]
  parts = [f"B={row['batch']:<3d} ctx={row['context']:<5d}",
           f"kernel {_fmt(k)} us"]
  if "GBps" in k:
    parts.append(f"{k['GBps']:.0f} GB/s ({100 * k['GBps'] / copy_gbps:.0f}%"
                 " of copy)")
  parts.append(f"xla {_fmt(row['xla_reference'])} us")
  if "jax_op" in row:
    parts.append(f"jax_op {_fmt(row['jax_op'])} us")
  return " | ".join(parts)


def _table(rows, copy_gbps, tuning) -> str:
  best = {}
  for t in tuning:
    key = (t["batch"], t["context"])
    if "us" in t and (key not in best or t["us"] < best[key]["us"]):
      best[key] = t
  head = ("| batch | context | kernel us | GB/s | % copy BW | XLA ref us | "
          "jax op us | kernel vs XLA | best tuned us (knobs) |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    k, x = r["kernel"], r["xla_reference"]
    j = r.get("jax_op", {"error": "n/a"})
    speed = (f"{x['us'] / k['us']:.2f}x" if "us" in k and "us" in x else "-")
    gb = f"{k['GBps']:.0f}" if "GBps" in k else "-"
    pct = f"{100 * k['GBps'] / copy_gbps:.0f}%" if "GBps" in k else "-"
    b = best.get((r["batch"], r["context"]))
    tuned = f"{b['us']:.1f} ({_knob_text(b['knobs'])})" if b else "-"
    lines.append(f"| {r['batch']} | {r['context']} | {_fmt(k)} | {gb} | "
                 f"{pct} | {_fmt(x)} | {_fmt(j)} | {speed} | {tuned} |")
  lines.append(f"\ncopy bandwidth (read + write): {copy_gbps:.0f} GB/s")
  return "\n".join(lines)


def _knob_text(knobs: dict) -> str:
  short = {"pages_per_compute_block": "p", "num_warps": "w",
           "num_stages": "s", "num_splits": "splits="}
  return ",".join(f"{short[k]}{v}" if k == "num_splits" else f"{v}{short[k]}"
                  for k, v in knobs.items())


def _out_path(args) -> Path:
  if args.out:
    return Path(args.out)
  name = "kernel_gpu_smoke.json" if args.smoke else "kernel_gpu.json"
  if os.environ.get("OUT"):
    return Path(os.environ["OUT"]) / name
  return Path(__file__).resolve().parent / "results" / name


if __name__ == "__main__":
  sys.exit(main())
