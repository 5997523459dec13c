"""``benchmarks/serving.py --smoke`` runs end to end and writes the timeline of both jaxserve processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_serving_benchmark_smoke_writes_the_timeline(tmp_path):
  out = tmp_path / "serving.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--smoke", "--out", str(out),
                         "--model-dir", str(tmp_path / "model"), "--cache-dir", str(tmp_path / "xla")],
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(out.read_text())
  first, second = res["timeline"]["jaxserve"], res["timeline"]["jaxserve_second_process"]
  for key in ("construction_s", "first_pass_s", "first_pass_tok_s", "steady_tok_s", "first_over_steady",
              "construction_plus_first_s"):
    assert first[key] > 0, key
  assert res["jaxserve"]["programs_at_construction"] > 0
  assert res["jaxserve"]["compiled_in_first_pass"] == 0 and res["jaxserve"]["recompiled_after_warmup"] == 0
  assert second["cache_hits"] >= second["programs"] > 0  # the second process loaded every program from the cache
  assert second["same_tokens"] and second["construction_plus_first_s"] > 0 and second["over_first_process"] > 0
  assert "error" in res["vllm"]  # not run in a smoke test, and said so
  bf = res["jaxserve_bfloat16"]  # the bfloat16 timeline of the same run
  assert bf["tok_s"] > 0 and bf["recompiled_after_warmup"] == 0 and 0 <= bf["greedy_match_vs_float32"] <= 1
  assert res["timeline"]["jaxserve_bfloat16"]["steady_tok_s"] > 0 and res["bfloat16_over_float32"] > 0
