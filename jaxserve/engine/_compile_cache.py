"""The engine's persistent compilation cache: JAX's own on-disk cache, switched on only around the engine's compiles.

JAX keeps its cache directory in a process-wide setting (``jax_compilation_cache_dir``) and binds
its cache object to that directory on the first compile that sees one. A library must not leave
that behind in the process of the code that imports it, so :func:`scope` sets the directory (and
thresholds low enough for a CPU step program's half-second compile) only for the calling thread,
only while the engine compiles, and afterwards puts JAX's cache object back the way it found it.
A directory the user configured (``jax_compilation_cache_dir`` set) is used as it is, never replaced.

The JAX calls that reach past its public API live here and nowhere else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Iterator

from jax._src import compilation_cache as _jax_cache
from jax._src import config as _jax_config

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state = {"active": 0, "bound_before": False}  # scopes open now; whether JAX's cache was bound before them
_local = threading.local()  # set_here: the directories this thread's open scopes set


def default_dir() -> Path:
  """``$JAXSERVE_CACHE_DIR/xla``, else ``$XDG_CACHE_HOME/jaxserve/xla``, else ``~/.cache/jaxserve/xla``."""
  root = os.environ.get("JAXSERVE_CACHE_DIR")
  if not root:
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "jaxserve")
  return Path(root) / "xla"


def resolve(setting: bool | str | os.PathLike | None) -> str | None:
  """The directory the engine's programs are cached in for ``LLM(compilation_cache=setting)``, or None.

  ``True``: :func:`default_dir`. A path: that directory. ``False``/``None``: no persistent cache.
  If the user configured ``jax_compilation_cache_dir``, that directory is used for ``True`` and for
  a path alike (JAX keeps one cache per process, and the user's wins). A directory the engine creates is private
  (0700); one owned by another user, or writable by others, is refused (JAX loads executables from
  it: whoever can write there can run code in this process), with a warning, and nothing is cached.
  """
  if setting is None or setting is False:
    return None
  if setting is not True and not isinstance(setting, (str, os.PathLike)):
    raise ValueError(f"compilation_cache must be True, False or a directory path, got {setting!r}")
  user = _jax_config.compilation_cache_dir.value
  if user:
    if setting is not True and Path(setting) != Path(user):
      log.info("compilation cache: using jax_compilation_cache_dir=%s (set in this process), not %s", user, setting)
    return str(user)
  path = default_dir() if setting is True else Path(setting)
  try:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
  except OSError as e:
    log.warning("no persistent compilation cache: cannot create %s (%s)", path, e)
    return None
  if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
    log.warning("no persistent compilation cache: %s belongs to another user or others can write to it; "
                "pass compilation_cache=<a directory of your own> or False", path)
    return None
  return str(path)


def _backend():
  import jax.extend.backend  # noqa: PLC0415 (jax.extend is not imported with jax)
  return jax.extend.backend.get_backend()


def is_users(path: str | None) -> bool:
  """Whether ``path`` is the directory the user configured for JAX (``jax_compilation_cache_dir``), not
  one this module set for the engine (inside a :func:`scope`)."""
  user = _jax_config.compilation_cache_dir.value
  return bool(path and user and Path(path) == Path(user) and user not in getattr(_local, "set_here", ()))


def jax_cache_may_serve() -> bool:
  """Whether a compile in this process may be served from JAX's persistent cache whatever this thread's
  settings say: JAX decides once per process that its cache is used, and a cache object bound to a
  directory (by any compile while ``jax_compilation_cache_dir`` was set, the user's included) stays
  bound until reset, so :func:`scope` (None) does not keep a compile from a hit there."""
  return _jax_cache._cache is not None and bool(getattr(_jax_cache, "_cache_used", True))


@contextlib.contextmanager
def scope(path: str | None) -> Iterator[None]:
  """Compiles inside this context read and write JAX's persistent cache at ``path`` (None: off).

  Thread-local settings: the directory (unless the user configured one), no minimum compile time
  and no minimum entry size. If these contexts (several threads may compile at once) are what
  bound JAX's cache object to a directory, the last one to exit unbinds it, so the process's later
  compiles see JAX as before.
  """
  if path is None:
    # JAX decides once per process, at the first compile that asks, whether its cache is used: ask
    # now, under the process's own settings, so that a compile here (cache off for this thread) is
    # not the one that decides "off" for every later compile of the user's
    _jax_cache.is_cache_used(_backend())
    with _jax_config.enable_compilation_cache(False):
      yield
    return
  user = _jax_config.compilation_cache_dir.value
  with _lock:
    if _state["active"] == 0:
      _state["bound_before"] = _jax_cache._cache is not None
    _state["active"] += 1
  try:
    with contextlib.ExitStack() as stack:
      if not user:
        stack.enter_context(_jax_config.compilation_cache_dir(path))
        _local.set_here = getattr(_local, "set_here", ()) + (path,)
        stack.callback(lambda: setattr(_local, "set_here", _local.set_here[:-1]))
      stack.enter_context(_jax_config.persistent_cache_min_compile_time_secs(0.0))
      stack.enter_context(_jax_config.persistent_cache_min_entry_size_bytes(-1))
      yield
  finally:
    with _lock:
      _state["active"] -= 1
      if _state["active"] == 0 and not _state["bound_before"] and _jax_cache._cache is not None:
        _jax_cache.reset_cache()  # JAX's cache object was bound to a directory here: unbind it
