"""OpenAI response bodies: completions, chat completions, their stream chunks, logprobs and usage."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable, Sequence

from jaxserve.server._async_engine import ChoiceDelta


# One encoder for every event: ``json.dumps`` with arguments builds a new one per call.
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def sse(obj: Any) -> str:
  """One server-sent event holding ``obj`` as JSON."""
  return f"data: {_json(obj)}\n\n"


SSE_DONE = "data: [DONE]\n\n"

# A sentencepiece byte-fallback piece: one byte of a UTF-8 character the vocabulary has no piece for.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class ChunkEncoder:
  """The per-token SSE events of one streamed request, as text pieces fixed when it starts.

  Each event is ``sse({**head, "choices": [choice], "usage": None})`` byte for byte, but only the
  new text (and logprobs, when asked for) is encoded per token: no dict is built and ``head`` is
  not encoded again.
  """

  def __init__(self, head: dict[str, Any]):
    self._prefix = 'data: ' + _json(head)[:-1] + ',"choices":[{"index":'
    self._suffix = '}],"usage":null}\n\n'

  def _finish(self, logprobs: Any, finish_reason: str | None) -> str:
    lp = "null" if logprobs is None else _json(logprobs)
    reason = "null" if finish_reason is None else _json(finish_reason)
    return f',"logprobs":{lp},"finish_reason":{reason}{self._suffix}'

  def completion(self, index: int, text: str, logprobs: dict[str, list] | None, finish_reason: str | None) -> str:
    """A ``text_completion`` chunk: ``{"index", "text", "logprobs", "finish_reason"}``."""
    return f'{self._prefix}{index},"text":{_json(text)}{self._finish(logprobs, finish_reason)}'

  def chat(self, index: int, content: str | None, logprobs: dict[str, list] | None, finish_reason: str | None
           ) -> str:
    """A ``chat.completion.chunk``: ``{"index", "delta": {"content"}, "logprobs", "finish_reason"}``;
    ``content`` None gives an empty delta."""
    delta = "{}" if content is None else '{"content":' + _json(content) + "}"
    return f'{self._prefix}{index},"delta":{delta}{self._finish(logprobs, finish_reason)}'


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
  """Token strings for logprobs: a token's own text, spaces included (sentencepiece's ``▁`` -> space)."""

  def __init__(self, tokenizer: Any):
    self.tokenizer = tokenizer
    self._cache: dict[int, str] = {}
    self._bytes: dict[int, list[int]] = {}

  def __call__(self, token_id: int) -> str:
    s = self._cache.get(token_id)
    if s is None:
      piece = getattr(self.tokenizer, "id_to_piece", None)
      s = piece(token_id) if piece is not None else None
      if s is None or s.startswith("<"):  # byte pieces <0x0A>, specials <s>: their decoded text
        s = self.tokenizer.decode([token_id])
      s = s.replace("\u2581", " ")
      self._cache[token_id] = s
    return s

  def token_bytes(self, token_id: int) -> list[int]:
    """The token's UTF-8 bytes: a byte-fallback piece (``<0xF0>``) is its one byte, not the U+FFFD
    its text decodes to alone, so that the bytes of consecutive tokens join into the characters."""
    b = self._bytes.get(token_id)
    if b is None:
      piece = getattr(self.tokenizer, "id_to_piece", None)
      m = _BYTE_PIECE.fullmatch(piece(token_id)) if piece is not None else None
      b = [int(m.group(1), 16)] if m else list(self(token_id).encode("utf-8"))
      self._bytes[token_id] = b
    return b


def _entries(entry: Any) -> list[tuple[int, float]]:
  """An engine logprob entry (``{token_id: logprob}`` or ``{token_id: Logprob}``) as sorted pairs."""
  pairs = [(int(t), float(getattr(v, "logprob", v))) for t, v in dict(entry).items()]
  return sorted(pairs, key=lambda p: -p[1])


def _finite(x: float) -> float:
  return x if math.isfinite(x) else -9999.0  # JSON has no -inf; OpenAI clients expect a number


class CompletionLogprobs:
  """Accumulates the legacy completions ``logprobs`` object of one choice."""

  def __init__(self, token_text: TokenText, top: int):
    self.token_text, self.top = token_text, top
    self.offset = 0  # characters of the tokens so far: the next token's text_offset
    self.tokens: list[str] = []
    self.token_logprobs: list[float] = []
    self.top_logprobs: list[dict[str, float]] = []
    self.text_offset: list[int] = []

  def add(self, token_ids: Sequence[int], entries: Iterable[Any]) -> dict[str, list]:
    """Appends tokens; returns the object for just these tokens (a stream chunk's ``logprobs``)."""
    chunk: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, entry in zip(token_ids, entries):
      pairs = _entries(entry)
      own = dict(pairs).get(int(tid), float("nan"))
      s = self.token_text(tid)
      top = {}
      for t, lp in pairs[:self.top]:
        top.setdefault(self.token_text(t), _finite(lp))
      chunk["tokens"].append(s)
      chunk["token_logprobs"].append(_finite(own))
      chunk["top_logprobs"].append(top)
      chunk["text_offset"].append(self.offset)
      self.offset += len(s)
    for k, v in chunk.items():
      getattr(self, k).extend(v)
    return chunk

  def result(self) -> dict[str, list]:
    return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset}


def chat_logprobs(token_text: TokenText, top: int, token_ids: Sequence[int], entries: Iterable[Any]
                  ) -> list[dict[str, Any]]:
  """Chat ``logprobs.content`` items for ``token_ids``."""
  out = []
  for tid, entry in zip(token_ids, entries):
    pairs = _entries(entry)
    s = token_text(tid)
    out.append({"token": s, "logprob": _finite(dict(pairs).get(int(tid), float("nan"))),
                "bytes": token_text.token_bytes(tid),
                "top_logprobs": [{"token": token_text(t), "logprob": _finite(lp),
                                  "bytes": token_text.token_bytes(t)} for t, lp in pairs[:top]]})
  return out


class Accumulator:
  """Collects the deltas of every choice of a non-streaming request."""

  def __init__(self):
    self.text: dict[int, list[str]] = {}
    self.num_tokens: dict[int, int] = {}
    self.finish: dict[int, str | None] = {}

  def add(self, index: int, d: ChoiceDelta) -> None:
    self.text.setdefault(index, []).append(d.text)
    self.num_tokens[index] = self.num_tokens.get(index, 0) + len(d.token_ids)
    if d.finish_reason is not None:
      self.finish[index] = d.finish_reason

  def completion_tokens(self) -> int:
    return sum(self.num_tokens.values())
