"""Orbax checkpoints of pruned models and Hugging Face export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import checkpoint
from jaxprune._masks import apply_masks, dense_masks, sparsity
from jaxprune._scores import magnitude_scores
from jaxprune._topk import nm_masks, topk_masks
from jaxserve import weights
from jaxprune._masks import leaf_masks
from jaxprune._tree import leaves_with_paths
from jaxserve.config import ModelConfig
from jaxserve.loaders import load_model, read_native, read_native_info, save_native
from jaxserve.testing import tiny_model
from jaxserve.tokenizer import load_tokenizer
from jaxserve.loaders import DEFAULT_TOKENIZER


@pytest.fixture(scope="module")
def pruned():
  cfg, params = tiny_model(seed=3)
  masks = topk_masks(magnitude_scores(params), 0.5)
  return cfg, apply_masks(params, masks), masks


def _same(a, b):
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (_, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("with_cfg", [True, False])
def test_save_restore_roundtrip(tmp_path, pruned, with_cfg):
  cfg, params, masks = pruned
  d = checkpoint.save(str(tmp_path / "ck"), params, masks, cfg=cfg if with_cfg else None,
                      metadata={"method": "magnitude", "sparsity": 0.5})
  ck = checkpoint.restore(d)
  _same(ck.params, params)
  _same(jax.tree.map(lambda m: m, ck.masks), masks)
  assert jax.tree.structure(ck.masks, is_leaf=lambda x: x is None) == jax.tree.structure(
      masks, is_leaf=lambda x: x is None)  # None (dense) leaves come back as None
  assert ck.metadata == {"method": "magnitude", "sparsity": 0.5}
  assert (ck.cfg == cfg) if with_cfg else ck.cfg is None
  _same(checkpoint.restore(d, target=jax.eval_shape(lambda: params)).params, params)
  assert checkpoint.is_pruned_checkpoint(d)


def test_restore_into_mismatched_tree_is_a_clear_error(tmp_path, pruned):
  cfg, params, masks = pruned
  d = checkpoint.save(str(tmp_path / "ck"), params, masks, cfg=cfg)
  other = tiny_model(seed=0, hidden_size=32)[1]
  with pytest.raises(ValueError, match="has shape"):
    checkpoint.restore(d, target=other)
  fewer = {k: v for k, v in params.items() if k != "layers_1"}
  with pytest.raises(ValueError, match="does not match the target tree"):
    checkpoint.restore(d, target=fewer)
  with pytest.raises(ValueError, match="not a jaxprune checkpoint"):
    checkpoint.restore(str(tmp_path))


def test_save_rejects_mismatched_masks(tmp_path, pruned):
  cfg, params, masks = pruned
  bad = dense_masks(params)
  bad["layers_0"]["mlp"]["up_proj"]["kernel"] = jnp.ones((2, 2), bool)
  with pytest.raises(ValueError, match="has shape"):
    checkpoint.save(str(tmp_path / "ck"), params, bad)
  assert not os.path.exists(tmp_path / "ck")  # nothing written


def test_paths_that_are_files_or_missing_are_clear_errors(tmp_path, pruned):
  """save/export_hf onto a file raised FileExistsError from os.makedirs; restore of a missing
  directory said only that it was not a checkpoint."""
  cfg, params, masks = pruned
  afile = tmp_path / "afile"
  afile.write_text("hello")
  with pytest.raises(ValueError, match="afile: is a file; saving needs a directory path"):
    checkpoint.save(str(afile), params, masks, cfg=cfg)
  with pytest.raises(ValueError, match="afile: is a file; saving needs a directory path"):
    checkpoint.export_hf(params, cfg, str(afile), masks=masks)
  assert afile.read_text() == "hello"
  with pytest.raises(ValueError, match="afile: is a file, not a checkpoint directory"):
    checkpoint.restore(str(afile))
  with pytest.raises(ValueError, match="nope: no such checkpoint directory"):
    checkpoint.restore(str(tmp_path / "nope"))


def test_load_model_and_load_pruned_agree(tmp_path):
  m = load_model()
  masks = nm_masks(magnitude_scores(m.params), "2:4")
  params = apply_masks(m.params, masks)
  d = checkpoint.save(str(tmp_path / "pruned"), params, masks, cfg=m.cfg, tokenizer=m.tokenizer)
  a, b, c = load_model(d), checkpoint.load_pruned(d), load_model(d, dense=True)
  for loaded in (a, b, c):
    assert loaded.cfg == m.cfg and loaded.tokenizer is not None
    _same(weights.densify(loaded.params), params)
    assert loaded.tokenizer.encode("Once upon a time") == m.tokenizer.encode("Once upon a time")
  # the 2:4 kernels (input sizes divisible by 4) load compressed, dense=True expands them
  assert isinstance(b.params["layers_0"]["mlp"]["up_proj"]["kernel"], weights.NMSparse)
  assert not any(weights.is_typed(x) for x in jax.tree.leaves(c.params, is_leaf=weights.is_typed))
  assert abs(sparsity(b.params).total - 0.5) < 1e-12


def test_export_hf_keeps_zeros(tmp_path, pruned):
  cfg, params, masks = pruned
  out = checkpoint.export_hf(params, cfg, str(tmp_path / "hf"), masks=masks, metadata={"method": "magnitude"},
                             tokenizer=load_tokenizer(DEFAULT_TOKENIZER))
  with open(os.path.join(out, "pruning.json")) as f:
    assert json.load(f)["sparsity"] == 0.5
  back = load_model(out)
  for path, m in [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(masks)[0]]:
    w = back.params
    for k in path:
      w = w[k.key]
    assert (np.asarray(w)[~np.asarray(m)] == 0).all()
  assert sparsity(back.params).total == 0.5


OLD = os.path.join(os.path.dirname(__file__), "data", "old_checkpoints")  # by tests/data/make_old_checkpoints.py


def test_one_native_format_holds_params_masks_and_metadata(tmp_path, pruned):
  cfg, params, masks = pruned
  masks = jax.tree.map(lambda m: m, masks, is_leaf=lambda x: x is None)
  embed = params["embed_tokens"]["embedding"]
  masks["embed_tokens"]["embedding"] = jnp.abs(embed) > jnp.median(jnp.abs(embed))  # masked, not a kernel: stays dense
  params = apply_masks(params, masks)
  d = checkpoint.save(str(tmp_path / "ck"), params, masks, cfg=cfg, metadata={"method": "magnitude"})
  assert sorted(os.listdir(d)) == ["masks", "model_config.json", "params"]  # one metadata file, no jaxprune.json
  info = read_native_info(d)
  assert info["format"] == "jaxserve-native-v2" and info["metadata"] == {"method": "magnitude"}
  assert ModelConfig.from_dict(info["config"]) == cfg
  ck = read_native(d)  # the jaxserve reader sees the same masks and metadata
  stored = {p for p, _ in jax.tree_util.tree_flatten_with_path(ck.params, is_leaf=weights.is_typed)[0]}
  typed = {weights.path_name(p) for p, x in jax.tree_util.tree_flatten_with_path(ck.params, is_leaf=weights.is_typed)[0]
           if weights.is_typed(x)}
  assert stored and set(ck.masks) == {"embed_tokens/embedding"} and set(ck.masks) | typed == set(leaf_masks(masks))
  for p, m in ck.masks.items():
    np.testing.assert_array_equal(m, np.asarray(leaf_masks(masks)[p]))
  plain = save_native(cfg, params, str(tmp_path / "plain"))  # masks and metadata are optional parts
  assert sorted(os.listdir(plain)) == ["model_config.json", "params"] and read_native(plain).masks == {}
  with pytest.raises(ValueError, match="saved without a model config"):
    load_model(checkpoint.save(str(tmp_path / "nocfg"), params, masks))
  with pytest.raises(ValueError, match="matches no parameter"):
    save_native(cfg, params, str(tmp_path / "bad"), masks={"layers_0/nothing/kernel": np.ones((2, 2), bool)})


def test_no_legacy_orbax_checkpointer():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for pkg in ("jaxprune", "jaxserve"):
    for folder, _, files in os.walk(os.path.join(root, pkg)):
      for name in files:
        if name.endswith(".py"):
          with open(os.path.join(folder, name), encoding="utf-8") as f:
            assert "PyTreeCheckpointer" not in f.read(), os.path.join(folder, name)


@pytest.mark.parametrize("name", ["pruned_v1", "pruned_v2", "pruned_v2_nocfg"])
def test_old_pruned_directories_still_restore(name):
  expected = np.load(os.path.join(OLD, "expected.npz"))
  d = os.path.join(OLD, name)
  assert checkpoint.is_pruned_checkpoint(d)
  ck = checkpoint.restore(d)
  assert ck.metadata == {"method": "magnitude", "pattern": "2:4"} and (ck.cfg is None) == name.endswith("nocfg")
  got = dict(leaves_with_paths(ck.params))
  assert set(got) == {k[len("pruned/"):] for k in expected.files if k.startswith("pruned/")}
  for p, x in got.items():
    assert x.dtype == expected[f"pruned/{p}"].dtype
    np.testing.assert_array_equal(np.asarray(x), expected[f"pruned/{p}"])
  got = dict(leaves_with_paths(ck.masks))
  assert set(got) == {k[len("masks/"):] for k in expected.files if k.startswith("masks/")}
  for p, m in got.items():
    np.testing.assert_array_equal(np.asarray(m), expected[f"masks/{p}"])
  if ck.cfg is not None:
    m = load_model(d)
    assert m.cfg == ck.cfg
    np.testing.assert_array_equal(np.asarray(weights.densify(m.params)["layers_1"]["mlp"]["up_proj"]["kernel"]),
                                  expected["pruned/layers_1/mlp/up_proj/kernel"])


def test_old_native_directory_still_loads():
  expected = np.load(os.path.join(OLD, "expected.npz"))
  m = load_model(os.path.join(OLD, "native_v1"))
  assert m.cfg.layer_intermediate_size == (24, 8)
  for p, x in leaves_with_paths(m.params):
    np.testing.assert_array_equal(np.asarray(x), expected[f"native/{p}"])
  assert read_native(os.path.join(OLD, "native_v1")).metadata == {"pruning": {"ratio": 0.5}, "source": "tiny"}


def test_old_dense_plus_mask_checkpoint_still_serves():
  """A v1 directory (every leaf dense, every mask stored) restores and serves (moved from test_weights.py)."""
  from jaxserve.engine import LLM, SamplingParams, _cpu_kernels
  d = os.path.join(OLD, "pruned_v1")
  assert not any(weights.is_typed(x) for x in jax.tree.leaves(load_model(d).params, is_leaf=weights.is_typed))
  llm = LLM(d, max_model_len=32, num_kv_blocks=8, max_num_seqs=2)  # serves: compressed from its zeros
  if _cpu_kernels.available():  # the 14 block kernels, each in the smallest form its zeros allow
    assert sum(llm.stats()["weight_formats"].get(k, 0) for k in ("2:4", "bitmask")) == 2 * 7
  out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
  assert len(out[0].outputs[0].token_ids) == 3
