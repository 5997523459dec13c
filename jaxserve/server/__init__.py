"""OpenAI-compatible HTTP server for the jaxserve engine (``jaxserve serve``).

``create_app(llm, tokenizer, ServerConfig(...))`` builds the FastAPI app; ``jaxserve serve`` runs it
under uvicorn. Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{name}``, ``POST /tokenize``, ``POST /detokenize`` (vLLM's), ``GET /health``,
``GET /metrics`` (Prometheus).
"""

from jaxserve.server._app import ServerConfig, create_app
from jaxserve.server._chat_template import render_plain
from jaxserve.server._errors import APIError
from jaxserve.server._metrics import ServerMetrics

__all__ = ["ServerConfig", "create_app", "render_plain", "APIError", "ServerMetrics"]
