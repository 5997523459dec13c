"""``jaxprune prune``: unstructured or N:M pruning (magnitude ... SparseGPT), optional recovery, saved for jaxserve."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jaxserve.cli_args import add_model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
  from jaxprune._prune import METHODS
  p = sub.add_parser(
      "prune", help="unstructured or N:M pruning (magnitude, random, taylor, fisher, obd, wanda, sparsegpt, obs)",
      description="Prune the blocks' projection kernels to a sparsity (or an N:M pattern along the input "
                  "dimension), optionally fine-tune with the masks fixed, and save a directory that "
                  "`jaxprune eval --model DIR` and jaxserve load. Data-dependent methods calibrate on --calib "
                  "(default: the embedded TinyStories train text; never the evaluation text).")
  add_model_args(p)
  p.add_argument("--method", choices=METHODS, required=True)
  p.add_argument("--sparsity", type=float, default=None, help="target fraction in [0, 1) (implied by --pattern)")
  p.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4 (N nonzeros in every M)")
  p.add_argument("--scope", choices=["layer", "global", "output"], default=None,
                 help="ranking scope (default: output for wanda, layer otherwise)")
  p.add_argument("--include", default=None, help="regex over parameter paths to prune (default: block projections)")
  p.add_argument("--exclude", default=None, help="regex over parameter paths to leave dense")
  add_calib_args(p, nsamples=128)
  p.add_argument("--seed", type=int, default=0, help="random scores, probes and calibration sampling")
  p.add_argument("--hessian", choices=["hutchinson", "exact"], default="hutchinson", help="OBD's Hessian diagonal")
  p.add_argument("--num-probes", type=int, default=16, help="Hutchinson probes for OBD")
  p.add_argument("--blocksize", type=int, default=128, help="SparseGPT lazy-update block (columns)")
  p.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT/OBS dampening (fraction of mean diag H)")
  p.add_argument("--obs-rounds", type=int, default=4, help="prune/refit rounds of iterative OBS")
  p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                 help="wanda/sparsegpt/obs: prune a block's linears in execution order, later ones seeing inputs "
                      "through the pruned earlier ones (default); --no-true-sequential: one pass per block, as "
                      "the reference SparseGPT and Wanda")
  p.add_argument("--rounds", type=int, default=1, help="score methods: prune in N rounds (iterative)")
  p.add_argument("--round-steps", type=int, default=0, help="masked fine-tuning steps between rounds")
  add_finetune_args(p, steps=0)
  p.add_argument("--eval", action="store_true", help="report perplexity on the evaluation text after each stage")
  p.add_argument("--eval-data", default=None, help="evaluation text (default: the embedded TinyStories validation)")
  p.add_argument("--eval-windows", type=int, default=40, help="evaluation windows of --eval-seq-len (0: all)")
  p.add_argument("--eval-seq-len", type=int, default=256)
  p.add_argument("--out", required=True, help="output directory (orbax params + masks + metadata + config)")
  p.add_argument("--hf-out", default=None, help="also export a Hugging Face directory")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.set_defaults(func=run)


def add_calib_args(p: argparse.ArgumentParser, nsamples: int) -> None:
  p.add_argument("--calib", default=None, help="calibration text (default: embedded TinyStories train text)")
  p.add_argument("--nsamples", type=int, default=nsamples, help="calibration windows")
  p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")


def add_finetune_args(p: argparse.ArgumentParser, steps: int) -> None:
  p.add_argument("--finetune-steps", type=int, default=steps, help="masked recovery fine-tuning steps (0: none)")
  p.add_argument("--finetune-lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine to 0)")
  p.add_argument("--finetune-batch-size", type=int, default=16, help="windows per step")
  p.add_argument("--finetune-seq-len", type=int, default=128, help="tokens per window")
  p.add_argument("--distill", type=float, default=0.0,
                 help="weight in [0, 1] of distillation from the dense model (KL) in the fine-tuning loss")


def prune_config(args: argparse.Namespace):
  from jaxprune._masks import DEFAULT_INCLUDE
  from jaxprune._prune import PruneConfig
  return PruneConfig(method=args.method, sparsity=args.sparsity, pattern=args.pattern, scope=args.scope,
                     include=args.include or DEFAULT_INCLUDE, exclude=args.exclude, seed=args.seed,
                     hessian=args.hessian, num_probes=args.num_probes, blocksize=args.blocksize,
                     percdamp=args.percdamp, obs_rounds=args.obs_rounds, rounds=args.rounds,
                     round_steps=args.round_steps, true_sequential=args.true_sequential)


def finetune_config(args: argparse.Namespace):
  from jaxprune._finetune import FinetuneConfig
  if args.finetune_steps < 0:
    raise ValueError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
  if args.finetune_steps == 0:
    return None
  return FinetuneConfig(steps=args.finetune_steps, learning_rate=args.finetune_lr,
                        batch_size=args.finetune_batch_size, seq_len=args.finetune_seq_len, distill=args.distill,
                        seed=args.seed)


def read_text_arg(path: str | None, default: str) -> tuple[str, str]:
  from jaxprune._data import read_text
  path = path or default
  return path, read_text(path)


def check_out_dir(path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path)) or "."
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--out {path} exists and is not a directory")
  if not os.path.isdir(parent):
    raise ValueError(f"--out {path}: parent directory {parent} does not exist")


def evaluate(params, cfg, ids, args) -> tuple[float, float]:
  from jaxprune.eval import perplexity
  t0 = time.perf_counter()
  ppl = perplexity(params, cfg, ids, args.eval_seq_len, args.eval_windows or None)
  return ppl, time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
  from jaxprune import checkpoint
  from jaxprune._data import sample_windows
  from jaxprune._finetune import finetune
  from jaxprune._prune import DATA_METHODS, prune
  from jaxserve.loaders import CALIB_TEXT, EVAL_TEXT, load_model

  # Everything that can be wrong is checked before loading or computing anything.
  config = prune_config(args)
  ft = finetune_config(args)
  check_out_dir(args.out)
  if args.hf_out:
    check_out_dir(args.hf_out)
  need_calib = config.method in DATA_METHODS or ft is not None or config.round_steps > 0
  calib_path, calib_text = read_text_arg(args.calib, CALIB_TEXT) if need_calib else (None, None)
  eval_path, eval_text = read_text_arg(args.eval_data, EVAL_TEXT) if args.eval else (None, None)
  if calib_path and eval_path and os.path.abspath(calib_path) == os.path.abspath(eval_path):
    raise ValueError(f"calibration and evaluation text are the same file ({calib_path}); use held-out text")

  m = load_model(args.model, args.dtype, args.tokenizer, dense=True)
  if (need_calib or args.eval) and m.tokenizer is None:
    raise ValueError(f"{args.model}: no tokenizer found; pass --tokenizer")
  progress = not args.no_progress and not args.json
  result = {"model": args.model or "stories260K (embedded)", "method": config.method, "calib": calib_path}
  calib_ids = m.tokenizer.encode(calib_text) if need_calib else None
  calib = (sample_windows(calib_ids, nsamples=args.nsamples, seq_len=args.seq_len, bos_id=m.cfg.bos_token_id,
                          seed=args.seed) if config.method in DATA_METHODS or config.round_steps else None)
  eval_ids = m.tokenizer.encode(eval_text) if args.eval else None
  if args.eval:
    result["dense_perplexity"], _ = evaluate(m.params, m.cfg, eval_ids, args)
  res = prune(m.params, m.cfg, config, calib, progress=progress)
  result.update(res.report.to_dict())
  result.pop("per_leaf")
  params = res.params
  if args.eval:
    result["perplexity"], _ = evaluate(params, m.cfg, eval_ids, args)
  if ft is not None:
    t0 = time.perf_counter()
    out = finetune(params, m.cfg, res.masks, calib_ids, ft, teacher=m.params if ft.distill else None,
                   progress=progress)
    params = out.params
    result["finetune"] = {"steps": ft.steps, "seconds": time.perf_counter() - t0,
                          "final_loss": float(out.losses[-20:].mean())}
    if args.eval:
      result["finetuned_perplexity"], _ = evaluate(params, m.cfg, eval_ids, args)
  metadata = {k: v for k, v in result.items() if k not in ("model",)}
  metadata["source_model"] = result["model"]
  checkpoint.save(args.out, params, res.masks, cfg=m.cfg, tokenizer=m.tokenizer, metadata=metadata)
  result["out"] = os.path.abspath(args.out)
  if args.hf_out:
    checkpoint.export_hf(params, m.cfg, args.hf_out, masks=res.masks, tokenizer=m.tokenizer, metadata=metadata)
    result["hf_out"] = os.path.abspath(args.hf_out)
  if args.json:
    print(json.dumps(result))
  else:
    _print_summary(result, res.report)
  return 0


def _print_summary(result: dict, report) -> None:
  pat = f" {result['pattern']}" if result["pattern"] else ""
  print(f"{result['method']}{pat}: sparsity {result['sparsity']:.4f} of {result['prunable_weights']} prunable "
        f"weights in {result['seconds']:.2f}s")
  if report.dense_leaves:
    print(f"left dense (input dimension not a multiple of M): {', '.join(report.dense_leaves)}", file=sys.stderr)
  for key, label in (("dense_perplexity", "dense"), ("perplexity", "pruned"), ("finetuned_perplexity", "recovered")):
    if key in result:
      print(f"perplexity ({label}): {result[key]:.4f}")
  if "finetune" in result:
    print(f"fine-tuned {result['finetune']['steps']} steps in {result['finetune']['seconds']:.1f}s")
  print(f"saved to {result['out']}" + (f" and {result['hf_out']} (Hugging Face)" if "hf_out" in result else ""))
