"""``benchmarks/sampler_cpu.py --smoke`` runs against a baseline revision and writes its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sampler_benchmark_smoke(tmp_path):
  out = tmp_path / "sampler.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sampler_cpu.py"), "--smoke", "--baseline-rev",
                         "HEAD", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["cpu"] and len(res["rows"]) == 6  # 3 cases x rows 3 and 8
  for row in res["rows"]:
    assert row["ms"] > 0 and row["baseline_ms"] > 0
    assert row["same_tokens"] == row["rows"]  # the same code and seeds: the same tokens
