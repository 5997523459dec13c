"""Time per call of the CPU matmul kernels over dense packed, 2:4 and bitmask float32 weights.

For each weight shape ``K x N`` and row count ``M``: the dense kernel over weights packed by
``jaxserve.weights.PackedDense`` (``packed_matmul``), ``nm_matmul`` over a 2:4 weight (the 2 largest of every 4)
and ``bitmask_matmul`` over random 50% and 70% unstructured weights, each one jitted call timed
with ``block_until_ready`` (dispatch included: about 5 us here), the median of ``--calls`` calls
after two warm-ups, in two orders: "hot", one kernel's calls in a row (its weights stay in L2
where they fit: 2 MB a core here), and "rotating", one call of each kernel in turn (each reads its
weights from L3, as a layer does in a model step); with one thread and with XLA's pool (``--threads``).
Speedup = dense time / sparse time. Output: a
table and ``benchmarks/results/sparse_matmul_cpu.json`` (with the CPU model and the load average
before and after).

With ``--baseline-rev REV`` the 2:4 kernel of another revision (its ``csrc/sparse_matmul_cpu.cc``
and headers, built here and registered under another name) is timed alongside, as "2:4 REV", in the
same rotation: an A/B of a kernel change in one process.

  python benchmarks/sparse_matmul_cpu.py [--threads 1,0] [--calls 300] [--shapes 512x512,4096x4096]
      [--rows 1,8,64,256] [--baseline-rev REV]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import cpu_model, file_at, isa  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = ((512, 512), (512, 1408), (1408, 512))
ROWS = (1, 8, 64, 256)


def time_calls(calls: dict, rounds: int, rotate: bool) -> dict:
  """Median seconds per call of each ``name: (jitted fn, args)`` over ``rounds`` calls after two
  warm-ups. ``rotate``: one call of each kernel per round (in rotating order), so that each reads
  its weights after the others have pushed them out of L2, as in a model step; else all calls of
  one kernel in a row (its weights stay in L2 when they fit)."""
  names = list(calls)
  times = {name: [] for name in names}

  def call(name, keep):
    fn, args = calls[name]
    t0 = time.perf_counter()
    fn(*args).block_until_ready()
    if keep:
      times[name].append(time.perf_counter() - t0)

  if rotate:
    for r in range(rounds + 2):
      for name in names[r % len(names):] + names[:r % len(names)]:
        call(name, r >= 2)
  else:
    for name in names:
      for r in range(rounds + 2):
        call(name, r >= 2)
  return {name: float(np.median(t)) for name, t in times.items()}


def build_baseline(rev: str, tmp: str) -> str:
  """Builds the N:M kernel of git revision ``rev`` alone; returns the FFI target it is registered as."""
  import jax
  from jaxserve.engine import _cpu_kernels as ck
  src_dir = Path(tmp) / "csrc"
  src_dir.mkdir()
  for name in ("sparse_matmul_cpu.cc", "parallel.h", "valid_rows.h"):
    (src_dir / name).write_bytes(file_at(rev, f"jaxserve/engine/csrc/{name}"))
  lib_path = os.path.join(tmp, "baseline_sparse_matmul.so")
  cmd = [ck._compiler(), *ck._compile_flags(), "-I", str(src_dir), "-I", jax.ffi.include_dir(),
         str(src_dir / "sparse_matmul_cpu.cc"), "-o", lib_path]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(f"building the N:M kernel of {rev} failed:\n{proc.stderr[-2000:]}")
  target = "baseline_nm_matmul_cpu"
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(lib_path).JaxserveNmMatmulCpu),
                              platform="cpu")
  return target


def baseline_nm_matmul(target: str, n_out: int, threads: int):
  """A jitted 2:4 ``nm_matmul`` of ``x, values, meta`` through another build's registered ``target``."""
  import jax
  import jax.numpy as jnp

  def call(x, values, meta):
    out = jax.ShapeDtypeStruct((x.shape[0], n_out), jnp.float32)
    return jax.ffi.ffi_call(target, out)(x, values, meta, jnp.full((1,), x.shape[0], jnp.int32), n=np.int64(2),
                                         m=np.int64(4), num_threads=np.int64(threads))
  return jax.jit(call)


