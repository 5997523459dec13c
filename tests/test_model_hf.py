"""Our Flax model against transformers' PyTorch LLaMA, Mistral and Qwen2: logits and greedy generation."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxserve.generate import generate
from jaxserve.loaders import load_model, save_hf
from jaxserve.model import forward

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
CASES = [
    # (model_type, heads, kv_heads, tied, rope scaling)
    ("llama", 4, 4, False, None),
    ("llama", 4, 2, True, LLAMA3_SCALING),
    ("llama", 8, 2, False, {"rope_type": "linear", "factor": 2.0}),
    ("mistral", 4, 2, False, None),
    ("mistral", 8, 2, True, None),
    ("qwen2", 4, 1, False, None),
    ("qwen2", 8, 4, True, None),
]
_CLASSES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}


def make_hf_model(tmp_path, model_type, heads, kv_heads, tied, scaling, seed=0, init_range=0.3):
  """A small random HF model saved offline with save_pretrained; returns (torch model, dir)."""
  torch.manual_seed(seed)
  config_cls, model_cls = _CLASSES[model_type]
  kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=heads,
                num_key_value_heads=kv_heads, tie_word_embeddings=tied, max_position_embeddings=256,
                initializer_range=init_range, rope_theta=10000.0)
  if scaling:
    kwargs["rope_scaling"] = dict(scaling)
  model = model_cls(config_cls(**kwargs)).eval().float()
  if model_type == "qwen2":  # biases start at zero; make them matter
    with torch.no_grad():
      for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
          proj.bias.normal_(0, 0.5)
  path = os.path.join(tmp_path, f"{model_type}-{heads}-{kv_heads}-{tied}")
  model.save_pretrained(path, safe_serialization=True)
  return model, path


@pytest.mark.parametrize("model_type,heads,kv_heads,tied,scaling", CASES)
def test_logits_match_transformers(tmp_path, model_type, heads, kv_heads, tied, scaling):
  hf, path = make_hf_model(tmp_path, model_type, heads, kv_heads, tied, scaling)
  loaded = load_model(path)
  assert loaded.cfg.model_type == model_type and loaded.cfg.num_kv_heads == kv_heads
  tokens = np.random.default_rng(0).integers(0, 97, size=(3, 80))  # 80 > 32: llama3 scaling is exercised
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(forward(loaded.params, loaded.cfg, jnp.asarray(tokens)).logits)
  assert np.abs(ours - expected).max() <= 1e-4


@pytest.mark.parametrize("model_type,heads,kv_heads,tied,scaling", [CASES[1], CASES[3], CASES[5]])
def test_greedy_generation_matches_transformers(tmp_path, model_type, heads, kv_heads, tied, scaling):
  hf, path = make_hf_model(tmp_path, model_type, heads, kv_heads, tied, scaling, seed=1, init_range=0.5)
  loaded = load_model(path)
  prompts = [[5, 17, 3, 88, 41], [9, 9, 60, 2, 31, 70, 12, 8, 44]]
  ours = generate(loaded.params, loaded.cfg, prompts, max_new_tokens=64)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    assert got == ref[0, len(prompt):].tolist()


def test_stories260k_export_roundtrip_matches_transformers(tmp_path):
  """llama2.c -> our model -> HF directory -> transformers: same logits (checks the RoPE permutation)."""
  m = load_model()
  out = save_hf(m.cfg, m.params, str(tmp_path / "hf"), m.tokenizer)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval().float()
  tokens = np.asarray([m.tokenizer.encode("Once upon a time, there was a dog named Max.", add_bos=True)])
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(forward(m.params, m.cfg, jnp.asarray(tokens)).logits)
  assert np.abs(ours - expected).max() <= 1e-4
  # the exported tokenizer loads in transformers and agrees with ours
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  text = "Lily saw a big red ball in the park."
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == m.tokenizer.encode(text)
  # and our loader reads the exported directory back to the same model
  again = load_model(out)
  assert np.abs(np.asarray(forward(again.params, again.cfg, jnp.asarray(tokens)).logits) - ours).max() <= 1e-5


def test_stories260k_greedy_story_about_a_girl():
  m = load_model()
  out = generate(m.params, m.cfg, [[m.cfg.bos_token_id]], max_new_tokens=60)[0]
  text = m.tokenizer.decode(out)
  assert text.startswith("Once upon a time")
  assert "girl" in text and "Lily" in text


def test_bfloat16_close_to_float32():
  m32, m16 = load_model(), load_model(dtype="bfloat16")
  assert m16.params["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  tokens = jnp.asarray([m32.tokenizer.encode("Once upon a time", add_bos=True)])
  a = forward(m32.params, m32.cfg, tokens).logits
  b = forward(m16.params, m16.cfg, tokens).logits
  assert b.dtype == jnp.float32
  assert jnp.argmax(a[0, -1]) == jnp.argmax(b[0, -1])
  assert float(jnp.abs(a - b).max()) < 0.5


# ----------------------------------------------------------------------------- malformed inputs

def test_truncated_llama2c_file(tmp_path):
  data = open(os.path.join(os.path.dirname(__import__("jaxserve").__file__), "assets", "stories260K.bin"), "rb").read()
  bad = tmp_path / "cut.bin"
  bad.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"cut\.bin: truncated llama2\.c checkpoint"):
    load_model(str(bad))


def test_wrong_llama2c_header(tmp_path):
  bad = tmp_path / "bad.bin"
  bad.write_bytes(np.array([64, 172, 5, 7, 4, 512, 512], np.int32).tobytes() + b"\0" * 1000)
  with pytest.raises(ValueError, match=r"bad\.bin: invalid llama2\.c header .*divisible"):
    load_model(str(bad))


def test_missing_safetensors_key(tmp_path):
  _, path = make_hf_model(tmp_path, "llama", 4, 2, False, None)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(path, "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    load_model(path)


def test_unknown_model_type(tmp_path):
  _, path = make_hf_model(tmp_path, "llama", 4, 2, False, None)
  cfg_path = os.path.join(path, "config.json")
  cfg = json.load(open(cfg_path))
  cfg["model_type"] = "gpt2"
  json.dump(cfg, open(cfg_path, "w"))
  with pytest.raises(ValueError, match=r"config\.json: model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
    load_model(path)


def test_missing_path_and_unknown_format(tmp_path):
  with pytest.raises(ValueError, match="no such model"):
    load_model(str(tmp_path / "nope"))
  (tmp_path / "weights.pt").write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown model format"):
    load_model(str(tmp_path / "weights.pt"))


@pytest.mark.parametrize("extra", [
    {},
    {"tie_word_embeddings": True, "attention_bias": True, "attention_out_bias": True, "dtype": "bfloat16"},
    {"layer_num_heads": (4, 2, 4), "layer_num_kv_heads": (2, 1, 2), "layer_intermediate_size": (96, 32, 16)},
])
def test_param_shapes_equal_the_whole_models_init(extra):
  """param_shapes traces one layer per distinct layer shape: it must give exactly the tree a whole init gives."""
  import jax

  from jaxserve.config import ModelConfig
  from jaxserve.model import init_params, param_shapes
  cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=16, **extra)
  got, want = param_shapes(cfg), jax.eval_shape(lambda: init_params(cfg))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert jax.tree.leaves(jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), got, want)) == \
      [True] * len(jax.tree.leaves(want))
  got["layers_0"] = None  # a fresh tree each call: the cached one is untouched
  assert param_shapes(cfg)["layers_0"] is not None
