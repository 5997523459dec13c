"""Tensor-parallel model on 4 virtual CPU devices: same results, no gathered weights, clear errors, two processes."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.generate import generate
from jaxserve.loaders import load_model
from jaxserve.model import forward
from jaxserve.sharding import make_mesh, shard_params
from jaxserve.testing import tiny_model

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (virtual) devices; see tests/conftest.py")


@pytest.fixture(scope="module")
def stories():
  return load_model()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_sharded_forward_and_greedy_match_one_device(stories, tp):
  m = stories
  params = shard_params(m.params, m.cfg, make_mesh(tp))
  q = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert {s.data.shape for s in q.addressable_shards} == {(64, 64 // tp)}
  tokens = jnp.asarray([m.tokenizer.encode("Once upon a time, a cat", add_bos=True)])
  ref = forward(m.params, m.cfg, tokens).logits
  got = forward(params, m.cfg, tokens).logits
  assert float(jnp.abs(ref - got).max()) < 1e-4
  prompt = m.tokenizer.encode("Lily and Ben went to the", add_bos=True)
  assert generate(params, m.cfg, [prompt], 40) == generate(m.params, m.cfg, [prompt], 40)


def test_compiled_program_gathers_no_weight_matrix(stories):
  m = stories
  params = shard_params(m.params, m.cfg, make_mesh(4))
  tokens = jnp.zeros((2, 16), jnp.int32)
  hlo = jax.jit(lambda p, t: forward(p, m.cfg, t).logits).lower(params, tokens).compile().as_text()
  assert "all-reduce" in hlo  # row-parallel projections reduce their partial sums
  assert "all-gather" not in hlo


def test_invalid_tensor_parallel_settings():
  cfg, params = tiny_model(num_heads=6, num_kv_heads=3)
  with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide .* layer 0 has 3 KV heads"):
    shard_params(params, cfg, make_mesh(2))
  with pytest.raises(ValueError, match=r"tensor_parallel_size=8 needs that many devices, but only 4"):
    make_mesh(8)
  with pytest.raises(ValueError, match="must be >= 1"):
    make_mesh(0)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_form_one_mesh(stories):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "-m", "jaxserve.multihost", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--local-devices", "2", "--max-tokens", "24", "--prompt", "Once upon a time"]
  procs = [subprocess.Popen(cmd + ["--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-2000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert [r["process_id"] for r in results] == [0, 1]
  assert all(r["devices"] == 4 and r["processes"] == 2 for r in results)
  m = stories
  expected = generate(m.params, m.cfg, [m.tokenizer.encode("Once upon a time", add_bos=True)], 24)[0]
  assert results[0]["tokens"] == results[1]["tokens"] == expected
