"""``benchmarks/gpu_scale.py --smoke``: the GPU-scale script runs end to end on tiny shapes on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_scale_smoke(tmp_path):
  out = tmp_path / "gpu_scale.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "all", "--smoke", "--out", str(out)],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  s = res["serve"]
  assert s["greedy_equal_to_xla"] == "2/2"  # the Pallas kernels (interpret mode) give XLA's greedy tokens
  assert s["serving"]["output_tokens"] > 0 and s["serving"]["output_tok_s"] > 0
  assert [r["batch"] for r in s["decode"]] == [1, 4]
  assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in s["decode"])
  assert s["weight_bytes"] > 0 and s["copy"]["read_GBps_best"] > 0
  prune = {(r["method"], r["target"]): r for r in res["prune"]}
  assert set(prune) == {("wanda", "50%"), ("sparsegpt", "50%"), ("wanda", "2:4"), ("sparsegpt", "2:4")}
  for r in prune.values():
    assert abs(r["sparsity"] - 0.5) < 0.02, r
  assert "step / floor" in proc.stdout and "| sparsegpt | 2:4 |" in proc.stdout


def test_full_run_needs_a_gpu():
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), "serve"], capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert proc.returncode != 0 and "needs a GPU" in proc.stderr
