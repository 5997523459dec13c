"""``jaxserve serve``: run the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import logging
import os
import time

from jaxserve._cli_args import add_model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                     description="Serve a model over HTTP with OpenAI's completions and chat completions API.")
  add_model_args(p)
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
  p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
  p.add_argument("--api-key", default=os.environ.get("JAXSERVE_API_KEY"),
                 help="require 'Authorization: Bearer KEY' on /v1 routes (default: $JAXSERVE_API_KEY, else none)")
  p.add_argument("--served-model-name", default=None,
                 help="model name clients pass (default: the model file's name, 'stories260K' when embedded)")
  e = p.add_argument_group("engine")
  e.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
  e.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks in the pool (default: engine's choice)")
  e.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch at most")
  e.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one engine step at most")
  e.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens per sequence "
                 "(default: the model's context)")
  e.add_argument("--no-prefix-caching", action="store_true", help="disable automatic prefix caching")
  e.add_argument("--sparse-weights", choices=["auto", "off"], default="auto",
                 help="auto: a pruned model's sparse kernels run compressed (N:M, bitmask); off: all dense")
  e.add_argument("--seed", type=int, default=0, help="engine seed (requests without a seed draw from it)")
  e.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                 help="compile the decode step of every batch-size bucket (and, with --background-compile, catch-all "
                      "mixed steps) before listening (default: on)")
  e.add_argument("--background-compile", action=argparse.BooleanOptionalAction, default=True,
                 help="run a step whose shape bucket is not compiled yet in a larger compiled one while its own "
                      "compiles on a helper thread, instead of stalling every stream (default: on)")
  p.add_argument("--shutdown-timeout", type=float, default=30.0,
                 help="on SIGTERM, seconds in-flight requests get to finish before they are aborted")
  p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
  p.set_defaults(func=run)


def served_name(model: str | None) -> str:
  if model is None:
    return "stories260K"
  return os.path.splitext(os.path.basename(os.path.normpath(model)))[0]


def run(args: argparse.Namespace) -> int:
  from jaxserve import LLM
  from jaxserve.loaders import load_model
  from jaxserve.server import ServerConfig, create_app
  from jaxserve.server._runner import run as run_server

  if not 0 <= args.port <= 65535:
    raise ValueError(f"--port must be in [0, 65535], got {args.port}")
  if args.shutdown_timeout < 0:
    raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  loaded = load_model(args.model, args.dtype, args.tokenizer)
  if loaded.tokenizer is None:
    raise ValueError(f"{args.model}: no tokenizer found; pass --tokenizer")
  llm = LLM(model=loaded, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len, dtype=args.dtype,
            enable_prefix_caching=not args.no_prefix_caching, seed=args.seed,
            background_compile=args.background_compile, sparse_weights=args.sparse_weights)
  del loaded  # the engine holds the weights in the form it runs them; no dense copy beside them
  if args.warmup:
    t0 = time.perf_counter()
    n = llm.warmup(mixed=args.background_compile)
    logging.getLogger("jaxserve.serve").info("warm-up: compiled %d step programs in %.1f s", n,
                                             time.perf_counter() - t0)
  config = ServerConfig(model_name=args.served_model_name or served_name(args.model),
                        max_model_len=llm.max_model_len, vocab_size=llm.model.cfg.vocab_size, api_key=args.api_key)
  app = create_app(llm, llm.tokenizer, config)
  run_server(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)
  return 0
