"""``benchmarks/attention_cpu.py --smoke`` runs and writes what the README's table reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.engine import _cpu_kernels

ROOT = Path(__file__).resolve().parents[1]


def test_attention_cpu_smoke(tmp_path):
  if not _cpu_kernels.available():
    pytest.skip(f"no CPU kernels: {_cpu_kernels._state.get('error')}")
  if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
    pytest.skip("not a git checkout (the baseline is read from git)")
  out = tmp_path / "attention_cpu.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_cpu.py"), "--smoke", "--baseline-rev",
                         "HEAD", "--out", str(out)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["baseline_commit"] == "HEAD" and res["cpu"] and len(res["loadavg"]) == 3
  for dtype in ("float32", "bfloat16"):
    row = res["results"][dtype]
    assert row["kv_bytes"] > 0 and row["ms"]["new"] > 0 and row["ms"]["old"] > 0 and row["GBps"]["plain read"] > 0
    # the committed kernel is its own baseline here: from the same pools, the same outputs
    assert row["max_abs_diff_old_new"] <= 1e-6 and row["old_over_new"] > 0
