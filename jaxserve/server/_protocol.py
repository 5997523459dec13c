"""OpenAI request bodies: pydantic models, and their validation into prompt ids and SamplingParams.

Types are checked strictly (``"5"`` is not an integer); value ranges are checked by
``SamplingParams`` itself, so the server and the offline API accept exactly the same values.
Every problem becomes an :class:`APIError` (HTTP 400) whose message and ``param`` name the field.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from jaxserve.server._chat_template import chat_prompt_ids
from jaxserve.server._errors import APIError, bad_request

# The most completions one request may ask for (``n`` times the number of prompts).
MAX_SEQUENCES_PER_REQUEST = 64


class _Strict(BaseModel):
  # Unknown fields are ignored (clients send vendor extras); known ones must have the right type.
  model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
  include_usage: bool | None = False


class _SamplingFields(_Strict):
  """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

  model: str | None = None
  n: int | None = 1
  temperature: float | None = None
  top_p: float | None = None
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool | None = False
  stream_options: StreamOptions | None = None
  presence_penalty: float | None = 0.0
  frequency_penalty: float | None = 0.0
  logit_bias: dict[str, float] | None = None
  user: str | None = None
  # vLLM extras
  top_k: int | None = None
  min_p: float | None = None
  repetition_penalty: float | None = None
  stop_token_ids: list[int] | None = None
  ignore_eos: bool | None = False
  min_tokens: int | None = 0
  include_stop_str_in_output: bool | None = False


class CompletionRequest(_SamplingFields):
  """``POST /v1/completions``."""

  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = 16
  logprobs: int | None = None
  echo: bool | None = False
  suffix: str | None = None
  best_of: int | None = None


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ChatMessage(_Strict):
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: str | list[TextPart] | None = None
  name: str | None = None


class ChatCompletionRequest(_SamplingFields):
  """``POST /v1/chat/completions``."""

  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: int | None = None
  max_completion_tokens: int | None = None
  logprobs: bool | None = False
  top_logprobs: int | None = None
  tools: list[Any] | None = None
  response_format: dict[str, Any] | None = None

  # free-form fields whose strings the server never reads (tools are refused, a response_format is
  # read by its "type" only): the lone-surrogate search, which may not hold the event loop over
  # millions of items, passes them over
  unread: ClassVar[tuple[str, ...]] = ("tools", "response_format")


class TokenizeRequest(_Strict):
  """``POST /tokenize`` (vLLM's): ``prompt`` (``TokenizeCompletionRequest``) or ``messages``
  (``TokenizeChatRequest``), and whether to return the token strings."""

  n: ClassVar[int] = 1  # one prompt (the request-size checks read it)
  model: str | None = None
  prompt: str | None = None
  messages: list[ChatMessage] | None = Field(default=None, min_length=1)
  add_special_tokens: bool | None = None  # a prompt gets BOS unless false; messages get what the chat route runs
  add_generation_prompt: bool | None = True
  return_token_strs: bool | None = False

  @pydantic.model_validator(mode="after")
  def _one_input(self) -> "TokenizeRequest":
    if (self.prompt is None) == (self.messages is None):
      raise ValueError("give exactly one of 'prompt' (a string) or 'messages' (a chat)")
    return self


class DetokenizeRequest(_Strict):
  """``POST /detokenize`` (vLLM's)."""

  model: str | None = None
  tokens: list[int]


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
  """JSON bytes -> a validated ``model`` instance, or a 400 naming the first bad field."""
  try:
    obj = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad_request(f"request body is not valid JSON: {e}") from None
  if not isinstance(obj, dict):
    raise bad_request(f"request body must be a JSON object, got {type(obj).__name__}")
  try:
    return model.model_validate(obj)
  except pydantic.ValidationError as e:
    raise _validation_error(e, obj, model) from None


_FIELD_HINTS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "messages": "a non-empty list of {\"role\", \"content\"} objects",
}


