"""Pruned models leave the library: native checkpoints load in the engine and generate; uniform ones load in transformers."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxprune.structured import Importance, StructuredConfig, prune_structured
from jaxserve.engine import LLM, SamplingParams
from jaxserve.generate import generate
from jaxserve.loaders import load_model, save_hf, save_native
from jaxserve.model import forward
from jaxserve.testing import tiny_model

PROMPTS = [[1, 17, 3, 88, 41], [1, 9, 60, 2, 31, 70, 12, 8, 44]]


@pytest.mark.parametrize("sc", [
    StructuredConfig(ratio=0.5, importance=Importance(kind="l2")),
    StructuredConfig(ratio=0.25, mode="channel", round_to=8, importance=Importance(kind="l1")),
    StructuredConfig(ratio=0.5, attention_unit="query_head", importance=Importance(kind="l2")),
], ids=["block", "channel", "query_head"])
def test_uniform_pruned_model_exports_to_transformers_with_the_same_logits(tmp_path, sc):
  cfg, params = tiny_model(seed=2, num_heads=8, num_kv_heads=4, num_layers=2)
  res = prune_structured(params, cfg, sc)
  assert res.cfg.is_uniform
  save_hf(res.cfg, res.params, str(tmp_path))
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval().float()
  assert hf.config.hidden_size == res.cfg.hidden_size and hf.config.intermediate_size == res.cfg.intermediate_size
  assert hf.config.num_attention_heads == res.cfg.num_heads and hf.config.num_key_value_heads == res.cfg.num_kv_heads
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 30))
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(forward(res.params, res.cfg, jnp.asarray(tokens)).logits)
  assert np.abs(ours - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_non_uniform_model_refuses_hf_export_and_saves_natively(tmp_path):
  cfg, params = tiny_model(seed=2, num_heads=8, num_kv_heads=4, num_layers=3)
  res = prune_structured(params, cfg, StructuredConfig(ratio=0.5, mlp_layers=(1, 2), attention_layers=(0, 1),
                                                       importance=Importance(kind="l2")))
  with pytest.raises(ValueError, match="every layer to have the same heads"):
    save_hf(res.cfg, res.params, str(tmp_path / "hf"))
  save_native(res.cfg, res.params, str(tmp_path / "native"))
  loaded = load_model(str(tmp_path / "native"))
  assert loaded.cfg == res.cfg
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 12)))
  np.testing.assert_array_equal(forward(loaded.params, loaded.cfg, tokens).logits,
                                forward(res.params, res.cfg, tokens).logits)


def test_pruned_model_loads_in_the_engine_and_generates_like_the_reference(tmp_path):
  cfg, params = tiny_model(seed=4, num_heads=8, num_kv_heads=4, num_layers=3)
  res = prune_structured(params, cfg, StructuredConfig(ratio=0.5, attention_layers=(0, 2), mlp_layers=(1, 3),
                                                       importance=Importance(kind="l1")))
  assert not res.cfg.is_uniform
  save_native(res.cfg, res.params, str(tmp_path))
  llm = LLM(model=str(tmp_path), max_model_len=64, num_kv_blocks=32, max_num_seqs=4)
  outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
  ref = generate(res.params, res.cfg, PROMPTS, max_new_tokens=20)
  assert [o.outputs[0].token_ids for o in outs] == ref
  assert all(len(r) == 20 for r in ref)


def _cli(*args):
  out = subprocess.run([sys.executable, "-m", "jaxprune.cli", *args], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout)


def test_cli_prune_recover_eval_and_serve_the_embedded_model(tmp_path):
  out, hf = tmp_path / "pruned", tmp_path / "hf"
  result = _cli("prune-structured", "--pruning-ratio", "0.25", "--block-wise", "--pruner-type", "taylor",
                "--taylor", "param_first", "--num-examples", "4", "--finetune-steps", "3", "--lora-rank", "4",
                "--test-after-train", "--eval-windows", "2", "--out", str(out), "--hf-out", str(hf), "--json")
  assert result["parameters_after"] < result["parameters_before"]
  assert result["config"]["num_kv_heads"] == 3 and result["config"]["intermediate_size"] == 129
  assert result["perplexity_pruned"] > result["perplexity_dense"]
  ev = _cli("eval", "--model", str(out), "--max-windows", "2", "--json")
  assert ev["perplexity"] == pytest.approx(result["perplexity_recovered"], rel=1e-5)
  assert _cli("eval", "--model", str(hf), "--max-windows", "2", "--json")["perplexity"] == \
      pytest.approx(ev["perplexity"], rel=1e-4)
  llm = LLM(model=str(out), max_model_len=128, num_kv_blocks=32, max_num_seqs=2)
  text = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
  assert len(text[0].outputs[0].token_ids) > 0 and text[0].outputs[0].text.strip()
