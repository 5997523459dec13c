"""Transport limits of the HTTP server: body size and read time, cheap request bounds, queue and stream caps.

Every check here runs before the expensive work it guards (parsing, tokenizing, admitting a
request to the engine), so that one hostile or careless client cannot stall the event loop or
take the whole KV pool from the others.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, AsyncIterator

from pydantic import BaseModel

from jaxserve.server._errors import APIError, bad_request

# A JSON escape of a UTF-16 surrogate; only bodies holding one are searched for lone surrogates.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransportLimits:
  """What one client may ask of the server.

  Attributes:
    max_body_bytes: request bodies above this many bytes get 413, counted while reading (a
      chunked body is cut off as soon as it is over).
    body_timeout: seconds a request body may take to arrive in full (408 beyond, connection closed).
    header_timeout: seconds a connection may take to send a request's headers, counted from its
      opening or from the end of its previous response (idle and slowloris sockets are closed).
    max_in_flight_seqs: sequences (``n`` per prompt) running or queued in the engine at most; a
      request that would go beyond gets 429 with ``Retry-After``. None: no bound.
    max_tokens_per_request: the most ``n x max_tokens`` (summed over the prompts) one request may
      ask for (400 beyond), so that one request cannot take the whole KV pool. None: no bound.
    max_stream_buffer: tokens and their logprobs (one entry each) buffered for a request whose
      client does not read them; beyond, its requests are aborted and their KV blocks freed.
    stream_stall_timeout: seconds one write to a streaming client may block (the client reads
      nothing) before its requests are aborted and the connection closed.
    max_prompt_chars: characters a text prompt (or all chat messages together) may have, checked
      before tokenizing. None: ``max_model_len x`` the longest token's text (no prompt longer
      can fit the context).
    retry_after: seconds sent in ``Retry-After`` with a 429.
  """

  max_body_bytes: int = 8 * 1024 * 1024
  body_timeout: float = 30.0
  header_timeout: float = 10.0
  max_in_flight_seqs: int | None = None
  max_tokens_per_request: int | None = None
  max_stream_buffer: int = 65536
  stream_stall_timeout: float = 30.0
  max_prompt_chars: int | None = None
  retry_after: int = 1

  def __post_init__(self):
    for name in ("max_body_bytes", "max_stream_buffer", "retry_after"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    for name in ("body_timeout", "header_timeout", "stream_stall_timeout"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
    for name in ("max_in_flight_seqs", "max_tokens_per_request", "max_prompt_chars"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1 or None, got {value}")


# ---------------------------------------------------------------- the body
async def read_body(chunks: AsyncIterator[bytes], limit: int) -> bytes:
  """Reads a request body, refusing it (413) as soon as it is over ``limit`` bytes."""
  parts, size = [], 0
  async for chunk in chunks:
    size += len(chunk)
    if size > limit:
      raise APIError(413, f"request body is over the limit of {limit} bytes; send a smaller request",
                     code="request_too_large")
    parts.append(chunk)
  return b"".join(parts)


def parse_json(raw: bytes) -> dict[str, Any]:
  """The body as a JSON object, or a 400 for anything that is not one (including JSON that Python
  refuses to build: nesting deeper than its recursion limit, integers of more than 4300 digits)."""
  try:
    obj = json.loads(raw)
  except RecursionError:
    raise bad_request("request body is nested too deeply to parse") from None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the integer digit limit
    raise bad_request(f"request body is not valid JSON: {e}") from None
  if not isinstance(obj, dict):
    raise bad_request(f"request body must be a JSON object, got {type(obj).__name__}")
  return obj


def check_sizes(obj: dict[str, Any], max_items: int) -> None:
  """400 for a list or object field (or a prompt's token list) of more than ``max_items`` items,
  before the request model validates them item by item (seconds for millions of items)."""
  for key, value in obj.items():
    if isinstance(value, (list, dict)) and len(value) > max_items:
      raise bad_request(f"'{key}' has {len(value)} items; no request can use more than {max_items}", str(key))
    if key in ("prompt", "messages") and isinstance(value, list):
      for i, item in enumerate(value):
        inner = item.get("content") if isinstance(item, dict) else item
        if isinstance(inner, list) and len(inner) > max_items:
          raise bad_request(f"'{key}.{i}' has {len(inner)} items; no request can use more than {max_items}",
                            f"{key}.{i}")


def check_unicode(raw: bytes, parsed: BaseModel) -> None:
  """400 if a string of the request holds a lone UTF-16 surrogate (valid JSON, but no Unicode text)."""
  if _SURROGATE_ESCAPE.search(raw) is None:
    return
  path = _lone_surrogate(parsed, [])
  if path is not None:
    param = ".".join(str(p) for p in path)
    raise bad_request(f"'{param}' holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair); "
                      "strings must be valid Unicode", param)


def _lone_surrogate(value: Any, path: list) -> list | None:
  """The path of the first string (or key) under ``value`` that is not valid Unicode, or None.

  Runs on the event loop, so lists of numbers or of valid strings are passed over whole, and a
  model's ``unread`` fields (free-form, never read) are not searched."""
  if isinstance(value, str):
    return None if _is_text(value) else path
  if isinstance(value, BaseModel):
    unread = getattr(value, "unread", ())
    items = [(k, getattr(value, k)) for k in type(value).model_fields if k not in unread]
  elif isinstance(value, dict):
    items = value.items()
  elif isinstance(value, (list, tuple)):
    kinds = set(map(type, value))  # (at C speed: a list of a million numbers is skipped in milliseconds)
    if kinds <= _SCALARS or (kinds == {str} and _is_text("".join(value))):
      return None
    items = enumerate(value)
  else:
    return None
  for k, v in items:
    if isinstance(k, str) and not _is_text(k):
      return [*path, k.encode("utf-8", "backslashreplace").decode("utf-8")]
    if isinstance(v, str):
      if not _is_text(v):
        return [*path, k]
    elif isinstance(v, _CONTAINERS):
      found = _lone_surrogate(v, [*path, k])
      if found is not None:
        return found
  return None


_CONTAINERS = (BaseModel, dict, list, tuple)
_SCALARS = {int, float, bool, type(None)}


def _is_text(s: str) -> bool:
  if s.isascii():
    return True
  try:
    s.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


# ---------------------------------------------------------------- prompts, before tokenizing
def check_prompt_bounds(req: Any, *, max_model_len: int, max_prompt_chars: int, max_prompts: int) -> None:
  """Bounds a request's prompts by what is cheap to count (their number, characters and token
  ids), so that no request is tokenized or checked id by id when it cannot fit anyway."""
  prompt = getattr(req, "prompt", None)
  if prompt is not None:
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    n = req.n if isinstance(req.n, int) and req.n >= 1 else 1
    if len(items) * n > max_prompts:
      raise bad_request(f"{len(items)} prompts x n={n} = {len(items) * n} completions; at most "
                        f"{max_prompts} per request", "prompt")
    for item in items:
      _check_length(len(item), isinstance(item, str), max_model_len, max_prompt_chars, "prompt")
    return
  messages = getattr(req, "messages", None)
  if messages is not None:
    if len(messages) >= max_model_len:
      raise bad_request(f"{len(messages)} messages cannot fit this model's maximum context length of "
                        f"{max_model_len} tokens; send fewer", "messages")
    chars = 0
    for m in messages:
      content = m.content
      chars += len(content) if isinstance(content, str) else sum(len(p.text) for p in content or ())
    _check_length(chars, True, max_model_len, max_prompt_chars, "messages")


def _check_length(size: int, text: bool, max_model_len: int, max_prompt_chars: int, param: str) -> None:
  if text and size > max_prompt_chars:
    raise bad_request(f"the {param} has {size} characters, more than the {max_prompt_chars} that could fit this "
                      f"model's maximum context length of {max_model_len} tokens; shorten it", param)
  if not text and size >= max_model_len:
    raise bad_request(f"This model's maximum context length is {max_model_len} tokens, but the {param} has "
                      f"{size} tokens; shorten it to at most {max_model_len - 1} tokens", param)


def default_max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
  """``max_model_len`` times the longest text one token decodes to (+1 for a leading space, x2 for
  Unicode normalization): a text prompt longer than that has more tokens than the context."""
  longest = 1
  for i in range(int(tokenizer.vocab_size)):
    try:
      longest = max(longest, len(tokenizer.decode([i])))
    except Exception:  # noqa: BLE001 - a special id some tokenizers refuse to decode alone
      continue
  return max_model_len * (longest + 1) * 2
