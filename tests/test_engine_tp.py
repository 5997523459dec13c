"""Tensor-parallel serving on 4 virtual CPU devices: identical greedy outputs, sharded pools, clear errors."""

import jax
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.loaders import load_model
from jaxserve.testing import tiny_model
from jaxserve.loaders import LoadedModel

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (virtual) devices; see tests/conftest.py")

PROMPTS = ["Once upon a time", "Lily and Ben went to the park. They saw", "The cat",
           {"prompt_token_ids": [1, 40, 41, 42, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313]}]


def test_greedy_outputs_identical_for_tp_1_2_4():
  model = load_model()
  params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
  results = {}
  for tp in (1, 2, 4):
    llm = LLM(model, block_size=8, max_model_len=128, max_num_seqs=8, tensor_parallel_size=tp)
    results[tp] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    k_pool = llm.engine.runner.kv_pools[0][0]
    head_axis = 0 if llm.engine.runner.attn.kv_layout == "head" else 1
    assert {s.data.shape[head_axis] for s in k_pool.addressable_shards} == {model.cfg.kv_heads(0) // tp}
    assert llm.stats()["kv_blocks_used"] == 0
  assert results[1] == results[2] == results[4]
  assert all(len(t) == 40 for t in results[1])


def test_invalid_tensor_parallel_settings():
  cfg, params = tiny_model(num_heads=6, num_kv_heads=3)
  model = LoadedModel(cfg, params, None)
  with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide .* 3 KV heads"):
    LLM(model, tensor_parallel_size=2)
  with pytest.raises(ValueError, match=r"tensor_parallel_size=8 needs that many devices, but only 4"):
    LLM(load_model(), tensor_parallel_size=8)
  with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
    LLM(load_model(), tensor_parallel_size=0)
