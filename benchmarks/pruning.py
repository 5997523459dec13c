"""Unstructured and N:M pruning of stories260K: perplexity and wall time per method, a sparsity sweep, recovery.

Protocol: calibration = 32 windows of 256 tokens sampled (seed 0) from the embedded TinyStories train
text; evaluation = the first 40 windows of 256 tokens (BOS prepended to each) of the held-out
TinyStories validation text (``--full-eval`` adds the whole file for dense and recovered models).
Recovery = 600 steps of 16 x 128 tokens of masked fine-tuning with AdamW on a cosine schedule from
2e-3 on the train text (the library's defaults); pruned weights
are checked to be exactly zero afterwards. Times are wall-clock on the machine that runs this and
include JIT compilation.

  python benchmarks/pruning.py           # table + sweep plot + recovery -> benchmarks/results/pruning.{json,png}
  python benchmarks/pruning.py --quick   # a smoke run: fewer methods and points, short recovery
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxprune import (FinetuneConfig, PruneConfig, apply_masks, exact_hessian_diagonal,  # noqa: E402
                      finetune, fisher_scores, hutchinson_diagonal, magnitude_scores, nm_incompatible, nm_masks, obd_scores, prune,
                      random_scores, sparsity, taylor_scores, topk_masks)
from jaxprune._data import batches_of, loss_fn_for, read_text, sample_windows  # noqa: E402
from jaxprune._hessian import select  # noqa: E402
from jaxprune._scores import _grad  # noqa: E402
from jaxprune._tree import leaves_with_paths  # noqa: E402
from jaxprune.eval import perplexity  # noqa: E402
from jaxserve.loaders import CALIB_TEXT, EVAL_TEXT, load_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ["magnitude", "random", "taylor", "fisher", "obd", "wanda", "sparsegpt", "obs"]
SCORE_METHODS = ("magnitude", "random", "taylor", "fisher", "obd")
TARGETS = {"50%": dict(sparsity=0.5), "2:4": dict(pattern="2:4"), "4:8": dict(pattern="4:8")}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="smoke run: 3 methods, 3 sweep points, 20 recovery steps")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--sweep", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="sparsities of the plot")
  p.add_argument("--obs-sweep", default="0.3,0.7,0.9", help="fewer points for the slow iterative OBS")
  p.add_argument("--recover", default="obs:50%,obs:2:4", help="method:target pairs to fine-tune")
  p.add_argument("--finetune-steps", type=int, default=600)
  p.add_argument("--finetune-batch-size", type=int, default=16)
  p.add_argument("--finetune-seq-len", type=int, default=128)
  p.add_argument("--finetune-lr", type=float, default=2e-3)
  p.add_argument("--distill", type=float, default=0.0, help="knowledge-distillation weight in recovery")
  p.add_argument("--num-probes", type=int, default=16, help="Hutchinson probes for OBD")
  p.add_argument("--full-eval", action="store_true", help="also evaluate dense and recovered models on the whole file")
  p.add_argument("--out", default=os.path.join(RESULTS, "pruning"))
  args = p.parse_args()
  if args.quick:
    args.methods, args.sweep, args.obs_sweep = "magnitude,wanda,sparsegpt", "0.3,0.7", ""
    args.finetune_steps, args.finetune_seq_len, args.recover = 20, 64, "sparsegpt:50%"
  return args


def _best_of(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(jax.tree.leaves(fn()))
    times.append(time.perf_counter() - t0)
  return min(times)  # the least disturbed run on a shared machine


def hutchinson_cost(params, cfg, calib, ks=(1, 2, 4, 8, 16)):
  """Wall time of Hutchinson's diagonal with k probes, in units of one gradient evaluation (same batch).

  Best of several runs for both (other processes share the CPU).
  """
  loss = loss_fn_for(cfg)
  batches = batches_of(calib, 4)[:1]  # one batch of 4 windows of 256 tokens
  sel = select(params)
  t_grad = _best_of(lambda: _grad(sel, params, batches[0], loss_fn=loss), 8)
  key = jax.random.PRNGKey(0)
  out = {"grad_seconds": t_grad, "sequential": {}, "vectorized": {}}
  for chunk, kind in ((1, "sequential"), (8, "vectorized")):
    run = lambda k, chunk=chunk: hutchinson_diagonal(loss, params, batches, key, num_probes=k,  # noqa: E731
                                                     probe_chunk=chunk)
    jax.block_until_ready(jax.tree.leaves(run(chunk)))  # compile
    for k in ks if chunk == 1 else (8, 16):
      t = _best_of(lambda: run(k), 2)
      out[kind][k] = {"seconds": t, "gradient_evaluations": t / t_grad, "per_probe": t / t_grad / k}
  return out


def obd_diagnostic(params, cfg, cal_ids):
  """Is OBD's premise (positive curvature) true here? Exact Hessian diagonal of one small leaf vs Hutchinson."""
  loss = loss_fn_for(cfg)
  calib = sample_windows(cal_ids, nsamples=2, seq_len=128, bos_id=cfg.bos_token_id, seed=1)
  batches = batches_of(calib, 1)
  inc = r"layers_4/self_attn/k_proj/kernel"
  leaf = lambda t: np.asarray(t["layers_4"]["self_attn"]["k_proj"]["kernel"]).ravel()  # noqa: E731
  exact = leaf(exact_hessian_diagonal(loss, params, batches, include=inc))
  out = {"leaf": inc, "tokens": 256, "exact_negative_fraction": float((exact < 0).mean())}
  for k in (16, 256):
    est = leaf(hutchinson_diagonal(loss, params, batches, jax.random.PRNGKey(1), num_probes=k, include=inc,
                                   probe_chunk=16))
    out[f"hutchinson_{k}"] = {"correlation_with_exact": float(np.corrcoef(exact, est)[0, 1]),
                              "relative_error": float(np.linalg.norm(est - exact) / np.linalg.norm(exact))}
  return out


