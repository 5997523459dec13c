"""Orbax checkpoints of pruned models (params + masks + metadata) and Hugging Face export.

Layout of a saved directory::

  DIR/jaxprune.json        format, pruning metadata, the params' dense paths/shapes/dtypes, masked
                           and compressed paths
  DIR/params/              orbax PyTree checkpoint of the parameters: with a config, sparse kernels
                           in their compressed form (jaxserve.weights: N:M or bitmask), the rest
                           dense with pruned entries as exact zeros
  DIR/masks/               orbax PyTree checkpoint of the masks of the masked leaves stored dense
                           (a compressed leaf's mask is its stored pattern)
  DIR/model_config.json    the model config (when saved with ``cfg``): jaxserve's native format,
  DIR/tokenizer.*          so ``jaxserve.loaders.load_model(DIR)`` and ``LLM(model=DIR)`` load it

Format v1 (every leaf dense, every mask stored) still loads.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._masks import apply_masks, leaf_masks, sparsity
from jaxprune._tree import leaves_with_paths, map_with_path
from jaxprune._validate import check_masks
from jaxserve import weights
from jaxserve.config import ModelConfig

PyTree = Any
METADATA_FILE = "jaxprune.json"
FORMAT = "jaxprune-pruned-v2"
_READABLE = ("jaxprune-pruned-v1", FORMAT)


class Checkpoint(NamedTuple):
  params: PyTree
  masks: PyTree
  metadata: dict[str, Any]
  cfg: ModelConfig | None


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer()


def _restore_numpy(path: str, like: PyTree) -> PyTree:
  """Restores into host numpy arrays shaped like ``like`` (no device sharding involved)."""
  import orbax.checkpoint as ocp
  with _checkpointer() as ckpt:
    return ckpt.restore(path, item=like, restore_args=ocp.checkpoint_utils.construct_restore_args(like))


def _spec(tree: PyTree) -> dict[str, list]:
  return {p: [list(x.shape), str(np.dtype(x.dtype))] for p, x in leaves_with_paths(tree)}


def is_pruned_checkpoint(directory: str) -> bool:
  """Whether ``directory`` was written by :func:`save`."""
  return os.path.isfile(os.path.join(directory, METADATA_FILE))


def save(directory: str, params: PyTree, masks: PyTree, *, cfg: ModelConfig | None = None, tokenizer: Any = None,
         metadata: dict[str, Any] | None = None, compress: bool = True) -> str:
  """Saves params, masks and metadata; masks are applied first so pruned entries are stored as 0.

  With ``cfg`` and ``compress``, each masked 2-D kernel whose N:M (exactly N of every M) or
  bitmask form is at most 0.7x its dense bytes is stored in that form (a 2:4 float32 kernel:
  0.53x); :func:`restore` gives back the same dense params and masks.

  Args:
    directory: output directory (created; existing checkpoint files are overwritten).
    params: parameter pytree.
    masks: mask pytree matching ``params`` (bool arrays, None for dense leaves).
    cfg: model config; when given the directory is also a jaxserve native model directory.
    tokenizer: optional tokenizer, saved beside the model.
    metadata: JSON-serialisable pruning metadata (method, target, report, ...).
    compress: store sparse kernels compressed (only with ``cfg``).

  Returns:
    The absolute directory path.
  """
  check_masks(params, masks)
  try:
    json.dumps(metadata or {})
  except TypeError as e:
    raise ValueError(f"metadata must be JSON-serialisable ({e})") from None
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  params = apply_masks(params, masks)
  masks = map_with_path(lambda _, m: None if m is None or m is True else np.asarray(m, bool), masks)
  stored = params
  if cfg is not None and compress:
    stored = weights.compress_params(params, masks, exact_mask=True)
  compressed = [p for p, x in leaves_with_paths(stored) if weights.is_typed(x)]
  if cfg is not None:
    from jaxserve.loaders import save_native
    save_native(cfg, stored, directory, tokenizer, extra={"pruned_by": FORMAT})
  else:
    with _checkpointer() as ckpt:
      ckpt.save(os.path.join(directory, "params"), params, force=True)
  with _checkpointer() as ckpt:
    ckpt.save(os.path.join(directory, "masks"), map_with_path(lambda p, m: None if p in compressed else m, masks),
              force=True)
  info = {"format": FORMAT, "metadata": metadata or {}, "params": _spec(params), "masked": sorted(leaf_masks(masks)),
          "compressed": compressed, "sparsity": sparsity(masks).total if leaf_masks(masks) else 0.0,
          "config": None if cfg is None else cfg.to_dict()}
  with open(os.path.join(directory, METADATA_FILE), "w") as f:
    json.dump(info, f, indent=2)
  return directory


def _read_info(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"{directory}: not a jaxprune checkpoint (no {METADATA_FILE})")
  with open(path) as f:
    info = json.load(f)
  if info.get("format") not in _READABLE:
    raise ValueError(f"{directory}: unknown checkpoint format {info.get('format')!r}, expected one of {_READABLE}")
  return info


def _check_target(info: dict[str, Any], target: PyTree, directory: str) -> None:
  saved, want = info["params"], _spec(target)
  missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
  if missing or extra:
    raise ValueError(f"{directory}: checkpoint does not match the target tree: target-only paths {missing[:3]}, "
                     f"checkpoint-only paths {extra[:3]}")
  for p, (shape, _) in want.items():
    if saved[p][0] != shape:
      raise ValueError(f"{directory}: {p} has shape {tuple(saved[p][0])} in the checkpoint, the target has "
                       f"{tuple(shape)}")


def restore(directory: str, target: PyTree | None = None) -> Checkpoint:
  """Restores what :func:`save` wrote.

  Args:
    directory: a directory written by :func:`save`.
    target: optional pytree (arrays or ``jax.ShapeDtypeStruct``) the params must match; a
      mismatch in paths or shapes raises a ValueError before anything is read.

  Returns:
    ``Checkpoint(params, masks, metadata, cfg)``; params keep their saved dtypes.
  """
  directory = os.path.abspath(directory)
  info = _read_info(directory)
  if target is not None:
    _check_target(info, target, directory)
  like = {p: np.zeros(shape, np.dtype(dtype)) for p, (shape, dtype) in info["params"].items()}
  params_like = _unflatten(like)
  compressed = set(info.get("compressed", []))
  if info.get("config") is not None:  # the native model directory (compressed kernels as typed leaves)
    from jaxserve.loaders import load_native
    stored = load_native(directory).params
    params = weights.densify(stored)
    params = map_with_path(lambda p, x: jnp.asarray(x, like[p].dtype), params)
  else:
    stored = params = jax.tree.map(jnp.asarray, _restore_numpy(os.path.join(directory, "params"), params_like))
  masked = set(info["masked"])
  masks_like = map_with_path(lambda p, x: np.zeros(x.shape, bool) if p in masked - compressed else None, params_like)
  masks = _restore_numpy(os.path.join(directory, "masks"), masks_like)
  kept = {p: x.mask() for p, x in leaves_with_paths(stored) if p in compressed}
  masks = map_with_path(lambda p, m: kept[p] if p in kept else None if m is None else jnp.asarray(m, bool), masks)
  cfg = None if info.get("config") is None else ModelConfig.from_dict(info["config"])
  return Checkpoint(params, masks, info["metadata"], cfg)


def _unflatten(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for path, x in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = x
  return out


def load_pruned(directory: str, dtype: str | None = None):
  """Loads a pruned model directory as ``jaxserve.loaders.LoadedModel(cfg, params, tokenizer, source)``.

  Compressed kernels come back as typed leaves (:mod:`jaxserve.weights`), as
  ``jaxserve.loaders.load_model(DIR)`` returns them.
  """
  from jaxserve.loaders import load_native
  info = _read_info(os.path.abspath(directory))
  if info.get("config") is None:
    raise ValueError(f"{directory}: saved without a model config; pass cfg= to jaxprune.checkpoint.save")
  return load_native(directory, dtype)


def export_hf(params: PyTree, cfg: ModelConfig, out_dir: str, *, masks: PyTree | None = None, tokenizer: Any = None,
              metadata: dict[str, Any] | None = None) -> str:
  """Writes a Hugging Face directory (``config.json`` + safetensors) of a pruned model.

  Pruned weights are stored as exact zeros (dense tensors); ``pruning.json`` beside them
  records the metadata and achieved sparsity.
  """
  from jaxserve.loaders import save_hf
  if masks is not None:
    params = apply_masks(params, masks)
  save_hf(cfg, params, out_dir, tokenizer)
  with open(os.path.join(out_dir, "pruning.json"), "w") as f:
    json.dump({"metadata": metadata or {}, "sparsity": sparsity(params).total}, f, indent=2)
  return out_dir
