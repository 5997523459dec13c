"""GPU benchmark of the N:M sparse decode matmul: check, then time vs dense and cuSPARSELt.

Steps (one process, one device):
  1. Correctness on fresh random N:M weights (seed printed): the kernel's
     output, its buffer poisoned (NaN) before the run, vs a dense float32
     reference of the same bfloat16 weight (XLA), for every shape; in smoke
     mode also vs a float64 NumPy oracle and for the 1:4 and 4:8 patterns.
  2. Copy bandwidth of the card (one large read + write, bytes counted twice).
  3. Timings for LLaMA-7B projections, K x N = 4096x4096, 4096x11008,
     11008x4096, batch 1, 8, 64, bfloat16, 2:4, panels of 128 lanes:
     dense XLA `x @ W`, this kernel, and, when torch sees a CUDA GPU, torch's
     dense `F.linear` and `to_sparse_semi_structured` (cuSPARSELt) weight.
     Per case: median time, achieved bandwidth = weight bytes the method must
     read (dense, compressed values + meta, or torch's packed storage) / time,
     and speedup vs dense XLA; the kernel's and torch's outputs of the timed
     inputs are checked against the dense float32 reference in the same run.
  4. A budgeted sweep of the kernel's knobs at three sizes (skip: --no-tune).

Timing: each JAX measurement is one jitted program of `n` calls, each with its
own x and its own copy of the weight (so nothing stays in the 60 MB L2 and XLA
cannot merge dots sharing an operand), run `reps` times after a warm-up; the
median program time over `n` is reported. Torch captures the same `n` calls in
a CUDA graph (eager loop if capture fails) and times replays with CUDA events.

  python benchmarks/sparse_gpu.py                 # GPU (H100/H200), ~5 min
  python benchmarks/sparse_gpu.py --smoke         # tiny, interpret mode, CPU

Writes JSON to --out, else $OUT/sparse_gpu.json when $OUT is set, else
benchmarks/results/sparse_gpu.json (smoke mode: a temporary file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Leave GPU memory to torch, which runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels_pallas as kp  # noqa: E402
from kernels_pallas import _compat  # noqa: E402
from kernels_pallas import sparse_matmul  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """Problem sizes and timing effort of one benchmark run."""

  shapes: tuple[tuple[int, int], ...]  # (K, N)
  batches: tuple[int, ...]
  n: int
  m: int
  panel: int
  dtype: str
  interpret: bool
  copy_bytes: int
  program_bytes: int  # weight bytes one timed program streams, about
  min_calls: int
  max_calls: int
  reps: int
  tune_cases: tuple[tuple[int, int, int], ...]  # (K, N, batch)
  tune_grid: tuple[dict, ...]


GPU = Setup(
    shapes=((4096, 4096), (4096, 11008), (11008, 4096)), batches=(1, 8, 64),
    n=2, m=4, panel=128, dtype="bfloat16", interpret=False,
    copy_bytes=2 << 30, program_bytes=1 << 30, min_calls=8, max_calls=48,
    reps=15,
    tune_cases=((4096, 4096, 1), (4096, 11008, 8), (11008, 4096, 64)),
    tune_grid=tuple(dict(block_k=k, block_n=b, num_warps=w)
                    for k in (128, 256, 512) for b in (32, 64, 128)
                    for w in (4, 8))
    + tuple(dict(num_splits=s) for s in (1, 2, 4, 8, 16))
    + tuple(dict(num_stages=s) for s in (2, 4)),
)
SMOKE = Setup(
    shapes=((64, 80),), batches=(1, 3), n=2, m=4, panel=32,
    dtype="bfloat16", interpret=True, copy_bytes=8 << 20, program_bytes=1,
    min_calls=2, max_calls=2, reps=2,
    tune_cases=((64, 80, 1),),
    tune_grid=(dict(block_k=32, block_n=16, num_splits=2),),
)
REL_TOL = {"float32": 1e-4, "bfloat16": 1e-2}


# ------------------------------------------------ reference packer (NumPy)
def random_nm_weight(rng: np.random.Generator, k: int, cols: int, *, n: int,
                     m: int, dropout: float = 0.0) -> np.ndarray:
  """Random float32 [K, N] with at most n nonzeros in each group of m along K.

  Exactly n where `dropout` is 0; otherwise each kept value is zeroed with
  that probability, leaving groups with fewer than n nonzeros.
  """
  w = rng.standard_normal((k // m, m, cols)).astype(np.float32)
  keep = np.argsort(rng.random(w.shape), axis=1) < n
  if dropout:
    keep &= rng.random(w.shape) >= dropout
  return (w * keep).reshape(k, cols)


def pack_nm(w: np.ndarray, *, n: int, m: int,
            panel: int) -> tuple[np.ndarray, np.ndarray]:
  """Packs dense [K, N] (at most n nonzeros per group) into (values, meta).

  An independent NumPy packer for tests and benchmarks. Each group keeps its
  nonzeros plus, if it has fewer than n, its first zero positions (value 0),
  in ascending index order; padded lanes past N get value 0, index 0 (so
  they carry duplicate indices). Layout: see `kernels_pallas.sparse_matmul`.
  """
  k, cols = w.shape
  if k % m or not 0 < n < m or panel % 16:
    raise ValueError(f"bad pattern {n}:{m} for K={k} or panel {panel}")
  bits = 2 if m <= 4 else 4
  per_word = 32 // bits
  num_panels = -(-cols // panel)
  groups = np.zeros((k // m, m, num_panels * panel), w.dtype)
  groups[:, :, :cols] = w.reshape(k // m, m, cols)
  nonzero = groups != 0
  if (nonzero.sum(axis=1) > n).any():
    raise ValueError(f"some group holds more than n = {n} nonzeros")
  rank = np.where(nonzero, 0, m) + np.arange(m)[None, :, None]
  idx = np.sort(np.argsort(rank, axis=1, kind="stable")[:, :n], axis=1)
  vals = np.take_along_axis(groups, idx, axis=1)  # [G, n, NP * P]
  idx[:, :, cols:] = 0
  slots = (k // m) * n

  def to_panels(a):  # [G, n, NP * P] -> [NP, S, P]
    return a.reshape(slots, num_panels, panel).transpose(1, 0, 2)

  idx = to_panels(idx).astype(np.uint32).reshape(num_panels, slots,
                                                 panel // per_word, per_word)
  shifts = (bits * np.arange(per_word)).astype(np.uint32)
  meta = np.bitwise_or.reduce(idx << shifts, axis=-1)
  return (np.ascontiguousarray(to_panels(vals)),
          np.ascontiguousarray(meta, dtype=np.uint32))


# ----------------------------------------------------------------- helpers
def rel_err(got, want) -> float:
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  if not np.isfinite(got).all():
    return float("nan")
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@dataclasses.dataclass
class Problem:
  """One weight in both layouts, as host arrays, plus its pattern."""

  k: int
  cols: int
  n: int
  m: int
  dense: np.ndarray  # [K, N] float32 holding values exact in `dtype`
  values: np.ndarray
  meta: np.ndarray
  dtype: str

  @property
  def compressed_bytes(self) -> int:
    item = jnp.dtype(self.dtype).itemsize
    return self.values.size * item + self.meta.size * 4

  @property
  def dense_bytes(self) -> int:
    return self.dense.size * jnp.dtype(self.dtype).itemsize


def make_problem(rng, k, cols, *, n, m, panel, dtype, dropout=0.0) -> Problem:
  w = random_nm_weight(rng, k, cols, n=n, m=m, dropout=dropout)
  w = np.asarray(jnp.asarray(w, dtype).astype(jnp.float32))  # exact in dtype
  values, meta = pack_nm(w, n=n, m=m, panel=panel)
  return Problem(k, cols, n, m, w, values, meta, dtype)


def kernel_config(p: Problem, batch: int, s: Setup, **knobs):
  """The knobs the kernel will run with (defaults filled in)."""
  return sparse_matmul.make_config(
      batch=batch, k=p.k, n_out=p.cols, panel=p.values.shape[2], n=p.n,
      m=p.m, itemsize=jnp.dtype(p.dtype).itemsize, interpret=s.interpret,
      **knobs)


def kernel_fn(p: Problem, s: Setup, **knobs):
  def call(x, values, meta):
    return kp.nm_sparse_matmul(x, values, meta, n=p.n, m=p.m, n_out=p.cols,
                               interpret=s.interpret, **knobs)
  return call


def dense_fn(x, w):
  return x @ w


def time_program(call, xs, weights, reps):
  """Median and min seconds per call of `call(xs[i], *weights[i])`."""

  @jax.jit
  def program(xs, weights):
    return [call(x, *w) for x, w in zip(xs, weights)]

  with _compat.quiet_backend_warnings():
    outs = jax.block_until_ready(program(xs, weights))  # compile + warm up
    jax.block_until_ready(program(xs, weights))
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(program(xs, weights))
      times.append(time.perf_counter() - t0)
  return statistics.median(times) / len(xs), min(times) / len(xs), outs


def num_calls(nbytes: int, s: Setup) -> int:
  return max(s.min_calls, min(s.max_calls, math.ceil(s.program_bytes / nbytes)))


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
  return {"bytes_moved": 4 * n, "seconds": t, "GBps": 4 * n / t / 1e9}


# -------------------------------------------------------------- correctness
def correctness(s: Setup, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  out = []

  def record(name, dtype, got, want, tol=None):
    err = rel_err(got, want)
    tol = REL_TOL[dtype] if tol is None else tol
    ok = bool(np.isfinite(err) and err <= tol)
    out.append({"check": name, "dtype": dtype, "rel_err": err, "tol": tol,
                "ok": ok})
    print(f"  {'ok ' if ok else 'BAD'} {name:<52s} {dtype:<8s} "
          f"rel_err={err:.2e} (tol {tol:.0e})", flush=True)

  dtypes = ("bfloat16", "float32")
  for shape_index, (k, cols) in enumerate(s.shapes):
    patterns = [(s.n, s.m)]
    if s.interpret and shape_index == 0:  # smoke: the other patterns once
      patterns += [(1, 4), (4, 8)]
    for n, m in patterns:
      for dtype in dtypes:
        p = make_problem(rng, k, cols, n=n, m=m, panel=s.panel, dtype=dtype,
                         dropout=0.1)
        batch = 5
        x = np.asarray(jnp.asarray(rng.standard_normal((batch, k)), dtype)
                       .astype(jnp.float32))
        args = (jnp.asarray(x, dtype), jnp.asarray(p.values, dtype),
                jnp.asarray(p.meta))
        got = kp.nm_sparse_matmul(*args, n=n, m=m, n_out=cols,
                                  interpret=s.interpret, poison_outputs=True)
        want = jnp.dot(jnp.asarray(x), jnp.asarray(p.dense),
                       precision=jax.lax.Precision.HIGHEST)
        record(f"kernel {k}x{cols} {n}:{m} B={batch} vs dense f32", dtype,
               got, want)
        if s.interpret:
          oracle = x.astype(np.float64) @ p.dense.astype(np.float64)
          record(f"kernel {k}x{cols} {n}:{m} vs float64 oracle", dtype, got,
                 oracle)
  return out


# ------------------------------------------------------------------- torch
def torch_status() -> tuple[object | None, str]:
  try:
    import torch  # noqa: PLC0415 - optional, GPU machines only
  except ImportError:
    return None, "torch is not installed"
  if not torch.cuda.is_available():
    return None, f"torch {torch.__version__} sees no CUDA device"
  return torch, f"torch {torch.__version__}"


def time_torch(torch, call, xs, weights, reps) -> tuple[float, float, list,
                                                        str]:
  """Median/min seconds per call of `call(xs[i], weights[i])` on the GPU."""
  def run_all():
    return [call(x, w) for x, w in zip(xs, weights)]

  side = torch.cuda.Stream()
  side.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(side):
    for _ in range(2):
      outs = run_all()
  torch.cuda.current_stream().wait_stream(side)
  torch.cuda.synchronize()
  mode = "cuda graph"
  try:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
      outs = run_all()
    replay = graph.replay
  except Exception as e:  # noqa: BLE001 - fall back to eager launches
    mode = f"eager ({type(e).__name__} in graph capture)"
    torch.cuda.synchronize()
    replay = run_all
  replay()
  torch.cuda.synchronize()
  times = []
  for _ in range(reps):
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    replay()
    end.record()
    end.synchronize()
    times.append(start.elapsed_time(end) / 1e3)
  torch.cuda.synchronize()
  if mode != "cuda graph":
    outs = run_all()
  return (statistics.median(times) / len(xs), min(times) / len(xs), outs,
          mode)


def torch_columns(torch, p: Problem, xs_np, reps) -> dict:
  """Torch dense and cuSPARSELt timings and checks for one case."""
  from torch.sparse import to_sparse_semi_structured  # noqa: PLC0415
  f = torch.nn.functional.linear
  w_nk = torch.from_numpy(np.ascontiguousarray(p.dense.T)).to(
      "cuda", torch.bfloat16)
  xs = [torch.from_numpy(x).to("cuda", torch.bfloat16) for x in xs_np]
  want = checked_outputs(p, xs_np)
  cols = {}
  dense_ws = [w_nk.clone() for _ in xs]
  cols["torch_dense"] = _torch_case(torch, f, xs, dense_ws, want, reps,
                                    p.dense_bytes)
  del dense_ws
  try:
    sparse_ws = [to_sparse_semi_structured(w_nk.clone()) for _ in xs]
  except Exception as e:  # noqa: BLE001 - report, keep going
    cols["torch_sparse"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return cols
  w0 = sparse_ws[0]
  stored = sum(t.numel() * t.element_size() for name in
               ("packed", "meta", "packed_t", "meta_t")
               if isinstance(t := getattr(w0, name, None), torch.Tensor))
  read = sum(t.numel() * t.element_size() for name in ("packed", "meta")
             if isinstance(t := getattr(w0, name, None), torch.Tensor))
  cols["torch_sparse"] = _torch_case(torch, f, xs, sparse_ws, want, reps,
                                     read)
  cols["torch_sparse"].update(backend=type(w0).__name__,
                              stored_bytes=stored)
  return cols


def _torch_case(torch, f, xs, ws, want, reps, nbytes) -> dict:
  try:
    med, best, outs, mode = time_torch(torch, f, xs, ws, reps)
  except Exception as e:  # noqa: BLE001 - report, keep going
    return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  err = max(rel_err(outs[i].float().cpu().numpy(), w)
            for i, w in want.items())
  return {"us": med * 1e6, "us_min": best * 1e6, "GBps": nbytes / med / 1e9,
          "weight_bytes": nbytes, "rel_err": err, "timing": mode,
          "ok": bool(np.isfinite(err) and err <= REL_TOL["bfloat16"])}


# ------------------------------------------------------------------ timing
def checked_outputs(p: Problem, xs_np) -> dict[int, np.ndarray]:
  """Float32 NumPy `x @ W` of the first and last timed call (checked)."""
  return {i: xs_np[i] @ p.dense for i in sorted({0, len(xs_np) - 1})}


def time_case(p: Problem, batch: int, s: Setup, rng, torch, knobs=None,
              dense: bool = True) -> dict:
  calls = num_calls(p.compressed_bytes, s)
  dtype = s.dtype
  xs_np = [np.asarray(jnp.asarray(rng.standard_normal((batch, p.k)), dtype)
                      .astype(jnp.float32)) for _ in range(calls)]
  xs = [jnp.asarray(x, dtype) for x in xs_np]
  row = {"K": p.k, "N": p.cols, "batch": batch, "calls": calls,
         "weight_bytes": {"dense": p.dense_bytes,
                          "kernel": p.compressed_bytes}}
  want = checked_outputs(p, xs_np)
  # Separate device buffers per call: jnp.array copies each time.
  sparse_ws = [(jnp.array(p.values, dtype), jnp.array(p.meta))
               for _ in range(calls)]
  row["kernel"] = _jax_case(kernel_fn(p, s, **(knobs or {})), xs, sparse_ws,
                            want, s.reps, p.compressed_bytes)
  cfg = kernel_config(p, batch, s, **(knobs or {}))
  row["kernel"]["config"] = cfg._asdict()
  del sparse_ws
  if dense:
    dense_ws = [(jnp.array(p.dense, dtype),) for _ in range(calls)]
    row["dense_xla"] = _jax_case(dense_fn, xs, dense_ws, want, s.reps,
                                 p.dense_bytes)
    del dense_ws
    if torch is not None:
      row.update(torch_columns(torch, p, xs_np, s.reps))
    d = row["dense_xla"]
    for name in ("kernel", "torch_sparse"):
      r = row.get(name, {})
      if "us" in r and "us" in d:
        r["speedup_vs_dense_xla"] = d["us"] / r["us"]
  return row


def _jax_case(call, xs, weights, want, reps, nbytes) -> dict:
  try:
    med, best, outs = time_program(call, xs, weights, reps)
  except Exception as e:  # noqa: BLE001 - report, keep going
    return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  err = max(rel_err(outs[i], w) for i, w in want.items())
  return {"us": med * 1e6, "us_min": best * 1e6, "GBps": nbytes / med / 1e9,
          "rel_err": err,
          "ok": bool(np.isfinite(err) and err <= REL_TOL["bfloat16"])}


def tune(s: Setup, rng, deadline: float) -> list[dict]:
  results = []
  for k, cols, batch in s.tune_cases:
    p = make_problem(rng, k, cols, n=s.n, m=s.m, panel=s.panel, dtype=s.dtype)
    for knobs in s.tune_grid:
      if time.time() > deadline:
        print("  tuning stopped: time budget reached", flush=True)
        return results
      cfg = kernel_config(p, batch, s, **knobs)
      smem = sparse_matmul.shared_memory_estimate(
          n=p.n, m=p.m, block_k=cfg.block_k, block_n=cfg.block_n,
          block_b=cfg.block_b, num_stages=cfg.num_stages,
          itemsize=jnp.dtype(p.dtype).itemsize)
      if not s.interpret and smem > sparse_matmul.SHARED_LIMIT:
        results.append({"K": k, "N": cols, "batch": batch, "knobs": knobs,
                        "skipped": f"estimated shared memory {smem} B"})
        continue
      r = time_case(p, batch, s, rng, None, knobs=knobs, dense=False)["kernel"]
      results.append({"K": k, "N": cols, "batch": batch, "knobs": knobs, **r})
      print(f"  {k}x{cols} B={batch:<3d} {knobs} -> "
            f"{r.get('us', float('nan')):8.1f} us "
            f"{r.get('GBps', float('nan')):6.0f} GB/s "
            f"{r.get('error', '')[:80]}", flush=True)
  return results


# -------------------------------------------------------------------- main
def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true",
                  help="tiny sizes in interpret mode (CPU)")
  ap.add_argument("--no-tune", action="store_true", help="skip the sweep")
  ap.add_argument("--budget-s", type=float, default=300.0,
                  help="start no sweep point after this many seconds")
  ap.add_argument("--out", default=None, help="JSON path (see the docstring)")
  ap.add_argument("--seed", type=int, default=None)
  args = ap.parse_args(argv)
  t_start = time.time()
  s = SMOKE if args.smoke else GPU
  if not args.smoke and not _compat.on_gpu():
    print("no GPU backend: run with --smoke on the CPU", file=sys.stderr)
    return 2
  seed = args.seed if args.seed is not None else int.from_bytes(
      os.urandom(4), "little")
  torch, torch_note = torch_status()
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "device_kind": jax.devices()[0].device_kind,
         "python": platform.python_version(), "seed": seed,
         "torch": torch_note, "setup": dataclasses.asdict(s)}
  print(f"jax {env['jax']} on {env['device_kind']} ({env['backend']}), "
        f"seed {seed}; {torch_note}", flush=True)

  print("1. correctness on fresh random inputs", flush=True)
  checks = correctness(s, seed)

  print("2. copy bandwidth", flush=True)
  copy = copy_bandwidth(s)
  print(f"  {copy['GBps']:.0f} GB/s (read + write of "
        f"{copy['bytes_moved'] / 2**30:.2f} GiB)", flush=True)

  print(f"3. timings ({s.n}:{s.m}, {s.dtype}, panel {s.panel})", flush=True)
  rng = np.random.default_rng(seed + 1)
  rows = []
  for k, cols in s.shapes:
    p = make_problem(rng, k, cols, n=s.n, m=s.m, panel=s.panel, dtype=s.dtype)
    for batch in s.batches:
      row = time_case(p, batch, s, rng, torch)
      if torch is None:
        row["torch_sparse"] = {"skipped": torch_note}
      rows.append(row)
      print("  " + _row_text(row), flush=True)

  tuning = []
  if not args.no_tune:
    print("4. tuning sweep (kernel knobs)", flush=True)
    tuning = tune(s, rng, t_start + args.budget_s)

  timed_ok = all(r["kernel"].get("ok", False) for r in rows)
  all_ok = all(c["ok"] for c in checks) and timed_ok
  result = {"env": env, "correctness": checks, "correct": all_ok,
            "copy_bandwidth": copy, "cases": rows, "tuning": tuning,
            "seconds": time.time() - t_start}
  if s.interpret:
    result["note"] = "interpret mode on CPU: timings are not meaningful"
  path = _out_path(args)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1, default=str))
  print()
  print(_table(rows, copy["GBps"]))
  print(f"correctness: {'PASS' if all_ok else 'FAIL'}")
  print(f"wrote {path} in {time.time() - t_start:.0f} s")
  return 0 if all_ok else 1


def _fmt(r: dict, key: str = "us", spec: str = ".1f", unit: str = "") -> str:
  if "skipped" in r:
    return "skipped"
  if key not in r:
    return "error" if "error" in r else "-"
  return format(r[key], spec) + unit


def _row_text(row: dict) -> str:
  parts = [f"{row['K']}x{row['N']} B={row['batch']:<3d}",
           f"kernel {_fmt(row['kernel'], unit=' us')} "
           f"({_fmt(row['kernel'], 'GBps', '.0f', ' GB/s')})",
           f"dense {_fmt(row['dense_xla'], unit=' us')}",
           f"cuSPARSELt {_fmt(row.get('torch_sparse', {}), unit=' us')}"]
  if "error" in row["kernel"]:
    parts.append(row["kernel"]["error"][:200])
  return " | ".join(parts)


def _table(rows, copy_gbps) -> str:
  head = ("| K x N | batch | dense XLA us | kernel us | kernel GB/s | "
          "% copy BW | kernel vs dense | torch dense us | cuSPARSELt us | "
          "cuSPARSELt vs dense XLA | kernel rel err |")
  lines = [head, "|" + "---|" * 11]
  for r in rows:
    k, d = r["kernel"], r["dense_xla"]
    td, ts = r.get("torch_dense", {}), r.get("torch_sparse", {})
    pct = f"{100 * k['GBps'] / copy_gbps:.0f}%" if "GBps" in k else "-"
    lines.append(
        f"| {r['K']}x{r['N']} | {r['batch']} | {_fmt(d)} | {_fmt(k)} | "
        f"{_fmt(k, 'GBps', '.0f')} | {pct} | "
        f"{_fmt(k, 'speedup_vs_dense_xla', '.2f', 'x')} | {_fmt(td)} | "
        f"{_fmt(ts)} | {_fmt(ts, 'speedup_vs_dense_xla', '.2f', 'x')} | "
        f"{_fmt(k, 'rel_err', '.1e')} |")
  lines.append(f"\ncopy bandwidth (read + write): {copy_gbps:.0f} GB/s; "
               "GB/s = weight bytes the method reads / time")
  notes = {r["torch_sparse"]["skipped"] for r in rows
           if "skipped" in r.get("torch_sparse", {})}
  for note in notes:
    lines.append(f"torch columns skipped: {note}")
  return "\n".join(lines)


def _out_path(args) -> Path:
  if args.out:
    return Path(args.out)
  if args.smoke:
    return Path(tempfile.gettempdir()) / f"sparse_gpu_smoke_{os.getpid()}.json"
  if os.environ.get("OUT"):
    return Path(os.environ["OUT"]) / "sparse_gpu.json"
  return Path(__file__).resolve().parent / "results" / "sparse_gpu.json"


if __name__ == "__main__":
  sys.exit(main())