def sweep_scores(method, params, cfg, calib, num_probes):
  """Scores of a score-based method, computed once for the whole sweep."""
  loss, batches = loss_fn_for(cfg), batches_of(calib, 8)
  if method == "magnitude":
    return magnitude_scores(params)
  if method == "random":
    return random_scores(params, 0)
  if method == "taylor":
    return taylor_scores(loss, params, batches)
  if method == "fisher":
    return fisher_scores(loss, params, batches)
  return obd_scores(loss, params, batches, num_probes=num_probes)


def zeros_kept(params, masks) -> bool:
  flat = dict(leaves_with_paths(params))
  return all(bool((np.asarray(flat[p])[~np.asarray(m)] == 0).all()) for p, m in leaves_with_paths(masks))


def main():
  args = parse_args()
  methods = [m for m in args.methods.split(",") if m]
  t_start = time.perf_counter()
  m = load_model()
  cfg, params = m.cfg, m.params
  cal_ids = m.tokenizer.encode(read_text(CALIB_TEXT))
  ev_ids = m.tokenizer.encode(read_text(EVAL_TEXT))
  calib = sample_windows(cal_ids, nsamples=32, seq_len=256, bos_id=cfg.bos_token_id, seed=0)
  ev = lambda p: perplexity(p, cfg, ev_ids, 256, 40)  # noqa: E731
  ev_full = lambda p: perplexity(p, cfg, ev_ids, 256, None)  # noqa: E731
  result = {"model": "stories260K", "calibration": "32 x 256 tokens of tinystories_train_first2MiB.txt (seed 0)",
            "evaluation": "first 40 x 256-token windows of tinystories_valid_prefix.txt, BOS prepended",
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()}",
            "dense": {"perplexity": ev(params)}}
  if args.full_eval:
    result["dense"]["perplexity_full"] = ev_full(params)
  dense = result["dense"]["perplexity"]
  print(f"dense perplexity {dense:.3f}", flush=True)

  # 1. The table: every method at 50% unstructured, 2:4 and 4:8. Score methods compute their scores
  # once (timed) and reuse them for every target and the sweep (what prune() does per call);
  # layer-wise methods run prune() per target.
  rows, pruned, scores = [], {}, {}
  for method in methods:
    if method in SCORE_METHODS:
      t0 = time.perf_counter()
      scores[method] = sweep_scores(method, params, cfg, calib, args.num_probes)
      jax.block_until_ready(jax.tree.leaves(scores[method]))
      score_seconds = time.perf_counter() - t0
    for tname, target in TARGETS.items():
      if method in SCORE_METHODS:
        t0 = time.perf_counter()
        masks = (nm_masks(scores[method], target["pattern"]) if "pattern" in target
                 else topk_masks(scores[method], target["sparsity"]))
        new_params = apply_masks(params, masks)
        jax.block_until_ready(jax.tree.leaves(new_params))
        seconds = score_seconds + time.perf_counter() - t0
        dense_leaves = nm_incompatible(scores[method], target["pattern"]) if "pattern" in target else []
        achieved = sparsity(new_params).total
      else:
        res = prune(params, cfg, PruneConfig(method=method, **target), calib)
        new_params, masks, seconds = res.params, res.masks, res.report.seconds
        dense_leaves, achieved = list(res.report.dense_leaves), res.report.achieved.total
      row = {"method": method, "target": tname, "perplexity": ev(new_params), "seconds": seconds,
             "sparsity": achieved, "dense_leaves": dense_leaves}
      rows.append(row)
      pruned[(method, tname)] = (new_params, masks)
      print(f"{method:>10} {tname:>4}: ppl {row['perplexity']:8.3f}  sparsity {row['sparsity']:.4f}  "
            f"{row['seconds']:6.1f}s", flush=True)
  by = {(r["method"], r["target"]): r for r in rows}
  for r in rows:
    mag = by.get(("magnitude", r["target"]))
    if mag and mag["perplexity"] > dense:
      r["increase_vs_magnitude"] = (r["perplexity"] - dense) / (mag["perplexity"] - dense)
  result["table"] = rows

  # 2. Hutchinson's cost in gradient evaluations.
  if "obd" in methods:
    result["hutchinson_cost"] = hutchinson_cost(params, cfg, calib)
    print("hutchinson:", json.dumps(result["hutchinson_cost"]), flush=True)
    result["obd_diagnostic"] = obd_diagnostic(params, cfg, cal_ids)
    print("obd diagnostic:", json.dumps(result["obd_diagnostic"]), flush=True)

  # 3. Perplexity against sparsity (layer-wise unstructured; 50% comes from the table).
  sweep = [float(s) for s in args.sweep.split(",") if s]
  curves = {}
  for method in methods:
    points = sorted(set([float(s) for s in args.obs_sweep.split(",") if s] if method == "obs" else sweep) | {0.5})
    curve = []
    for s in points:
      if s == 0.5:
        curve.append((s, by[(method, "50%")]["perplexity"]))
      elif method in SCORE_METHODS:
        curve.append((s, ev(apply_masks(params, topk_masks(scores[method], s)))))
      else:
        curve.append((s, ev(prune(params, cfg, PruneConfig(method=method, sparsity=s), calib).params)))
    curves[method] = curve
    print(f"sweep {method}: " + ", ".join(f"{s:.1f}:{p:.2f}" for s, p in curve), flush=True)
  result["sweep"] = {k: [{"sparsity": s, "perplexity": p} for s, p in v] for k, v in curves.items()}

  # 4. Recovery fine-tuning with masks fixed.
  ft_cfg = FinetuneConfig(steps=args.finetune_steps, batch_size=args.finetune_batch_size,
                          seq_len=args.finetune_seq_len, learning_rate=args.finetune_lr, distill=args.distill)
  recovery = []
  for spec in [s for s in args.recover.split(",") if s]:
    method, tname = spec.split(":", 1)
    if (method, tname) in pruned:
      start, masks = pruned[(method, tname)]
    else:
      res = prune(params, cfg, PruneConfig(method=method, **TARGETS[tname]), calib)
      start, masks = res.params, res.masks
    t0 = time.perf_counter()
    ft = finetune(start, cfg, masks, cal_ids, ft_cfg, teacher=params if args.distill else None)
    seconds = time.perf_counter() - t0
    row = {"method": method, "target": tname, "steps": ft_cfg.steps, "batch": ft_cfg.batch_size,
           "seq_len": ft_cfg.seq_len, "lr": ft_cfg.learning_rate, "distill": ft_cfg.distill,
           "perplexity_before": ev(start), "perplexity": ev(ft.params), "seconds": seconds,
           "sparsity": sparsity(ft.params).total, "pruned_weights_exactly_zero": zeros_kept(ft.params, masks)}
    row["ratio_to_dense"] = row["perplexity"] / dense
    if args.full_eval:
      row["perplexity_full"] = ev_full(ft.params)
    recovery.append(row)
    print(f"recovery {method} {tname}: {row['perplexity_before']:.3f} -> {row['perplexity']:.3f} "
          f"({row['ratio_to_dense']:.3f}x dense) in {seconds:.0f}s; zeros kept: {row['pruned_weights_exactly_zero']}",
          flush=True)
  result["recovery"] = recovery
  result["total_seconds"] = time.perf_counter() - t_start
  write(result, curves, dense, args.out)


