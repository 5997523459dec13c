"""Run the app under uvicorn; on SIGTERM/SIGINT drain in-flight requests (then abort them) and exit 0."""

from __future__ import annotations

import signal
from typing import Any

import uvicorn
from fastapi import FastAPI


class _DrainingServer(uvicorn.Server):
  """uvicorn's server, with the engine drained between closing the listening sockets and
  uvicorn's own wait for open connections, so that streams end with a final chunk and ``[DONE]``
  instead of being cancelled."""

  def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
    super().__init__(config)
    self._app = app
    self._drain_timeout = drain_timeout

  async def shutdown(self, sockets: Any = None) -> None:
    for server in getattr(self, "servers", []):
      server.close()  # stop accepting connections now (uvicorn closes them again, harmlessly)
    await self._app.state.engine.drain(self._drain_timeout)
    await super().shutdown(sockets)


def run(app: FastAPI, *, host: str, port: int, shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
  """Serves ``app`` until SIGTERM or SIGINT, then shuts down gracefully and returns.

  In-flight requests get ``shutdown_timeout`` seconds to finish; the rest are aborted (streams
  end with ``finish_reason: "abort"``), the engine thread stops and the function returns.
  """
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          timeout_graceful_shutdown=shutdown_timeout + 5.0)
  server = _DrainingServer(config, app, shutdown_timeout)
  # uvicorn restores the previous handlers after its graceful shutdown and raises the signal
  # again; with these no-op handlers that second delivery does nothing, so the process exits 0.
  previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    server.run()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
