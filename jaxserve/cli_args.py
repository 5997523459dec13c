"""Command-line arguments shared by the ``jaxserve`` and ``jaxprune`` subcommands (the public home of CLI helpers)."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
  """Adds ``--model``, ``--tokenizer`` and ``--dtype`` (what :func:`jaxserve.loaders.load_model` takes)."""
  p.add_argument("--model", default=None,
                 help="model: a llama2.c .bin file, a Hugging Face directory or a saved directory "
                      "(default: the embedded stories260K)")
  p.add_argument("--tokenizer", default=None, help="tokenizer path (default: found beside the model)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