def _validation_error(e: pydantic.ValidationError, obj: dict[str, Any], model: type[BaseModel]) -> APIError:
  err = e.errors()[0]
  if not err["loc"]:  # a whole-body rule
    return bad_request(err["msg"].removeprefix("Value error, "))
  field = str(err["loc"][0])
  if field in ("prompt", "stop") and err["type"] != "missing":  # unions: one message, not one per member
    hint = "a string" if model is TokenizeRequest and field == "prompt" else _FIELD_HINTS[field]
    return bad_request(f"'{field}' must be {hint}, got {_short(obj.get(field))}", field)
  path, value = _data_path(err["loc"], obj, missing=err["type"] == "missing")
  param = ".".join(str(p) for p in path)
  if err["type"] == "missing":
    return bad_request(f"'{param}' is required", param)
  if path == ["messages"]:
    return bad_request(f"'messages' must be {_FIELD_HINTS['messages']}, got {_short(value)}", "messages")
  if len(path) == 3 and path[2] == "content":
    return bad_request(f"'{param}' must be a string or a list of {{\"type\": \"text\", \"text\"}} parts, "
                       f"got {_short(value)}", param)
  return bad_request(f"'{param}': {err['msg']}, got {_short(err.get('input'))}", param)


def _data_path(loc: tuple, obj: Any, missing: bool) -> tuple[list, Any]:
  """The part of a pydantic error location that indexes the request data (drops union member tags)."""
  path, cur = [], obj
  for i, p in enumerate(loc):
    if isinstance(cur, dict) and p in cur:
      path.append(p)
      cur = cur[p]
    elif isinstance(cur, list) and isinstance(p, int) and p < len(cur):
      path.append(p)
      cur = cur[p]
    elif missing and i == len(loc) - 1:
      path.append(p)
  return path, cur


def _short(value: Any, limit: int = 80) -> str:
  text = json.dumps(value) if not isinstance(value, BaseModel) else value.model_dump_json()
  return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- prompts
def completion_prompts(req: CompletionRequest, tokenizer: Any, vocab_size: int) -> list[list[int]]:
  """The request's prompts as token-id lists (strings get BOS, as ``LLM.generate`` does)."""
  p = req.prompt
  if isinstance(p, str):
    items: list[str | list[int]] = [p]
  elif p and all(isinstance(x, int) for x in p):
    items = [list(p)]  # type: ignore[arg-type]
  else:
    items = list(p)  # type: ignore[arg-type]
  if not items:
    raise bad_request("'prompt' must not be an empty list", "prompt")
  out = []
  for i, item in enumerate(items):
    if isinstance(item, str):
      out.append(tokenizer.encode(item, add_bos=True))
      continue
    if not item:
      raise bad_request(f"'prompt' token list {i} is empty; give at least one token id", "prompt")
    bad = next((t for t in item if not 0 <= t < vocab_size), None)
    if bad is not None:
      raise bad_request(f"'prompt' holds token id {bad}, outside the vocabulary [0, {vocab_size})", "prompt")
    out.append(list(item))
  return out


def chat_prompt(req: ChatCompletionRequest, tokenizer: Any) -> list[int]:
  """The chat prompt's token ids (the tokenizer's chat template, or the plain one)."""
  return messages_prompt(req.messages, tokenizer)


def messages_prompt(chat: list[ChatMessage], tokenizer: Any, add_generation_prompt: bool = True) -> list[int]:
  """Token ids of chat messages rendered with the tokenizer's chat template (or the plain one)."""
  messages = []
  for i, m in enumerate(chat):
    content = m.content
    if isinstance(content, list):
      content = "".join(part.text for part in content)
    if content is None:
      raise bad_request(f"'messages.{i}.content' is required (tool calls are not supported)",
                        f"messages.{i}.content")
    messages.append({"role": m.role, "content": content})
  try:
    return chat_prompt_ids(tokenizer, messages, add_generation_prompt)
  except Exception as e:  # a template may reject role orders (e.g. two user turns in a row)
    raise bad_request(f"'messages' could not be rendered with the chat template: {e}", "messages") from None


