"""``benchmarks/abuse.py --smoke``: every abuse case runs against a live server, gets its expected
status, and the greedy streams in flight stay correct and are never frozen for long."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_abuse_smoke(tmp_path):
  out = tmp_path / "abuse.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "abuse.py"), "--smoke", "--out", str(out)],
                        capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["cpu"] and len(res["load_average_before"]) == 3 and res["tracebacks_in_server_log"] == 0
  rows = {r["case"]: r for r in res["cases"]}
  assert {"chunked_body_50MB", "prompts_2M", "json_nested_100k", "lone_surrogate_model", "slowloris",
          "unread_streams", "flood", "n_x_max_tokens"} <= set(rows)
  bad = {name: (r["status"], r["detail"]) for name, r in rows.items() if not r["expected"]}
  assert not bad, bad
  wrong = {name: r["streams_equal"] for name, r in rows.items() if not r["streams_correct"]}
  assert not wrong, wrong  # the streams in flight gave LLM.generate's greedy text through every case
  assert all(r["healthy_after"] for r in rows.values())
  # no case froze the streams for seconds (an 8 MB prompt froze them 7.5 s, 2M prompts 30 s, before)
  assert max(r["longest_gap_s"] for r in rows.values()) < 10, {n: r["longest_gap_s"] for n, r in rows.items()}
  assert "streams ok" in proc.stdout and "wrote" in proc.stdout
