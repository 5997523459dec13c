"""jaxserve: a LLaMA-family model in Flax and an LLM engine with a paged KV cache.

Importing ``jaxserve`` (or its model, config, loaders, tokenizer and weights modules) does not
import the engine, the server or the Pallas kernels: the engine's names below are resolved on
first use, so ``from jaxserve import LLM`` works and ``import jaxprune`` stays light.
"""

import importlib
from typing import Any

from jaxserve.config import ModelConfig
from jaxserve.loaders import LoadedModel, load_model, save_hf, save_native
from jaxserve.model import forward, init_params

_LAZY = {name: "jaxserve.engine" for name in
         ("LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput")}

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "ModelConfig",
           "LoadedModel", "load_model", "save_hf", "save_native", "forward", "init_params"]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))
