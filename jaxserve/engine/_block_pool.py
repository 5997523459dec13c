"""Ref-counted KV block pool: O(1) free queue, reserved null block, prefix-cache map with LRU eviction."""

from __future__ import annotations

import hashlib
import struct
from typing import Iterable, Sequence

NULL_BLOCK_ID = 0  # never handed out: padded block-table entries and padding tokens point here


class BlockAccountingError(RuntimeError):
  """The KV block bookkeeping is inconsistent (an engine bug).

  Raised, never ``assert``ed, so that the checks survive ``python -O``.
  """


def check(condition: bool, message: str) -> None:
  """Raises :class:`BlockAccountingError` with ``message`` unless ``condition`` holds."""
  if not condition:
    raise BlockAccountingError(message)


class KVBlock:
  """One block of the pool: its id, reference count, prefix hash and free-queue links."""

  __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

  def __init__(self, block_id: int):
    self.block_id = block_id
    self.ref_cnt = 0
    self.block_hash: bytes | None = None  # set while the block is registered in the prefix cache
    self.prev_free: KVBlock | None = None
    self.next_free: KVBlock | None = None

  def __repr__(self) -> str:
    return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class FreeBlockQueue:
  """Doubly linked list of free blocks, least recently freed first; every operation is O(1).

  Removing from the middle (a prefix-cache hit on a free block) is what a plain deque cannot do in O(1).
  """

  def __init__(self, blocks: Iterable[KVBlock]):
    self._head = KVBlock(-1)  # sentinels
    self._tail = KVBlock(-1)
    self._head.next_free, self._tail.prev_free = self._tail, self._head
    self.num_free = 0
    for b in blocks:
      self.append(b)

  def append(self, block: KVBlock) -> None:
    if block.prev_free is not None or block.next_free is not None:
      raise BlockAccountingError(f"{block} is already in the free queue")
    last = self._tail.prev_free
    last.next_free, block.prev_free = block, last
    block.next_free, self._tail.prev_free = self._tail, block
    self.num_free += 1

  def popleft(self) -> KVBlock:
    block = self._head.next_free
    if block is self._tail:
      raise ValueError("no free KV blocks")
    self.remove(block)
    return block

  def remove(self, block: KVBlock) -> None:
    if block.prev_free is None or block.next_free is None:
      raise BlockAccountingError(f"{block} is not in the free queue")
    block.prev_free.next_free = block.next_free
    block.next_free.prev_free = block.prev_free
    block.prev_free = block.next_free = None
    self.num_free -= 1

  def __iter__(self):
    b = self._head.next_free
    while b is not self._tail:
      yield b
      b = b.next_free

  def __del__(self) -> None:
    # the links put every free block in a reference cycle: unlink them, so that a dropped engine's
    # blocks go with it, not at Python's next full collection
    b = self._head
    while b is not None:
      nxt = b.next_free
      b.prev_free = b.next_free = None
      b = nxt


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
  """Identity of a full block: its tokens chained with its parent's identity (SHA-256, 128 bits)."""
  h = hashlib.sha256(parent_hash or b"root")
  h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
  return h.digest()[:16]


class BlockPool:
  """All KV blocks of the engine; block 0 is the null block and is never allocated.

  A block is either in use (``ref_cnt > 0``, owned by one or more sequences) or free
  (``ref_cnt == 0``, in the free queue). A free block may still hold a registered prefix
  (``block_hash`` set): a later request with the same prefix takes it back from the queue;
  allocation pops the least recently freed block and evicts its prefix first (LRU).
  """

  def __init__(self, num_blocks: int, enable_caching: bool = True):
    if num_blocks < 2:
      raise ValueError(f"num_blocks must be >= 2 (one is the reserved null block), got {num_blocks}")
    self.num_blocks = num_blocks
    self.enable_caching = enable_caching
    self.blocks = [KVBlock(i) for i in range(num_blocks)]
    self.free_queue = FreeBlockQueue(self.blocks[1:])
    self.cached: dict[bytes, KVBlock] = {}
    self.num_evictions = 0

  @property
  def num_free(self) -> int:
    """Blocks that can be allocated now (free ones, including evictable cached ones)."""
    return self.free_queue.num_free

  @property
  def num_usable(self) -> int:
    return self.num_blocks - 1

  def get_new_blocks(self, n: int) -> list[KVBlock]:
    """Takes ``n`` blocks from the free queue (ref_cnt 1), evicting their cached prefixes."""
    if n > self.num_free:
      raise ValueError(f"cannot allocate {n} blocks: only {self.num_free} free")
    out = []
    for _ in range(n):
      block = self.free_queue.popleft()
      self._evict(block)
      block.ref_cnt = 1
      out.append(block)
    return out

  def _evict(self, block: KVBlock) -> None:
    if block.block_hash is not None:
      del self.cached[block.block_hash]
      block.block_hash = None
      self.num_evictions += 1

  def touch(self, blocks: Iterable[KVBlock]) -> None:
    """Adds a reference to each block (prefix hit or fork), taking free ones out of the queue."""
    for block in blocks:
      if block.ref_cnt == 0:
        self.free_queue.remove(block)
      block.ref_cnt += 1

  def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
    """Drops one reference per block; blocks reaching zero join the queue's tail in the given order."""
    for block in blocks:
      if block.ref_cnt <= 0:
        raise BlockAccountingError(f"freeing {block} whose ref_cnt is already {block.ref_cnt}")
      block.ref_cnt -= 1
      if block.ref_cnt == 0:
        self.free_queue.append(block)

  def lookup(self, block_hash: bytes) -> KVBlock | None:
    return self.cached.get(block_hash) if self.enable_caching else None

  def cache_block(self, block: KVBlock, block_hash: bytes) -> None:
    """Registers a full, computed block under its prefix hash (the first block with a hash wins)."""
    if not self.enable_caching or block.block_hash is not None or block_hash in self.cached:
      return
    block.block_hash = block_hash
    self.cached[block_hash] = block

  def reset_prefix_cache(self) -> None:
    for block in list(self.cached.values()):
      block.block_hash = None
    self.cached.clear()

  def check_invariants(self) -> None:
    """Raises BlockAccountingError if the pool's bookkeeping is inconsistent."""
    null = self.blocks[NULL_BLOCK_ID]
    check(null.ref_cnt == 0 and null.prev_free is None and null.block_hash is None, "null block was handed out")
    queued = [b.block_id for b in self.free_queue]
    check(len(queued) == len(set(queued)) == self.free_queue.num_free, "a block is queued twice")
    for b in self.blocks[1:]:
      check(b.ref_cnt >= 0, f"{b} has a negative ref_cnt")
      check((b.ref_cnt == 0) == (b.prev_free is not None), f"{b}: free-queue membership disagrees with ref_cnt")
    for h, b in self.cached.items():
      check(b.block_hash == h, f"{b} is cached under a hash it does not carry")
    check(sum(b.block_hash is not None for b in self.blocks) == len(self.cached), "stale block hashes")
