"""The engine's compiled programs kept on disk whole, so a later process with the same model and settings skips tracing them.

JAX's persistent compilation cache (:mod:`jaxserve.engine._compile_cache`) saves the XLA compile,
but it is keyed by the lowered program, so every process still traces and lowers each program
before it can look one up: for a step program that is the whole model traced through Flax, most of
a warm start's time. This cache stores each compiled program as JAX serializes it
(``jax.experimental.serialize_executable``) under a key of everything that shapes it: the program's
key and the abstract signature of its arguments (shapes, dtypes and pytree structure, which holds
the weight leaves' kinds and layouts), the model configuration and attention backend, the JAX and
jaxlib versions and platform, the CPU's instruction sets, JAX's numerics settings, the jaxserve and
Pallas-kernel source files themselves, and the ``JAXSERVE_*`` and ``XLA_FLAGS`` environment. A
change to any of them is a miss, never a stale program.

Entries are pickles of machine code: they are read only from a directory of this user's that
nobody else can write to (else the cache is off, with a warning), and written atomically. The
directory is kept under ``MAX_BYTES`` (least recently used entries go first: a load marks its entry
used): every source edit or setting change makes a new set of entries, and the old ones would
otherwise pile up.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import pickle
import threading
import tempfile
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)
VERSION = 1
SUBDIR = "jaxserve-executables"
MAX_BYTES = 1 << 30  # the directory's size bound (one engine's programs: a few MB to a few hundred MB)
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion",
                 "jax_numpy_rank_promotion", "jax_default_prng_impl", "jax_threefry_partitionable")


@functools.lru_cache(maxsize=None)
def _code_fingerprint() -> str:
  """A hash of the jaxserve and kernels_pallas sources (Python, C++): any edit is a new key."""
  h = hashlib.sha256()
  for package in ("jaxserve", "kernels_pallas"):
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      continue
    root = Path(list(spec.submodule_search_locations)[0])
    for path in sorted(root.rglob("*")):
      if path.suffix in (".py", ".cc", ".h") and path.is_file():
        h.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
        h.update(path.read_bytes())
  return h.hexdigest()


def _environment() -> str:
  import jaxlib
  device = jax.devices()[0]
  parts = [f"v{VERSION}", jax.__version__, jaxlib.__version__, device.platform, device.device_kind,
           str(getattr(device.client, "platform_version", "")), _code_fingerprint()]
  if device.platform == "cpu":
    from jaxserve.engine import _cpu_kernels
    parts.append(_cpu_kernels.cpu_flags())
  parts += [f"{name}={getattr(jax.config, name, None)}" for name in _JAX_SETTINGS]
  parts += [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("JAXSERVE_") or k == "XLA_FLAGS"]
  return "\n".join(parts)


def signature(key: tuple, args: tuple, context: str) -> str:
  """The cache key of program ``key`` compiled for ``args`` (arrays or ``ShapeDtypeStruct``s) in ``context``."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  avals = [(tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__))) for x in leaves]
  text = "\n".join([_environment(), context, repr(key), str(tree), repr(avals)])
  return hashlib.sha256(text.encode()).hexdigest()


def _private(path: Path) -> bool:
  st = path.stat()
  return not hasattr(os, "getuid") or (st.st_uid == os.getuid() and not st.st_mode & 0o022)


class ExecutableCache:
  """Compiled programs under ``<root>/jaxserve-executables`` (``root``: the engine's compilation cache directory)."""

  def __init__(self, root: str, max_bytes: int = MAX_BYTES):
    self.dir = Path(root) / SUBDIR
    self.max_bytes = max_bytes
    self.hits = 0
    self.skipped = 0  # compiles not stored: JAX's own cache may have served them (stored, they would not run)
    self._lock = threading.Lock()
    try:
      self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
      self.ok = _private(self.dir)
    except OSError as e:
      log.warning("no executable cache: cannot create %s (%s)", self.dir, e)
      self.ok = False
      return
    if not self.ok:
      log.warning("no executable cache: %s belongs to another user or others can write to it", self.dir)

  def load(self, sig: str) -> Any | None:
    """The compiled program stored under ``sig``, or None (absent, unreadable, or not this user's)."""
    path = self.dir / f"{sig}.exe"
    if not self.ok or not path.is_file():
      return None
    try:
      if not _private(path):
        log.warning("executable cache: ignoring %s (not this user's, or writable by others)", path)
        return None
      from jax.experimental import serialize_executable
      payload, in_tree, out_tree = pickle.loads(path.read_bytes())
      # on the one device the engine runs on (by default JAX would spread it over every local device)
      exe = serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=jax.devices()[:1])
    except Exception as e:  # noqa: BLE001 - a bad entry is a miss: compile instead
      log.info("executable cache: %s unreadable (%s); compiling instead", path.name, e)
      return None
    with self._lock:  # programs load on several threads
      self.hits += 1
    try:
      os.utime(path)  # used now: the last to be evicted
    except OSError:
      pass
    return exe

  def store(self, sig: str, exe: Any) -> None:
    """Keeps ``exe`` under ``sig`` (atomically; failures only log)."""
    if not self.ok:
      return
    try:
      from jax.experimental import serialize_executable
      data = pickle.dumps(serialize_executable.serialize(exe))
      fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, self.dir / f"{sig}.exe")
    except Exception as e:  # noqa: BLE001 - caching is an optimisation
      log.info("executable cache: could not store a program (%s)", e)
      return
    self.evict()

  def evict(self) -> None:
    """Removes the least recently used entries until the directory holds at most ``max_bytes``."""
    entries = []
    for path in self.dir.glob("*.exe"):
      try:
        st = path.stat()
      except OSError:  # removed by another process meanwhile
        continue
      entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: e[0]):
      if total <= self.max_bytes:
        break
      try:
        path.unlink()
      except OSError:
        continue
      total -= size
