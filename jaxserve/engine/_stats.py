"""Engine statistics: KV pool use and waste, preemptions, prefix-cache hits, steps and tokens since a reset."""

from __future__ import annotations

from typing import Any

from jaxserve.engine._kv_cache_manager import KVCacheManager
from jaxserve.engine._scheduler import Scheduler, SchedulerOutput


class EngineStats:
  """Counters over the steps since :meth:`reset`, read from the scheduler and its cache manager."""

  def __init__(self, scheduler: Scheduler, *, block_size: int, max_model_len: int):
    self.scheduler = scheduler
    self.block_size = block_size
    self.max_model_len = max_model_len
    self.reset()

  @property
  def kv_manager(self) -> KVCacheManager:
    return self.scheduler.kv_manager

  def reset(self) -> None:
    self._steps = 0
    self._slots_allocated = 0
    self._slots_filled = 0
    self._slots_nonempty = 0
    self._preemptions0 = self.scheduler.num_preemptions
    self._queries0, self._hits0 = self.kv_manager.prefix_queries, self.kv_manager.prefix_hits
    self._copies0 = self.kv_manager.num_copies
    self._peak_seqs = 0
    self._peak_blocks = 0
    self._tokens = 0
    self._seq_steps = 0

  def record_step(self, sched: SchedulerOutput) -> None:
    live = {seq.seq_id: seq.num_computed_tokens for r in self.scheduler.running for seq in r.seqs}
    allocated, filled, nonempty = self.kv_manager.slot_usage(live)
    self._steps += 1
    self._slots_allocated += allocated
    self._slots_filled += filled
    self._slots_nonempty += nonempty
    self._tokens += sched.num_tokens
    self._seq_steps += len(live)
    self._peak_seqs = max(self._peak_seqs, self.scheduler.num_running_seqs)
    self._peak_blocks = max(self._peak_blocks, self.kv_manager.num_used_blocks)

  def snapshot(self, num_compiled_programs: int) -> dict[str, Any]:
    """The statistics (``num_compiled_programs`` is the model runner's, placed among them)."""
    kv = self.kv_manager
    queries = kv.prefix_queries - self._queries0
    hits = kv.prefix_hits - self._hits0
    return {
        "kv_blocks_total": kv.pool.num_usable,
        "kv_blocks_used": kv.num_used_blocks,
        "kv_block_size": self.block_size,
        "kv_waste_fraction": 1 - self._slots_filled / self._slots_allocated if self._slots_allocated else 0.0,
        # the least any block-granular cache could waste on the same steps: only the partial last blocks
        "kv_waste_floor_fraction": 1 - self._slots_filled / self._slots_nonempty if self._slots_nonempty else 0.0,
        "kv_mean_tokens_per_seq": self._slots_filled / self._seq_steps if self._seq_steps else 0.0,
        # what a cache reserving max_model_len slots per running sequence would have wasted on the same steps
        "kv_contiguous_waste_fraction":
            1 - self._slots_filled / (self._seq_steps * self.max_model_len) if self._seq_steps else 0.0,
        "num_preemptions": self.scheduler.num_preemptions - self._preemptions0,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "num_compiled_programs": num_compiled_programs,
        "num_steps": self._steps,
        "num_batched_tokens": self._tokens,
        "num_block_copies": kv.num_copies - self._copies0,
        "peak_running_seqs": self._peak_seqs,
        "peak_kv_blocks_used": self._peak_blocks,
        "num_running_requests": len(self.scheduler.running),
        "num_waiting_requests": len(self.scheduler.waiting),
        "total_preemptions": self.scheduler.num_preemptions,
    }
