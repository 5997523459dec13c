"""``jaxprune demo``: evaluate the embedded model, prune it with SparseGPT (50% and 2:4), evaluate and generate again."""

from __future__ import annotations

import argparse
import json
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
      "demo", help="end-to-end demo on the embedded stories260K: prune with SparseGPT, compare perplexity and text",
      description="Evaluates the dense embedded stories260K on held-out TinyStories text, prunes it with "
                  "SparseGPT to 50%% unstructured and to 2:4 (calibrated on TinyStories train text), evaluates "
                  "the pruned models, generates from each, and prints a table of perplexity, sparsity and time.")
  p.add_argument("--nsamples", type=int, default=32, help="calibration windows of --seq-len tokens")
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--eval-windows", type=int, default=40, help="evaluation windows of 256 tokens (0: the whole file)")
  p.add_argument("--finetune-steps", type=int, default=0,
                 help="also fine-tune each pruned model this many steps with masks fixed (600 in the README)")
  p.add_argument("--prompt", default="Once upon a time, there was a little dog")
  p.add_argument("--max-new-tokens", type=int, default=40)
  p.add_argument("--decode-batch", type=int, default=8, help="sequences decoded at once for the tok/s column")
  p.add_argument("--decode-tokens", type=int, default=128, help="tokens each of them decodes")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.set_defaults(func=run)


def serving_speed(model, batch: int, tokens: int) -> dict:
  """Decode throughput and weight bytes of ``model`` in jaxserve (sparse kernels where they pay)."""
  from jaxserve.engine import LLM, SamplingParams
  llm = LLM(model, max_num_seqs=batch, max_model_len=min(model.cfg.max_position_embeddings, 16 + tokens))
  vocab, bos = model.cfg.vocab_size, model.cfg.bos_token_id or 1
  prompts = [{"prompt_token_ids": [bos] + [(3 + 7 * i + j) % vocab for j in range(15)]} for i in range(batch)]
  sp = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, detokenize=False)
  llm.generate(prompts, sp, use_tqdm=False)  # compiles
  llm.reset_prefix_cache()
  t0 = time.perf_counter()
  llm.generate(prompts, sp, use_tqdm=False)
  stats = llm.stats()
  return {"decode_tok_s": batch * tokens / (time.perf_counter() - t0), "weight_bytes": stats["weight_bytes"],
          "weight_formats": stats["weight_formats"]}


def run(args: argparse.Namespace) -> int:
  from jaxprune._data import read_text, sample_windows
  from jaxprune._finetune import FinetuneConfig, finetune
  from jaxprune._prune import PruneConfig, prune
  from jaxprune.eval import perplexity
  from jaxserve.generate import generate
  from jaxserve.loaders import CALIB_TEXT, EVAL_TEXT, load_model

  if (args.eval_windows < 0 or args.max_new_tokens < 1 or args.finetune_steps < 0 or args.decode_batch < 1
      or args.decode_tokens < 1):
    raise ValueError("need --eval-windows >= 0, --finetune-steps >= 0, and --max-new-tokens, --decode-batch and "
                     "--decode-tokens >= 1")
  quiet = args.json
  m = load_model()
  calib_ids = m.tokenizer.encode(read_text(CALIB_TEXT))
  calib = sample_windows(calib_ids, nsamples=args.nsamples, seq_len=args.seq_len, bos_id=m.cfg.bos_token_id)
  eval_ids = m.tokenizer.encode(read_text(EVAL_TEXT))
  prompt = m.tokenizer.encode(args.prompt, add_bos=True)
  windows = args.eval_windows or None

  def measure(name, params, sparsity, prune_seconds):
    t0 = time.perf_counter()
    ppl = perplexity(params, m.cfg, eval_ids, 256, windows)
    eval_seconds = time.perf_counter() - t0
    out = generate(params, m.cfg, [prompt], args.max_new_tokens, eos_id=m.tokenizer.eos_id)[0]
    row = {"model": name, "sparsity": sparsity, "perplexity": ppl, "prune_seconds": prune_seconds,
           "eval_seconds": eval_seconds, "text": m.tokenizer.decode(prompt + out),
           **serving_speed(m._replace(params=params), args.decode_batch, args.decode_tokens)}
    if not quiet:
      print(f"[{name}] perplexity {ppl:.3f}, {row['decode_tok_s']:.0f} tok/s decoding, "
            f"{row['weight_bytes'] / 1e6:.2f} MB of weights in jaxserve\n  {row['text']!r}", flush=True)
    return row

  rows = [measure("dense", m.params, 0.0, 0.0)]
  for label, target in (("sparsegpt 50%", dict(sparsity=0.5)), ("sparsegpt 2:4", dict(pattern="2:4"))):
    res = prune(m.params, m.cfg, PruneConfig(method="sparsegpt", **target), calib, progress=not quiet)
    rows.append(measure(label, res.params, res.report.achieved.total, res.report.seconds))
    if args.finetune_steps:
      t0 = time.perf_counter()
      ft = finetune(res.params, m.cfg, res.masks, calib_ids, FinetuneConfig(steps=args.finetune_steps),
                    progress=not quiet)
      rows.append(measure(f"{label} + {args.finetune_steps} ft steps", ft.params, res.report.achieved.total,
                          res.report.seconds + time.perf_counter() - t0))
  n_eval = "all" if windows is None else windows
  if args.json:
    print(json.dumps({"eval_windows": n_eval, "calib_windows": args.nsamples, "rows": rows}))
    return 0
  print(f"\nstories260K, perplexity on {n_eval} windows of 256 tokens of held-out TinyStories text; "
        f"calibration: {args.nsamples} windows of {args.seq_len} tokens of TinyStories train text\n")
  print(f"| {'model':<28} | sparsity | perplexity | time s  | eval s | decode tok/s | weight MB | kernels run as |")
  print(f"|{'-' * 30}|----------|------------|---------|--------|--------------|-----------|----------------|")
  for r in rows:
    forms = ", ".join(f"{k} {v}" for k, v in sorted(r["weight_formats"].items()))
    print(f"| {r['model']:<28} | {r['sparsity']:8.3f} | {r['perplexity']:10.3f} | {r['prune_seconds']:7.2f} | "
          f"{r['eval_seconds']:6.2f} | {r['decode_tok_s']:12.0f} | {r['weight_bytes'] / 1e6:9.3f} | {forms} |")
  print("\ntime: pruning (plus fine-tuning where listed), including JIT compilation; sparsity: of the blocks' "
        "projection kernels;\ndecode tok/s: jaxserve's LLM, "
        f"{args.decode_batch} sequences x {args.decode_tokens} greedy tokens after a warm-up pass (the pruned models "
        "run their sparse kernels compressed);\nweight MB: the parameters as the engine holds them "
        "(llm.stats()['weight_bytes'])")
  return 0
