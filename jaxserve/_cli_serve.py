"""``jaxserve serve``: run the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import TYPE_CHECKING

from jaxserve._cli_args import add_model_args

if TYPE_CHECKING:
  from jaxserve.server._limits import TransportLimits

# a server's prompt tokens per step (LLM's max_num_prefill_tokens): the prompts of a burst are read about
# one per step, so its requests get their first tokens one after another, not all after the whole burst
SERVE_PREFILL_TOKENS = 128


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                     description="Serve a model over HTTP with OpenAI's completions and chat completions API.")
  add_model_args(p)
  p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                 help="the model to serve, as with --model (vLLM's 'vllm serve MODEL')")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
  p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
  p.add_argument("--api-key", default=os.environ.get("JAXSERVE_API_KEY"),
                 help="require 'Authorization: Bearer KEY' on /v1 routes (default: $JAXSERVE_API_KEY, else none)")
  p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                 help="names clients may pass as 'model'; the first is the one responses use by default "
                      "(default: the model path as given, 'stories260K' when embedded)")
  e = p.add_argument_group("engine")
  e.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
  e.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks in the pool (default: engine's choice)")
  e.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch at most")
  e.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one engine step at most")
  e.add_argument("--max-num-prefill-tokens", type=int, default=None,
                 help="prompt tokens one engine step reads at most, so prompts arriving together are read one "
                      f"after another and each gets its first token sooner (default: {SERVE_PREFILL_TOKENS}, at most "
                      "--max-num-batched-tokens; 0: no limit but --max-num-batched-tokens, LLM's default)")
  e.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens per sequence "
                 "(default: the model's context)")
  e.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                 help="bytes of the KV pool, if --num-kv-blocks is not given (default: engine's choice)")
  e.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="devices to shard the model over")
  e.add_argument("--attention-backend", choices=["auto", "xla", "pallas"], default="auto",
                 help="auto: the Pallas kernels on GPU, XLA elsewhere")
  e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                 help="reuse the KV blocks of earlier requests' identical prefixes (default: on)")
  e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                 help="the same as --no-enable-prefix-caching")
  e.add_argument("--sparse-weights", choices=["auto", "off"], default="auto",
                 help="auto: a pruned model's sparse kernels run compressed (N:M, bitmask); off: all dense")
  e.add_argument("--seed", type=int, default=0, help="engine seed (requests without a seed draw from it)")
  e.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                 help="compile every step program not compiled yet before listening (with --compile lazy; "
                      "--compile eager has compiled them all already) (default: on)")
  e.add_argument("--compile", choices=["eager", "lazy"], default="eager",
                 help="eager: compile the engine's fixed set of step programs before listening, so the first "
                      "requests run at full speed; lazy: compile each on first use (default: eager)")
  e.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction, default=True,
                 help="load and keep compiled programs in $JAXSERVE_CACHE_DIR/xla (default ~/.cache/jaxserve/xla), so "
                      "a restart with the same model and flags starts in seconds (default: on)")
  e.add_argument("--background-compile", action=argparse.BooleanOptionalAction, default=True,
                 help="run a step whose shape bucket is not compiled yet in a larger compiled one while its own "
                      "compiles on a helper thread, instead of stalling every stream (default: on)")
  p.add_argument("--shutdown-timeout", type=float, default=30.0,
                 help="on SIGTERM, seconds in-flight requests get to finish before they are aborted")
  p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
  _add_limit_args(p)
  p.set_defaults(func=run)


def prefill_tokens(args: argparse.Namespace) -> int | None:
  """``--max-num-prefill-tokens`` as ``LLM`` takes it: the server's default where not given, None for 0."""
  n = args.max_num_prefill_tokens
  if n is None:
    return min(SERVE_PREFILL_TOKENS, args.max_num_batched_tokens)
  if n < 0:
    raise ValueError(f"--max-num-prefill-tokens must be >= 0 (0: no limit), got {n}")
  return n or None


def model_path(args: argparse.Namespace) -> str | None:
  """The model to load: the positional MODEL or ``--model`` (one of them, or the same in both)."""
  if args.model_arg is not None and args.model is not None and args.model_arg != args.model:
    raise ValueError(f"two models given: {args.model_arg!r} and --model {args.model!r}; pass one")
  return args.model_arg if args.model_arg is not None else args.model


