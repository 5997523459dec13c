"""Physical removal of pruned groups (a smaller dense model) and its masked reference."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxprune._tree import leaves_with_paths, map_with_path
from jaxprune.structured._groups import PrunePlan, check_plan, dim_size, leaf_dims, split_layer
from jaxserve.config import ModelConfig

Params = dict[str, Any]


def pruned_config(cfg: ModelConfig, plan: PrunePlan) -> ModelConfig:
  """The configuration of the model ``plan`` leaves.

  Layers that still share one shape get plain ``num_heads`` / ``num_kv_heads`` /
  ``intermediate_size``; otherwise the per-layer tuples are set (the global fields then hold
  the largest layer's sizes). Removing hidden channels scales ``rms_norm_eps`` by
  ``hidden / new_hidden`` (see :func:`remove_groups`).
  """
  check_plan(cfg, plan)
  heads = tuple(len(plan.heads[i]) for i in plan.layers)
  kv = tuple(len(plan.kv_heads[i]) for i in plan.layers)
  ffn = tuple(len(plan.mlp[i]) for i in plan.layers)
  hidden = len(plan.hidden)
  changes: dict[str, Any] = dict(num_layers=len(plan.layers), hidden_size=hidden, num_heads=max(heads),
                                 num_kv_heads=max(kv), intermediate_size=max(ffn), layer_num_heads=None,
                                 layer_num_kv_heads=None, layer_intermediate_size=None)
  if len(set(zip(heads, kv, ffn))) > 1:
    changes.update(layer_num_heads=heads, layer_num_kv_heads=kv, layer_intermediate_size=ffn)
  if hidden != cfg.hidden_size:
    changes["rms_norm_eps"] = cfg.rms_norm_eps * cfg.hidden_size / hidden
  return cfg.replace(**changes)


def _check_leaf(cfg: ModelConfig, path: str, x: Any) -> tuple:
  dims = leaf_dims(path)
  layer, _ = split_layer(path)
  if layer is not None and layer >= cfg.num_layers:
    raise ValueError(f"params have {path!r} but the config has {cfg.num_layers} layers")
  if len(dims) != np.ndim(x) or any(d is not None and x.shape[a] != dim_size(cfg, d) for a, d in enumerate(dims)):
    raise ValueError(f"parameter {path!r} has shape {tuple(x.shape)}, which does not match the config")
  return dims


def _set(tree: dict, path: str, value: Any) -> None:
  *parents, last = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[last] = value


def remove_groups(params: Params, cfg: ModelConfig, plan: PrunePlan) -> tuple[Params, ModelConfig]:
  """Cuts the pruned groups out: new, smaller arrays and the matching config.

  The smaller model computes exactly what the masked one (:func:`mask_groups`) computes. For
  hidden channels that needs one correction: RMSNorm divides by the mean over the hidden size,
  so every norm scale is multiplied by ``sqrt(hidden / new_hidden)`` and ``rms_norm_eps`` by
  ``hidden / new_hidden``; then ``scale' x / sqrt(sum x^2 / n' + eps')`` equals the masked
  model's ``scale x / sqrt(sum x^2 / n + eps)``.

  Args:
    params: parameters of ``cfg``.
    cfg: the original configuration.
    plan: what to keep (indices into the original model).

  Returns:
    ``(params, cfg)`` of the smaller model; kept layers are renumbered ``layers_0..``.
  """
  new_cfg = pruned_config(cfg, plan)
  renumber = {old: new for new, old in enumerate(plan.layers)}
  norm_gain = math.sqrt(cfg.hidden_size / len(plan.hidden))
  out: Params = {}
  for path, x in leaves_with_paths(params):
    dims = _check_leaf(cfg, path, x)
    layer, rest = split_layer(path)
    if layer is not None and layer not in renumber:
      continue
    for axis, dim in enumerate(dims):
      if dim is not None:
        idx = plan.keep_indices(cfg, dim)
        if len(idx) != x.shape[axis]:
          x = jnp.take(jnp.asarray(x), idx, axis=axis)
    if rest.endswith("norm/scale") and norm_gain != 1.0:
      x = (jnp.asarray(x, jnp.float32) * norm_gain).astype(x.dtype)
    _set(out, path if layer is None else f"layers_{renumber[layer]}/{rest}", jnp.asarray(x))
  return out, new_cfg


def group_masks(params: Params, cfg: ModelConfig, plan: PrunePlan) -> Params:
  """Boolean masks (True = kept) of every parameter, same structure as ``params``.

  Removed blocks are masked whole (the block then adds nothing to the residual stream).
  Usable with :func:`jaxprune.apply_masks`-style code and as the reference for removal.
  """
  check_plan(cfg, plan)
  kept_layers = set(plan.layers)

  def leaf_mask(path: str, x: Any) -> np.ndarray:
    dims = _check_leaf(cfg, path, x)
    layer, _ = split_layer(path)
    m = np.ones(x.shape, bool)
    if layer is not None and layer not in kept_layers:
      return m & False
    for axis, dim in enumerate(dims):
      if dim is not None:
        keep = np.zeros(x.shape[axis], bool)
        keep[plan.keep_indices(cfg, dim)] = True
        m &= keep.reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return m

  return map_with_path(leaf_mask, params)


def mask_groups(params: Params, cfg: ModelConfig, plan: PrunePlan) -> Params:
  """The original-shaped model with the pruned groups set to zero (the reference for removal)."""
  masks = group_masks(params, cfg, plan)
  return map_with_path(lambda p, x, m: jnp.where(m, x, jnp.zeros((), jnp.asarray(x).dtype)), params, masks)


def count_parameters(params: Params) -> int:
  """Total number of parameter entries."""
  return int(sum(np.size(x) for _, x in leaves_with_paths(params)))
