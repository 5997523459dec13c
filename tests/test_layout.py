"""The package boundary: jaxprune imports the model layer only, through public names, and the per-block model API."""

import dataclasses
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import model
from jaxserve.testing import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_jaxprune_does_not_import_engine_server_or_pallas():
  code = ("import sys, jaxprune, jaxprune.structured, jaxserve.loaders, jaxserve.tokenizer, jaxserve.weights; "
          "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'kernels_pallas' "
          "or m.startswith(('jaxserve.engine', 'jaxserve.server'))); "
          "assert not heavy, heavy")
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]


def test_lazy_engine_names_still_import():
  code = "import jaxserve, sys; from jaxserve import LLM, SamplingParams; assert 'jaxserve.engine' in sys.modules"
  run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]


def test_jaxprune_uses_public_jaxserve_names_only():
  private = re.compile(r"jaxserve\._|from jaxserve\.[a-z_]*\._")
  found = []
  for folder, _, files in os.walk(os.path.join(ROOT, "jaxprune")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
          found += [f"{path}:{i}: {line.strip()}" for i, line in enumerate(f, 1) if private.search(line)]
  assert not found, found


def test_jaxprune_does_not_intercept_model_modules():
  for folder, _, files in os.walk(os.path.join(ROOT, "jaxprune")):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
          assert "intercept_methods" not in f.read(), name


NON_UNIFORM = {"layer_num_heads": (4, 2), "layer_num_kv_heads": (2, 1), "layer_intermediate_size": (96, 40),
               "attention_bias": True}


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, NON_UNIFORM])
def test_per_block_api_composes_to_forward(overrides):
  cfg, params = tiny_model(seed=3, **overrides)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
  x = model.embed(params, cfg, tokens)
  for i in range(cfg.num_layers):
    x = model.block_forward(params[f"layers_{i}"], cfg, i, x).hidden
  np.testing.assert_allclose(model.head(params, cfg, x), model.forward(params, cfg, tokens).logits, atol=1e-5,
                             rtol=1e-5)


@pytest.mark.parametrize("non_uniform", [False, True])
def test_jitted_blocks_trace_each_block_shape_once_and_give_the_same_logits(non_uniform, monkeypatch):
  kw = {}
  if non_uniform:  # layers 0 and 2, 1 and 3 alike: two distinct block shapes
    kw = dict(layer_num_heads=(4, 2, 4, 2), layer_num_kv_heads=(2, 1, 2, 1), layer_intermediate_size=(96, 40, 96, 40))
  cfg, params = tiny_model(seed=4, num_layers=4, **kw)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
  rotations = []  # one rotation of q and one of k per block traced
  rotate = model._apply_rope
  monkeypatch.setattr(model, "_apply_rope", lambda *a: rotations.append(1) or rotate(*a))
  jax.clear_caches()
  plain = jax.jit(lambda p, t: model.forward(p, cfg, t).logits)(params, tokens)
  assert len(rotations) == 2 * cfg.num_layers
  rotations.clear()
  jitted = jax.jit(lambda p, t: model.forward(p, cfg, t, jit_blocks=True).logits)(params, tokens)
  assert len(rotations) == 2 * (2 if non_uniform else 1)
  np.testing.assert_array_equal(jitted, plain)


@dataclasses.dataclass(frozen=True)
class _LayerScaledAttention:
  """A backend whose output depends on its layer (not ``layer_independent``): causal attention times layer + 1."""

  def __call__(self, layer, q, k, v, layer_kv, meta):
    out, layer_kv = model.CausalAttention()(layer, q, k, v, layer_kv, meta)
    return out * (layer + 1), layer_kv


@dataclasses.dataclass(frozen=True)
class _FalselyIndependent(_LayerScaledAttention):
  layer_independent = True


def test_jitted_blocks_give_a_layer_dependent_backend_its_own_layer():
  cfg, params = tiny_model(seed=4, num_layers=3)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 5)), jnp.int32)
  run = jax.jit(lambda p, t, attn, jit_blocks: model.forward(p, cfg, t, attn=attn, jit_blocks=jit_blocks).logits,
                static_argnums=(2, 3))
  plain = run(params, tokens, _LayerScaledAttention(), False)
  np.testing.assert_array_equal(run(params, tokens, _LayerScaledAttention(), True), plain)
  # the check has teeth: the same backend declared layer-independent shares layer 0's trace, and the logits change
  shared = run(params, tokens, _FalselyIndependent(), True)
  assert not np.allclose(shared, plain)


def test_block_linear_inputs():
  cfg, params = tiny_model(seed=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, cfg.hidden_size))
  out = model.block_forward(params["layers_0"], cfg, 0, x, return_linear_inputs=True)
  names = {"self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj", "mlp/gate_proj",
           "mlp/up_proj", "mlp/down_proj"}
  assert set(out.linear_inputs) == names
  np.testing.assert_array_equal(out.linear_inputs["self_attn/q_proj"], out.linear_inputs["self_attn/k_proj"])
  assert out.linear_inputs["mlp/down_proj"].shape == (2, 5, cfg.ffn(0))
  # The recorded input of a linear reproduces its output: the MLP's residual contribution.
  mlp = params["layers_0"]["mlp"]
  gate = out.linear_inputs["mlp/gate_proj"] @ mlp["gate_proj"]["kernel"]
  up = out.linear_inputs["mlp/gate_proj"] @ mlp["up_proj"]["kernel"]
  np.testing.assert_allclose(jax.nn.silu(gate) * up, out.linear_inputs["mlp/down_proj"], atol=1e-5, rtol=1e-5)
  no_capture = model.block_forward(params["layers_0"], cfg, 0, x)
  assert no_capture.linear_inputs is None
  np.testing.assert_array_equal(no_capture.hidden, out.hidden)
