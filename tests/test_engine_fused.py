"""Joined projections: ``weights.concat_columns`` for every kernel kind, and the engine's q/k/v and gate/up fusion."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxserve import weights
from jaxserve.engine import _cpu_kernels
from jaxserve.engine._weight_forms import fuse_projections, prepare_params, weight_formats
from jaxserve.model import forward
from jaxserve.testing import tiny_model
from jaxserve.weights import BitmaskSparse, NMSparse, PackedDense


def _nm_weight(rng, k, n, keep, m):
  w = rng.standard_normal((k, n)).astype(np.float32)
  order = np.argsort(-np.abs(w).reshape(k // m, m, n), axis=1)
  mask = np.zeros((k // m, m, n), bool)
  np.put_along_axis(mask, order[:, :keep], True, axis=1)
  mask = mask.reshape(k, n)
  return w * mask, mask


KINDS = {
    "plain": lambda w, mask: jnp.asarray(w),
    "packed": lambda w, mask: PackedDense.pack(jnp.asarray(w)),
    "packed-bf16": lambda w, mask: PackedDense.pack(jnp.asarray(w, jnp.bfloat16)),
    "2:4": lambda w, mask: NMSparse.compress(w, mask, n=2, m=4),
    "4:8": lambda w, mask: NMSparse.compress(w, mask, n=4, m=8),
    "bitmask": lambda w, mask: BitmaskSparse.compress(w, mask),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_concat_columns_equals_the_dense_concatenation(kind):
  """Parts of widths 64, 32, 40 (the last not a panel multiple) join to exactly ``[A | B | C]``, in their kind."""
  rng = np.random.default_rng(0)
  parts = []
  for n in (64, 32, 48 if kind.startswith("packed") else 40):
    w, mask = _nm_weight(rng, 32, n, 2 if kind == "2:4" else 4, 4 if kind == "2:4" else 8)
    parts.append(KINDS[kind](w, mask))
  joined = weights.concat_columns(parts)
  assert type(joined) is type(parts[0]) and joined.shape == (32, sum(p.shape[1] for p in parts))
  want = np.concatenate([np.asarray(weights.to_dense(p), np.float32) for p in parts], axis=1)
  np.testing.assert_array_equal(np.asarray(weights.to_dense(joined), np.float32), want)
  if isinstance(joined, BitmaskSparse):
    assert int(joined.offsets[-1]) == sum(int(p.offsets[-1]) for p in parts)
    assert joined.values.shape[0] == int(joined.offsets[-1]) + 16


def test_concat_columns_declines_what_it_cannot_join():
  rng = np.random.default_rng(1)
  w, mask = _nm_weight(rng, 32, 40, 2, 4)
  nm = NMSparse.compress(w, mask, n=2, m=4)
  assert weights.concat_columns([nm, nm]) is None  # 40 columns: the first part ends inside a panel
  w2, mask2 = _nm_weight(rng, 32, 32, 2, 4)
  nm2 = NMSparse.compress(w2, mask2, n=2, m=4)
  assert weights.concat_columns([nm2, BitmaskSparse.compress(w2, mask2)]) is None  # two kinds
  assert weights.concat_columns([nm2, PackedDense.pack(jnp.asarray(w2))]) is None
  assert weights.concat_columns([jnp.ones((4, 16)), jnp.ones((8, 16))]) is None  # two K
  assert weights.concat_columns([jnp.ones((4, 16)), jnp.ones((4, 16), jnp.bfloat16)]) is None  # two dtypes


@pytest.mark.parametrize("pattern", ["dense", "2:4", "70%"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_model_equals_the_unfused_one(pattern, bias):
  """The engine's form of a model (packed or compressed, then q/k/v and gate/up joined) gives the plain model's
  logits; every block runs 4 matmuls."""
  if not _cpu_kernels.available():
    assert not any(shutil.which(c) for c in ("c++", "g++", "clang++")), _cpu_kernels._state.get("error")
    pytest.skip("no C++ compiler")
  cfg, params = tiny_model(seed=3, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=16, vocab_size=96, attention_bias=bias)
  if pattern != "dense":
    scores = jaxprune.magnitude_scores(params)
    masks = jaxprune.nm_masks(scores, "2:4") if pattern == "2:4" else jaxprune.topk_masks(scores, 0.7)
    params = jaxprune.apply_masks(params, masks)
  fused = fuse_projections(prepare_params(params, native=True))
  for i in range(cfg.num_layers):
    block = fused[f"layers_{i}"]
    assert sorted(block["self_attn"]) == ["o_proj", "qkv_proj"] and sorted(block["mlp"]) == ["down_proj",
                                                                                             "gate_up_proj"]
    assert ("bias" in block["self_attn"]["qkv_proj"]) == bias
  forms = weight_formats(fused)
  assert sum(forms.values()) == cfg.num_layers * 4 + 1, forms
  if pattern != "dense":
    assert forms.get("2:4" if pattern == "2:4" else "bitmask", 0) >= cfg.num_layers * 4 - 1, forms
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 7)), jnp.int32)
  want = forward(params, cfg, tokens).logits
  got = jax.jit(lambda p: forward(p, cfg, tokens).logits)(fused)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_mixed_kinds_stay_apart():
  """A block whose q is 2:4 but k and v are dense keeps its three projections (and still computes right)."""
  cfg, params = tiny_model(seed=4, hidden_size=64, intermediate_size=160, num_layers=1, num_heads=4, num_kv_heads=2,
                           head_dim=16, vocab_size=96)
  attn = params["layers_0"]["self_attn"]
  w, mask = _nm_weight(np.random.default_rng(2), 64, 64, 2, 4)
  attn["q_proj"]["kernel"] = NMSparse.compress(w, mask, n=2, m=4)
  fused = fuse_projections(params)
  assert sorted(fused["layers_0"]["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
  assert "gate_up_proj" in fused["layers_0"]["mlp"]
  tokens = jnp.asarray([[1, 2, 3]], jnp.int32)
  np.testing.assert_allclose(forward(fused, cfg, tokens).logits, forward(params, cfg, tokens).logits, rtol=1e-5,
                             atol=1e-5)
