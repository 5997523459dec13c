"""OpenAI-style API errors: an exception carrying the HTTP status and the JSON error body."""

from __future__ import annotations

from typing import Any

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_exceeded", 503: "server_unavailable", 500: "internal_server_error"}


class APIError(Exception):
  """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

  def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
               type: str | None = None):  # noqa: A002 - the OpenAI field is called "type"
    super().__init__(message)
    self.status = status
    self.message = message
    self.param = param
    self.code = code
    self.type = type or _TYPES.get(status, "invalid_request_error")

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
  return APIError(400, message, param=param)
