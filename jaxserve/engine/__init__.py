"""Paged-KV serving engine: block pool, scheduler, model runner, sampling and the ``LLM`` API."""

from jaxserve.engine._attention import PagedAttention, PagedMeta, paged_attention_reference
from jaxserve.engine._engine import EngineStepError
from jaxserve.engine._outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.engine._sampling_params import BeamSearchParams, SamplingParams
from jaxserve.engine.llm import LLM

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "Logprob",
           "PagedAttention", "PagedMeta", "paged_attention_reference", "EngineStepError"]
