"""The engine executes a pruned model's sparsity: same tokens and logits as dense, fewer bytes held, no dense copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import checkpoint
from jaxserve import weights
from jaxserve.engine import LLM, SamplingParams
from jaxserve.engine import _cpu_kernels
from jaxserve.engine._weight_forms import prepare_params, weight_formats
from jaxserve.loaders import LoadedModel
from jaxserve.model import forward
from jaxserve.testing import tiny_model

KW = dict(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32, vocab_size=256)


def _kernels_or_skip():
  if not _cpu_kernels.available():
    pytest.skip(f"no C++ CPU kernels: {_cpu_kernels._state.get('error')}")


@pytest.fixture(scope="module", params=["2:4", "4:8", "50%", "70%"])
def pruned(request):
  cfg, params = tiny_model(seed=1, **KW)
  scores = jaxprune.magnitude_scores(params)
  pattern = request.param
  masks = (jaxprune.nm_masks(scores, pattern) if ":" in pattern
           else jaxprune.topk_masks(scores, int(pattern[:-1]) / 100))
  return pattern, cfg, jaxprune.apply_masks(params, masks)


def test_native_forward_logits_match_dense(pruned):
  """The C++ sparse kernels inside the model: logits within 1e-4 of the same weights run dense."""
  _kernels_or_skip()
  pattern, cfg, params = pruned
  native = prepare_params(params, native=True)
  forms = weight_formats(native)
  assert forms.get("bitmask" if "%" in pattern else pattern, 0) == 2 * 7, forms  # every block kernel
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 21)), jnp.int32)
  run = jax.jit(lambda p, t: forward(p, cfg, t).logits)
  target = _cpu_kernels.BITMASK_MATMUL_TARGET if "%" in pattern else _cpu_kernels.NM_MATMUL_TARGET
  assert target in run.lower(native, tokens).as_text()  # the native kernel runs, not the dense expansion
  got = run(native, tokens)
  want = jax.jit(lambda p, t: forward(p, cfg, t).logits)(params, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_engine_sparse_equals_dense_run(pruned):
  """``LLM`` with the pruned model compressed gives the greedy tokens of the same model run dense."""
  _kernels_or_skip()
  pattern, cfg, params = pruned
  rng = np.random.default_rng(0)
  prompts = [{"prompt_token_ids": rng.integers(3, cfg.vocab_size, int(n)).tolist()} for n in rng.integers(4, 60, 12)]
  sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, detokenize=False)
  out, stats = {}, {}
  for mode in ("auto", "off"):
    llm = LLM(LoadedModel(cfg, params, None), max_num_seqs=8, max_model_len=128, sparse_weights=mode)
    out[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    stats[mode] = llm.stats()
  assert out["auto"] == out["off"]
  assert "packed" in stats["off"]["weight_formats"] and set(stats["off"]["weight_formats"]) <= {"packed", "dense"}
  ratio = stats["auto"]["weight_bytes"] / stats["off"]["weight_bytes"]
  assert ratio < (0.75 if pattern in ("2:4", "4:8", "50%") else 0.6), ratio


def test_sparse_weights_is_validated():
  with pytest.raises(ValueError, match=r"sparse_weights must be one of \('auto', 'off'\), got 'on'"):
    LLM(max_model_len=64, sparse_weights="on")


def test_bfloat16_runs_dense(pruned):
  """No bfloat16 sparse kernels yet: a bfloat16 engine expands compressed kernels and runs them dense (packed)."""
  _, cfg, params = pruned
  cfg16 = cfg.replace(dtype="bfloat16")
  typed = jax.tree_util.tree_map_with_path(
      lambda p, x: weights.compress(x).astype(jnp.bfloat16) if getattr(p[-1], "key", "") == "kernel"
      and weights.is_typed(weights.compress(x)) else x.astype(jnp.bfloat16), params)
  llm = LLM(LoadedModel(cfg16, typed, None), max_num_seqs=4, max_model_len=64)
  assert set(llm.stats()["weight_formats"]) <= {"dense", "packed"}
  out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                     use_tqdm=False)
  assert len(out[0].outputs[0].token_ids) == 4


_NO_COPY = textwrap.dedent("""
  import gc, json, sys
  import jax
  from jaxserve.engine import LLM
  llm = LLM(sys.argv[1], num_kv_blocks=32, max_model_len=64, max_num_seqs=4)
  gc.collect()
  live = sum(a.nbytes for a in jax.live_arrays())
  pools = sum(a.nbytes for pair in llm.engine.runner.kv_pools for a in pair)
  print(json.dumps(dict(live=live, weights=llm.stats()["weight_bytes"], pools=pools,
                        formats=llm.stats()["weight_formats"])))
""")


def test_no_dense_copy_after_loading_a_compressed_checkpoint(tmp_path):
  """After ``LLM(model=DIR)`` the live arrays are the compressed weights plus the KV pool (within 5%)."""
  _kernels_or_skip()
  cfg, params = tiny_model(seed=2, hidden_size=256, intermediate_size=1024, num_layers=3, num_heads=4,
                           num_kv_heads=2, head_dim=64, vocab_size=64)
  masks = jaxprune.nm_masks(jaxprune.magnitude_scores(params), "2:4")
  d = checkpoint.save(str(tmp_path / "m"), jaxprune.apply_masks(params, masks), masks, cfg=cfg)
  proc = subprocess.run([sys.executable, "-c", _NO_COPY, d], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["formats"].get("2:4") == 3 * 4  # per block: q/k/v joined, o, gate/up joined, down
  dense = sum(x.size * 4 for x in jax.tree.leaves(params))
  assert got["weights"] < 0.62 * dense  # 2:4 kernels, dense embeddings and head
  assert got["live"] <= 1.05 * (got["weights"] + got["pools"]), got
