"""jaxserve: a LLaMA-family model in Flax and an LLM engine with a paged KV cache."""

from jaxserve.config import ModelConfig
from jaxserve.engine import LLM, BeamSearchParams, CompletionOutput, RequestOutput, SamplingParams
from jaxserve.loaders import LoadedModel, load_model, save_hf, save_native
from jaxserve.model import forward, init_params

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "ModelConfig",
           "LoadedModel", "load_model", "save_hf", "save_native", "forward", "init_params"]