def make_kernels(w: np.ndarray, rng: np.random.Generator, threads: int, baseline: tuple[str, str] | None = None
                 ) -> dict:
  """``name: (jitted fn of x and the weights, weights, weight bytes)`` for the dense and sparse kernels."""
  import jax
  import jax.numpy as jnp
  from jaxserve.engine import _cpu_kernels as ck

  from jaxserve.weights import BitmaskSparse, NMSparse, PackedDense

  k, n_out = w.shape
  packed = PackedDense.pack(jnp.asarray(w)).panels.reshape(k, n_out)
  top2 = np.argsort(-np.abs(w.reshape(k // 4, 4, n_out)), axis=1)[:, :2]  # the 2 largest of every 4
  keep = np.zeros((k // 4, 4, n_out), bool)
  np.put_along_axis(keep, top2, True, axis=1)
  nm = NMSparse.compress(w, keep.reshape(k, n_out), n=2, m=4)
  values, meta = nm.values, nm.meta
  kernels = {
      "dense": (jax.jit(lambda x, p: ck.packed_matmul(x, p, num_threads=threads)), (packed,), k * n_out * 4),
      "2:4": (jax.jit(lambda x, v, mt: ck.nm_matmul(x, v, mt, n=2, m=4, n_out=n_out, num_threads=threads)),
              (values, meta), values.nbytes + meta.nbytes),
  }
  if baseline is not None:
    rev, target = baseline
    kernels[f"2:4 {rev}"] = (baseline_nm_matmul(target, n_out, threads), (values, meta), values.nbytes + meta.nbytes)
  for sparsity in (0.5, 0.7):
    bm = BitmaskSparse.compress(w, rng.random(w.shape) >= sparsity)
    weights = (bm.bits, bm.values, bm.offsets)
    kernels[f"bitmask {sparsity:.0%}"] = (
        jax.jit(lambda x, b, v, o: ck.bitmask_matmul(x, b, v, o, n_out=n_out, num_threads=threads)), weights,
        sum(a.nbytes for a in weights))
  return kernels


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--threads", default="1,0", help="num_threads settings, comma-separated (0: XLA's pool)")
  ap.add_argument("--calls", type=int, default=300)
  ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="weight shapes KxN, comma-separated")
  ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="row counts M, comma-separated")
  ap.add_argument("--baseline-rev", default=None, help="a git revision whose 2:4 kernel is timed alongside")
  ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparse_matmul_cpu.json"))
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  from jaxserve.engine import _cpu_kernels

  if not _cpu_kernels.available():
    raise SystemExit(f"the CPU kernels did not build: {_cpu_kernels._state.get('error')}")
  shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
  row_counts = [int(m) for m in args.rows.split(",")]
  tmp = tempfile.TemporaryDirectory()
  baseline = (args.baseline_rev, build_baseline(args.baseline_rev, tmp.name)) if args.baseline_rev else None
  load_before = os.getloadavg()
  rows_out = []
  print("us per call (speedup over dense); hot: one kernel's calls in a row, rotating: the kernels in turn")
  for threads in map(int, args.threads.split(",")):
    rng = np.random.default_rng(0)
    for k, n_out in shapes:
      kernels = make_kernels(rng.standard_normal((k, n_out)).astype(np.float32), rng, threads, baseline)
      for m in row_counts:
        x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
        calls = {name: (fn, (x, *weights)) for name, (fn, weights, _) in kernels.items()}
        for mode in ("hot", "rotating"):
          us = {name: sec * 1e6 for name, sec in time_calls(calls, args.calls, mode == "rotating").items()}
          speedup = {name: us["dense"] / t for name, t in us.items() if name != "dense"}
          rows_out.append({"threads": threads, "K": k, "N": n_out, "M": m, "mode": mode, "us": us, "speedup": speedup,
                           "weight_bytes": {name: int(b) for name, (_, _, b) in kernels.items()}})
          print(f"threads={threads} {k:>4} x {n_out:<4} M={m:<3} {mode:<8} " + "  ".join(
              f"{name} {t:6.1f}" + (f" ({speedup[name]:.2f}x)" if name != "dense" else "") for name, t in us.items()),
              flush=True)

  result = {
      "command": "python benchmarks/sparse_matmul_cpu.py " + " ".join(sys.argv[1:]),
      "cpu": cpu_model(), "isa": isa(), "cores": os.cpu_count(), "calls": args.calls, "baseline_rev": args.baseline_rev,
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "jax": jax.__version__,
      "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows_out,
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
