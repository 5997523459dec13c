"""The sampler program on the CPU: milliseconds per call for top-k/top-p/min-p sampling, against a baseline revision.

Times ``jaxserve.engine._sampler.sample`` (the program a step with sampled rows runs after the model)
at several row counts and vocabulary sizes, every row sampling with temperature 0.8 and the settings
of each case, median of ``--reps`` calls. With ``--baseline-rev REV`` the same cases run, in the same
process, on that revision's ``_sampler.py``, and the sampled tokens of both are compared.

  python benchmarks/sampler_cpu.py [--rows 8,32,128,256] [--vocab 8192,32000] [--reps 20]
                                   [--baseline-rev REV] [--smoke] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._machine import file_at, git_commit, machine, write_results  # noqa: E402

CASES = {  # name -> (top_k or 0 for none, top_p, min_p)
    "top-p 0.9": (0, 0.9, 0.0),
    "top-k 50, top-p 0.9": (50, 0.9, 0.0),
    "min-p 0.05": (0, 1.0, 0.05),
}


def _load_baseline(rev: str, tmp: str):
  path = os.path.join(tmp, "baseline_sampler.py")
  Path(path).write_bytes(file_at(rev, "jaxserve/engine/_sampler.py"))
  spec = importlib.util.spec_from_file_location("baseline_sampler", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
  spec.loader.exec_module(mod)
  return mod


def _tensors(mod, rows: int, vocab: int, case: tuple[int, float, float]):
  top_k, top_p, min_p = case
  spec = mod.sampling_tensors_spec(rows, vocab, mod.SamplerConfig(vocab_arrays=False))
  vals = dict(row_index=np.arange(rows, dtype=np.int32), temperature=np.full(rows, 0.8, np.float32),
              top_k=np.full(rows, top_k or vocab, np.int32), top_p=np.full(rows, top_p, np.float32),
              min_p=np.full(rows, min_p, np.float32), logprobs=np.asarray(False),
              seed=np.stack([np.arange(rows), np.full(rows, 7)], 1).astype(np.uint32),
              counter=np.zeros((rows, 2), np.int32))
  return spec._replace(**{name: vals.get(name, None) for name in spec._fields})


def time_sampler(mod, rows: int, vocab: int, case, reps: int) -> tuple[float, np.ndarray]:
  import jax
  import jax.numpy as jnp
  cfg = mod.SamplerConfig(vocab_arrays=False)
  logits = jnp.asarray(np.random.default_rng(rows + vocab).standard_normal((rows, vocab)).astype(np.float32) * 3)
  t = _tensors(mod, rows, vocab, case)
  fn = jax.jit(lambda x, tensors: mod.sample(x, tensors, cfg))
  tokens = np.asarray(fn(logits, t).tokens)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(logits, t))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3, tokens


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", default="8,32,128,256")
  ap.add_argument("--vocab", default="8192,32000")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--baseline-rev", default=None, help="a git revision whose _sampler.py is the baseline")
  ap.add_argument("--smoke", action="store_true", help="tiny sizes and 2 reps: checks that the script runs")
  ap.add_argument("--out", default=None, help="default: benchmarks/results/sampler_cpu.json")
  args = ap.parse_args()
  if args.smoke:
    args.rows, args.vocab, args.reps = "3,8", "512", 2
  rows, vocabs = [int(r) for r in args.rows.split(",")], [int(v) for v in args.vocab.split(",")]
  out = args.out or str(ROOT / "benchmarks" / "results" / "sampler_cpu.json")
  from jaxserve.engine import _sampler as current
  res = dict(machine=machine(), commit=git_commit(), baseline_rev=args.baseline_rev, reps=args.reps,
             temperature=0.8, rows=[])
  with tempfile.TemporaryDirectory() as tmp:
    baseline = _load_baseline(args.baseline_rev, tmp) if args.baseline_rev else None
    print(f"{'case':22s} {'rows':>5s} {'vocab':>6s} {'ms':>9s}" + (f" {'baseline':>9s} {'speedup':>8s} same"
                                                                     if baseline else ""))
    for vocab in vocabs:
      for name, case in CASES.items():
        for r in rows:
          ms, tokens = time_sampler(current, r, vocab, case, args.reps)
          row = dict(case=name, rows=r, vocab=vocab, ms=ms)
          line = f"{name:22s} {r:5d} {vocab:6d} {ms:9.2f}"
          if baseline is not None:
            base_ms, base_tokens = time_sampler(baseline, r, vocab, case, args.reps)
            same = int(np.sum(tokens == base_tokens))
            row.update(baseline_ms=base_ms, speedup=base_ms / ms, same_tokens=same)
            line += f" {base_ms:9.2f} {base_ms / ms:7.2f}x {same}/{r}"
          res["rows"].append(row)
          print(line, flush=True)
  write_results(out, res)


if __name__ == "__main__":
  main()
