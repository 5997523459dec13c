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
from jaxserve.loaders import load_model
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
