"""Prometheus metrics of the server and its engine (names follow vLLM's, prefixed ``jaxserve:``)."""

from __future__ import annotations

from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds), as vLLM's: from sub-millisecond decode steps to minutes-long queues.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0)


class ServerMetrics:
  """All metrics in one private registry (so several servers can live in one process, e.g. in tests).

  Gauges and engine counters are set from ``engine.stats()`` by the engine thread after each step;
  latencies are observed per request as its tokens come out of the engine.
  """

  def __init__(self, model_name: str):
    self.registry = CollectorRegistry()
    r, labels = self.registry, {"model_name": model_name}

    def gauge(name: str, doc: str) -> Gauge:
      return Gauge(f"jaxserve:{name}", doc, list(labels), registry=r).labels(**labels)

    def counter(name: str, doc: str) -> Counter:
      return Counter(f"jaxserve:{name}", doc, list(labels), registry=r).labels(**labels)

    def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
      return Histogram(f"jaxserve:{name}", doc, list(labels), buckets=buckets, registry=r).labels(**labels)

    self.num_requests_running = gauge("num_requests_running", "Requests in the engine's running batch.")
    self.num_requests_waiting = gauge("num_requests_waiting", "Requests queued in the engine, not yet running.")
    self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).")
    self.kv_blocks_used = gauge("kv_cache_blocks_used", "KV cache blocks held by requests.")
    self.kv_blocks_total = gauge("kv_cache_blocks_total", "KV cache blocks in the pool.")
    self.num_compiled_programs = gauge("num_compiled_programs", "jit programs the engine has compiled so far.")
    self.num_preemptions = counter("num_preemptions", "Requests preempted (recomputed later) for lack of KV blocks.")
    self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
    self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
    self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests.")
    self.generation_tokens = counter("generation_tokens", "Tokens generated.")
    self.ttft = histogram("time_to_first_token_seconds", "Time from request arrival to its first token.",
                          TTFT_BUCKETS)
    self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens of a sequence.",
                         ITL_BUCKETS)
    self.e2e = histogram("e2e_request_latency_seconds", "Time from request arrival to its end.", E2E_BUCKETS)
    self._finished = Counter("jaxserve:request_success", "Finished requests by finish reason.",
                             ["model_name", "finished_reason"], registry=r)
    self._model_name = model_name
    self._engine_counts: dict[str, float] = {}

  def request_finished(self, reason: str) -> None:
    self._finished.labels(model_name=self._model_name, finished_reason=reason).inc()

  def update_engine(self, stats: Mapping[str, Any]) -> None:
    """Copies gauges from ``engine.stats()`` and advances counters by the growth of its totals."""
    total, used = stats.get("kv_blocks_total"), stats.get("kv_blocks_used")
    if total is not None and used is not None:
      self.kv_blocks_total.set(total)
      self.kv_blocks_used.set(used)
      self.kv_cache_usage.set(used / total if total else 0.0)
    for key, gauge in (("num_running_requests", self.num_requests_running),
                       ("num_waiting_requests", self.num_requests_waiting),
                       ("num_compiled_programs", self.num_compiled_programs)):
      if key in stats:
        gauge.set(stats[key])
    for key, counter in (("total_preemptions", self.num_preemptions),
                         ("prefix_cache_queries", self.prefix_cache_queries),
                         ("prefix_cache_hits", self.prefix_cache_hits)):
      if key in stats:
        grown = float(stats[key]) - self._engine_counts.get(key, 0.0)
        if grown > 0:
          counter.inc(grown)
        self._engine_counts[key] = float(stats[key])

  def render(self) -> bytes:
    return generate_latest(self.registry)
