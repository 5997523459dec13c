"""Test session setup: four virtual CPU devices (for the sharding tests), set before JAX starts, and
strict numerics for the whole suite (as equinox does).

``jax_numpy_dtype_promotion="strict"`` makes any implicit promotion between different dtypes an
error at trace time (a float32 weight meeting a bfloat16 activation, an int32 count meeting a
Python float), and ``jax_numpy_rank_promotion="raise"`` does the same for implicit broadcasting
between arrays of different ranks: silent precision and shape bugs fail a test instead of
shipping. The environment variables carry both modes into the subprocesses some tests start (CLI,
second engine process); ``jax.config.update`` covers this process in case JAX was imported first.
Library code never sets these flags; a test that deliberately mixes dtypes opts out locally with
``jax.numpy_dtype_promotion("standard")``.
"""

import gc
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ["JAX_NUMPY_DTYPE_PROMOTION"] = "strict"
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _free_each_modules_programs():
  """After each test module: drop JAX's in-memory caches and run a full collection.

  Every compiled XLA program keeps its code mapped (on the order of a hundred memory maps each); the
  suite compiles thousands (each test's shapes, interpret-mode Pallas kernels, tracing helpers that
  JAX's own caches keep, objects in reference cycles that only a full collection frees) and one
  process may hold at most ``vm.max_map_count`` maps (65530 by default): XLA crashed compiling once
  the suite had passed that. The engine itself frees its programs when dropped (test_engine_compile).
  """
  yield
  jax.clear_caches()
  gc.collect()
