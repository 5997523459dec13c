"""``LLM``: the offline and incremental API of the paged-KV engine (mirrors vLLM's ``LLM``)."""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

from jaxserve import weights
from jaxserve.engine import _compile_cache, _cpu_kernels
from jaxserve.engine._attention import PagedAttention
from jaxserve.engine._engine import EngineCore, EngineStepError, PromptType
from jaxserve.engine._kv_cache_manager import cdiv
from jaxserve.engine._model_runner import ModelRunner, kv_bytes_per_block
from jaxserve.engine._outputs import RequestOutput
from jaxserve.engine._sampling_params import BeamSearchParams, SamplingParams
from jaxserve.engine._weight_forms import SPARSE_MODES, weight_formats
from jaxserve.sharding import check_tensor_parallel, kv_pool_sharding, make_mesh, shard_params
from kernels_pallas import compiled_kernel_supported

_DEFAULT_KV_BYTES = 1 << 30  # default pool cap: 1 GiB


class LLM:
  """A model served with a paged KV cache, continuous batching and chunked prefill.

  Example::

    llm = LLM()  # the embedded stories260K
    out = llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=32))
    print(out[0].outputs[0].text)

  Args:
    model: a path for :func:`jaxserve.loaders.load_model` (None: the embedded stories260K) or a
      ``LoadedModel``.
    block_size: tokens per KV block.
    num_kv_blocks: size of the pool in blocks (one more is reserved as the null block).
    kv_cache_memory_bytes: size of the pool in bytes, if ``num_kv_blocks`` is not given. Default:
      room for ``max_num_seqs`` sequences of ``max_model_len`` tokens, capped at 1 GiB.
    max_num_seqs: sequences batched in one step at most.
    max_num_batched_tokens: tokens (prefill chunks plus decodes) in one step at most.
    max_num_prefill_tokens: prompt tokens one step reads at most (None: up to
      ``max_num_batched_tokens``). A smaller value reads prompts that arrive together one after
      another, so each request's first token comes once its own prompt is read rather than after
      the whole burst's (lower mean time to first token on a server), at some cost in throughput;
      a step's prompt share is cut so that the step, decodes included, fills a compiled step size
      (no padding run). Greedy tokens are the same either way. ``jaxserve serve`` defaults to 128.
    max_model_len: longest sequence (prompt + output); default the model's context.
    dtype: ``"float32"`` or ``"bfloat16"`` (parameters and KV pools) when ``model`` is a path.
    enable_prefix_caching: reuse the KV blocks of earlier requests' identical prefixes.
    seed: seed of requests that carry none.
    attention_backend: ``"auto"`` (Pallas kernels on GPU, XLA elsewhere), ``"xla"`` or ``"pallas"``.
    pallas_interpret: run the Pallas kernels in interpret mode (testing on CPU).
    tensor_parallel_size: devices to shard the model over (Megatron layout; KV pools split by
      KV head); must divide every layer's KV heads. The scheduler and block pool are unchanged.
    sparse_weights: ``"auto"`` (default): Dense kernels that are sparse enough (a pruned model, from
      its compressed checkpoint or from its zeros) run compressed (N:M or bitmask) on the native
      kernels, float32 on the CPU; a kernel whose compressed form would not be at most 0.7x its
      dense bytes stays dense. ``"off"``: every kernel dense (for comparison). Sharded
      (``tensor_parallel_size > 1``), GPU and bfloat16 models run dense.
    compile: ``"eager"`` (default): compile every step program here, before the first request (a
      progress bar counts them: a few dozen, a fixed set that no later request adds to, so the
      first ``generate`` runs at full speed). ``"lazy"``: compile each program when a step first
      needs it (a quick constructor; the first requests wait for compiles).
    compilation_cache: keep compiled programs on disk, so a later process with the same model and
      settings loads them instead of compiling. ``True`` (default): in JAX's cache directory if
      you configured one (``jax_compilation_cache_dir``), else in ``$JAXSERVE_CACHE_DIR/xla``
      (default ``$XDG_CACHE_HOME/jaxserve/xla``, i.e. ``~/.cache/jaxserve/xla``, created private);
      a path: that directory; ``False``: no persistent cache. It is JAX's own cache, switched on
      only around the engine's compiles: your other JAX programs are not cached by it, and your
      JAX settings are left as they were.
    background_compile: with ``compile="lazy"``, when a step needs a program not compiled yet, run
      it padded into a larger compiled one and compile its own on a helper thread (for servers,
      where a synchronous compile stalls every stream). Outputs can differ from a run without it
      by float rounding only.
  """

  def __init__(self, model: Any = None, block_size: int = 16, num_kv_blocks: int | None = None,
               kv_cache_memory_bytes: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
               max_model_len: int | None = None, dtype: str = "float32", enable_prefix_caching: bool = True,
               seed: int = 0, *, max_num_prefill_tokens: int | None = None, attention_backend: str = "auto",
               pallas_interpret: bool | None = None, tensor_parallel_size: int = 1, background_compile: bool = False,
               sparse_weights: str = "auto", compile: str = "eager", compilation_cache: bool | str | os.PathLike = True):
    from jaxserve.loaders import LoadedModel, load_model
    if model is not None and not isinstance(model, (str, os.PathLike, LoadedModel)):
      raise ValueError(f"model must be a path, a LoadedModel or None (the embedded stories260K), got "
                       f"{type(model).__name__}")
    for name, value, lo in (("block_size", block_size, 1), ("max_num_seqs", max_num_seqs, 1),
                            ("max_num_batched_tokens", max_num_batched_tokens, 1)):
      if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
      raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(enable_prefix_caching, bool):
      raise ValueError(f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}")
    if max_num_prefill_tokens is not None and (not isinstance(max_num_prefill_tokens, int) or
                                               not 1 <= max_num_prefill_tokens <= max_num_batched_tokens):
      raise ValueError(f"max_num_prefill_tokens must be None or an int in [1, max_num_batched_tokens="
                       f"{max_num_batched_tokens}], got {max_num_prefill_tokens!r}")
    if attention_backend not in ("auto", "xla", "pallas"):
      raise ValueError(f"attention_backend must be 'auto', 'xla' or 'pallas', got {attention_backend!r}")
    if sparse_weights not in SPARSE_MODES:
      raise ValueError(f"sparse_weights must be one of {SPARSE_MODES}, got {sparse_weights!r}")
    if compile not in ("eager", "lazy"):
      raise ValueError(f"compile must be 'eager' or 'lazy', got {compile!r}")
    cache_dir = _compile_cache.resolve(compilation_cache)
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
      raise ValueError(f"tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
    mesh = make_mesh(tensor_parallel_size) if tensor_parallel_size > 1 else None
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype)
    cfg = loaded.cfg
    params = loaded.params
    if mesh is not None:
      check_tensor_parallel(cfg, tensor_parallel_size)
      if attention_backend == "pallas":
        raise ValueError("attention_backend='pallas' runs on one device; use 'xla' (or 'auto') with "
                         "tensor_parallel_size > 1")
      params = shard_params(weights.densify(params), cfg, mesh)
    self.tokenizer = loaded.tokenizer
    if max_model_len is None:
      max_model_len = cfg.max_position_embeddings
    if not isinstance(max_model_len, int) or not 2 <= max_model_len <= cfg.max_position_embeddings:
      raise ValueError(f"max_model_len must be an int in [2, {cfg.max_position_embeddings}] (the model's "
                       f"context), got {max_model_len!r}")
    per_block = kv_bytes_per_block(cfg, block_size, cfg.dtype)
    if num_kv_blocks is None:
      if kv_cache_memory_bytes is None:
        kv_cache_memory_bytes = min(_DEFAULT_KV_BYTES, max_num_seqs * cdiv(max_model_len, block_size) * per_block)
      if not isinstance(kv_cache_memory_bytes, int) or kv_cache_memory_bytes < 1:
        raise ValueError(f"kv_cache_memory_bytes must be a positive int, got {kv_cache_memory_bytes!r}")
      num_kv_blocks = kv_cache_memory_bytes // per_block
    if not isinstance(num_kv_blocks, int) or num_kv_blocks < cdiv(max_model_len, block_size):
      raise ValueError(f"the KV pool must hold one sequence of max_model_len={max_model_len} tokens: at least "
                       f"{cdiv(max_model_len, block_size)} blocks of {block_size} ({per_block} bytes each), got "
                       f"{num_kv_blocks!r}; raise num_kv_blocks / kv_cache_memory_bytes or lower max_model_len")
    if attention_backend == "auto":
      kernel_ok = (jax.default_backend() == "gpu" and cfg.sliding_window is None and mesh is None
                   and compiled_kernel_supported(head_dim=cfg.head_dim, page_size=block_size))
      attention_backend = "pallas" if kernel_ok else "xla"
    attn = PagedAttention(impl=attention_backend, sliding_window=cfg.sliding_window, interpret=pallas_interpret,
                          cpu_kernel=False if mesh is not None else None)  # a custom call does not shard
    with _compile_cache.scope(cache_dir):  # the runner's own small setup programs are cached too
      runner = ModelRunner(cfg, params, num_blocks=num_kv_blocks + 1, block_size=block_size,
                           max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens, attention=attn,
                           kv_pool_sharding=None if mesh is None else kv_pool_sharding(mesh, attn.kv_layout),
                           background_compile=bool(background_compile), sparse_weights=sparse_weights,
                           compilation_cache=cache_dir)
    del params
    # the runner's (packed or compressed) parameters are the only copy kept
    self.model = loaded._replace(params=runner.params)
    self.engine = EngineCore(cfg, runner, loaded.tokenizer, block_size=block_size, num_blocks=num_kv_blocks + 1,
                             max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching, seed=seed,
                             max_num_prefill_tokens=max_num_prefill_tokens, step_sizes=runner.token_buckets)
    self.max_model_len = max_model_len
    self.attention_backend = attention_backend
    self._ids = itertools.count()
    if compile == "eager":
      runner.compile_all(progress=True)

  # ---- offline API
  def generate(self, prompts: PromptType | Sequence[PromptType],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
               use_tqdm: bool = True) -> list[RequestOutput]:
    """Generates completions for every prompt; returns one ``RequestOutput`` per prompt, in order.

    ``prompts`` is one prompt (a string, ``{"prompt_token_ids": [...]}``, or token ids as a list or a
    1-D array) or a list of them (a 2-D array of token ids is one prompt per row). Every prompt is
    validated before any work starts: a bad one raises ValueError naming its index and the engine
    is left as it was.
    """
    if isinstance(prompts, np.ndarray):  # token ids: [T] is one prompt, [N, T] a batch
      prompts = prompts.tolist()
    if isinstance(prompts, (str, Mapping)) or (isinstance(prompts, Sequence) and prompts and
                                               isinstance(prompts[0], (int, np.integer))):
      prompts = [prompts]
    if not isinstance(prompts, Iterable):
      raise ValueError(f"prompts must be a prompt (a string, {{'prompt_token_ids': [...]}} or a list of token ids) "
                       f"or a list of prompts, got {type(prompts).__name__}")
    prompts = list(prompts)
    if sampling_params is None:
      sampling_params = SamplingParams()
    if isinstance(sampling_params, (SamplingParams, BeamSearchParams)):
      params = [sampling_params] * len(prompts)
    elif isinstance(sampling_params, Sequence) and not isinstance(sampling_params, str):
      params = list(sampling_params)
      if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts; pass one or one per prompt")
    else:
      raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")
    return self._run(prompts, params, use_tqdm)

  def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                  use_tqdm: bool = False) -> list[RequestOutput]:
    """Beam search (vLLM's ``LLM.beam_search``); ``outputs`` holds the beams, best first."""
    if not isinstance(params, BeamSearchParams):
      raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    return self.generate(prompts, params, use_tqdm)

  def _run(self, prompts, params, use_tqdm) -> list[RequestOutput]:
    if self.engine.has_unfinished():
      raise ValueError("generate() needs an idle engine, but requests added with add_request are unfinished")
    reqs = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
      try:
        reqs.append(self.engine.make_request(f"gen-{next(self._ids)}", prompt, p))
      except ValueError as e:
        raise ValueError(f"prompt {i}: {e}") from None
    self.engine.reset_stats()
    for req in reqs:
      self.engine.add(req)
    bar = None
    if use_tqdm:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(reqs), desc="Processed prompts", dynamic_ncols=True)
    try:
      while self.engine.has_unfinished():
        done = sum(r.finished for r in self.engine.step())
        if bar is not None and done:
          bar.update(done)
    except EngineStepError:
      for req in reqs:  # leave the engine idle (and recovered) for the next call
        self.engine.abort(req.request_id)
      raise
    finally:
      if bar is not None:
        bar.close()
    failed = [(i, r.error) for i, r in enumerate(reqs) if r.error is not None]
    if failed:
      raise RuntimeError(f"{len(failed)} of {len(reqs)} prompts failed; prompt {failed[0][0]}: {failed[0][1]}")
    return [self.engine.output(r) for r in reqs]

  # ---- incremental API (the HTTP server's)
  def add_request(self, request_id: str, prompt: PromptType,
                  sampling_params: SamplingParams | BeamSearchParams | None = None) -> None:
    """Queues a request; raises ValueError (and changes nothing) if it is invalid."""
    self.engine.add(self.engine.make_request(request_id, prompt, sampling_params or SamplingParams()))

  def abort_request(self, request_id: str | Sequence[str]) -> None:
    """Stops requests and frees their KV blocks; unknown or finished ids are ignored."""
    ids = [request_id] if isinstance(request_id, str) else request_id
    if not isinstance(ids, Iterable) or isinstance(ids, bytes):
      raise ValueError(f"request_id must be a request id string or a list of them, got {type(request_id).__name__}")
    for rid in ids:
      self.engine.abort(rid)

  def step(self) -> list[RequestOutput]:
    """Runs one engine step; returns the cumulative output of every request that progressed
    (``finished=True`` for the last time a request appears; a request the engine failed alone
    ends with ``finish_reason="error"`` and ``error`` set). Raises :class:`EngineStepError` when
    the device step failed: its requests failed, the engine has recovered and the next step runs."""
    return [self.engine.output(r) for r in self.engine.step()]

  def has_unfinished_requests(self) -> bool:
    return self.engine.has_unfinished()

  def get_num_unfinished_requests(self) -> int:
    return len(self.engine.scheduler.requests)

  # ---- introspection
  def stats(self) -> dict[str, Any]:
    """Engine statistics: the KV pool now, and since the last ``generate`` call (or ``reset_stats``):
    ``kv_waste_fraction`` (allocated slots not holding a token over allocated slots, summed over
    the steps), ``kv_waste_floor_fraction`` (the same with only blocks holding a token counted: the
    partial last blocks' share, the least a block-granular cache can waste), ``num_preemptions``,
    ``prefix_cache_hit_rate`` (prompt tokens served from the cache over prompt tokens looked up) and more; ``num_compiled_programs`` counts jit programs;
    ``weight_bytes`` is the parameters' size as held (compressed kernels count their compressed
    bytes) and ``weight_formats`` counts the Dense kernels run in each form. ``cpu_kernels`` says
    which C++ CPU kernel paths run: ``used`` (this engine's steps run attention and every Dense on
    them) and, on a CPU backend, ``_cpu_kernels.info()``: ``available``, ``isa``, ``bf16_matmul``
    (``"amx"``, ``"avx512_bf16"`` or ``"widen"``) and ``error`` (why the library did not load)."""
    runner = self.engine.runner
    return {**self.engine.stats(), "weight_bytes": weights.nbytes(runner.params),
            "weight_formats": weight_formats(runner.params), "cpu_kernels": self._cpu_kernel_stats()}

  def _cpu_kernel_stats(self) -> dict[str, Any]:
    # off a CPU backend the kernels were never loaded: asking would build them for nothing
    info = _cpu_kernels.info() if jax.default_backend() == "cpu" else {}
    return {"used": self.engine.runner.uses_cpu_kernels, **info}

  def reset_stats(self) -> None:
    self.engine.reset_stats()

  def warmup(self, max_num_seqs: int | None = None, mixed: bool = False) -> int:
    """Compiles every step program not compiled yet (what ``compile="eager"`` does in the
    constructor); returns how many it compiled (0 after an eager construction).

    ``max_num_seqs`` and ``mixed`` are accepted for compatibility: the program set is fixed by the
    engine's settings, and all of it is compiled.
    """
    if max_num_seqs is not None and (not isinstance(max_num_seqs, int) or max_num_seqs < 1):
      raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
    del mixed
    return self.engine.runner.compile_all()

  def reset_prefix_cache(self) -> None:
    """Forgets every cached prefix (the blocks stay free); e.g. between a warm-up and a timed run."""
    self.engine.kv_manager.pool.reset_prefix_cache()

  def get_tokenizer(self):
    return self.tokenizer
