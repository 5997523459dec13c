"""Block-accounting invariant checks raise (not ``assert``), so they hold under ``python -O`` too."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from jaxserve.engine._block_pool import BlockAccountingError, BlockPool
from jaxserve.engine._kv_cache_manager import KVCacheManager

def _corrupt_pool() -> BlockPool:
  pool = BlockPool(4)
  pool.get_new_blocks(1)[0].ref_cnt = 0  # held block with no reference, not in the free queue
  return pool


def _corrupt_manager() -> KVCacheManager:
  kv = KVCacheManager(4, 2)
  kv.allocate_slots(7, 0, 3)
  kv.pool.blocks[1].ref_cnt += 1  # a reference no block table holds
  return kv


@pytest.mark.parametrize("make", [_corrupt_pool, _corrupt_manager])
def test_invariant_violation_raises(make):
  with pytest.raises(BlockAccountingError, match="ref_cnt|tables hold it"):
    make().check_invariants()
  assert issubclass(BlockAccountingError, RuntimeError)


def test_invariant_checks_survive_python_O():
  script = textwrap.dedent("""
      import sys
      from jaxserve.engine._block_pool import BlockAccountingError, BlockPool
      from jaxserve.engine._kv_cache_manager import KVCacheManager
      assert sys.flags.optimize >= 1
      failures = []
      pool = BlockPool(4)
      pool.get_new_blocks(1)[0].ref_cnt = 0
      kv = KVCacheManager(4, 2)
      kv.allocate_slots(7, 0, 3)
      kv.pool.blocks[1].ref_cnt += 1
      for name, check in (("pool", pool.check_invariants), ("manager", kv.check_invariants),
                          ("double free", lambda: BlockPool(3).free_blocks([BlockPool(3).blocks[1]]))):
        try:
          check()
        except BlockAccountingError as e:
          print(name, "raised:", e)
        else:
          failures.append(name)
      sys.exit(len(failures))
  """)
  r = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stdout + r.stderr
  assert r.stdout.count("raised:") == 3, r.stdout
