"""Version-sensitive Pallas imports and backend selection, in one place.

The kernels are written against the portable Pallas API (``pallas_call``,
``BlockSpec``, ref indexing). What differs between JAX releases is kept here:

* JAX 0.10 (CPU CI): Pallas Triton backend current, kernels run with
  ``interpret=True``.
* JAX 0.11 (GPU machines): the Triton backend still lowers but warns that it is
  deprecated in favour of Mosaic GPU. We silence that one warning around the
  call and keep using it; a Mosaic GPU variant is not written yet.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import jax
from jax.experimental import pallas as pl

try:  # The Triton compiler params moved/were deprecated in newer JAX.
  from jax.experimental.pallas import triton as _plgpu  # type: ignore

  _TRITON_PARAMS = getattr(_plgpu, "CompilerParams", None)
except ImportError:  # pragma: no cover - depends on the JAX build.
  _plgpu = None
  _TRITON_PARAMS = None

__all__ = [
    "pl",
    "GPU_PLATFORMS",
    "on_gpu",
    "resolve_interpret",
    "triton_compiler_params",
    "is_tracer",
    "quiet_backend_warnings",
    "reference_paged_attention_op",
]

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def on_gpu() -> bool:
  """True when JAX's default backend is a GPU."""
  return jax.default_backend() in GPU_PLATFORMS


def resolve_interpret(interpret: bool | None) -> bool:
  """`None` means: interpret unless the default backend is a GPU."""
  if interpret is None:
    return not on_gpu()
  return bool(interpret)


def triton_compiler_params(num_warps: int, num_stages: int) -> Any | None:
  """Compiler params for the Triton lowering, or None if unavailable."""
  if _TRITON_PARAMS is None:  # pragma: no cover
    return None
  return _TRITON_PARAMS(num_warps=num_warps, num_stages=num_stages)


def is_tracer(x: Any) -> bool:
  """True when `x` is an abstract value inside a transformation (jit, vmap)."""
  return isinstance(x, jax.core.Tracer)


@contextlib.contextmanager
def quiet_backend_warnings():
  """Silence the Triton-backend deprecation warning of JAX >= 0.11."""
  with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=".*Pallas Triton backend is deprecated.*")
    warnings.filterwarnings(
        "ignore", message=".*ops.gpu.paged_attention is deprecated.*")
    yield


def reference_paged_attention_op():
  """JAX's own GPU paged-attention op (for benchmarks), or None."""
  with quiet_backend_warnings():
    try:
      from jax.experimental.pallas.ops.gpu import paged_attention as mod  # type: ignore
    except Exception:  # pragma: no cover - optional, version dependent.
      return None
  return getattr(mod, "paged_attention", None)
