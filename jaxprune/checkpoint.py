"""Pruned models in jaxserve's one native format (params, masks, pruning metadata) and Hugging Face export.

:func:`save` writes a :func:`jaxserve.loaders.save_native` directory: the parameters (with a
config, each sparse kernel compressed as an N:M or bitmask leaf of :mod:`jaxserve.weights`, the
rest dense with pruned entries as exact zeros), the masks of the masked leaves stored dense (a
compressed leaf's mask is its stored pattern) and the metadata. With a config the directory is a
model: ``jaxserve.loaders.load_model(DIR)`` and ``LLM(model=DIR)`` load it.

Directories of the earlier ``jaxprune-pruned-v1``/``-v2`` formats (a ``jaxprune.json`` beside
the params) still restore, through a private reader.
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
from jaxserve.loaders import (NATIVE_CONFIG, LoadedModel, load_native, read_native, read_native_info, save_hf,
                              save_native, tree_from_paths)

PyTree = Any
LEGACY_METADATA_FILE = "jaxprune.json"  # the earlier formats' metadata file
_LEGACY_READABLE = ("jaxprune-pruned-v1", "jaxprune-pruned-v2")


class Checkpoint(NamedTuple):
  params: PyTree  # dense, in their saved dtypes
  masks: PyTree  # like params: bool arrays at masked leaves, None elsewhere
  metadata: dict[str, Any]
  cfg: ModelConfig | None


def is_pruned_checkpoint(directory: str) -> bool:
  """Whether ``directory`` holds masks or compressed kernels (written by :func:`save`, or an earlier format)."""
  if os.path.isfile(os.path.join(directory, LEGACY_METADATA_FILE)):
    return True
  try:
    info = read_native_info(directory)
  except ValueError:
    return False
  return bool(info.get("masks") or info.get("weights"))


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
    cfg: model config; when given the directory is also a model jaxserve loads.
    tokenizer: optional tokenizer, saved beside the model.
    metadata: JSON-serialisable pruning metadata (method, target, report, ...).
    compress: store sparse kernels compressed (only with ``cfg``).

  Returns:
    The absolute directory path.
  """
  _check_out_dir(directory)
  check_masks(params, masks)
  try:
    json.dumps(metadata or {})
  except TypeError as e:
    raise ValueError(f"metadata must be JSON-serialisable ({e})") from None
  params = apply_masks(params, masks)
  masks = map_with_path(lambda _, m: None if m is None or m is True else np.asarray(m, bool), masks)
  stored = weights.compress_params(params, masks, exact_mask=True) if cfg is not None and compress else params
  compressed = {p for p, x in leaves_with_paths(stored) if weights.is_typed(x)}
  dense_masks = {p: m for p, m in leaf_masks(masks).items() if p not in compressed}
  return save_native(cfg, stored, directory, tokenizer, masks=dense_masks, metadata=metadata)


def _check_out_dir(directory: str) -> None:
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise ValueError(f"{directory}: is a file; saving needs a directory path (new, or a checkpoint to overwrite)")


def _check_target(saved: dict[str, list], target: PyTree, directory: str) -> None:
  want = {p: list(x.shape) for p, x in leaves_with_paths(target)}
  missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
  if missing or extra:
    raise ValueError(f"{directory}: checkpoint does not match the target tree: target-only paths {missing[:3]}, "
                     f"checkpoint-only paths {extra[:3]}")
  for p, shape in want.items():
    if list(saved[p][0]) != shape:
      raise ValueError(f"{directory}: {p} has shape {tuple(saved[p][0])} in the checkpoint, the target has "
                       f"{tuple(shape)}")


