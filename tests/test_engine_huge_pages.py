"""Huge pages for the KV pools: only whole pages inside a buffer are advised, and its contents stay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.engine import _huge_pages

MIB = 1 << 20


def _vma_flags(addr: int) -> dict[str, str]:
  """The /proc/self/smaps fields of the mapping that holds ``addr``."""
  fields, inside = {}, False
  with open("/proc/self/smaps") as f:
    for line in f:
      head = line.split()[0]
      if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
        lo, hi = (int(x, 16) for x in head.split("-"))
        if inside:
          break
        inside = lo <= addr < hi
      elif inside:
        key, _, value = line.partition(":")
        fields[key] = value.strip()
  return fields


def test_huge_page_range_is_the_whole_pages_inside():
  assert _huge_pages.huge_page_range(0, 4 * MIB) == (0, 4 * MIB)
  assert _huge_pages.huge_page_range(1, 4 * MIB) == (2 * MIB, 2 * MIB)  # [1, 4 MiB + 1): one whole page
  assert _huge_pages.huge_page_range(2 * MIB - 64, 2 * MIB + 64) == (2 * MIB, 2 * MIB)
  assert _huge_pages.huge_page_range(64, 2 * MIB) == (2 * MIB, 0)  # no whole page inside
  assert _huge_pages.huge_page_range(3 * MIB, MIB)[1] == 0


def test_advised_pool_keeps_its_zeros_and_takes_writes():
  if not _huge_pages.available():
    pytest.skip("no transparent huge pages here (not Linux, or 'never')")
  pool = jnp.zeros((256, 4, 16, 64), jnp.float32)  # 4 MiB: at least one whole huge page inside
  done = _huge_pages.advise_zeroed([pool])
  start, length = _huge_pages.huge_page_range(pool.unsafe_buffer_pointer(), pool.nbytes)
  assert done == length >= 2 * MIB
  assert _vma_flags(start).get("THPeligible") == "1"  # the advice took: the mapping may get huge pages
  assert not np.asarray(pool).any()  # the pages given back read as zeros
  # writes into the donated buffer land and stay (the engine updates its pools in place)
  write = jax.jit(lambda p, v: p.at[5, 1].set(v), donate_argnums=0)
  pool = write(pool, jnp.full((16, 64), 3.0, jnp.float32))
  host = np.asarray(pool)
  assert (host[5, 1] == 3.0).all() and np.count_nonzero(host) == 16 * 64


def test_arrays_with_no_whole_page_are_left_alone():
  small = jnp.zeros((1000,), jnp.float32)
  assert _huge_pages.advise_zeroed([small]) == 0
  assert not np.asarray(small).any()
