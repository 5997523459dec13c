"""One engine thread batching every in-flight HTTP request; asyncio handlers talk to it through queues.

The engine (``LLM``'s incremental API: ``add_request`` / ``abort_request`` / ``step``) is plain,
single-threaded Python; it is only ever touched by :class:`AsyncEngine`'s thread. Handlers send it
commands through a thread-safe queue and receive :class:`Update` objects (new tokens and text of
each completion, finish reasons, errors) on their own ``asyncio.Queue``. The thread computes the
deltas itself, so handlers never read engine state that the thread is changing, and hands the
event loop all updates of one iteration (one engine step) in one ``call_soon_threadsafe``: the
thread and the loop share the GIL, and a wake-up per request and token was most of the loop's
work. No request can stop the loop: a failed ``add_request`` becomes that request's error, and a
failed ``step`` fails the requests in flight and the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import queue
import threading
import time
from typing import Any, AsyncIterator, Callable, NamedTuple, Sequence

from jaxserve.server._errors import APIError
from jaxserve.server._limits import TransportLimits
from jaxserve.server._metrics import ServerMetrics

log = logging.getLogger("jaxserve.server")


class ChoiceDelta(NamedTuple):
  """What one completion gained in one engine step (a tuple: built per token, it must be cheap)."""

  index: int  # completion index within its request (0 .. n-1)
  token_ids: tuple[int, ...]
  text: str
  logprobs: tuple[Any, ...] | None  # engine logprob entries of the new tokens (None: not asked)
  finish_reason: str | None  # "stop", "length", "abort" once the completion ended


class Update(NamedTuple):
  """A message from the engine thread about one request (``tag`` names it inside its HTTP request).

  The first update of a request acknowledges ``add_request`` (or carries its ``error``).
  """

  tag: int
  choices: tuple[ChoiceDelta, ...] = ()
  num_prompt_tokens: int = 0
  finished: bool = False
  error: APIError | None = None


class ClientDisconnected(Exception):
  """The HTTP client went away (or stopped reading); its requests were aborted."""


@dataclasses.dataclass
class _Choice:
  num_tokens: int = 0  # tokens sent
  num_chars: int = 0  # characters of text sent
  finished: bool = False
  last_time: float = 0.0


@dataclasses.dataclass
class _Stream:
  """Engine-thread state of one request: where to send updates and what was already sent."""

  tag: int
  sink: Callable[[Update], None]  # called on ``loop`` with each update
  loop: asyncio.AbstractEventLoop
  arrival: float
  n: int  # completions of the request
  choices: dict[int, _Choice] = dataclasses.field(default_factory=dict)
  first_token: bool = False


_STOP = object()


class AsyncEngine:
  """Owns the LLM and the engine thread, the only thread that touches it.

  Each iteration of the thread runs the queued commands and one step, then hands the event loop
  everything they produced at once (acknowledgements of new requests travel with the step's
  tokens, which come out of the same step).

  The engine's gauges (``llm.stats()``, which walks the weights too) are read at most every
  :attr:`metrics_interval` seconds while it runs, and whenever it falls idle.

  Args:
    llm: an object with ``add_request``, ``abort_request``, ``step``, ``has_unfinished_requests``
      and ``stats`` (``jaxserve.LLM``).
    metrics: where the thread reports engine state and latencies.
    limits: the bounds on what one request may take (queue, tokens, stream buffer).
  """

  metrics_interval: float = 0.1  # seconds

  def __init__(self, llm: Any, metrics: ServerMetrics, limits: TransportLimits | None = None):
    self.llm = llm
    self.metrics = metrics
    self.limits = limits or TransportLimits()
    self.in_flight_seqs = 0  # sequences of admitted requests not yet released (event-loop side only)
    self._cmds: queue.SimpleQueue = queue.SimpleQueue()
    self._streams: dict[str, _Stream] = {}
    # updates of this iteration, per event loop, handed over together at its end (engine thread only)
    self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[Update], None], Update]]] = {}
    self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
    self._closed = False
    self.steps = 0
    self._tokens_sent = 0  # generated tokens handed to requests (engine thread only)
    self._metrics_time = -math.inf  # when the engine's stats were last read (engine thread only)

  # ------------------------------------------------------------ asyncio side
  def start(self) -> None:
    self._thread.start()

  @property
  def closed(self) -> bool:
    """True once shutdown began (new requests get 503)."""
    return self._closed

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._closed

  def admit(self, params: Sequence[Any]) -> int:
    """Checks one HTTP request's sequences against the limits and counts them in flight (release
    them with :meth:`release`); 400 over the per-request token cap, 429 when the queue is full."""
    if self._closed:
      raise APIError(503, "the server is shutting down")
    seqs = sum(int(getattr(p, "n", 1) or 1) for p in params)
    cap = self.limits.max_tokens_per_request
    tokens = sum(int(getattr(p, "n", 1) or 1) * int(getattr(p, "max_tokens", 0) or 0) for p in params)
    if cap is not None and tokens > cap:
      raise APIError(400, f"the request asks for {tokens} tokens (n x max_tokens over its prompts), more than the "
                     f"{cap} one request may take; lower 'n' or 'max_tokens'", param="max_tokens")
    bound = self.limits.max_in_flight_seqs
    if bound is not None and seqs > bound:
      raise APIError(400, f"the request asks for {seqs} sequences (n x prompts), more than the {bound} this server "
                     f"runs or queues at once; lower 'n' or send fewer prompts", param="n")
    if bound is not None and self.in_flight_seqs + seqs > bound:
      raise APIError(429, f"the server is busy ({self.in_flight_seqs} sequences running or queued, at most {bound}); "
                     f"retry after {self.limits.retry_after} s", code="server_busy")
    self.in_flight_seqs += seqs
    return seqs

  def release(self, seqs: int) -> None:
    self.in_flight_seqs -= seqs

  def add(self, request_id: str, prompt_token_ids: list[int], params: Any, *, tag: int,
          sink: Callable[[Update], None], arrival: float) -> None:
    """Queues a request; its updates go to ``sink`` (the first one acknowledges it or holds the error)."""
    if self._closed:
      raise APIError(503, "the server is shutting down")
    self._cmds.put(("add", request_id, prompt_token_ids, params, tag, sink, asyncio.get_running_loop(), arrival))

  def abort(self, request_id: str) -> None:
    """Aborts a request (no-op when it already finished); its KV blocks are freed."""
    self._cmds.put(("abort", request_id))

  async def drain(self, timeout: float) -> None:
    """Graceful shutdown, first half: refuse new requests (503), give the ones in flight
    ``timeout`` seconds to finish, then abort the rest (their streams end with ``finish_reason``
    ``"abort"``)."""
    self._closed = True
    deadline = time.monotonic() + timeout
    while self._streams and time.monotonic() < deadline:
      await asyncio.sleep(0.05)
    if self._streams:
      log.info("aborting %d requests still running after %.1f s", len(self._streams), timeout)
      self._cmds.put(("abort_all",))

  def shutdown(self, timeout: float = 30.0) -> None:
    """Aborts what is still in flight, stops the thread and waits for it."""
    self._closed = True
    self._cmds.put(_STOP)
    self._thread.join(timeout)

  # ------------------------------------------------------------ engine thread
  def _run(self) -> None:
    while True:
      try:
        if not self._iteration():
          return
      except Exception as e:  # noqa: BLE001 - a bug here must fail requests, not hang them
        log.exception("engine loop iteration failed")
        self._abort_all("error", APIError(500, f"the engine loop failed: {type(e).__name__}: {e}"))
      finally:
        self._flush()  # what a failed or final iteration left

  def _iteration(self) -> bool:
    """Runs the queued commands and one engine step; False once asked to stop."""
    idle = not self._streams and not self._safe(self.llm.has_unfinished_requests, False)
    cmds = [self._cmds.get()] if idle else []  # sleep until a handler sends something
    while True:
      try:
        cmds.append(self._cmds.get_nowait())
      except queue.Empty:
        break
    for cmd in cmds:
      if cmd is _STOP:
        self._abort_all("abort")
        self._update_metrics(force=True)
        return False  # (_run flushes the aborts)
      if cmd[0] == "add":
        self._add(*cmd[1:])
      elif cmd[0] == "abort":
        self._abort(cmd[1])
      else:
        self._abort_all("abort")
    if self._safe(self.llm.has_unfinished_requests, False):
      self._step()
    self._flush()
    self._update_metrics(force=not self._streams)
    return True

  def _safe(self, fn, default):
    try:
      return fn()
    except Exception:  # noqa: BLE001 - the loop must survive anything the engine raises
      log.exception("engine call %s failed", getattr(fn, "__name__", fn))
      return default

  def _add(self, request_id, prompt_token_ids, params, tag, sink, loop, arrival) -> None:
    try:
      self.llm.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, params)
    except ValueError as e:
      self._send(loop, sink, Update(tag, error=APIError(400, str(e))))
      return
    except Exception as e:  # noqa: BLE001
      log.exception("add_request(%s) failed", request_id)
      self._send(loop, sink, Update(tag, error=APIError(500, f"the engine could not take the request: {e}")))
      return
    self._streams[request_id] = _Stream(tag, sink, loop, arrival, params.n)
    self.metrics.prompt_tokens.inc(len(prompt_token_ids))
    self._send(loop, sink, Update(tag, num_prompt_tokens=len(prompt_token_ids)))

  def _abort(self, request_id: str) -> None:
    stream = self._streams.pop(request_id, None)
    if stream is None:
      return
    self._safe(lambda: self.llm.abort_request(request_id), None)
    self.metrics.request_finished("abort")
    self._send(stream.loop, stream.sink, Update(stream.tag, finished=True))

  def _abort_all(self, reason: str, error: APIError | None = None) -> None:
    for request_id in list(self._streams):
      stream = self._streams.pop(request_id)
      self._safe(lambda: self.llm.abort_request(request_id), None)
      self.metrics.request_finished(reason)
      choices = tuple(ChoiceDelta(i, (), "", None, "abort") for i in range(stream.n)
                      if not stream.choices.get(i, _Choice()).finished)
      self._send(stream.loop, stream.sink, Update(stream.tag, choices, finished=True, error=error))

  def _step(self) -> None:
    try:
      outputs = self.llm.step()
    except Exception as e:  # noqa: BLE001
      log.exception("engine step failed; failing the %d requests in flight", len(self._streams))
      self._abort_all("error", APIError(500, f"the engine failed: {type(e).__name__}: {e}"))
      return
    self.steps += 1
    now = time.monotonic()
    tokens0 = self._tokens_sent
    for out in outputs:
      stream = self._streams.get(out.request_id)
      if stream is None:
        continue  # aborted meanwhile
      choices = tuple(d for d in (self._delta(stream, c, now) for c in out.outputs) if d is not None)
      finished = bool(out.finished)
      if choices or finished:
        self._send(stream.loop, stream.sink, Update(stream.tag, choices, finished=finished))
      if finished:
        del self._streams[out.request_id]
        self.metrics.e2e.observe(now - stream.arrival)
        reasons = {c.finish_reason for c in out.outputs}
        self.metrics.request_finished("stop" if "stop" in reasons else (reasons.pop() or "stop"))
    if self._tokens_sent > tokens0:
      self.metrics.generation_tokens.inc(self._tokens_sent - tokens0)

  def _delta(self, stream: _Stream, c: Any, now: float) -> ChoiceDelta | None:
    state = stream.choices.setdefault(c.index, _Choice(last_time=stream.arrival))
    if state.finished:
      return None
    new_ids = tuple(c.token_ids[state.num_tokens:])
    finished = c.finish_reason is not None
    if new_ids:
      if not stream.first_token:
        stream.first_token = True
        self.metrics.ttft.observe(now - stream.arrival)
      elif state.num_tokens:
        self.metrics.itl.observe(now - state.last_time)
      self._tokens_sent += len(new_ids)
      state.last_time = now
    # The engine's text of a running completion leaves out what a stop string or an unfinished UTF-8
    # character could still change, so it only grows: what was sent is its prefix.
    text = c.text or ""
    end = len(text)
    if not finished:  # (an engine without that rule may still end in a partial character)
      while end > state.num_chars and text[end - 1] == "\ufffd":
        end -= 1
    new_text = text[state.num_chars:end]
    logprobs = None
    if c.logprobs is not None:
      logprobs = tuple(c.logprobs[state.num_tokens:state.num_tokens + len(new_ids)])
    state.num_tokens += len(new_ids)
    state.num_chars += len(new_text)
    state.finished = finished
    if not new_ids and not new_text and not finished:
      return None
    return ChoiceDelta(c.index, new_ids, new_text, logprobs, c.finish_reason)

  def _update_metrics(self, force: bool) -> None:
    now = time.monotonic()
    if not force and now - self._metrics_time < self.metrics_interval:
      return
    self._metrics_time = now
    stats = self._safe(self.llm.stats, None)
    if stats:
      self.metrics.update_engine(stats)

  def _send(self, loop: asyncio.AbstractEventLoop, sink: Callable[[Update], None], update: Update) -> None:
    """Queues ``update`` for ``sink``; :meth:`_flush` hands it over with the rest of the iteration's."""
    self._outbox.setdefault(loop, []).append((sink, update))

  def _flush(self) -> None:
    """One ``call_soon_threadsafe`` per event loop for everything this iteration produced."""
    outbox, self._outbox = self._outbox, {}
    for loop, items in outbox.items():
      try:
        loop.call_soon_threadsafe(_dispatch, items)
      except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


