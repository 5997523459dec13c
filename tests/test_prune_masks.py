"""Mask pytrees, exact top-k, N:M groups, and agreement with torch.nn.utils.prune."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.utils import prune as tprune

from jaxprune import _masks, _topk
from jaxprune._masks import apply_masks, dense_masks, prunable_paths, sparsity
from jaxprune._scores import magnitude_scores
from jaxprune._topk import nm_incompatible, nm_masks, topk_masks


def _params(seed=0, shapes=((64, 32), (32, 48), (172, 64))):
  rng = np.random.default_rng(seed)
  layers = {}
  for i, (a, b) in enumerate(shapes):
    layers[f"layers_{i}"] = {
        "mlp": {"up_proj": {"kernel": jnp.asarray(rng.standard_normal((a, b)), jnp.float32)}},
        "input_layernorm": {"scale": jnp.ones((a,), jnp.float32)},
    }
  return {"embed_tokens": {"embedding": jnp.asarray(rng.standard_normal((10, 4)), jnp.float32)}, **layers}


def test_default_filter_selects_block_kernels_only():
  p = _params()
  assert prunable_paths(p) == [f"layers_{i}/mlp/up_proj/kernel" for i in range(3)]
  assert prunable_paths(p, include=r"layers_1/") == ["layers_1/input_layernorm/scale", "layers_1/mlp/up_proj/kernel"]
  assert prunable_paths(p, exclude=r"layers_0") == ["layers_1/mlp/up_proj/kernel", "layers_2/mlp/up_proj/kernel"]
  m = dense_masks(p)
  assert m["embed_tokens"]["embedding"] is None and m["layers_0"]["input_layernorm"]["scale"] is None


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.75, 0.9])
def test_layer_magnitude_matches_torch_l1_unstructured(amount):
  p = _params(1)
  scores = jax.tree.map(jnp.abs, p)
  scores = jax.tree.map(lambda s: s, {k: v for k, v in scores.items()})
  masks = topk_masks(_only_kernels(scores), amount)
  for i in range(3):
    w = np.asarray(p[f"layers_{i}"]["mlp"]["up_proj"]["kernel"])
    lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(w.T.copy()))
    tprune.l1_unstructured(lin, "weight", amount=amount)
    ours = np.asarray(masks[f"layers_{i}"]["mlp"]["up_proj"]["kernel"])
    np.testing.assert_array_equal(ours, lin.weight_mask.numpy().T.astype(bool))


def _only_kernels(tree):
  sel = set(prunable_paths(tree))
  from jaxprune._tree import map_with_path
  return map_with_path(lambda path, x: x if path in sel else None, tree)


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.8])
def test_global_magnitude_matches_torch_global_unstructured(amount):
  p = _params(2)
  masks = topk_masks(_only_kernels(jax.tree.map(jnp.abs, p)), amount, scope="global")
  lins = []
  for i in range(3):
    w = np.asarray(p[f"layers_{i}"]["mlp"]["up_proj"]["kernel"])
    lin = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
    with torch.no_grad():
      lin.weight.copy_(torch.from_numpy(w.T.copy()))
    lins.append(lin)
  tprune.global_unstructured([(l, "weight") for l in lins], pruning_method=tprune.L1Unstructured, amount=amount)
  for i, lin in enumerate(lins):
    np.testing.assert_array_equal(np.asarray(masks[f"layers_{i}"]["mlp"]["up_proj"]["kernel"]),
                                  lin.weight_mask.numpy().T.astype(bool))


@pytest.mark.parametrize("scope", ["layer", "global", "output"])
@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.625, 0.875])
def test_achieved_sparsity_is_exact(scope, s):
  p = _params(3, shapes=((64, 32), (32, 48), (16, 8)))  # every size * s is an integer
  masks = topk_masks(_only_kernels(jax.tree.map(jnp.abs, p)), s, scope=scope)
  rep = sparsity(masks)
  assert rep.total == s
  if scope != "global":
    assert all(v == s for v in rep.per_leaf.values())
  if scope == "output":  # every output column pruned to exactly s of its inputs
    for _, m in _masks.leaf_masks(masks).items():
      np.testing.assert_array_equal(np.asarray(m).sum(0), round((1 - s) * m.shape[0]))
  pruned = apply_masks(p, masks)
  assert sparsity(pruned).total == s


def test_rounding_rule_for_non_integer_targets():
  scores = {"w": jnp.arange(10.0).reshape(10, 1)}
  for s, k in [(0.25, 3), (0.34, 3), (0.35, 4), (0.05, 1), (0.04, 0)]:
    m = topk_masks(scores, s)["w"]
    assert int((~m).sum()) == k == _topk.num_pruned(s, 10)


def test_tie_break_prunes_lower_flat_index_first():
  scores = {"w": jnp.zeros((4, 3))}
  m = np.asarray(topk_masks(scores, 0.5)["w"]).reshape(-1)
  np.testing.assert_array_equal(m, [False] * 6 + [True] * 6)
  g = topk_masks({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}, 0.5, scope="global")
  assert not np.asarray(g["a"]).any() and np.asarray(g["b"]).all()  # "a" comes first in flatten order
  nm = np.asarray(nm_masks({"w": jnp.zeros((4, 2))}, "2:4")["w"])
  np.testing.assert_array_equal(nm[:, 0], [False, False, True, True])


@pytest.mark.parametrize("pattern", ["1:2", "2:4", "4:8", "3:8", "1:4"])
def test_nm_groups_have_exactly_n_nonzeros(pattern):
  n, m = (int(x) for x in pattern.split(":"))
  p = _params(4, shapes=((64, 32), (32, 48), (172, 64)))
  scores = _only_kernels(jax.tree.map(jnp.abs, p))
  masks = nm_masks(scores, pattern)
  bad = nm_incompatible(scores, pattern)
  assert bad == (["layers_2/mlp/up_proj/kernel"] if 172 % m else [])
  pruned = apply_masks(p, masks)
  for i in range(3):
    w = np.asarray(pruned[f"layers_{i}"]["mlp"]["up_proj"]["kernel"])
    if f"layers_{i}/mlp/up_proj/kernel" in bad:
      assert masks[f"layers_{i}"]["mlp"]["up_proj"]["kernel"] is None and np.count_nonzero(w) == w.size
      continue
    counts = (w.reshape(w.shape[0] // m, m, w.shape[1]) != 0).sum(1)
    np.testing.assert_array_equal(counts, n)
    # the kept ones are the largest |w| of their group
    orig = np.abs(np.asarray(p[f"layers_{i}"]["mlp"]["up_proj"]["kernel"])).reshape(-1, m, w.shape[1])
    kept_min = np.where(w.reshape(-1, m, w.shape[1]) != 0, orig, np.inf).min(1)
    dropped_max = np.where(w.reshape(-1, m, w.shape[1]) == 0, orig, -np.inf).max(1)
    assert (kept_min >= dropped_max).all()


def test_existing_masks_stay_pruned_and_count():
  rng = np.random.default_rng(5)
  s = {"w": jnp.asarray(rng.random((8, 8)), jnp.float32)}
  m1 = topk_masks(s, 0.25)
  s2 = {"w": jnp.asarray(rng.random((8, 8)), jnp.float32)}  # new scores would revive some
  m2 = topk_masks(s2, 0.5, masks=m1)
  assert not np.asarray(m2["w"])[~np.asarray(m1["w"])].any()
  assert int((~m2["w"]).sum()) == 32
  assert int((~topk_masks(s2, 0.1, masks=m1)["w"]).sum()) == 16  # never less than before


def test_traced_sparsity_under_jit_matches_eager():
  rng = np.random.default_rng(6)
  s = {"a": jnp.asarray(rng.random((16, 8)), jnp.float32), "b": jnp.asarray(rng.random((8, 4)), jnp.float32)}
  for scope in ("layer", "global", "output"):
    f = jax.jit(lambda sc, t, scope=scope: topk_masks(sc, t, scope=scope))
    for t in (0.0, 0.3, 0.5, 0.7):
      jitted, eager = f(s, jnp.float32(t)), topk_masks(s, t, scope=scope)
      for k in s:
        np.testing.assert_array_equal(jitted[k], eager[k])


def test_apply_masks_and_report():
  p = _params(7)
  masks = topk_masks(_only_kernels(jax.tree.map(jnp.abs, p)), 0.5)
  out = apply_masks(p, masks)
  assert out["embed_tokens"]["embedding"] is p["embed_tokens"]["embedding"]
  rep = sparsity(out)
  assert set(rep.per_leaf) == set(prunable_paths(p)) and rep.total == 0.5
  assert "total: 0.5000" in str(rep)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), "x"])
def test_bad_sparsity_is_rejected(bad):
  with pytest.raises(ValueError, match=r"sparsity must be"):
    topk_masks({"w": jnp.ones((4, 4))}, bad)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2:1", "2-4", (2,)])
def test_bad_pattern_is_rejected(bad):
  with pytest.raises(ValueError, match=r"N:M|pattern"):
    nm_masks({"w": jnp.ones((4, 4))}, bad)


def test_mismatched_mask_tree_is_rejected():
  p = _params(8)
  masks = dense_masks(p)
  del masks["layers_0"]
  with pytest.raises(ValueError, match="does not match"):
    apply_masks(p, masks)
  masks = dense_masks(p)
  masks["layers_1"]["mlp"]["up_proj"]["kernel"] = jnp.ones((3, 3), bool)
  with pytest.raises(ValueError, match="has shape"):
    apply_masks(p, masks)
  masks["layers_1"]["mlp"]["up_proj"]["kernel"] = jnp.ones((32, 48), jnp.float32)
  with pytest.raises(ValueError, match="dtype bool"):
    apply_masks(p, masks)


@pytest.mark.parametrize("bad", [jnp.float32(1.5), jnp.float32(-0.5), jnp.float32(jnp.nan), jnp.array([0.5, 0.5])])
def test_concrete_array_sparsity_is_checked_like_a_float(bad):
  """A concrete jax array out of range was taken as traced and pruned everything (1.5) or nothing (NaN)."""
  with pytest.raises(ValueError, match=r"sparsity must be"):
    topk_masks({"w": jnp.ones((4, 4))}, bad)
  assert sparsity(topk_masks({"w": jnp.arange(16.0).reshape(4, 4)}, jnp.float32(0.5))).total == 0.5


def _bad_current_masks(scores):
  good = topk_masks(scores, 0.5)
  wrong_shape = jax.tree.map(lambda m: m, good)
  wrong_shape["layers_1"]["mlp"]["up_proj"]["kernel"] = jnp.ones((3, 3), bool)
  as_float = jax.tree.map(lambda m: m.astype(jnp.float32), good)
  return [({}, "does not match"), (wrong_shape, "has shape"), (as_float, "dtype bool")]


@pytest.mark.parametrize("case", range(3))
def test_current_masks_that_do_not_match_the_scores_are_rejected(case):
  """``masks=`` of another tree was ignored ({}) or failed deep in JAX (wrong shape or dtype)."""
  scores = magnitude_scores(_params(9, shapes=((64, 32), (32, 48))))
  masks, match = _bad_current_masks(scores)[case]
  for fn in (lambda: topk_masks(scores, 0.5, masks=masks), lambda: topk_masks(scores, 0.5, masks=masks, scope="global"),
             lambda: nm_masks(scores, "2:4", masks=masks)):
    with pytest.raises(ValueError, match=match):
      fn()


@pytest.mark.parametrize("bad", [None, (2.5, 4), (True, 4)])
def test_pattern_must_be_given_and_integral(bad):
  with pytest.raises(ValueError, match=r"N:M|pattern"):
    nm_masks({"w": jnp.ones((8, 4))}, bad)
  with pytest.raises(ValueError, match=r"N:M|pattern"):
    nm_incompatible({"w": jnp.ones((8, 4))}, bad)


def test_combine_masks_of_different_trees_is_a_clear_error():
  p = _params(10)
  a = dense_masks(p)
  b = dense_masks(p)
  del b["layers_0"]
  with pytest.raises(ValueError, match="do not match"):
    _masks.combine_masks(a, b)
  b = dense_masks(p)
  b["layers_1"]["mlp"]["up_proj"]["kernel"] = jnp.ones((3, 3), bool)
  with pytest.raises(ValueError, match=r"shape \(32, 48\) in the first tree, \(3, 3\) in the second"):
    _masks.combine_masks(a, b)