# ---------------------------------------------------------------- sampling parameters
def sampling_params(req: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_model_len: int,
                    param_cls: type, *, max_n: int = MAX_SEQUENCES_PER_REQUEST) -> Any:
  """Checks the sampling fields against the model and builds ``param_cls`` (``SamplingParams``);
  ``n`` may be at most ``max_n`` (the engine's sequences per step, or the server's bound)."""
  chat = isinstance(req, ChatCompletionRequest)
  _unsupported(req, chat)
  if req.stream_options is not None and not req.stream:  # as OpenAI and vLLM: not silently ignored
    raise bad_request("'stream_options' is only allowed with 'stream': true; drop it or set 'stream': true",
                      "stream_options")
  n = req.n if req.n is not None else 1
  if not 1 <= n <= max_n:
    raise bad_request(f"'n' must be in [1, {max_n}], got {n}", "n")
  if chat:
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    prompt_field = "messages"
  else:
    max_field, max_tokens, prompt_field = "max_tokens", req.max_tokens, "prompt"
  if prompt_len >= max_model_len:
    raise bad_request(f"This model's maximum context length is {max_model_len} tokens, but the "
                      f"{prompt_field} has {prompt_len} tokens; shorten it to at most "
                      f"{max_model_len - 1} tokens", prompt_field)
  if max_tokens is None:
    max_tokens = max_model_len - prompt_len
  elif max_tokens >= 1 and prompt_len + max_tokens > max_model_len:
    raise bad_request(f"This model's maximum context length is {max_model_len} tokens, but "
                      f"{prompt_len + max_tokens} were requested ({prompt_len} in the {prompt_field}, "
                      f"{max_tokens} in '{max_field}'); set '{max_field}' to at most "
                      f"{max_model_len - prompt_len}", max_field)
  logprobs = _logprobs(req, chat)
  kw = dict(n=n, max_tokens=max_tokens, stop=req.stop, seed=req.seed, logprobs=logprobs,
            presence_penalty=_or(req.presence_penalty, 0.0), frequency_penalty=_or(req.frequency_penalty, 0.0),
            temperature=_or(req.temperature, 1.0), top_p=_or(req.top_p, 1.0), top_k=_or(req.top_k, 0),
            min_p=_or(req.min_p, 0.0), repetition_penalty=_or(req.repetition_penalty, 1.0),
            stop_token_ids=req.stop_token_ids, ignore_eos=bool(req.ignore_eos),
            min_tokens=_or(req.min_tokens, 0), include_stop_str_in_output=bool(req.include_stop_str_in_output))
  try:
    return param_cls(**kw)
  except ValueError as e:  # SamplingParams names the field first: "top_p must be in (0, 1], got 1.5"
    field, _, rest = str(e).partition(" ")
    if field not in kw:
      raise bad_request(f"invalid sampling parameters: {e}") from None
    field = {"max_tokens": max_field, "logprobs": "top_logprobs" if chat else "logprobs"}.get(field, field)
    raise bad_request(f"'{field}' {rest}", field) from None


def _logprobs(req: CompletionRequest | ChatCompletionRequest, chat: bool) -> int | None:
  if not chat:
    return req.logprobs
  if req.top_logprobs is not None and not req.logprobs:
    raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
  return (req.top_logprobs or 0) if req.logprobs else None


def _unsupported(req: CompletionRequest | ChatCompletionRequest, chat: bool) -> None:
  if req.logit_bias:
    raise bad_request("'logit_bias' is not supported", "logit_bias")
  if chat:
    if req.tools:
      raise bad_request("'tools' (function calling) is not supported", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
      raise bad_request("'response_format' must be {\"type\": \"text\"}; structured output is not supported",
                        "response_format")
  else:
    if req.suffix:
      raise bad_request("'suffix' is not supported", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
      raise bad_request(f"'best_of' must equal 'n' ({req.n or 1}) when given, got {req.best_of}", "best_of")
    if req.echo and req.logprobs is not None:
      raise bad_request("'echo' with 'logprobs' is not supported (no prompt logprobs)", "echo")


def _or(value: Any, default: Any) -> Any:
  return default if value is None else value


def include_usage(req: CompletionRequest | ChatCompletionRequest) -> bool:
  return bool(req.stream_options and req.stream_options.include_usage)


# ---------------------------------------------------------------- /tokenize and /detokenize
def tokenize(req: TokenizeRequest, tokenizer: Any) -> list[int]:
  """The token ids ``/tokenize`` returns: the prompt's (BOS unless ``add_special_tokens`` is false) or
  the chat's as the chat completions route renders it."""
  if req.prompt is not None:
    return tokenizer.encode(req.prompt, add_bos=req.add_special_tokens is not False)
  return messages_prompt(req.messages, tokenizer, add_generation_prompt=req.add_generation_prompt is not False)


def token_strs(tokenizer: Any, ids: list[int]) -> list[str]:
  """The tokens' own strings (sentencepiece pieces such as ``"▁Once"``, else their decoded text)."""
  piece = getattr(tokenizer, "id_to_piece", None)
  return [piece(i) if piece is not None else tokenizer.decode([i]) for i in ids]


def detokenize(req: DetokenizeRequest, tokenizer: Any, vocab_size: int) -> str:
  bad = next((t for t in req.tokens if not 0 <= t < vocab_size), None)
  if bad is not None:
    raise bad_request(f"'tokens' holds token id {bad}, outside the vocabulary [0, {vocab_size})", "tokens")
  return tokenizer.decode(req.tokens)
