"""Console scripts: every subcommand has --help; generate and eval run end to end on the embedded model."""

import json
import subprocess
import sys

import pytest

from jaxprune.cli import build_parser as prune_parser
from jaxserve.cli import build_parser as serve_parser


def _subcommands(parser):
  action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
  return sorted(action.choices)


@pytest.mark.parametrize("prog,parser", [("jaxprune", prune_parser), ("jaxserve", serve_parser)])
def test_every_subcommand_has_help(prog, parser):
  for name in _subcommands(parser()):
    out = subprocess.run([sys.executable, "-m", f"{prog}.cli", name, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"usage: {prog} {name}" in out.stdout


def test_generate_and_eval_commands():
  out = subprocess.run([sys.executable, "-m", "jaxserve.cli", "generate", "Once upon a time", "--max-tokens", "20"],
                       capture_output=True, text=True, check=True)
  assert out.stdout.startswith("Once upon a time") and len(out.stdout.split()) > 10
  out = subprocess.run([sys.executable, "-m", "jaxprune.cli", "eval", "--max-windows", "8", "--json"],
                       capture_output=True, text=True, check=True)
  result = json.loads(out.stdout)
  assert result["windows"] == 8 and 2.0 < result["perplexity"] < 8.0


def test_eval_bad_input_is_a_clear_error(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jaxprune.cli", "eval", "--data", str(tmp_path / "none.txt")],
                       capture_output=True, text=True)
  assert out.returncode == 2 and "none.txt: cannot read" in out.stderr
  tiny = tmp_path / "tiny.txt"
  tiny.write_text("Hi.")
  out = subprocess.run([sys.executable, "-m", "jaxprune.cli", "eval", "--data", str(tiny)], capture_output=True, text=True)
  assert out.returncode == 2 and "fewer than one window" in out.stderr
