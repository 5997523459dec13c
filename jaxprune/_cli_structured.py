"""``jaxprune prune-structured``: LLM-Pruner-style structured pruning, optional LoRA recovery, saved for jaxserve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from jaxserve.cli_args import add_model_args

def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
      "prune-structured", help="remove heads, MLP channels, hidden channels or layers (a smaller dense model)",
      description="Structured pruning (LLM-Pruner style): score coupled groups (a KV head with its query heads, "
                  "an MLP channel, a hidden channel, a block), remove the least important ones, optionally recover "
                  "with LoRA, and save a model that `jaxprune eval --model DIR` and jaxserve load. Layer ranges "
                  "are half-open [start, end) and default to every layer; start = end prunes nothing of that kind.")
  add_model_args(p)
  p.add_argument("--pruning-ratio", type=float, required=True, help="fraction in [0, 1) of each pruned kind's groups")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--block-wise", dest="mode", action="store_const", const="block",
                    help="prune attention KV groups and MLP channels inside layer ranges (default)")
  mode.add_argument("--channel-wise", dest="mode", action="store_const", const="channel",
                    help="prune hidden channels (the embedding dimension, everywhere)")
  mode.add_argument("--layer-wise", dest="mode", action="store_const", const="layer", help="drop whole blocks")
  p.set_defaults(mode="block")
  p.add_argument("--layer", type=int, default=None, help="layer-wise: number of blocks to keep (overrides the ratio)")
  for kind in ("attention", "mlp"):
    p.add_argument(f"--block-{kind}-layer-start", type=int, default=None, help=f"first layer whose {kind} is pruned")
    p.add_argument(f"--block-{kind}-layer-end", type=int, default=None, help=f"end (exclusive) of the {kind} range")
  p.add_argument("--attention-unit", choices=["kv_group", "query_head"], default="kv_group",
                 help="kv_group: a KV head with all its query heads; query_head: the same number of query heads "
                      "from every KV group")
  p.add_argument("--pruner-type", choices=["l1", "l2", "random", "taylor"], default="taylor", help="importance")
  p.add_argument("--taylor", choices=["vectorize", "param_first", "param_second", "param_mix"],
                 default="param_first", help="Taylor variant")
  p.add_argument("--grouping-strategy", choices=["sum", "mean", "max", "prod", "first"], default="sum",
                 help="how the members of a group combine")
  p.add_argument("--hessian", choices=["fisher", "hutchinson"], default="fisher",
                 help="second-order diagonal for param_second / param_mix")
  p.add_argument("--hutchinson-probes", type=int, default=8)
  p.add_argument("--global-pruning", action="store_true", help="rank groups of one kind across layers")
  p.add_argument("--iterative-steps", type=int, default=1, help="prune in N steps, re-scoring each time")
  p.add_argument("--round-to", type=int, default=1, help="keep MLP/hidden channel counts a multiple of this")
  p.add_argument("--num-examples", type=int, default=10, help="calibration windows for Taylor importance")
  p.add_argument("--calib-seq-len", type=int, default=64, help="tokens per calibration window")
  p.add_argument("--calib", default=None, help="calibration / recovery text (default: embedded TinyStories train text)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--finetune-steps", type=int, default=0, help="LoRA recovery steps (0: none)")
  p.add_argument("--lora-rank", type=int, default=8)
  p.add_argument("--lora-alpha", type=float, default=16.0)
  p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                 help="comma-separated projection names")
  p.add_argument("--lora-lr", type=float, default=5e-3, help="peak learning rate")
  p.add_argument("--lora-batch-size", type=int, default=16)
  p.add_argument("--lora-micro-batch", type=int, default=8, help="windows per gradient evaluation (accumulated)")
  p.add_argument("--lora-seq-len", type=int, default=128)
  p.add_argument("--test-after-train", action="store_true",
                 help="report perplexity on the evaluation text before pruning, after pruning and after recovery")
  p.add_argument("--eval-windows", type=int, default=40, help="evaluation windows for --test-after-train")
  p.add_argument("--eval-seq-len", type=int, default=256)
  p.add_argument("--out", required=True, help="output directory (orbax params + model_config.json + tokenizer)")
  p.add_argument("--hf-out", default=None, help="also export a Hugging Face directory (uniform layers only)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.set_defaults(func=run)


def _configs(args: argparse.Namespace):
  from jaxprune.structured import Importance, LoraConfig, StructuredConfig
  importance = Importance(kind=args.pruner_type, taylor=args.taylor, aggregation=args.grouping_strategy,
                          hessian=args.hessian, hutchinson_probes=args.hutchinson_probes)
  sc = StructuredConfig(ratio=args.pruning_ratio, mode=args.mode, attention_unit=args.attention_unit,
                        importance=importance, scope="global" if args.global_pruning else "local",
                        iterative_steps=args.iterative_steps, round_to=args.round_to, keep_layers=args.layer,
                        seed=args.seed)
  lora = None
  if args.finetune_steps < 0:
    raise ValueError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
  if args.finetune_steps:
    lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=tuple(args.lora_targets.split(",")),
                      steps=args.finetune_steps, learning_rate=args.lora_lr, batch_size=args.lora_batch_size,
                      micro_batch=args.lora_micro_batch, seq_len=args.lora_seq_len, seed=args.seed)
  if args.num_examples < 1 or args.calib_seq_len < 1:
    raise ValueError(f"--num-examples and --calib-seq-len must be >= 1, got {args.num_examples}, {args.calib_seq_len}")
  return sc, lora


def _with_ranges(sc, args: argparse.Namespace, num_layers: int):
  """Layer ranges from the flags: an omitted start is 0, an omitted end is the number of layers."""
  ranges = {}
  for kind, field in (("attention", "attention_layers"), ("mlp", "mlp_layers")):
    start, end = getattr(args, f"block_{kind}_layer_start"), getattr(args, f"block_{kind}_layer_end")
    if start is not None or end is not None:
      ranges[field] = (0 if start is None else start, num_layers if end is None else end)
  return dataclasses.replace(sc, **ranges)


def run(args: argparse.Namespace) -> int:
  import jax
  from jaxprune.eval import perplexity
  from jaxprune._data import read_text, sample_windows, text_token_ids
  from jaxprune.structured import count_parameters, finetune_lora, planned_layer_sizes, prune_structured, validate
  from jaxserve.loaders import EVAL_TEXT, hf_config, load_model, save_hf, save_native
  t0 = time.perf_counter()
  sc, lora = _configs(args)
  m = load_model(args.model, args.dtype, args.tokenizer, dense=True)
  sc = _with_ranges(sc, args, m.cfg.num_layers)
  validate(m.cfg, sc)
  sizes = planned_layer_sizes(m.cfg, sc)
  if args.hf_out and sizes is not None and len(set(sizes)) > 1:
    raise ValueError(f"--hf-out: a Hugging Face config needs every layer to have the same (heads, kv_heads, "
                     f"intermediate_size), but this pruning leaves {sizes}; prune every layer alike or drop "
                     "--hf-out (the native directory loads in jaxserve and `jaxprune eval`)")
  if m.tokenizer is None and (sc.importance.needs_gradients or lora or args.test_after_train):
    raise ValueError(f"{args.model}: no tokenizer found; pass --tokenizer")
  needs_text = sc.importance.needs_gradients or lora is not None
  calib_ids = text_token_ids(m.tokenizer, args.calib) if needs_text else None
  windows = None
  if sc.importance.needs_gradients:
    if m.cfg.bos_token_id is None:
      raise ValueError("the model has no bos_token_id; calibration windows start with BOS")
    windows = sample_windows(calib_ids, nsamples=args.num_examples, seq_len=args.calib_seq_len,
                             bos_id=m.cfg.bos_token_id, seed=args.seed, distinct=False)
  eval_ids = None
  if args.test_after_train:
    eval_ids = m.tokenizer.encode(read_text(EVAL_TEXT, "evaluation text"))
  result: dict = {"model": args.model or "stories260K (embedded)", "out": args.out}
  ppl = lambda params, cfg: perplexity(params, cfg, eval_ids, args.eval_seq_len, args.eval_windows)
  if eval_ids is not None:
    result["perplexity_dense"] = ppl(m.params, m.cfg)
  t = time.perf_counter()
  pruned = prune_structured(m.params, m.cfg, sc, windows, key=jax.random.PRNGKey(args.seed), progress=not args.json)
  result["prune_seconds"] = time.perf_counter() - t
  params, cfg = pruned.params, pruned.cfg
  if eval_ids is not None:
    result["perplexity_pruned"] = ppl(params, cfg)
  if lora is not None:
    t = time.perf_counter()
    tuned = finetune_lora(params, cfg, calib_ids, lora, progress=not args.json)
    params = tuned.params
    result.update(finetune_seconds=time.perf_counter() - t, finetune_loss_first=float(tuned.losses[0]),
                  finetune_loss_last=float(tuned.losses[-1]))
    if eval_ids is not None:
      result["perplexity_recovered"] = ppl(params, cfg)
  report = dict(pruned.report, finetune_steps=args.finetune_steps)
  save_native(cfg, params, args.out, m.tokenizer, metadata={"pruning": report, "source": result["model"]})
  result.update(parameters_before=report["parameters_before"], parameters_after=count_parameters(params),
                block_removed_fraction=report["block_removed_fraction"], config=cfg.to_dict())
  status = 0
  if args.hf_out:
    try:
      hf_config(cfg)
      save_hf(cfg, params, args.hf_out, m.tokenizer)
      result["hf_out"] = args.hf_out
    except ValueError as e:
      result["hf_out_error"] = str(e)
      print(f"jaxprune prune-structured: error: {e}", file=sys.stderr)
      status = 2
  result["seconds"] = time.perf_counter() - t0
  if args.json:
    print(json.dumps(result))
  else:
    _print_summary(result, pruned.plan.describe(m.cfg))
  return status


def _print_summary(result: dict, plan: dict) -> None:
  print(f"parameters {result['parameters_before']:,} -> {result['parameters_after']:,} "
        f"(block parameters -{100 * result['block_removed_fraction']:.1f}%)")
  print(f"hidden size {plan['hidden_size']}, layers kept {plan['layers_kept']}")
  for row in plan["per_layer"]:
    print(f"  layer {row['layer']}: heads {row['heads']}, kv_heads {row['kv_heads']}, "
          f"intermediate {row['intermediate_size']}")
  for name in ("dense", "pruned", "recovered"):
    if f"perplexity_{name}" in result:
      print(f"perplexity {name:9s} {result[f'perplexity_{name}']:.4f}")
  print(f"saved to {result['out']}" + (f" and {result['hf_out']} (Hugging Face)" if "hf_out" in result else ""))
