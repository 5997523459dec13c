"""The FastAPI application: OpenAI routes as module-level handlers over one :class:`AppState`, API-key
check, error bodies, SSE streaming, metrics, lifespan."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jaxserve.server import _protocol as proto
from jaxserve.server._async_engine import AsyncEngine, ClientDisconnected, RequestGroup
from jaxserve.server._errors import APIError
from jaxserve.server._limits import (TransportLimits, check_prompt_bounds, check_sizes, check_unicode,
                                     default_max_prompt_chars, parse_json, read_body)
from jaxserve.server._metrics import ServerMetrics
from jaxserve.server._responses import (SSE_DONE, Accumulator, ChunkEncoder, CompletionLogprobs, TokenText,
                                        chat_logprobs, sse, usage)

log = logging.getLogger("jaxserve.server")

# Scope extension under which the server (``_runner``) puts a callable that cuts the connection.
ABORT_CONNECTION = "jaxserve.abort_connection"


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
  """What the HTTP layer needs to know besides the engine.

  Attributes:
    model_name: the name clients pass as ``model`` (and ``GET /v1/models`` lists).
    max_model_len: prompt plus completion tokens allowed per sequence.
    vocab_size: token ids in prompts must be below it.
    api_key: when set, ``/v1/*`` routes need ``Authorization: Bearer <api_key>``.
    aliases: more names the model is served under (vLLM's ``--served-model-name A B``: ``model_name``
      is A, ``aliases`` B); responses name the model as the request did.
    max_num_seqs: the engine's sequences per step, which bounds a request's ``n`` (None: the
      engine's own, where ``create_app`` finds it, else only the server's ``MAX_SEQUENCES_PER_REQUEST``).
  """

  model_name: str
  max_model_len: int
  vocab_size: int
  api_key: str | None = None
  aliases: tuple[str, ...] = ()
  max_num_seqs: int | None = None

  @property
  def max_n(self) -> int:
    """The largest ``n`` a request may ask for."""
    return min(proto.MAX_SEQUENCES_PER_REQUEST, self.max_num_seqs or proto.MAX_SEQUENCES_PER_REQUEST)

  @property
  def served_names(self) -> tuple[str, ...]:
    return (self.model_name, *(a for a in self.aliases if a != self.model_name))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AppState:
  """What the routes read (``request.app.state.server``): built once by :func:`create_app`.

  Attributes:
    async_engine: the engine thread every request goes through.
    tokenizer: prompts are encoded with it on ``tokenize_pool``, one at a time; the engine thread
      decodes outputs with it, and the event loop decodes what is short (echoed prompts, logprob
      token strings).
    config: the model's names and sizes, and the API key.
    limits: what one client may take.
    metrics: the Prometheus metrics ``GET /metrics`` renders.
    sampling_params_cls: the class requests become (``jaxserve.SamplingParams``).
    max_prompt_chars: text prompts longer than this cannot fit ``config.max_model_len`` tokens.
    token_text: token strings for logprobs (cached).
    tokenize_pool: the one thread prompts are tokenized on, off the event loop.
    created: the ``created`` time of the model cards.
  """

  async_engine: AsyncEngine
  tokenizer: Any
  config: ServerConfig
  limits: TransportLimits
  metrics: ServerMetrics
  sampling_params_cls: type
  max_prompt_chars: int
  token_text: TokenText
  tokenize_pool: concurrent.futures.ThreadPoolExecutor
  created: int


def create_app(llm: Any, tokenizer: Any, config: ServerConfig, sampling_params_cls: type | None = None,
               *, limits: TransportLimits | None = None) -> FastAPI:
  """Builds the ASGI app around ``llm`` (``jaxserve.LLM`` or anything with its incremental API).

  The engine thread starts with the app's lifespan and stops (aborting what is left) when it ends.
  ``limits`` bound what one client may take (default: ``TransportLimits()``).
  """
  if sampling_params_cls is None:
    from jaxserve import SamplingParams as sampling_params_cls  # noqa: N813
  limits = limits or TransportLimits()
  engine_seqs = getattr(getattr(llm, "engine", None), "max_num_seqs", None)  # jaxserve.LLM's
  if config.max_num_seqs is None and isinstance(engine_seqs, int):
    config = dataclasses.replace(config, max_num_seqs=engine_seqs)
  metrics = ServerMetrics(config.model_name)
  state = AppState(
      async_engine=AsyncEngine(llm, metrics, limits), tokenizer=tokenizer, config=config, limits=limits,
      metrics=metrics, sampling_params_cls=sampling_params_cls,
      max_prompt_chars=limits.max_prompt_chars or default_max_prompt_chars(tokenizer, config.max_model_len),
      token_text=TokenText(tokenizer), created=int(time.time()),
      tokenize_pool=concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxserve-tokenize"))
  app = FastAPI(title="jaxserve", lifespan=_lifespan)
  app.state.server = state
  app.add_exception_handler(APIError, _api_error)
  app.add_exception_handler(StarletteHTTPException, _http_error)
  app.add_exception_handler(Exception, _internal_error)
  app.add_api_route("/health", health, methods=["GET"])
  app.add_api_route("/metrics", metrics_route, methods=["GET"])
  app.add_api_route("/v1/models", list_models, methods=["GET"])
  app.add_api_route("/v1/models/{name:path}", get_model, methods=["GET"])
  app.add_api_route("/tokenize", tokenize, methods=["POST"])
  app.add_api_route("/detokenize", detokenize, methods=["POST"])
  app.add_api_route("/v1/completions", completions, methods=["POST"])
  app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
  return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
  state: AppState = app.state.server
  state.async_engine.start()
  log.info("serving %s (max_model_len %d)", state.config.model_name, state.config.max_model_len)
  try:
    yield
  finally:
    state.tokenize_pool.shutdown(wait=False, cancel_futures=True)
    await asyncio.get_running_loop().run_in_executor(None, state.async_engine.shutdown)
    log.info("engine stopped after %d steps", state.async_engine.steps)


def _state(request: Request) -> AppState:
  return request.app.state.server


# ---------------------------------------------------------------- errors
async def _api_error(request: Request, e: APIError) -> JSONResponse:
  headers = {}
  if e.status == 429:
    headers["Retry-After"] = str(_state(request).limits.retry_after)
  if e.status in (408, 413):  # the rest of the body is not read: this connection cannot carry another request
    headers["Connection"] = "close"
  return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
  """Routing's 404 and 405, saying what the server serves (a 405 keeps its ``Allow`` header)."""
  method, path, message = request.method, request.url.path, str(e.detail)
  if e.status_code == 404:
    routes = ", ".join(f"{'/'.join(sorted(r.methods))} {r.path_format}" for r in request.app.routes
                       if isinstance(r, APIRoute))
    message = f"Invalid URL ({method} {path}); this server serves {routes}"
  elif e.status_code == 405:
    message = f"method {method} is not allowed on {path}; use {(e.headers or {}).get('Allow', 'another method')}"
  return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
  log.exception("unhandled error on %s", request.url.path)
  return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)


# ---------------------------------------------------------------- request checks
def _authorize(state: AppState, request: Request) -> None:
  if state.config.api_key is None:
    return
  scheme, _, key = request.headers.get("authorization", "").partition(" ")
  if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), state.config.api_key.encode()):
    raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def _check_model(state: AppState, name: str | None) -> None:
  served_names = state.config.served_names
  if name is not None and name not in served_names:
    served = ", ".join(f"'{n}'" for n in served_names)
    raise APIError(404, f"The model '{name}' does not exist; this server serves {served}",
                   param="model", code="model_not_found")


async def _read(state: AppState, request: Request, model: type) -> Any:
  """The request body, read within the size and time limits, parsed and checked for what is cheap
  to check (model name, prompt count and length) before anything is tokenized."""
  _authorize(state, request)
  limits, config = state.limits, state.config
  size = request.headers.get("content-length")
  if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
    raise APIError(413, f"request body of {size} bytes is over the limit of {limits.max_body_bytes}; "
                   "send a smaller request", code="request_too_large")
  try:
    async with asyncio.timeout(limits.body_timeout):
      raw = await read_body(request.stream(), limits.max_body_bytes)
  except TimeoutError:
    raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g} s",
                   code="request_timeout") from None
  except ClientDisconnect:
    raise APIError(499, "client disconnected while sending the request body") from None
  # pydantic validates lists item by item on the event loop (a second for 4M token ids): bound them first
  check_sizes(parse_json(raw), max(config.max_model_len, proto.MAX_SEQUENCES_PER_REQUEST))
  body = proto.parse_body(raw, model)
  check_unicode(raw, body)
  _check_model(state, body.model)
  check_prompt_bounds(body, max_model_len=config.max_model_len, max_prompt_chars=state.max_prompt_chars,
                      max_prompts=proto.MAX_SEQUENCES_PER_REQUEST)
  return body


async def _off_loop(state: AppState, fn: Any, *args: Any) -> Any:
  """``fn(*args)`` on the tokenizing thread."""
  return await asyncio.get_running_loop().run_in_executor(state.tokenize_pool, fn, *args)


def _model_card(state: AppState, name: str) -> dict[str, Any]:
  return {"id": name, "object": "model", "created": state.created, "owned_by": "jaxserve",
          "max_model_len": state.config.max_model_len}


# ---------------------------------------------------------------- routes
async def health(request: Request) -> Response:
  engine = _state(request).async_engine
  if engine.alive:
    return JSONResponse({"status": "ok"})
  return JSONResponse({"status": "shutting down" if engine.closed else "engine stopped"}, status_code=503)


async def metrics_route(request: Request) -> Response:
  return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> dict[str, Any]:
  state = _state(request)
  _authorize(state, request)
  return {"object": "list", "data": [_model_card(state, name) for name in state.config.served_names]}


async def get_model(name: str, request: Request) -> dict[str, Any]:
  state = _state(request)
  _authorize(state, request)
  _check_model(state, name)
  return _model_card(state, name)


async def tokenize(request: Request) -> dict[str, Any]:
  """vLLM's ``/tokenize``: ``{"prompt"}`` or ``{"messages"}`` -> ``{count, max_model_len, tokens, token_strs}``."""
  state = _state(request)
  req: proto.TokenizeRequest = await _read(state, request, proto.TokenizeRequest)
  ids = await _off_loop(state, proto.tokenize, req, state.tokenizer)
  strs = proto.token_strs(state.tokenizer, ids) if req.return_token_strs else None
  return {"count": len(ids), "max_model_len": state.config.max_model_len, "tokens": ids, "token_strs": strs}


async def detokenize(request: Request) -> dict[str, Any]:
  """vLLM's ``/detokenize``: ``{"tokens"}`` -> ``{"prompt"}``."""
  state = _state(request)
  req: proto.DetokenizeRequest = await _read(state, request, proto.DetokenizeRequest)
  return {"prompt": await _off_loop(state, proto.detokenize, req, state.tokenizer, state.config.vocab_size)}


async def completions(request: Request) -> Response:
  """``POST /v1/completions``: one engine request per prompt, ``n`` completions each."""
  arrival = time.monotonic()
  state = _state(request)
  config = state.config
  req: proto.CompletionRequest = await _read(state, request, proto.CompletionRequest)
  prompts = await _off_loop(state, proto.completion_prompts, req, state.tokenizer, config.vocab_size)
  params = [proto.sampling_params(req, len(p), config.max_model_len, state.sampling_params_cls,
                                  max_n=config.max_n) for p in prompts]
  rid = f"cmpl-{uuid.uuid4().hex}"
  group = RequestGroup(state.async_engine, rid, prompts, params, arrival)
  echo = [state.tokenizer.decode(p) for p in prompts] if req.echo else None
  head = {"id": rid, "object": "text_completion", "created": int(time.time()),
          "model": req.model or config.model_name}  # the name the request used
  if req.stream:
    chunks = _completion_chunks(state, req, group, head, echo)
    return await _stream(request, group, chunks, state.limits.stream_stall_timeout)
  return JSONResponse(await _completion_body(state, req, group, head, echo, request))


async def _completion_chunks(state: AppState, req: proto.CompletionRequest, group: RequestGroup,
                             head: dict[str, Any], echo: list[str] | None) -> AsyncIterator[str]:
  n, top = group.params[0].n, req.logprobs
  encode = ChunkEncoder(head).completion
  echoed: set[int] = set()
  ntok = 0
  lps: dict[int, CompletionLogprobs] = {}
  async for updates in group.batches():
    events = []
    for upd in updates:
      for d in upd.choices:
        index = upd.tag * n + d.index
        text = d.text
        if echo is not None and index not in echoed:
          echoed.add(index)
          text = echo[upd.tag] + text
        ntok += len(d.token_ids)
        lp = None
        if top is not None:
          lp = lps.setdefault(index, CompletionLogprobs(state.token_text, top)).add(d.token_ids, d.logprobs or ())
        # one chunk per generated token (as vLLM): its text may be empty (held back, a partial
        # character, a special token), but clients time tokens by chunks
        events.append(encode(index, text, lp, d.finish_reason))
    if events:
      yield "".join(events)
  if proto.include_usage(req):
    yield sse({**head, "choices": [], "usage": usage(sum(group.num_prompt_tokens), ntok)})


async def _completion_body(state: AppState, req: proto.CompletionRequest, group: RequestGroup,
                           head: dict[str, Any], echo: list[str] | None, request: Request) -> dict[str, Any]:
  n, top = group.params[0].n, req.logprobs
  acc = Accumulator()
  lps: dict[int, CompletionLogprobs] = {}

  async def collect() -> None:
    async for upd in group.updates():
      for d in upd.choices:
        index = upd.tag * n + d.index
        acc.add(index, d)
        if top is not None:
          lps.setdefault(index, CompletionLogprobs(state.token_text, top)).add(d.token_ids, d.logprobs or ())

  await _collect(request, group, collect)
  choices = []
  for tag in range(len(group.prompts)):
    for i in range(n):
      index = tag * n + i
      text = "".join(acc.text.get(index, []))
      choices.append({"index": index, "text": (echo[tag] if echo else "") + text,
                      "logprobs": lps[index].result() if index in lps else None,
                      "finish_reason": acc.finish.get(index)})
  return {**head, "choices": choices, "usage": usage(sum(group.num_prompt_tokens), acc.completion_tokens())}


async def chat_completions(request: Request) -> Response:
  """``POST /v1/chat/completions``: one engine request, ``n`` completions."""
  arrival = time.monotonic()
  state = _state(request)
  config = state.config
  req: proto.ChatCompletionRequest = await _read(state, request, proto.ChatCompletionRequest)
  prompt = await _off_loop(state, proto.chat_prompt, req, state.tokenizer)
  params = proto.sampling_params(req, len(prompt), config.max_model_len, state.sampling_params_cls,
                                 max_n=config.max_n)
  rid = f"chatcmpl-{uuid.uuid4().hex}"
  group = RequestGroup(state.async_engine, rid, [prompt], [params], arrival)
  head = {"id": rid, "object": "chat.completion", "created": int(time.time()),
          "model": req.model or config.model_name}  # the name the request used
  if req.stream:
    chunks = _chat_chunks(state, req, group, {**head, "object": "chat.completion.chunk"})
    return await _stream(request, group, chunks, state.limits.stream_stall_timeout)
  return JSONResponse(await _chat_body(state, group, head, request))


async def _chat_chunks(state: AppState, req: proto.ChatCompletionRequest, group: RequestGroup,
                       head: dict[str, Any]) -> AsyncIterator[str]:
  params = group.params[0]
  top = params.logprobs
  encode = ChunkEncoder(head).chat
  for i in range(params.n):
    yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}], "usage": None})
  ntok = 0
  async for updates in group.batches():
    events = []
    for upd in updates:
      for d in upd.choices:
        ntok += len(d.token_ids)
        lp = None if top is None else {"content": chat_logprobs(state.token_text, top, d.token_ids, d.logprobs or ())}
        # a chunk per token, text or not (a delta without content only when a completion ends with no new token)
        events.append(encode(d.index, d.text if d.text or d.token_ids else None, lp, d.finish_reason))
    if events:
      yield "".join(events)
  if proto.include_usage(req):
    yield sse({**head, "choices": [], "usage": usage(group.num_prompt_tokens[0], ntok)})


async def _chat_body(state: AppState, group: RequestGroup, head: dict[str, Any], request: Request) -> dict[str, Any]:
  params = group.params[0]
  top = params.logprobs
  acc = Accumulator()
  lps: dict[int, list] = {}

  async def collect() -> None:
    async for upd in group.updates():
      for d in upd.choices:
        acc.add(d.index, d)
        if top is not None:
          lps.setdefault(d.index, []).extend(chat_logprobs(state.token_text, top, d.token_ids, d.logprobs or ()))

  await _collect(request, group, collect)
  choices = [{"index": i, "message": {"role": "assistant", "content": "".join(acc.text.get(i, []))},
              "logprobs": {"content": lps.get(i, [])} if top is not None else None,
              "finish_reason": acc.finish.get(i)} for i in range(params.n)]
  return {**head, "choices": choices, "usage": usage(group.num_prompt_tokens[0], acc.completion_tokens())}


async def _watch_disconnect(request: Request, group: RequestGroup) -> None:
  while True:
    message = await request.receive()
    if message["type"] == "http.disconnect":
      group.client_disconnected()
      return


async def _collect(request: Request, group: RequestGroup, collect: Any) -> None:
  """Runs a non-streaming request to its end; a client that goes away aborts it."""
  await group.start()
  watcher = asyncio.create_task(_watch_disconnect(request, group))
  try:
    await collect()
  except ClientDisconnected:
    raise APIError(499, "client disconnected") from None
  finally:
    watcher.cancel()
    group.abort()


async def _stream(request: Request, group: RequestGroup, chunks: AsyncIterator[str],
                  stall_timeout: float) -> StreamingResponse:
  """Starts the requests (errors still become a 4xx status), then streams SSE chunks and ``[DONE]``."""
  await group.start()

  async def body() -> AsyncIterator[str]:
    watcher = asyncio.create_task(_watch_disconnect(request, group))
    try:
      async for chunk in chunks:
        yield chunk
      yield SSE_DONE
    except ClientDisconnected:
      if group.stalled:  # the client fell too far behind; should it read on, it learns why the stream ends
        yield sse(APIError(408, "the client read too slowly: the stream fell more than the server's "
                           "buffer behind, so its requests were aborted", code="client_too_slow").body())
    except APIError as e:  # the engine failed mid-stream: say so in the stream, then end it
      yield sse(e.body())
      yield SSE_DONE
    finally:
      watcher.cancel()
      group.abort()

  return _GroupStreamingResponse(group, stall_timeout, body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


class _ClientStalled(Exception):
  """A write to a streaming client blocked longer than the stall timeout."""


class _GroupStreamingResponse(StreamingResponse):
  """A streaming response that aborts its requests however it ends (even if its body never started),
  and gives up on a client that reads nothing for ``stall_timeout`` seconds (the server closes the
  connection).

  A write is timed by one watchdog timer per response, which looks every quarter timeout at the
  write in progress and cancels it once it is ``stall_timeout`` old (a write blocks only while the
  client does not read); no timer is set and cancelled per write, as ``asyncio.timeout`` would.
  """

  def __init__(self, group: RequestGroup, stall_timeout: float, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self._group = group
    self._stall_timeout = stall_timeout

  async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
    loop = asyncio.get_running_loop()
    writing: list[Any] = [None, 0.0]  # the task writing now (None between writes), and since when
    writer: list[Any] = [None]  # the task that writes
    stalled = False

    def watch() -> None:
      nonlocal stalled, watchdog
      task, since = writing
      if task is not None and loop.time() - since >= self._stall_timeout:
        stalled = True
        task.cancel()
        return
      watchdog = loop.call_later(self._stall_timeout / 4, watch)

    async def send_or_give_up(message: Any) -> None:
      task = writer[0] or asyncio.current_task()  # one task writes the whole response
      writer[0] = writing[0] = task
      writing[1] = loop.time()
      try:
        await send(message)
      except asyncio.CancelledError:
        if stalled and task.uncancel() == 0:  # our watchdog's cancellation, not the server's
          self._group.abort()
          raise _ClientStalled() from None
        raise
      finally:
        writing[0] = None

    watchdog = loop.call_later(self._stall_timeout / 4, watch)
    try:
      await super().__call__(scope, receive, send_or_give_up)
    except _ClientStalled:
      log.warning("%s: the client read nothing for %g s; its requests were aborted and the connection closed",
                  self._group.ids[0].rsplit("-", 1)[0], self._stall_timeout)
      abort_connection = scope.get("extensions", {}).get(ABORT_CONNECTION)
      if abort_connection is not None:  # else the server closes it, seeing the response unfinished
        abort_connection()
        await asyncio.sleep(0)  # the server learns of the disconnect before this handler returns
    finally:
      watchdog.cancel()
      self._group.abort()
