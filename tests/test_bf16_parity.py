"""bfloat16 rounded where PyTorch rounds: the MLP and the attention reference against transformers' bfloat16.

A bfloat16 model whose numbers round at other points than PyTorch's takes other greedy tokens
wherever two logits are near a tie (random-weight models have many). These tests pin the two
places where jaxserve rounded differently: SiLU (``jax.nn.silu`` rounds the sigmoid to bfloat16
before the product; PyTorch computes it in float32 and rounds once) and the softmax weights of
attention (PyTorch's CPU SDPA rounds the unnormalized weights ``exp(s - max)`` to bfloat16 and
divides by their float32 sum at the end; jaxserve normalized first). The comparison is bit for bit.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

from jaxserve.config import ModelConfig
from jaxserve.model import MLP, dot_product_attention


def _bf16(t: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(t.detach().float().numpy(), jnp.bfloat16)


def test_mlp_bfloat16_equals_transformers():
  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=88, initializer_range=0.5)
  hf_mlp = transformers.models.llama.modeling_llama.LlamaMLP(hf_cfg).eval().to(torch.bfloat16)
  x = torch.randn(3, 40, 64).to(torch.bfloat16)
  with torch.no_grad():
    want = hf_mlp(x).float().numpy()
  params = {name: {"kernel": _bf16(getattr(hf_mlp, name).weight.T)} for name in ("gate_proj", "up_proj", "down_proj")}
  cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=88, num_layers=1, num_heads=4, num_kv_heads=4, head_dim=16,
                    dtype="bfloat16")
  got = np.asarray(MLP(cfg, 0).apply({"params": params}, _bf16(x)), np.float32)
  # the three matmuls accumulate in float32 in another order than PyTorch's: a rare output rounds the
  # other way (measured 0.03% here); SiLU rounded in bfloat16 made 59% of them differ
  assert np.mean(got != want) < 0.005


def test_attention_bfloat16_rounds_closer_to_torch_sdpa():
  """Decodes and causal prefills over several GQA ratios against PyTorch's flash SDPA on the CPU.

  Not bit for bit: PyTorch's kernel differs in some detail we have not pinned down (its exp and an
  online or chunked softmax were ruled out), so a few percent of outputs still differ, mostly by one
  bfloat16 unit. Normalizing the weights before rounding them (the old reference) made about 45% differ.
  """
  differ, total = 0, 0
  for heads, kv_heads, queries, keys in [(4, 2, 1, 57), (8, 2, 1, 130), (4, 4, 1, 16), (8, 1, 1, 300), (4, 2, 40, 40)]:
    gen = torch.Generator().manual_seed(keys)
    q = torch.randn(2, heads, queries, 64, generator=gen).to(torch.bfloat16)
    k = torch.randn(2, kv_heads, keys, 64, generator=gen).to(torch.bfloat16)
    v = torch.randn(2, kv_heads, keys, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
      want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=queries > 1, enable_gqa=True)
    mask = jnp.broadcast_to(jnp.arange(keys)[None, :] <= jnp.arange(keys - queries, keys)[:, None], (2, queries, keys))
    got = dot_product_attention(_bf16(q.transpose(1, 2)), _bf16(k.transpose(1, 2)), _bf16(v.transpose(1, 2)), mask)
    assert got.dtype == jnp.bfloat16
    got = np.asarray(got, np.float32).transpose(0, 2, 1, 3)
    differ += int(np.sum(got != want.float().numpy()))
    total += got.size
  assert differ / total < 0.15  # measured 0.048 (the old reference: 0.45)
