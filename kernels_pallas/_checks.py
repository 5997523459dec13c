"""Input validation shared by the kernel wrappers (clear ValueErrors)."""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from kernels_pallas import _compat, _core

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                jnp.dtype(jnp.float16))


def _is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def check_pool(k_pages: Any, v_pages: Any, q_dtype, head_dim: int) -> None:
  """K/V pools: [num_kv_heads, num_pages, page_size, head_dim], same dtype as q."""
  if k_pages.ndim != 4:
    raise ValueError(
        "k_pages must be [num_kv_heads, num_pages, page_size, head_dim], got "
        f"shape {tuple(k_pages.shape)}")
  if v_pages.shape != k_pages.shape:
    raise ValueError("v_pages must have the shape of k_pages "
                     f"{tuple(k_pages.shape)}, got {tuple(v_pages.shape)}")
  if k_pages.shape[-1] != head_dim:
    raise ValueError(f"head_dim of q ({head_dim}) must equal that of the KV "
                     f"pages ({k_pages.shape[-1]})")
  for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
    if jnp.dtype(x.dtype) != jnp.dtype(q_dtype):
      raise ValueError(f"{name} dtype must equal q dtype {jnp.dtype(q_dtype)}"
                       f", got {jnp.dtype(x.dtype)}; cast one of them")
  if k_pages.shape[1] < 1 or k_pages.shape[2] < 1:
    raise ValueError("the KV pool needs at least one page of at least one "
                     f"slot, got shape {tuple(k_pages.shape)}")


def check_query(q: Any, num_kv_heads: int, name: str = "q") -> None:
  if q.ndim != 3:
    raise ValueError(f"{name} must be 3-D [tokens, num_heads, head_dim], got "
                     f"shape {tuple(q.shape)}")
  if jnp.dtype(q.dtype) not in FLOAT_DTYPES:
    raise ValueError(f"{name} dtype must be one of float32, bfloat16, float16,"
                     f" got {jnp.dtype(q.dtype)}")
  num_heads = q.shape[1]
  if num_heads % num_kv_heads:
    raise ValueError(
        f"GQA ratio: num_heads ({num_heads}) must be a multiple of "
        f"num_kv_heads ({num_kv_heads})")


def check_int_array(x: Any, name: str, shape: tuple[int, ...] | None = None,
                    ndim: int | None = None) -> None:
  if not hasattr(x, "dtype") or jnp.dtype(x.dtype) != jnp.dtype(jnp.int32):
    got = jnp.dtype(x.dtype) if hasattr(x, "dtype") else type(x).__name__
    raise ValueError(f"{name} must be an int32 array, got {got}")
  if shape is not None and tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got "
                     f"{tuple(x.shape)}")
  if ndim is not None and x.ndim != ndim:
    raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_knobs(*, sm_scale, soft_cap, pages_per_compute_block, num_splits,
                block_q=None) -> None:
  if sm_scale is not None and not (math.isfinite(sm_scale) and sm_scale > 0):
    raise ValueError(f"sm_scale must be a positive finite float, got "
                     f"{sm_scale}")
  if soft_cap is not None and not (math.isfinite(soft_cap) and soft_cap > 0):
    raise ValueError(f"soft_cap must be None or a positive finite float, got "
                     f"{soft_cap}")
  if pages_per_compute_block is not None and not (
      isinstance(pages_per_compute_block, int)
      and _is_pow2(pages_per_compute_block)):
    raise ValueError("pages_per_compute_block must be a power of 2 >= 1, got "
                     f"{pages_per_compute_block}")
  if num_splits is not None and not (isinstance(num_splits, int)
                                     and num_splits >= 1):
    raise ValueError(f"num_splits must be an int >= 1, got {num_splits}")
  if block_q is not None and not (isinstance(block_q, int) and block_q >= 1):
    raise ValueError(f"block_q must be an int >= 1, got {block_q}")


def check_compiled_shapes(head_dim: int, page_size: int, block_k: int,
                          interpret: bool) -> None:
  """The Triton lowering needs power-of-2 tiles and dots of >= 16."""
  if interpret:
    return
  if not (_is_pow2(head_dim) and head_dim >= 16):
    raise ValueError(f"the compiled GPU kernel needs head_dim a power of 2 >= "
                     f"16, got {head_dim}; use the XLA reference path or "
                     "interpret=True")
  if not _is_pow2(page_size):
    raise ValueError(f"the compiled GPU kernel needs page_size a power of 2, "
                     f"got {page_size}")
  if block_k < 16:
    raise ValueError("pages_per_compute_block * page_size must be >= 16 for "
                     f"the compiled GPU kernel, got {block_k}")


def compiled_kernel_supported(head_dim: int, page_size: int) -> bool:
  """Whether the compiled (Triton) kernels accept this head_dim / page_size.

  With the default pages_per_compute_block; interpret mode accepts anything.
  Engines use it to pick the Pallas path on a GPU or fall back to XLA.
  """
  if head_dim < 1 or page_size < 1:
    return False
  ppcb = _core.auto_pages_per_compute_block(page_size, 1 << 20, head_dim)
  try:
    check_compiled_shapes(head_dim, page_size, ppcb * page_size,
                          interpret=False)
  except ValueError:
    return False
  return True


def concrete(x: Any) -> np.ndarray | None:
  """Host copy of `x` if it is concrete (not traced), else None."""
  if _compat.is_tracer(x):
    return None
  return np.asarray(x)


def check_block_table_values(block_tables: Any, num_pages: int) -> None:
  bt = concrete(block_tables)
  if bt is None or bt.size == 0:
    return
  lo, hi = int(bt.min()), int(bt.max())
  if lo < 0 or hi >= num_pages:
    raise ValueError(f"block_tables entries must be in [0, {num_pages}) (the "
                     f"pool has {num_pages} pages), got values in [{lo}, {hi}]")


def check_lengths_values(lengths: Any, capacity: int, name: str) -> None:
  ln = concrete(lengths)
  if ln is None or ln.size == 0:
    return
  lo, hi = int(ln.min()), int(ln.max())
  if lo < 0 or hi > capacity:
    raise ValueError(
        f"{name} must be in [0, {capacity}] (max_blocks * page_size), got "
        f"values in [{lo}, {hi}]")
