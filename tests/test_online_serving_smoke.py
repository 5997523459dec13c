"""``benchmarks/online_serving.py --smoke`` against ``jaxserve serve``: the JSON holds the table, every
request streamed one chunk per output token, and ``/tokenize`` round-trips the benchmark's tokenizer.

The builtin client always runs; vLLM's own client (``vllm bench serve``) where its venv exists (not on CI).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from online_serving import DEFAULT_VLLM_PYTHON, METRICS, make_tokenizer  # noqa: E402


@pytest.mark.parametrize("client", ["builtin", "vllm"])
def test_online_serving_smoke(tmp_path, client):
  if client == "vllm" and not os.path.exists(DEFAULT_VLLM_PYTHON):
    pytest.skip(f"vLLM's venv ({DEFAULT_VLLM_PYTHON}) is not installed")
  out = tmp_path / "online.json"
  cmd = [sys.executable, str(ROOT / "benchmarks" / "online_serving.py"), "--smoke", "--servers", "jaxserve",
         "--client", client, "--model-dir", str(tmp_path / "model"), "--out", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["cpu"] and len(res["loadavg_at_start"]) == 3 and res["client"] == client
  assert res["commands"]["jaxserve"][:2] == ["jaxserve", "serve"] and res["commands"]["client"]
  assert res["tokenize_roundtrip"]["ok"], res["tokenize_roundtrip"]
  (row,) = res["rows"]
  assert row["server"] == "jaxserve" and row["concurrency"] == 2 and row["runs"] == 1
  assert all(row[k] is not None and row[k] > 0 for k in METRICS), row
  assert row["mean_ttft_ms"] <= row["p99_ttft_ms"] and row["median_itl_ms"] <= row["p99_itl_ms"]
  # 8 requests of 8 tokens (ignore_eos): each streamed exactly 8 chunks
  assert row["chunks_equal_tokens"] and row["chunks_per_request"] == [8] and row["output_tokens_per_request"] == [8]
  (run,) = res["runs"]["jaxserve"]["2"]
  assert run["completed"] == 8 and not run["failed"]
  assert not [w for w in run["client_warnings"] if "endpoint" in w.lower()], run["client_warnings"]
  assert "jaxserve | 2 |" in proc.stdout and "wrote" in proc.stdout


def test_tokenizer_covers_the_vocabulary(tmp_path):
  from tokenizers import Tokenizer
  make_tokenizer(str(tmp_path), 40)
  tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  assert tok.get_vocab_size() == 40
  ids = list(range(3, 40))
  text = tok.decode(ids)
  assert tok.encode(text).ids == ids and text.split() == [f"w{i}" for i in ids]
  with pytest.raises(ValueError, match="vocab_size must exceed 3"):
    make_tokenizer(str(tmp_path), 3)


def test_row_flags_a_request_with_fewer_chunks_than_tokens():
  from online_serving import row
  run = dict({k: 1.0 for k in METRICS}, completed=2, chunks=[8, 8], output_tokens=[8, 8])
  assert row("jaxserve", 2, [run])["chunks_equal_tokens"]
  coalesced = dict(run, chunks=[8, 5])  # three tokens' text came in one chunk
  r = row("jaxserve", 2, [run, coalesced])
  assert not r["chunks_equal_tokens"] and r["chunks_per_request"] == [5, 8] and r["output_throughput"] == 1.0
