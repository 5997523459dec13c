"""``jaxserve serve`` flags: vLLM's spellings, mapped onto ``LLM`` keyword arguments (no server started)."""

from __future__ import annotations

import inspect

import pytest

from jaxserve import LLM
from jaxserve._cli_serve import llm_kwargs, model_path, served_names
from jaxserve.cli import build_parser


def parse(*argv: str):
  return build_parser().parse_args(["serve", *argv])


def test_engine_flags_map_onto_llm_keywords():
  args = parse("/models/x", "--tensor-parallel-size", "2", "--dtype", "bfloat16", "--max-model-len", "128",
               "--block-size", "32", "--kv-cache-memory-bytes", "1048576", "--no-enable-prefix-caching",
               "--attention-backend", "xla", "--host", "0.0.0.0", "--max-num-seqs", "7", "--seed", "3")
  kw = llm_kwargs(args)
  assert kw == {**kw, "tensor_parallel_size": 2, "dtype": "bfloat16", "max_model_len": 128, "block_size": 32,
                "kv_cache_memory_bytes": 1048576, "enable_prefix_caching": False, "attention_backend": "xla",
                "max_num_seqs": 7, "seed": 3}
  assert args.host == "0.0.0.0" and model_path(args) == "/models/x"
  inspect.signature(LLM).bind(model=None, **kw)  # every key is an LLM keyword argument


def test_defaults_and_spellings():
  kw = llm_kwargs(parse())
  defaults = {name: p.default for name, p in inspect.signature(LLM).parameters.items()}
  for name in ("tensor_parallel_size", "kv_cache_memory_bytes", "enable_prefix_caching", "attention_backend",
               "block_size", "max_model_len", "dtype"):
    assert kw[name] == defaults[name], name
  assert llm_kwargs(parse("--enable-prefix-caching"))["enable_prefix_caching"] is True
  assert llm_kwargs(parse("--no-prefix-caching"))["enable_prefix_caching"] is False  # the older spelling
  assert llm_kwargs(parse("-tp", "4"))["tensor_parallel_size"] == 4
  with pytest.raises(SystemExit):
    parse("--attention-backend", "cuda")


def test_model_positional_or_flag_and_served_names():
  assert model_path(parse("dir/model")) == model_path(parse("--model", "dir/model")) == "dir/model"
  assert model_path(parse("a", "--model", "a")) == "a"
  with pytest.raises(ValueError, match="two models given"):
    model_path(parse("a", "--model", "b"))
  # served under the path as given (vLLM's default), not its basename
  assert served_names(parse("./models/stories/")) == ("./models/stories/",)
  assert served_names(parse()) == ("stories260K",)
  assert served_names(parse("x", "--served-model-name", "a", "b")) == ("a", "b")