def write(result, curves, dense, out):
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=2)
  if curves:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, curve in curves.items():
      ax.plot([s for s, _ in curve], [p for _, p in curve], marker="o", label=method)
    ax.axhline(dense, color="k", linestyle="--", linewidth=1, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity of the block projections")
    ax.set_ylabel("perplexity (40 x 256 tokens, log scale)")
    ax.set_title("stories260K: one-shot unstructured pruning (layer-wise)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)
  print()
  print("| method | target | perplexity | increase vs magnitude | sparsity | time (s) |")
  print("|---|---|---|---|---|---|")
  print(f"| dense | - | {dense:.2f} | - | 0 | - |")
  for r in result["table"]:
    inc = f"{r['increase_vs_magnitude']:.2f}" if "increase_vs_magnitude" in r else "-"
    print(f"| {r['method']} | {r['target']} | {r['perplexity']:.2f} | {inc} | {r['sparsity']:.3f} | "
          f"{r['seconds']:.1f} |")
  if result["recovery"]:
    print()
    print("| recovered model | steps x batch x len | before | after | x dense | zeros kept | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in result["recovery"]:
      print(f"| {r['method']} {r['target']} | {r['steps']} x {r['batch']} x {r['seq_len']} | "
            f"{r['perplexity_before']:.2f} | {r['perplexity']:.3f} | {r['ratio_to_dense']:.3f} | "
            f"{r['pruned_weights_exactly_zero']} | {r['seconds']:.0f} |")
  if "hutchinson_cost" in result:
    hc = result["hutchinson_cost"]
    print("\nHutchinson diagonal cost in gradient evaluations (k probes): " + ", ".join(
        f"k={k}: {v['gradient_evaluations']:.1f}" for k, v in hc["sequential"].items()) + "; vectorized 8 at a time: " +
        ", ".join(f"k={k}: {v['gradient_evaluations']:.1f}" for k, v in hc["vectorized"].items()))
  print(f"\nwrote {out}.json" + (f" and {out}.png" if curves else "") + f" in {result['total_seconds']:.0f}s")


if __name__ == "__main__":
  main()
