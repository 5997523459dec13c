"""Run the app under uvicorn: close slow or idle connections, and on SIGTERM/SIGINT drain in-flight
requests (then abort them), close what is left and exit 0, all within the shutdown timeout."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from jaxserve.server._app import ABORT_CONNECTION

log = logging.getLogger("jaxserve.server")

# Seconds connections get to flush their last bytes after the engine is drained, before they are cut.
CLOSE_GRACE_S = 1.0


class GuardedH11Protocol(H11Protocol):
  """uvicorn's h11 protocol that closes a connection which has not sent a whole request's headers
  within ``header_timeout`` seconds of opening, or of the end of its previous response (slowloris
  headers, idle sockets, a body still dribbling in after its response). uvicorn arms no timer
  before a first request, and its keep-alive timer is cancelled by any byte received.

  Each request's scope also carries ``extensions[ABORT_CONNECTION]``: a callable that cuts the
  connection (the app gives up on a client that reads nothing; its handler then sees a disconnect).
  """

  header_timeout: float = 10.0
  _header_timer: asyncio.TimerHandle | None = None

  def connection_made(self, transport: Any) -> None:
    super().connection_made(transport)
    self._arm_header_timer(self.cycle)

  def on_response_complete(self) -> None:
    cycle = self.cycle  # a pipelined request may start inside super(): that one is not timed
    super().on_response_complete()
    self._arm_header_timer(cycle)

  def handle_events(self) -> None:
    scope = self.scope
    super().handle_events()
    if self.scope is not scope and self.scope is not None:  # a request began; its task has not run yet
      self.scope.setdefault("extensions", {})[ABORT_CONNECTION] = self.transport.abort

  def connection_lost(self, exc: Exception | None) -> None:
    if self._header_timer is not None:
      self._header_timer.cancel()
    super().connection_lost(exc)

  def _arm_header_timer(self, cycle: Any) -> None:
    if self._header_timer is not None:
      self._header_timer.cancel()
    if not self.transport.is_closing():
      self._header_timer = self.loop.call_later(self.header_timeout, self._headers_overdue, cycle)

  def _headers_overdue(self, cycle: Any) -> None:
    if self.cycle is cycle and not self.transport.is_closing():  # no new request began since the timer was armed
      self.transport.abort()


class _DrainingServer(uvicorn.Server):
  """uvicorn's server with a shutdown bounded by ``drain_timeout`` (+ :data:`CLOSE_GRACE_S`): stop
  accepting, close idle connections, give the engine's requests the timeout to finish (then abort
  them, so that streams end with a final chunk and ``[DONE]``), give connections a moment to flush,
  and cut those still open (clients that read nothing or never finish their request)."""

  def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
    super().__init__(config)
    self._app = app
    self._drain_timeout = drain_timeout

  async def shutdown(self, sockets: Any = None) -> None:
    for server in getattr(self, "servers", []):
      server.close()  # stop accepting connections now (uvicorn closes them again, harmlessly)
    for connection in list(self.server_state.connections):
      _quietly(connection.shutdown)  # closes idle connections; the others close after their response
    await self._app.state.server.async_engine.drain(self._drain_timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_GRACE_S
    while self.server_state.connections and loop.time() < deadline:
      await asyncio.sleep(0.05)
    if self.server_state.connections:
      log.info("closing %d connections still open at shutdown", len(self.server_state.connections))
      for connection in list(self.server_state.connections):
        connection.transport.abort()  # their handlers see a disconnect and end
      await asyncio.sleep(0.1)
    await super().shutdown(sockets)


def _quietly(fn: Any) -> None:
  try:
    fn()
  except Exception:  # noqa: BLE001 - a connection in a state h11 cannot close cleanly is cut later anyway
    pass


def run(app: FastAPI, *, host: str, port: int, shutdown_timeout: float = 30.0, log_level: str = "info",
        header_timeout: float = 10.0) -> None:
  """Serves ``app`` until SIGTERM or SIGINT, then shuts down gracefully and returns.

  In-flight requests get ``shutdown_timeout`` seconds to finish; the rest are aborted (streams
  end with ``finish_reason: "abort"``), connections still open a second later are closed, the
  engine thread stops and the function returns. Connections that send no complete request headers
  within ``header_timeout`` seconds are closed.
  """
  protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, http=protocol,
                          timeout_graceful_shutdown=CLOSE_GRACE_S)
  server = _DrainingServer(config, app, shutdown_timeout)
  # uvicorn restores the previous handlers after its graceful shutdown and raises the signal
  # again; with these no-op handlers that second delivery does nothing, so the process exits 0.
  previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    server.run()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
