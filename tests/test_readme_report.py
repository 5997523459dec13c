"""The README's figures are what `benchmarks/report.py` writes from the committed results files."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
  spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_readme_equals_generated(report):
  text = (ROOT / "README.md").read_text()
  assert report.render(text) == text, "README.md differs from the results files: run python benchmarks/report.py"


def test_every_block_is_placed_once(report):
  names = report.blocks_in((ROOT / "README.md").read_text())
  assert sorted(names) == sorted(report.BLOCKS)


def test_a_hand_edited_figure_is_caught(report, tmp_path):
  text = (ROOT / "README.md").read_text()
  edited = text.replace("| dense | 4.50 |", "| dense | 4.49 |", 1)
  assert edited != text
  assert report.render(edited) == text
  (tmp_path / "README.md").write_text(edited)
  assert report.main(["--check", "--readme", str(tmp_path / "README.md")]) == 1


def test_unknown_block_is_an_error(report):
  with pytest.raises(KeyError, match="no renderer"):
    report.render("<!-- report:nonexistent -->\nx\n<!-- /report:nonexistent -->")


def _numeric(cell: str) -> bool:
  return bool(re.fullmatch(r"\**[\d.,]+\**( ?(x|%|ms|s|GB/s))?( \(.*\))?", cell.strip()))


def test_no_table_of_figures_outside_a_block(report):
  """A table with measured numbers must come from a results file, so it must sit inside a block."""
  text = (ROOT / "README.md").read_text()
  outside = re.sub(r"<!-- report:([a-z0-9-]+) -->\n.*?<!-- /report:\1 -->", "", text, flags=re.S)
  rows = [line for line in outside.splitlines() if line.startswith("|") and not line.startswith("| ---")]
  numeric = [r for r in rows if any(_numeric(c) for c in r.strip("|").split("|")[1:])]
  assert not numeric, f"tables of figures outside a generated block: {numeric[:3]}"



def test_machine_line_names_the_instruction_sets(report):
  """The CI-class VM has come with and without AMX under one model name: the line says which."""
  line = report.machine_line
  assert line(dict(cpu="X", isa=["avx512f", "avx512_bf16", "amx_tile", "amx_bf16"], cpus=2)) == (
      "X (AVX-512, AVX-512 BF16, AMX), 2 cores")
  assert line(dict(cpu="X", isa=["avx2", "fma", "avx512f", "avx512_bf16"], cpus=2)) == "X (AVX-512, AVX-512 BF16, no AMX), 2 cores"
  assert line(dict(cpu="Y", isa=["avx2", "fma"], cpus=2)) == "Y (no AVX-512, no AMX), 2 cores"
  assert line(dict(cpu="Z", cpus=2)) == "Z, 2 cores"  # results written before the instruction sets were recorded