def served_names(args: argparse.Namespace) -> tuple[str, ...]:
  """``--served-model-name`` values, else the model path as given (vLLM's default), else 'stories260K'."""
  if args.served_model_name:
    return tuple(args.served_model_name)
  model = model_path(args)
  return (model if model is not None else "stories260K",)


def llm_kwargs(args: argparse.Namespace) -> dict[str, object]:
  """The ``jaxserve.LLM`` keyword arguments (all but ``model``) the engine flags ask for."""
  return dict(block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_prefill_tokens=prefill_tokens(args),
              max_model_len=args.max_model_len, dtype=args.dtype,
              enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
              attention_backend=args.attention_backend, tensor_parallel_size=args.tensor_parallel_size,
              background_compile=args.background_compile, sparse_weights=args.sparse_weights, compile=args.compile,
              compilation_cache=args.compilation_cache)


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
  model = model_path(args)
  names = served_names(args)
  loaded = load_model(model, args.dtype, args.tokenizer)
  if loaded.tokenizer is None:
    raise ValueError(f"{model}: no tokenizer found; pass --tokenizer")
  llm = LLM(model=loaded, **llm_kwargs(args))
  del loaded  # the engine holds the weights in the form it runs them; no dense copy beside them
  if args.warmup:
    t0 = time.perf_counter()
    n = llm.warmup(mixed=args.background_compile)
    logging.getLogger("jaxserve.serve").info("warm-up: compiled %d step programs in %.1f s", n,
                                             time.perf_counter() - t0)
  config = ServerConfig(model_name=names[0], aliases=names[1:], max_model_len=llm.max_model_len,
                        vocab_size=llm.model.cfg.vocab_size, api_key=args.api_key)
  stats = llm.stats()
  limits = _limits_from_args(args, max_num_seqs=args.max_num_seqs, max_model_len=llm.max_model_len,
                             kv_pool_tokens=stats["kv_blocks_total"] * stats["kv_block_size"])
  app = create_app(llm, llm.tokenizer, config, limits=limits)
  run_server(app, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
             header_timeout=limits.header_timeout)
  return 0


def _add_limit_args(p: argparse.ArgumentParser) -> None:
  """The ``jaxserve serve`` flags of ``jaxserve.server._limits.TransportLimits`` (same defaults)."""
  g = p.add_argument_group("limits per client")
  g.add_argument("--max-queued-requests", type=int, default=256,
                 help="sequences that may wait for a batch slot beyond --max-num-seqs; requests beyond get 429 "
                      "with Retry-After (default 256)")
  g.add_argument("--max-tokens-per-request", type=int, default=None,
                 help="most n x max_tokens (summed over prompts) one request may ask for "
                      "(default: half the KV pool's tokens, at least max_model_len)")
  g.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                 help="largest request body in bytes, counted while reading (default 8 MiB)")
  g.add_argument("--header-timeout", type=float, default=10.0,
                 help="seconds to receive a request's headers; idle connections are closed after it (default 10)")
  g.add_argument("--body-timeout", type=float, default=30.0,
                 help="seconds to receive a request's body (default 30)")
  g.add_argument("--stream-stall-timeout", type=float, default=30.0,
                 help="seconds a streaming client may read nothing before its requests are aborted (default 30)")
  g.add_argument("--max-stream-buffer", type=int, default=65536,
                 help="tokens and logprobs (one entry each) buffered for a client that does not read before its "
                      "requests are aborted (default 65536)")


def _limits_from_args(args: argparse.Namespace, *, max_num_seqs: int, max_model_len: int,
                      kv_pool_tokens: int | None) -> TransportLimits:
  """``TransportLimits`` from the flags of :func:`_add_limit_args` and the engine's sizes."""
  from jaxserve.server._limits import TransportLimits  # noqa: PLC0415
  if args.max_queued_requests < 0:
    raise ValueError(f"--max-queued-requests must be >= 0, got {args.max_queued_requests}")
  per_request = args.max_tokens_per_request
  if per_request is None and kv_pool_tokens is not None:
    per_request = max(max_model_len, kv_pool_tokens // 2)
  return TransportLimits(max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
                         header_timeout=args.header_timeout,
                         max_in_flight_seqs=max_num_seqs + args.max_queued_requests,
                         max_tokens_per_request=per_request, max_stream_buffer=args.max_stream_buffer,
                         stream_stall_timeout=args.stream_stall_timeout)
