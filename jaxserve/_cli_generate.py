"""``jaxserve generate``: complete a prompt with the model."""

from __future__ import annotations

import argparse

from jaxserve.cli_args import add_model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("generate", help="complete a prompt", description="Complete a prompt (greedy by default).")
  p.add_argument("prompt", nargs="?", default="Once upon a time", help="the prompt text")
  add_model_args(p)
  p.add_argument("--max-tokens", type=int, default=128, help="new tokens to generate at most")
  p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--compile", choices=["eager", "lazy"], default="lazy",
                 help="lazy: compile only the step programs this prompt runs (default: one prompt needs few); "
                      "eager: the engine's whole set first")
  p.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction, default=True,
                 help="load and keep compiled programs in $JAXSERVE_CACHE_DIR/xla (default: on)")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from jaxserve.engine import LLM, SamplingParams
  from jaxserve.loaders import load_model
  m = load_model(args.model, args.dtype, args.tokenizer)
  if m.tokenizer is None:
    raise ValueError(f"{args.model}: no tokenizer found; pass --tokenizer")
  params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
  max_len = min(m.cfg.max_position_embeddings, len(m.tokenizer.encode(args.prompt, add_bos=True)) + args.max_tokens)
  llm = LLM(m, max_num_seqs=1, max_model_len=max(max_len, 2), compile=args.compile,
            compilation_cache=args.compilation_cache)
  out = llm.generate(args.prompt, params, use_tqdm=False)[0]
  print(args.prompt + out.outputs[0].text)
  return 0
