"""The FastAPI application: OpenAI routes, API-key check, error bodies, SSE streaming, metrics, lifespan."""

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
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from jaxserve.server import _protocol as proto
from jaxserve.server._async_engine import AsyncEngine, ClientDisconnected, RequestGroup
from jaxserve.server._errors import APIError
from jaxserve.server._limits import (TransportLimits, check_prompt_bounds, check_sizes, check_unicode,
                                     default_max_prompt_chars, parse_json, read_body)
from jaxserve.server._metrics import ServerMetrics
from jaxserve.server._responses import (SSE_DONE, Accumulator, CompletionLogprobs, TokenText, chat_logprobs, sse,
                                        usage)

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
  """

  model_name: str
  max_model_len: int
  vocab_size: int
  api_key: str | None = None
  aliases: tuple[str, ...] = ()

  @property
  def served_names(self) -> tuple[str, ...]:
    return (self.model_name, *(a for a in self.aliases if a != self.model_name))


def create_app(engine: Any, tokenizer: Any, config: ServerConfig, sampling_params_cls: type | None = None,
               *, start_engine: bool = True, limits: TransportLimits | None = None) -> FastAPI:
  """Builds the ASGI app around ``engine`` (``jaxserve.LLM`` or anything with its incremental API).

  The engine thread starts with the app's lifespan and stops (aborting what is left) when it ends.
  ``limits`` bound what one client may take (default: ``TransportLimits()``).
  """
  if sampling_params_cls is None:
    from jaxserve import SamplingParams as sampling_params_cls  # noqa: N813
  limits = limits or TransportLimits()
  max_prompt_chars = limits.max_prompt_chars or default_max_prompt_chars(tokenizer, config.max_model_len)
  metrics = ServerMetrics(config.model_name)
  aengine = AsyncEngine(engine, metrics, limits)
  # Prompts are tokenized here, off the event loop, one at a time (the engine thread is the only
  # other user of the tokenizer).
  tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxserve-tokenize")

  async def off_loop(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(tokenize_pool, fn, *args)
  token_text = TokenText(tokenizer)
  created = int(time.time())

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if start_engine:
      aengine.start()
    log.info("serving %s (max_model_len %d)", config.model_name, config.max_model_len)
    try:
      yield
    finally:
      tokenize_pool.shutdown(wait=False, cancel_futures=True)
      await asyncio.get_running_loop().run_in_executor(None, aengine.shutdown)
      log.info("engine stopped after %d steps", aengine.steps)

  app = FastAPI(title="jaxserve", lifespan=lifespan)
  app.state.engine = aengine
  app.state.metrics = metrics
  app.state.limits = limits

  @app.exception_handler(APIError)
  async def _api_error(request: Request, e: APIError) -> JSONResponse:
    headers = {}
    if e.status == 429:
      headers["Retry-After"] = str(limits.retry_after)
    if e.status in (408, 413):  # the rest of the body is not read: this connection cannot carry another request
      headers["Connection"] = "close"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

  @app.exception_handler(Exception)
  async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

  def authorize(request: Request) -> None:
    if config.api_key is None:
      return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), config.api_key.encode()):
      raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                     code="invalid_api_key")

  def check_model(name: str | None) -> None:
    if name is not None and name not in config.served_names:
      served = ", ".join(f"'{n}'" for n in config.served_names)
      raise APIError(404, f"The model '{name}' does not exist; this server serves {served}",
                     param="model", code="model_not_found")

  async def read(request: Request, model: type) -> Any:
    """The request body, read within the size and time limits, parsed and checked for what is cheap
    to check (model name, prompt count and length) before anything is tokenized."""
    authorize(request)
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
    check_model(body.model)
    check_prompt_bounds(body, max_model_len=config.max_model_len, max_prompt_chars=max_prompt_chars,
                        max_prompts=proto.MAX_SEQUENCES_PER_REQUEST)
    return body

  def model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "jaxserve",
            "max_model_len": config.max_model_len}

  # ---------------------------------------------------------------- routes
  @app.get("/health")
  async def health() -> Response:
    if aengine.alive:
      return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "shutting down" if aengine.closed else "engine stopped"}, status_code=503)

  @app.get("/metrics")
  async def metrics_route() -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def list_models(request: Request) -> dict[str, Any]:
    authorize(request)
    return {"object": "list", "data": [model_card(name) for name in config.served_names]}

  @app.get("/v1/models/{name:path}")
  async def get_model(name: str, request: Request) -> dict[str, Any]:
    authorize(request)
    check_model(name)
    return model_card(name)

  @app.post("/tokenize")
  async def tokenize(request: Request) -> dict[str, Any]:
    """vLLM's ``/tokenize``: ``{"prompt"}`` or ``{"messages"}`` -> ``{count, max_model_len, tokens, token_strs}``."""
    req: proto.TokenizeRequest = await read(request, proto.TokenizeRequest)
    ids = await off_loop(proto.tokenize, req, tokenizer)
    strs = proto.token_strs(tokenizer, ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": config.max_model_len, "tokens": ids, "token_strs": strs}

  @app.post("/detokenize")
  async def detokenize(request: Request) -> dict[str, Any]:
    """vLLM's ``/detokenize``: ``{"tokens"}`` -> ``{"prompt"}``."""
    req: proto.DetokenizeRequest = await read(request, proto.DetokenizeRequest)
    return {"prompt": await off_loop(proto.detokenize, req, tokenizer, config.vocab_size)}

  @app.post("/v1/completions")
  async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    req: proto.CompletionRequest = await read(request, proto.CompletionRequest)
    prompts = await off_loop(proto.completion_prompts, req, tokenizer, config.vocab_size)
    params = [proto.sampling_params(req, len(p), config.max_model_len, sampling_params_cls) for p in prompts]
    n = params[0].n
    proto.check_prompt_count(len(prompts), n)
    rid = f"cmpl-{uuid.uuid4().hex}"
    group = RequestGroup(aengine, rid, prompts, params, arrival)
    echo = [tokenizer.decode(p) for p in prompts] if req.echo else None
    top = req.logprobs
    head = {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": req.model or config.model_name}  # the name the request used

    if req.stream:
      async def chunks() -> AsyncIterator[str]:
        echoed: set[int] = set()
        ntok = 0
        lps: dict[int, CompletionLogprobs] = {}
        async for upd in group.updates():
          for d in upd.choices:
            index = upd.tag * n + d.index
            text = d.text
            if echo is not None and index not in echoed:
              echoed.add(index)
              text = echo[upd.tag] + text
            ntok += len(d.token_ids)
            lp = None
            if top is not None:
              lp = lps.setdefault(index, CompletionLogprobs(token_text, top)).add(d.token_ids, d.logprobs or ())
            # one chunk per generated token (as vLLM): its text may be empty (held back, a partial
            # character, a special token), but clients time tokens by chunks
            yield sse({**head, "choices": [{"index": index, "text": text, "logprobs": lp,
                                            "finish_reason": d.finish_reason}], "usage": None})
        if proto.include_usage(req):
          yield sse({**head, "choices": [], "usage": usage(sum(group.num_prompt_tokens), ntok)})

      return await _stream(request, group, chunks(), limits.stream_stall_timeout)

    acc = Accumulator()
    lps: dict[int, CompletionLogprobs] = {}

    async def collect() -> None:
      async for upd in group.updates():
        for d in upd.choices:
          index = upd.tag * n + d.index
          acc.add(index, d)
          if top is not None:
            lps.setdefault(index, CompletionLogprobs(token_text, top)).add(d.token_ids, d.logprobs or ())

    await _collect(request, group, collect)
    choices = []
    for tag in range(len(prompts)):
      for i in range(n):
        index = tag * n + i
        text = "".join(acc.text.get(index, []))
        choices.append({"index": index, "text": (echo[tag] if echo else "") + text,
                        "logprobs": lps[index].result() if index in lps else None,
                        "finish_reason": acc.finish.get(index)})
    return JSONResponse({**head, "choices": choices,
                         "usage": usage(sum(group.num_prompt_tokens), acc.completion_tokens())})

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()
    req: proto.ChatCompletionRequest = await read(request, proto.ChatCompletionRequest)
    prompt = await off_loop(proto.chat_prompt, req, tokenizer)
    params = proto.sampling_params(req, len(prompt), config.max_model_len, sampling_params_cls)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    group = RequestGroup(aengine, rid, [prompt], [params], arrival)
    top = params.logprobs
    head = {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": req.model or config.model_name}  # the name the request used

    if req.stream:
      head["object"] = "chat.completion.chunk"

      async def chunks() -> AsyncIterator[str]:
        for i in range(params.n):
          yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}], "usage": None})
        ntok = 0
        async for upd in group.updates():
          for d in upd.choices:
            ntok += len(d.token_ids)
            lp = None if top is None else {"content": chat_logprobs(token_text, top, d.token_ids, d.logprobs or ())}
            delta = {"content": d.text} if d.text or d.token_ids else {}  # a chunk per token, text or not
            yield sse({**head, "choices": [{"index": d.index, "delta": delta,
                                            "logprobs": lp, "finish_reason": d.finish_reason}], "usage": None})
        if proto.include_usage(req):
          yield sse({**head, "choices": [], "usage": usage(len(prompt), ntok)})

      return await _stream(request, group, chunks(), limits.stream_stall_timeout)

    acc = Accumulator()
    lps: dict[int, list] = {}

    async def collect() -> None:
      async for upd in group.updates():
        for d in upd.choices:
          acc.add(d.index, d)
          if top is not None:
            lps.setdefault(d.index, []).extend(chat_logprobs(token_text, top, d.token_ids, d.logprobs or ()))

    await _collect(request, group, collect)
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(acc.text.get(i, []))},
                "logprobs": {"content": lps.get(i, [])} if top is not None else None,
                "finish_reason": acc.finish.get(i)} for i in range(params.n)]
    return JSONResponse({**head, "choices": choices, "usage": usage(len(prompt), acc.completion_tokens())})

  return app


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
  connection)."""

  def __init__(self, group: RequestGroup, stall_timeout: float, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self._group = group
    self._stall_timeout = stall_timeout

  async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
    async def send_or_give_up(message: Any) -> None:
      try:
        async with asyncio.timeout(self._stall_timeout):
          await send(message)
      except TimeoutError:
        self._group.abort()
        raise _ClientStalled() from None

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
      self._group.abort()