def restore(directory: str, target: PyTree | None = None) -> Checkpoint:
  """Restores what :func:`save` wrote (or an earlier format's directory).

  Args:
    directory: a directory written by :func:`save`.
    target: optional pytree (arrays or ``jax.ShapeDtypeStruct``) the params must match; a
      mismatch in paths or shapes raises a ValueError before anything is read.

  Returns:
    ``Checkpoint(params, masks, metadata, cfg)``; params keep their saved dtypes.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise ValueError(f"{directory}: is a file, not a checkpoint directory" if os.path.exists(directory)
                     else f"{directory}: no such checkpoint directory")
  if os.path.isfile(os.path.join(directory, LEGACY_METADATA_FILE)):
    return _restore_legacy(directory, target)
  if not os.path.isfile(os.path.join(directory, NATIVE_CONFIG)):
    raise ValueError(f"{directory}: not a jaxprune checkpoint (no {NATIVE_CONFIG})")
  info = read_native_info(directory)
  if target is not None:
    if "params" not in info:
      raise ValueError(f"{directory}: a jaxserve-native-v1 directory records no parameter shapes to check a target")
    _check_target(info["params"], target, directory)
  ck = read_native(directory)
  kept = {p: x.mask() for p, x in leaves_with_paths(ck.params) if weights.is_typed(x)}
  params = map_with_path(lambda p, x: jnp.asarray(weights.to_dense(x)), ck.params)
  masks = map_with_path(lambda p, x: jnp.asarray(kept[p]) if p in kept else
                        jnp.asarray(ck.masks[p]) if p in ck.masks else None, params)
  return Checkpoint(params, masks, ck.metadata, ck.cfg)


def load_pruned(directory: str, dtype: str | None = None) -> LoadedModel:
  """Loads a pruned model directory as ``jaxserve.loaders.LoadedModel(cfg, params, tokenizer, source)``.

  Compressed kernels come back as typed leaves (:mod:`jaxserve.weights`), as
  ``jaxserve.loaders.load_model(DIR)`` returns them.
  """
  if not os.path.isfile(os.path.join(directory, NATIVE_CONFIG)):
    raise ValueError(f"{directory}: not a model directory (no {NATIVE_CONFIG})")
  return load_native(directory, dtype)


def export_hf(params: PyTree, cfg: ModelConfig, out_dir: str, *, masks: PyTree | None = None, tokenizer: Any = None,
              metadata: dict[str, Any] | None = None) -> str:
  """Writes a Hugging Face directory (``config.json`` + safetensors) of a pruned model.

  Pruned weights are stored as exact zeros (dense tensors); ``pruning.json`` beside them
  records the metadata and achieved sparsity.
  """
  _check_out_dir(out_dir)
  if masks is not None:
    params = apply_masks(params, masks)
  save_hf(cfg, params, out_dir, tokenizer)
  with open(os.path.join(out_dir, "pruning.json"), "w") as f:
    json.dump({"metadata": metadata or {}, "sparsity": sparsity(params).total}, f, indent=2)
  return out_dir


# ----------------------------------------------------------------------------- earlier formats (read only)

def _restore_legacy(directory: str, target: PyTree | None) -> Checkpoint:
  """Reads a ``jaxprune-pruned-v1``/``-v2`` directory: ``jaxprune.json``, ``params/`` (or a native
  directory when saved with a config) and ``masks/`` (an orbax tree like the params, None at dense leaves)."""
  with open(os.path.join(directory, LEGACY_METADATA_FILE)) as f:
    info = json.load(f)
  if info.get("format") not in _LEGACY_READABLE:
    raise ValueError(f"{directory}: unknown checkpoint format {info.get('format')!r}, expected one of "
                     f"{_LEGACY_READABLE}")
  if target is not None:
    _check_target(info["params"], target, directory)
  like = {p: np.zeros(shape, np.dtype(dtype)) for p, (shape, dtype) in info["params"].items()}
  compressed = set(info.get("compressed", []))
  if info.get("config") is not None:  # the native model directory (compressed kernels as typed leaves)
    stored = read_native(directory).params
    params = map_with_path(lambda p, x: jnp.asarray(weights.to_dense(x), like[p].dtype), stored)
  else:
    restored = _legacy_restore(os.path.join(directory, "params"), tree_from_paths(like))
    stored = params = jax.tree.map(jnp.asarray, restored)
  masked = set(info["masked"]) - compressed
  masks_like = tree_from_paths({p: np.zeros(x.shape, bool) if p in masked else None for p, x in like.items()})
  masks = _legacy_restore(os.path.join(directory, "masks"), masks_like)
  kept = {p: x.mask() for p, x in leaves_with_paths(stored) if p in compressed}
  masks = map_with_path(lambda p, m: kept[p] if p in kept else None if m is None else jnp.asarray(m, bool), masks)
  cfg = None if info.get("config") is None else ModelConfig.from_dict(info["config"])
  return Checkpoint(params, masks, info["metadata"], cfg)


def _legacy_restore(path: str, like: PyTree) -> PyTree:
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path, like)

