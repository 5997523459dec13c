"""Incremental detokenization of one sequence's output and incremental stop-string search (vLLM's scheme)."""

from __future__ import annotations

from typing import Any, Sequence

# Prompt tokens decoded before the output, so that the first output token keeps its leading space
# (sentencepiece drops the space of the first token of a decoded run).
CONTEXT_TOKENS = 4


def anchor_ids(tokenizer: Any) -> tuple[int, ...]:
  """Token ids of a short text decoded before each window inside the output, so that no window
  starts the decoded string: sentencepiece strips leading whitespace there (``decode([▁, ▁th])``
  is ``"th"``), which would drop spaces at window boundaries."""
  ids = tuple(tokenizer.encode("a"))
  return ids if ids and tokenizer.decode(list(ids)) == "a" else ()


class IncrementalDetokenizer:
  """The output text of one sequence, grown by a short window decode per token.

  Each step decodes only ``ids[prefix_offset:]`` and ``ids[prefix_offset:read_offset]`` (a few
  tokens, after ``anchor`` once the window lies in the output) and appends the difference; text
  ending in an unfinished UTF-8 character (``"\ufffd"``) waits for the next token. :meth:`finish`
  appends what is still waiting. The concatenation equals decoding the whole output after a few
  prompt tokens, at O(1) decode work per token.

  Attributes:
    text: the stable output text so far.
  """

  __slots__ = ("text", "prefix_offset", "read_offset", "num_prompt_tokens", "anchor")

  def __init__(self, num_prompt_tokens: int, anchor: Sequence[int] = ()):
    self.text = ""
    self.prefix_offset = max(0, num_prompt_tokens - CONTEXT_TOKENS)
    self.read_offset = self.num_prompt_tokens = num_prompt_tokens
    self.anchor = list(anchor)

  def _window(self, tokenizer: Any, ids: Sequence[int]) -> tuple[str, str]:
    head = self.anchor if self.prefix_offset >= self.num_prompt_tokens else []
    window = list(ids[self.prefix_offset:])
    return (tokenizer.decode(head + window[:self.read_offset - self.prefix_offset]), tokenizer.decode(head + window))

  def _advance(self, before: str, full: str, num_ids: int) -> int:
    new = full[len(before):]
    self.text += new
    self.prefix_offset, self.read_offset = self.read_offset, num_ids
    return len(new)

  def step(self, tokenizer: Any, ids: Sequence[int]) -> int:
    """Takes in the tokens appended to ``ids`` (prompt + output) since the last call (one or many);
    returns how many characters were added."""
    if self.read_offset >= len(ids):
      return 0
    before, full = self._window(tokenizer, ids)
    if len(full) <= len(before) or full.endswith("\ufffd"):
      return 0
    return self._advance(before, full, len(ids))

  def finish(self, tokenizer: Any, ids: Sequence[int]) -> int:
    """Appends the text still waiting (an unfinished character is kept as ``"\ufffd"``)."""
    if self.read_offset >= len(ids):
      return 0
    return self._advance(*self._window(tokenizer, ids), len(ids))


def find_stop(text: str, num_new_chars: int, stops: Sequence[str]) -> tuple[int, str] | None:
  """The stop string that completes first among those ending in the last ``num_new_chars`` characters of ``text``.

  Only the new characters and the ``len(stop) - 1`` before them are searched (earlier text was
  searched when it was new), so a step costs O(new characters + longest stop), not O(text).
  Returns ``(start index, stop)`` of the match that ends earliest, as if the text had grown one
  character at a time (vLLM's rule); ties on the end go to the stop listed first.
  """
  if num_new_chars <= 0:
    return None
  best, best_end = None, len(text) + 1
  for stop in stops:
    at = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
    if at != -1 and at + len(stop) < best_end:
      best, best_end = (at, stop), at + len(stop)
  return best


def holdback(stops: Sequence[str], include_stop_str_in_output: bool) -> int:
  """Characters of an unfinished sequence's text not shown yet, because a stop string could still
  complete over them and cut them off (vLLM's ``stop_buffer_length``)."""
  if not stops or include_stop_str_in_output:
    return 0
  return max(len(s) for s in stops) - 1
