"""Run ``jaxserve serve`` as a subprocess on a free loopback port (for tests and the load benchmark)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


class ServerProcess:
  """``with ServerProcess(["--max-num-seqs", "64"]) as srv: httpx.get(srv.url("/health"))``.

  Starts ``python -m jaxserve.cli serve --host 127.0.0.1 --port <free>``, waits until ``/health``
  answers 200, and on exit sends SIGTERM and waits for the process (SIGKILL after ``stop_timeout``).
  The server's output goes to a log file (``log_text()``), shown when startup fails.
  """

  def __init__(self, args: Sequence[str] = (), *, startup_timeout: float = 180.0, stop_timeout: float = 60.0,
               env: dict[str, str] | None = None):
    self.args = list(args)
    self.startup_timeout = startup_timeout
    self.stop_timeout = stop_timeout
    self.env = dict(os.environ if env is None else env)
    self.env.pop("XLA_FLAGS", None)  # run as a user would (tests may force several host devices)
    self.env.setdefault("JAX_PLATFORMS", "cpu")
    self.port = 0
    self.proc: subprocess.Popen | None = None
    self._log = tempfile.NamedTemporaryFile("w+b", prefix="jaxserve-serve-", suffix=".log", delete=False)

  @property
  def base_url(self) -> str:
    return f"http://{HOST}:{self.port}"

  def url(self, path: str) -> str:
    return self.base_url + path

  def log_text(self) -> str:
    with open(self._log.name, "rb") as f:
      return f.read().decode("utf-8", errors="replace")

  def start(self) -> "ServerProcess":
    for attempt in range(3):  # the free port may be taken between probing and binding
      self.port = free_port()
      cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--host", HOST, "--port", str(self.port), *self.args]
      self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
      if self._wait_healthy():
        return self
      if "address already in use" not in self.log_text().lower() or attempt == 2:
        self.stop()
        raise RuntimeError(f"jaxserve serve did not start:\n{self.log_text()[-4000:]}")
    raise AssertionError("unreachable")

  def _wait_healthy(self) -> bool:
    deadline = time.monotonic() + self.startup_timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        return False
      try:
        if httpx.get(self.url("/health"), timeout=2.0).status_code == 200:
          return True
      except httpx.HTTPError:
        pass
      time.sleep(0.2)
    return False

  def terminate(self) -> None:
    """Sends SIGTERM (a graceful shutdown)."""
    if self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)

  def wait(self, timeout: float) -> int:
    return self.proc.wait(timeout)

  def stop(self) -> int | None:
    """SIGTERM, then SIGKILL after ``stop_timeout``; returns the exit code."""
    if self.proc is None:
      return None
    self.terminate()
    try:
      return self.proc.wait(self.stop_timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      return self.proc.wait()

  def __enter__(self) -> "ServerProcess":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
    self._log.close()
    os.unlink(self._log.name)
