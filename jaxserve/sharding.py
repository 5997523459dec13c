"""Tensor parallelism: a 1-D device mesh and Megatron-layout shardings of parameters and KV pools."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.model import Params

AXIS = "tp"

# Megatron layout: column-parallel projections split their output features, row-parallel ones
# their input features; embeddings and the LM head split the vocabulary.
_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")


def make_mesh(tensor_parallel_size: int, devices: list[Any] | None = None) -> Mesh:
  """A 1-D mesh named ``tp`` over the first ``tensor_parallel_size`` devices."""
  devices = list(jax.devices() if devices is None else devices)
  if tensor_parallel_size < 1:
    raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
  if tensor_parallel_size > len(devices):
    raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs that many devices, but only "
                     f"{len(devices)} {devices[0].platform} device(s) are available")
  return Mesh(np.array(devices[:tensor_parallel_size]), (AXIS,))


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
  """Raises ValueError unless every layer's query and KV heads split evenly over ``tp`` devices."""
  for i in range(cfg.num_layers):
    if cfg.kv_heads(i) % tp or cfg.heads(i) % tp:
      raise ValueError(f"tensor_parallel_size={tp} must divide the number of KV heads and query heads of every "
                       f"layer, but layer {i} has {cfg.kv_heads(i)} KV heads and {cfg.heads(i)} query heads")


def _spec(path: tuple[str, ...], shape: tuple[int, ...], tp: int) -> P:
  module, leaf = path[-2], path[-1]
  if module in _COLUMN:
    spec = P(None, AXIS) if leaf == "kernel" else P(AXIS)
  elif module in _ROW:
    spec = P(AXIS, None) if leaf == "kernel" else P()
  elif module == "embed_tokens":
    spec = P(AXIS, None)
  elif module == "lm_head":
    spec = P(None, AXIS)
  else:
    return P()
  # A dimension that does not split evenly (e.g. an MLP size of 172 over 8 devices) stays replicated.
  for dim, name in zip(shape, spec):
    if name is not None and dim % tp:
      return P()
  return spec


def param_specs(params: Params, tp: int) -> Params:
  """PartitionSpec pytree for ``params`` in the Megatron layout."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: _spec(tuple(k.key for k in path), tuple(x.shape), tp), params)


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
  """Places ``params`` on ``mesh`` in the Megatron layout (each device holds only its slice)."""
  tp = mesh.devices.size
  check_tensor_parallel(cfg, tp)
  specs = param_specs(params, tp)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def kv_pool_sharding(mesh: Mesh, layout: str = "head") -> NamedSharding:
  """KV pools split by KV head: ``[num_kv_heads, num_blocks, ...]`` (``"head"``) or
  ``[num_blocks, num_kv_heads, ...]`` (``"block"``)."""
  if layout not in ("head", "block"):
    raise ValueError(f"layout must be 'head' or 'block', got {layout!r}")
  return NamedSharding(mesh, P(AXIS) if layout == "head" else P(None, AXIS))


def shard_rows_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """``x`` split by rows over every mesh axis that ``like`` is sharded on (an all-to-all, no gather).

  Row-independent algorithms (SparseGPT's per-output OBS sweep) run locally on such a layout
  whatever the layout of the parameter they came from. Unsharded inputs are returned as they are.
  """
  sharding = getattr(like, "sharding", None)
  if not isinstance(sharding, NamedSharding) or sharding.is_fully_replicated:
    return x
  axes = tuple(a for spec in sharding.spec if spec is not None for a in ((spec,) if isinstance(spec, str) else spec))
  size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
  if x.shape[0] % size:
    return x
  return jax.device_put(x, NamedSharding(sharding.mesh, P(axes, *([None] * (x.ndim - 1)))))


def place_like(tree: Any, like: Any) -> Any:
  """Puts every array leaf of ``tree`` (e.g. masks) on the sharding of the matching leaf of ``like`` (params).

  ``tree`` may hold None (not pruned) where ``like`` holds arrays; those stay None.
  """
  return jax.tree.map(lambda x, ref: x if x is None or not hasattr(ref, "sharding") else jax.device_put(x, ref.sharding),
                      tree, like, is_leaf=lambda x: x is None)