def _dispatch(items: list[tuple[Callable[[Update], None], Update]]) -> None:
  """Runs on the event loop: each update to its request's sink, in the order the thread sent them."""
  for sink, update in items:
    try:
      sink(update)
    except Exception:  # noqa: BLE001 - one broken handler must not cost the others their updates
      log.exception("delivering an engine update failed")


class RequestGroup:
  """The engine requests of one HTTP request (one per prompt), merged into one stream of updates.

  Usage: ``await group.start()`` (raises the first ``APIError`` of any prompt, aborting the others,
  or the 400/429 of :meth:`AsyncEngine.admit`), then ``async for update in group.updates()``;
  ``group.abort()`` in a ``finally`` aborts whatever has not finished (a no-op otherwise). Updates
  wait in a buffer of ``limits.max_stream_buffer`` entries (a token, and each of its logprobs,
  is one); a consumer that falls that far behind (a streaming client that does not read) has its
  requests aborted, and ``updates()`` raises :class:`ClientDisconnected`.
  """

  def __init__(self, async_engine: AsyncEngine, base_id: str, prompts: Sequence[list[int]], params: Sequence[Any],
               arrival: float):
    self.async_engine = async_engine
    self.ids = [f"{base_id}-{i}" for i in range(len(prompts))]
    self.prompts = prompts
    self.params = params
    self.arrival = arrival
    self.num_prompt_tokens = [len(p) for p in prompts]
    self._inbox = _Inbox()
    self._unfinished: set[int] = set()
    self._admitted = 0  # sequences counted in the engine's in-flight total until released
    self.stalled = False  # the consumer fell more than max_stream_buffer entries behind
    self._buffered = 0  # entries of the updates received and not yet yielded by updates()

  def _put(self, item: Any) -> None:
    """Runs on the event loop for each update of the engine thread."""
    if self.stalled:
      return
    size = _entries(item)
    if self._buffered and self._buffered + size > self.async_engine.limits.max_stream_buffer:
      log.warning("%s: the client read nothing while %d tokens and logprobs queued up; aborting its requests",
                  self.ids[0].rsplit("-", 1)[0], self._buffered)
      self.stalled = True
      self.abort()
      self._inbox.put(ClientDisconnected)
      return
    self._buffered += size
    self._inbox.put(item)

  async def start(self) -> None:
    self._admitted = self.async_engine.admit(self.params)
    for tag, (rid, prompt, params) in enumerate(zip(self.ids, self.prompts, self.params)):
      try:
        self.async_engine.add(rid, prompt, params, tag=tag, sink=self._put, arrival=self.arrival)
      except APIError:
        self.abort()
        raise
      self._unfinished.add(tag)
    acked: set[int] = set()
    error = None
    early: list[Update] = []  # updates of acknowledged requests that came before the other acks
    while len(acked) < len(self.ids):
      item = await self._inbox.get()
      if item is ClientDisconnected:
        self.abort()
        raise ClientDisconnected()
      if item.tag not in acked:
        acked.add(item.tag)
        if item.error is not None:
          self._unfinished.discard(item.tag)
          error = error or item.error
        continue
      early.append(item)
    self._inbox.push_front(early)
    if error is not None:
      self.abort()
      raise error

  def client_disconnected(self) -> None:
    """Called by the disconnect watcher: wakes ``updates()``, which aborts and raises."""
    self._inbox.put(ClientDisconnected)

  async def updates(self) -> AsyncIterator[Update]:
    """The updates of the group's requests, in order, until all finished."""
    async for batch in self.batches():
      for update in batch:
        yield update

  async def batches(self) -> AsyncIterator[list[Update]]:
    """As :meth:`updates`, but each item is every update that has arrived (at least one), so a
    consumer that fell behind writes them at once. An error or a disconnect ends the batch
    before it and is raised at the next."""
    while self._unfinished or self.stalled:
      if self.stalled:
        raise ClientDisconnected()
      batch = [self._take(await self._inbox.get())]
      while self._unfinished and self._inbox:
        item = self._inbox.pop()
        if not isinstance(item, Update) or item.error is not None:
          self._inbox.push_front([item])
          break
        batch.append(self._take(item))
      yield batch

  def _take(self, item: Any) -> Update:
    """Accounts for one received item; raises what ends the stream (a disconnect, an engine error)."""
    if item is ClientDisconnected:
      self.abort()
      raise ClientDisconnected()
    self._buffered -= _entries(item)
    if item.finished:
      self._unfinished.discard(item.tag)
    if item.error is not None:
      self.abort()
      raise item.error
    return item

  def abort(self) -> None:
    for tag in sorted(self._unfinished):
      self.async_engine.abort(self.ids[tag])
    self._unfinished.clear()
    self.async_engine.release(self._admitted)
    self._admitted = 0


