"""Chooses the form of each Dense kernel the engine runs (dense, packed, N:M, bitmask) and registers the native kernels for them."""

from __future__ import annotations

from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve import weights
from jaxserve.weights import BitmaskSparse, NMSparse, PackedDense

SPARSE_MODES = ("auto", "off")


def _cpu_ok(x: jax.Array, w: Any) -> bool:
  from jaxserve.engine import _cpu_kernels
  return (jax.default_backend() == "cpu" and x.dtype == jnp.float32 and w.dtype == jnp.float32
          and _cpu_kernels.available())


def _packed_cpu(x: jax.Array, w: PackedDense, rows: jax.Array | None = None) -> jax.Array | None:
  from jaxserve.engine import _cpu_kernels
  # float32 panels, or bfloat16 ones in pairs of rows (the layout the bfloat16 kernel reads)
  fits = x.dtype == w.dtype and w.dtype in _cpu_kernels.DTYPES and w.pairs == (w.dtype == jnp.bfloat16)
  if not (fits and jax.default_backend() == "cpu" and _cpu_kernels.available()):
    return None
  return _cpu_kernels.packed_matmul(x, w.panels.reshape(w.rows, w.shape[1]), rows=rows)


def _nm_cpu(x: jax.Array, w: NMSparse, rows: jax.Array | None = None) -> jax.Array | None:
  from jaxserve.engine import _cpu_kernels
  if w.panel != weights.DEFAULT_PANEL or not _cpu_ok(x, w):
    return None
  return _cpu_kernels.nm_matmul(x, w.values, w.meta, n=w.n, m=w.m, n_out=w.shape[1], rows=rows)


def _bitmask_cpu(x: jax.Array, w: BitmaskSparse, rows: jax.Array | None = None) -> jax.Array | None:
  from jaxserve.engine import _cpu_kernels
  if not _cpu_ok(x, w):
    return None
  return _cpu_kernels.bitmask_matmul(x, w.bits, w.values, w.offsets, n_out=w.shape[1], rows=rows)


def register_cpu_kernels() -> None:
  """Lets :func:`jaxserve.weights.matmul` run typed leaves on the C++ CPU kernels (idempotent)."""
  weights.register_kernel(PackedDense, _packed_cpu)
  weights.register_kernel(NMSparse, _nm_cpu)
  weights.register_kernel(BitmaskSparse, _bitmask_cpu)


def _is_dense_kernel(path: tuple, x: Any) -> bool:
  return getattr(path[-1], "key", None) == "kernel" and len(x.shape) == 2


def prepare_params(params: Any, *, sparse: str = "auto", native: bool = False, fuse: bool = False) -> Any:
  """The engine's parameters: each Dense kernel in the form it runs fastest in.

  Args:
    params: the model's parameters; kernels may be arrays or typed leaves (e.g. loaded compressed).
    sparse: ``"auto"``: a kernel whose zeros (or stored compressed form) make an N:M or bitmask
      form at most :data:`jaxserve.weights.MAX_BYTES_FRACTION` of its dense bytes runs compressed,
      when ``native`` kernels exist for it; ``"off"``: every kernel runs dense.
    native: the C++ CPU kernels run this model (float32 or bfloat16 on the CPU): dense kernels with
      ``N % 16 == 0`` are packed (bfloat16 ones in pairs of rows: ``PackedDense.pairs``); float32
      sparse ones are kept compressed (the sparse kernels are float32 only: bfloat16 ones run
      packed dense). False: plain arrays only (XLA, GPU, sharded).
    fuse: also join each block's projections that read one input (:func:`fuse_projections`), before
      the dense ones are packed (joining packed kernels would unpack and pack them again).

  Returns:
    The parameters with no dense copy of a kernel kept beside its compressed or packed form.
  """
  if sparse not in SPARSE_MODES:
    raise ValueError(f"sparse_weights must be one of {SPARSE_MODES}, got {sparse!r}")
  if native:
    register_cpu_kernels()

  def one(path, x):
    if not weights.is_typed(x) and not _is_dense_kernel(path, x):
      return x
    name = weights.path_name(path)
    if isinstance(x, PackedDense):
      x = x.to_dense()
    if sparse == "auto" and native and x.dtype == jnp.float32:
      if not weights.is_typed(x):
        x = weights.compress(x, name=name)
      if isinstance(x, NMSparse) and x.panel != weights.DEFAULT_PANEL:
        x = NMSparse.compress(x.to_dense(), x.mask(), n=x.n, m=x.m, name=name)
    elif weights.is_typed(x):
      x = x.to_dense()
    return x

  def pack(path, x):
    if native and _is_dense_kernel(path, x) and not weights.is_typed(x) and x.dtype in (
        jnp.float32, jnp.bfloat16) and PackedDense.packable(x.shape):
      x = PackedDense.pack(x)
    return x

  params = jax.tree_util.tree_map_with_path(one, params, is_leaf=weights.is_typed)
  if fuse:
    params = fuse_projections(params)
  return jax.tree_util.tree_map_with_path(pack, params, is_leaf=weights.is_typed)


# Projections that read the same input, run as one matmul where their kernels are of one kind:
# (module, fused name, parts). jaxserve.model runs a block with either layout.
FUSED_PROJECTIONS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                     ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(params: Any) -> Any:
  """``params`` with each block's q/k/v kernels joined into ``qkv_proj`` and gate/up into ``gate_up_proj``.

  One matmul instead of three (two) per block: fewer kernel calls in a decode step, each longer
  (vLLM's QKVParallelLinear and MergedColumnParallelLinear). A group is joined only when its
  kernels are of one kind (:func:`jaxserve.weights.concat_columns`) and its biases are all present
  or all absent; otherwise it stays as it was. The parts are not kept (no second copy).
  """
  def fuse_module(module: dict) -> dict:
    module = dict(module)
    for _, fused, parts in FUSED_PROJECTIONS:
      if not all(p in module and set(module[p]) <= {"kernel", "bias"} for p in parts):
        continue
      has_bias = {"bias" in module[p] for p in parts}
      kernel = weights.concat_columns([module[p]["kernel"] for p in parts])
      if kernel is None or len(has_bias) != 1:
        continue
      joined = {"kernel": kernel}
      if has_bias == {True}:
        joined["bias"] = weights.concatenate([module[p]["bias"] for p in parts])
      for p in parts:
        del module[p]
      module[fused] = joined
    return module

  out = dict(params)
  for name, block in params.items():
    if name.startswith("layers_") and isinstance(block, dict):
      out[name] = {key: fuse_module(sub) if key in ("self_attn", "mlp") and isinstance(sub, dict) else sub
                   for key, sub in block.items()}
  return out


def weight_formats(params: Any) -> dict[str, int]:
  """How many Dense kernels run in each form: ``{"dense": 3, "packed": 40, "2:4": 56, "bitmask": 0}``."""
  def kind(x):
    if isinstance(x, NMSparse):
      return f"{x.n}:{x.m}"
    return {PackedDense: "packed", BitmaskSparse: "bitmask"}.get(type(x), "dense")
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=weights.is_typed)[0]
  return dict(Counter(kind(x) for path, x in flat if weights.is_typed(x) or _is_dense_kernel(path, x)))
