"""jaxserve: a LLaMA-family model in Flax and an LLM engine with a paged KV cache."""

from jaxserve.config import ModelConfig
from jaxserve.loaders import LoadedModel, load_model, save_hf, save_native
from jaxserve.model import forward, init_params

__all__ = ["ModelConfig", "LoadedModel", "load_model", "save_hf", "save_native", "forward", "init_params"]
