"""``jaxprune finetune``: masked recovery fine-tuning of a pruned model on calibration text."""

from __future__ import annotations

import argparse
import json
import os
import time

from jaxserve.cli_args import add_model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
  from jaxprune._cli_prune import add_finetune_args
  p = sub.add_parser(
      "finetune", help="recovery fine-tuning of a pruned model (masks fixed, pruned weights stay zero)",
      description="Fine-tune all parameters of a pruned model with AdamW on a cosine schedule while its masks "
                  "keep pruned weights at exactly zero. The masks come from a `jaxprune prune` directory, or "
                  "(for other models) from the zero pattern of the projection kernels.")
  add_model_args(p)
  p.add_argument("--calib", default=None, help="training text (default: embedded TinyStories train text)")
  add_finetune_args(p, steps=600)
  p.add_argument("--teacher", default=None,
                 help="dense model to distill from with --distill ('embedded' for the built-in stories260K)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--eval", action="store_true", help="report perplexity before and after")
  p.add_argument("--eval-data", default=None)
  p.add_argument("--eval-windows", type=int, default=40)
  p.add_argument("--eval-seq-len", type=int, default=256)
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from jaxprune import checkpoint
  from jaxprune._cli_prune import check_out_dir, evaluate, finetune_config, read_text_arg
  from jaxprune._finetune import finetune
  from jaxprune._masks import masks_from_params, sparsity
  from jaxserve.loaders import CALIB_TEXT, EVAL_TEXT, load_model

  if args.finetune_steps < 1:
    raise ValueError(f"--finetune-steps must be >= 1, got {args.finetune_steps}")
  ft = finetune_config(args)
  check_out_dir(args.out)
  calib_path, calib_text = read_text_arg(args.calib, CALIB_TEXT)
  eval_path, eval_text = read_text_arg(args.eval_data, EVAL_TEXT) if args.eval else (None, None)
  if eval_path and os.path.abspath(calib_path) == os.path.abspath(eval_path):
    raise ValueError(f"training and evaluation text are the same file ({calib_path}); use held-out text")
  if ft.distill > 0 and args.teacher is None:
    raise ValueError("--distill needs --teacher (the dense model; 'embedded' for the built-in stories260K)")
  m = load_model(args.model, args.dtype, args.tokenizer, dense=True)
  teacher = None
  if ft.distill > 0:
    teacher = load_model(None if args.teacher == "embedded" else args.teacher, args.dtype, dense=True)
    if teacher.cfg != m.cfg:
      raise ValueError(f"--teacher {args.teacher} has a different architecture than {args.model}")
  if m.tokenizer is None:
    raise ValueError(f"{args.model}: no tokenizer found; pass --tokenizer")
  if args.model and checkpoint.is_pruned_checkpoint(args.model):
    ck = checkpoint.restore(args.model)
    masks, metadata = ck.masks, dict(ck.metadata)
  else:
    masks, metadata = masks_from_params(m.params), {}
  result = {"model": args.model or "stories260K (embedded)", "sparsity": sparsity(masks).total, "calib": calib_path}
  eval_ids = m.tokenizer.encode(eval_text) if args.eval else None
  if args.eval:
    result["perplexity_before"], _ = evaluate(m.params, m.cfg, eval_ids, args)
  t0 = time.perf_counter()
  out = finetune(m.params, m.cfg, masks, m.tokenizer.encode(calib_text), ft,
                 teacher=None if teacher is None else teacher.params, progress=not args.no_progress and not args.json)
  result["seconds"] = time.perf_counter() - t0
  result["final_loss"] = float(out.losses[-20:].mean())
  if args.eval:
    result["perplexity_after"], _ = evaluate(out.params, m.cfg, eval_ids, args)
  metadata["finetune"] = {"steps": ft.steps, "learning_rate": ft.learning_rate, "batch_size": ft.batch_size,
                          "seq_len": ft.seq_len, "distill": ft.distill, "teacher": args.teacher, "calib": calib_path}
  checkpoint.save(args.out, out.params, masks, cfg=m.cfg, tokenizer=m.tokenizer, metadata=metadata)
  result["out"] = os.path.abspath(args.out)
  if args.json:
    print(json.dumps(result))
  else:
    print(f"fine-tuned {ft.steps} steps in {result['seconds']:.1f}s (final loss {result['final_loss']:.4f}); "
          f"sparsity {result['sparsity']:.4f} kept")
    if args.eval:
      print(f"perplexity {result['perplexity_before']:.4f} -> {result['perplexity_after']:.4f}")
    print(f"saved to {result['out']}")
  return 0
