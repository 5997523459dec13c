"""Per-sequence block tables over the block pool: allocation, prefix hits, fork, copy-on-write, free."""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxserve.engine._block_pool import BlockAccountingError, BlockPool, KVBlock, check, hash_block_tokens


@dataclasses.dataclass(frozen=True)
class PrefixHit:
  """Full blocks of a new sequence's tokens already in the prefix cache."""

  blocks: tuple[KVBlock, ...] = ()
  num_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Allocation:
  """What ``allocate_slots`` did: blocks appended and block copies the device must do first."""

  new_block_ids: tuple[int, ...]
  copies: tuple[tuple[int, int], ...]  # (src, dst): copy-on-write of a shared block before writing


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


class KVCacheManager:
  """Owns every sequence's block table; the scheduler only sees immutable results.

  Blocks are shared by reference count: forked sequences (``n > 1``, beams) start with their
  parent's table, and prefix-cache hits reuse blocks of earlier sequences with the same
  leading tokens. Only the block that receives a sequence's next token can be written, so
  copy-on-write is needed exactly when that block is shared.
  """

  def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
    if block_size < 1:
      raise ValueError(f"block_size must be >= 1, got {block_size}")
    self.block_size = block_size
    self.pool = BlockPool(num_blocks, enable_caching)
    self._tables: dict[int, list[KVBlock]] = {}
    self._hashes: dict[int, list[bytes]] = {}  # hash chain of each sequence's leading full blocks
    self._num_cached: dict[int, int] = {}  # leading blocks already registered in the prefix cache
    self.prefix_queries = 0  # tokens looked up in the prefix cache
    self.prefix_hits = 0  # tokens found there
    self.num_copies = 0

  # ---- queries
  def block_ids(self, seq_id: int) -> tuple[int, ...]:
    return tuple(b.block_id for b in self._tables.get(seq_id, ()))

  def has(self, seq_id: int) -> bool:
    return seq_id in self._tables

  @property
  def num_used_blocks(self) -> int:
    return self.pool.num_usable - self.pool.num_free

  def _block_hashes(self, seq_id: int, token_ids: Sequence[int], num_full: int) -> list[bytes]:
    """The hash chain of the first ``num_full`` blocks of ``token_ids`` (extends the stored chain)."""
    hashes = self._hashes.setdefault(seq_id, [])
    bs = self.block_size
    while len(hashes) < num_full:
      i = len(hashes)
      hashes.append(hash_block_tokens(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs]))
    return hashes

  # ---- allocation
  def get_computed_blocks(self, seq_id: int, token_ids: Sequence[int]) -> PrefixHit:
    """Longest run of cached full blocks at the start of ``token_ids`` (a new or recomputed sequence).

    The last token is never taken from the cache: its logits are needed.
    """
    if not self.pool.enable_caching or self._tables.get(seq_id):
      return PrefixHit()
    num_full = (len(token_ids) - 1) // self.block_size
    hits = []
    for h in self._block_hashes(seq_id, token_ids, num_full)[:num_full]:
      block = self.pool.lookup(h)
      if block is None:
        break
      hits.append(block)
    return PrefixHit(tuple(hits), len(hits) * self.block_size)

  def record_lookup(self, num_tokens: int, hit: PrefixHit) -> None:
    """Counts one prefix-cache lookup that led to an allocation (for the hit rate)."""
    if self.pool.enable_caching:
      self.prefix_queries += num_tokens
      self.prefix_hits += hit.num_tokens

  def allocate_slots(self, seq_id: int, num_computed_tokens: int, num_new_tokens: int,
                     prefix: PrefixHit = PrefixHit()) -> Allocation | None:
    """Gives ``seq_id`` room for ``num_new_tokens`` more tokens after ``num_computed_tokens``.

    ``num_computed_tokens`` includes the prefix hit's tokens. Returns None, changing nothing,
    when the pool cannot supply the blocks (the scheduler then preempts).
    """
    table = self._tables.get(seq_id, [])
    if prefix.blocks and table:
      raise BlockAccountingError(f"sequence {seq_id} already has blocks; prefix hits are for new sequences")
    bs = self.block_size
    num_new_blocks = max(0, cdiv(num_computed_tokens + num_new_tokens, bs) - len(table) - len(prefix.blocks))
    write = num_computed_tokens // bs  # block receiving the first new token
    cow = num_new_tokens > 0 and write < len(table) and table[write].ref_cnt > 1
    revived = sum(b.ref_cnt == 0 for b in prefix.blocks)  # free cached blocks leave the queue
    if num_new_blocks + cow + revived > self.pool.num_free:
      return None
    self.pool.touch(prefix.blocks)
    table = self._tables.setdefault(seq_id, [])
    table.extend(prefix.blocks)
    self._num_cached.setdefault(seq_id, len(prefix.blocks))
    copies: tuple[tuple[int, int], ...] = ()
    if cow:
      shared, (fresh,) = table[write], self.pool.get_new_blocks(1)
      copies = ((shared.block_id, fresh.block_id),)
      self.pool.free_blocks([shared])
      table[write] = fresh
      self.num_copies += 1
    new = self.pool.get_new_blocks(num_new_blocks)
    table.extend(new)
    return Allocation(tuple(b.block_id for b in new), copies)

  def cache_full_blocks(self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int) -> None:
    """Registers the sequence's blocks that are full and computed in the prefix cache."""
    if not self.pool.enable_caching:
      return
    table = self._tables[seq_id]
    num_full = min(num_computed_tokens // self.block_size, len(table))
    start = self._num_cached.get(seq_id, 0)
    if num_full <= start:
      return
    hashes = self._block_hashes(seq_id, token_ids, num_full)
    for i in range(start, num_full):
      self.pool.cache_block(table[i], hashes[i])
    self._num_cached[seq_id] = num_full

  def fork(self, parent_id: int, child_id: int) -> None:
    """The child starts with the parent's blocks (one more reference each); writes copy-on-write."""
    if child_id in self._tables:
      raise BlockAccountingError(f"sequence {child_id} already has blocks")
    table = self._tables.get(parent_id, [])
    self.pool.touch(table)
    self._tables[child_id] = list(table)
    self._hashes[child_id] = list(self._hashes.get(parent_id, ()))
    self._num_cached[child_id] = self._num_cached.get(parent_id, 0)

  def free(self, seq_id: int) -> None:
    """Releases the sequence's blocks, tail first so that prefix blocks stay cached longest."""
    table = self._tables.pop(seq_id, [])
    self._hashes.pop(seq_id, None)
    self._num_cached.pop(seq_id, None)
    self.pool.free_blocks(reversed(table))

  # ---- statistics and checks
  def slot_usage(self, num_computed: dict[int, int]) -> tuple[int, int, int]:
    """(allocated slots, slots holding a computed token, slots of the blocks holding at least one) over
    distinct blocks in use; the last minus the second is the unavoidable waste of partial last blocks."""
    bs = self.block_size
    filled: dict[int, int] = {}
    for seq_id, table in self._tables.items():
      c = num_computed.get(seq_id, 0)
      for j, b in enumerate(table):
        f = min(bs, max(0, c - j * bs))
        if f > filled.get(b.block_id, -1):
          filled[b.block_id] = f
    return len(filled) * bs, sum(filled.values()), sum(bs for f in filled.values() if f)

  def check_invariants(self) -> None:
    """Pool invariants, plus: each block's ref_cnt equals the number of tables holding it."""
    self.pool.check_invariants()
    counts: dict[int, int] = {}
    for table in self._tables.values():
      for b in table:
        counts[b.block_id] = counts.get(b.block_id, 0) + 1
    for b in self.pool.blocks:
      check(b.ref_cnt == counts.get(b.block_id, 0), f"{b}: {counts.get(b.block_id, 0)} tables hold it")
