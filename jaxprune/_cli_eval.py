"""``jaxprune eval``: perplexity of a model on a text file."""

from __future__ import annotations

import argparse
import json
import time

from jaxserve.cli_args import add_model_args


def add_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("eval", help="perplexity on a text file",
                     description="Perplexity: tokenize the whole file, split into non-overlapping windows of "
                                 "--seq-len tokens, prepend BOS to each, ppl = exp(mean NLL).")
  add_model_args(p)
  p.add_argument("--data", default=None, help="text file (default: the embedded TinyStories validation text)")
  p.add_argument("--seq-len", type=int, default=256, help="window length in tokens")
  p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from jaxprune._data import read_text
  from jaxprune.eval import perplexity
  from jaxserve.loaders import EVAL_TEXT, load_model
  path = args.data or EVAL_TEXT
  text = read_text(path, "evaluation text")
  m = load_model(args.model, args.dtype, args.tokenizer, dense=True)
  if m.tokenizer is None:
    raise ValueError(f"{args.model}: no tokenizer found; pass --tokenizer")
  t0 = time.perf_counter()
  ids = m.tokenizer.encode(text)
  ppl = perplexity(m.params, m.cfg, ids, args.seq_len, args.max_windows)
  n_windows = len(ids) // args.seq_len if args.max_windows is None else min(len(ids) // args.seq_len, args.max_windows)
  result = {"model": args.model or "stories260K (embedded)", "data": path, "seq_len": args.seq_len,
            "windows": n_windows, "tokens": n_windows * args.seq_len, "perplexity": ppl,
            "seconds": time.perf_counter() - t0}
  if args.json:
    print(json.dumps(result))
  else:
    print(f"perplexity {ppl:.4f} over {result['windows']} windows of {args.seq_len} tokens ({path})")
  return 0
