"""The ``jaxprune`` command: one subcommand per module listed in ``SUBCOMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes ``add_parser(subparsers)`` registering a subparser with ``set_defaults(func=run)``.
SUBCOMMANDS = ["jaxprune._cli_eval", "jaxprune._cli_structured", "jaxprune._cli_prune", "jaxprune._cli_finetune",
               "jaxprune._demo"]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxprune", description="Prune LLaMA-family models and evaluate them.")
  sub = parser.add_subparsers(dest="command", required=True)
  for name in SUBCOMMANDS:
    importlib.import_module(name).add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return int(args.func(args) or 0)
  except ValueError as e:
    print(f"jaxprune {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