def _entries(update: Any) -> int:
  """An update's size in buffer entries: its tokens and their logprobs (the bulk of its SSE text)."""
  if not isinstance(update, Update):
    return 0
  n = 0
  for d in update.choices:  # (loops, not generators: this runs twice per update on the event loop)
    n += len(d.token_ids)
    if d.logprobs:
      for entry in d.logprobs:
        n += len(entry)
  return n


class _Inbox:
  """The updates of one group, filled on the event loop and awaited by its one consumer (an
  ``asyncio.Queue`` without the task accounting and waiter list it does not need)."""

  def __init__(self):
    self._items: collections.deque = collections.deque()
    self._waiter: asyncio.Future | None = None

  def __len__(self) -> int:
    return len(self._items)

  def put(self, item: Any) -> None:
    self._items.append(item)
    if self._waiter is not None and not self._waiter.done():
      self._waiter.set_result(None)

  def push_front(self, items: list) -> None:
    """Puts ``items`` back before the others, in their order."""
    self._items.extendleft(reversed(items))

  def pop(self) -> Any:
    return self._items.popleft()

  async def get(self) -> Any:
    while not self._items:
      self._waiter = asyncio.get_running_loop().create_future()
      try:
        await self._waiter
      finally:
        self._waiter = None
    return self._items.popleft()
