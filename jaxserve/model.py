"""Flax LLaMA-family decoder (LLaMA, Mistral, Qwen2) with pluggable attention backends.

The parameters are a plain nested dict (Flax linen names mirroring Hugging Face):
``params['layers_0']['self_attn']['q_proj']['kernel']`` has shape ``[hidden, heads * head_dim]``
(kernels are ``(in, out)``). A block may also hold its projections joined, ``self_attn/qkv_proj``
(``[hidden, (heads + 2 * kv_heads) * head_dim]``, q then k then v) and ``mlp/gate_up_proj`` (gate then
up), as the engine runs them on its CPU kernels. ``forward`` runs the whole stack; ``embed``, ``block_forward`` and
``head`` run its three parts one at a time (``head(block_forward(...embed(tokens)...))`` equals
``forward``'s logits), for tools that work block by block such as pruning. The attention backend decides
whether keys and values come from the current tokens only (``CausalAttention``), from a
contiguous per-sequence cache (``ContiguousKVCache``) or from a paged pool (``jaxserve.engine``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxserve import weights
from jaxserve.config import ModelConfig

Array = jax.Array
Params = dict[str, Any]
_MASK_VALUE = -1e30


class AttentionBackend(Protocol):
  """Per-layer attention: ``(layer, q, k, v, layer_kv, meta) -> (out, new_layer_kv)``.

  Shapes: q ``[B, T, H, D]``, k and v ``[B, T, KVH, D]`` (q and k already rotated);
  out ``[B, T, H, D]``. Implementations are hashable (static under ``jit``) and apply
  the ``1/sqrt(D)`` softmax scale themselves. One whose result does not depend on ``layer``
  (beyond the arrays it is given) may say so with a true class attribute ``layer_independent``:
  ``forward(..., jit_blocks=True)`` then shares one trace among the layers of the same shape.
  """

  def __call__(self, layer: int, q: Array, k: Array, v: Array, layer_kv: Any, meta: Any) -> tuple[Array, Any]:
    ...


class ModelOutput(NamedTuple):
  logits: Array  # [B, T or K, V] float32
  kv: list[Any] | None  # one entry per layer, as the backend keeps it
  layer_inputs: list[Array] | None  # hidden states entering each block, [B, T, hidden]


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Grouped-query softmax attention, the specification every backend must match.

  Args:
    q: ``[B, T, H, D]`` queries.
    k: ``[B, S, KVH, D]`` keys; query head ``h`` reads KV head ``h // (H // KVH)``.
    v: ``[B, S, KVH, D]`` values.
    mask: ``[B, T, S]`` bool, True where query ``t`` may attend to key ``s``.

  Returns:
    ``[B, T, H, D]`` in q's dtype; scores and softmax are computed in float32.
  """
  b, t, h, d = q.shape
  kvh = k.shape[2]
  qg = q.reshape(b, t, kvh, h // kvh, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
  if v.dtype == jnp.float32:
    out = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(scores, axis=-1), v, preferred_element_type=jnp.float32)
  else:  # PyTorch's rounding (its CPU SDPA): unnormalized weights in v's dtype, divided by their float32 sum last
    unnormalized = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    total = jnp.transpose(unnormalized.sum(axis=-1), (0, 3, 1, 2))[..., None]  # [B, T, KVH, G, 1]
    out = jnp.einsum("bkgts,bskd->btkgd", unnormalized.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
  return out.reshape(b, t, h, d).astype(q.dtype)


def _window_mask(q_pos: Array, k_pos: Array, sliding_window: int | None) -> Array:
  """[B, T, S] causal (and sliding-window) mask from query and key positions."""
  mask = k_pos[:, None, :] <= q_pos[:, :, None]
  if sliding_window is not None:
    mask &= k_pos[:, None, :] > q_pos[:, :, None] - sliding_window
  return mask


@dataclasses.dataclass(frozen=True)
class CausalAttention:
  """Full causal attention over the current tokens; keeps no cache (``layer_kv`` stays None).

  ``meta`` may be None or a dict with ``positions`` ``[B, T]`` (absolute positions; the
  mask is ``k_pos <= q_pos``) so that right-padded batches stay exact.
  """

  layer_independent: ClassVar[bool] = True  # see AttentionBackend
  sliding_window: int | None = None

  def __call__(self, layer, q, k, v, layer_kv, meta):
    del layer
    b, t = q.shape[:2]
    pos = meta["positions"] if meta else jnp.broadcast_to(jnp.arange(t), (b, t))
    return dot_product_attention(q, k, v, _window_mask(pos, pos, self.sliding_window)), layer_kv


@dataclasses.dataclass(frozen=True)
class ContiguousKVCache:
  """A cache reserved per sequence: ``layer_kv = (k [B, S, KVH, D], v [B, S, KVH, D])``.

  New keys and values are written at their absolute positions (``meta['positions']``,
  ``[B, T]``); a query at position p attends to cache slots ``0..p``. Right-padded
  prompts are exact: stale slots past a sequence's position are masked and overwritten.
  """

  layer_independent: ClassVar[bool] = True  # see AttentionBackend
  sliding_window: int | None = None

  def __call__(self, layer, q, k, v, layer_kv, meta):
    del layer
    k_cache, v_cache = layer_kv
    pos = meta["positions"]
    rows = jnp.arange(q.shape[0])[:, None]
    k_cache = k_cache.at[rows, pos].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows, pos].set(v.astype(v_cache.dtype), mode="drop")
    k_pos = jnp.broadcast_to(jnp.arange(k_cache.shape[1]), (q.shape[0], k_cache.shape[1]))
    out = dot_product_attention(q, k_cache, v_cache, _window_mask(pos, k_pos, self.sliding_window))
    return out, (k_cache, v_cache)

  @staticmethod
  def init(cfg: ModelConfig, batch: int, max_len: int) -> list[tuple[Array, Array]]:
    """Zeroed cache for ``batch`` sequences of up to ``max_len`` tokens."""
    dtype = jnp.dtype(cfg.dtype)
    shape = lambda i: (batch, max_len, cfg.kv_heads(i), cfg.head_dim)
    return [(jnp.zeros(shape(i), dtype), jnp.zeros(shape(i), dtype)) for i in range(cfg.num_layers)]


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse frequencies of the rotary embedding, with ``linear`` or ``llama3`` scaling."""
  d = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  scaling = cfg.rope_scaling_dict
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = jnp.where(medium, smoothed, scaled)
  return inv_freq


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
  """cos and sin tables ``[B, T, 1, D]`` (rotate-half convention), float32."""
  freqs = positions[:, :, None].astype(jnp.float32) * rope_inv_freq(cfg)[None, None, :]  # [B, T, D/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  tables = lambda e: (jnp.cos(e), jnp.sin(e))
  # On the CPU, computed once per call under a conditional (whose branches XLA cannot fuse into
  # their users): left to itself, XLA's CPU compiler fused cos and sin into every layer's rotation
  # of q and of k and called libm's sincosf for each of their elements (the serving benchmark's
  # float32 decode of 64 rows: 1.7 of 32 ms per step, then 0.2). Elsewhere recomputing is cheap.
  on_cpu = lambda e: jax.lax.cond(jnp.any(jnp.isnan(e)), tables, tables, e)
  return jax.lax.platform_dependent(emb, cpu=on_cpu, default=tables)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32, scaled in the parameter dtype (as Hugging Face does)."""

  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale.reshape((1,) * (x.ndim - 1) + (-1,)) * xf.astype(self.dtype)  # [1.., D]: no rank promotion


class Linear(nn.Module):
  """``x @ kernel (+ bias)``, Flax ``Dense``'s parameters and initializers, for any kernel type.

  The kernel is a ``[in, out]`` array or a typed leaf of :mod:`jaxserve.weights` (packed, N:M,
  bitmask); :func:`jaxserve.weights.matmul` dispatches on its type.
  """

  features: int
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, rows=None):
    self.sow("intermediates", "inputs", x)  # a no-op unless "intermediates" is mutable (block_forward)
    if self.has_variable("params", "kernel"):  # a typed leaf is not an array: no shape check against init
      kernel = self.get_variable("params", "kernel")
    else:
      kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.dtype)
    y = weights.matmul(x, kernel, self.dtype, rows=rows)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.dtype).astype(self.dtype)
      y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))  # as Flax Dense does: no rank promotion
    return y


def _dense(features: int, name: str, dtype: Any, bias: bool = False) -> Linear:
  return Linear(features, use_bias=bias, dtype=dtype, name=name)


class Attention(nn.Module):
  cfg: ModelConfig
  layer: int
  attn: AttentionBackend

  @nn.compact
  def __call__(self, x, cos, sin, layer_kv, meta, rows=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    h, kvh, d = cfg.heads(self.layer), cfg.kv_heads(self.layer), cfg.head_dim
    b, t, _ = x.shape
    if self.has_variable("params", "qkv_proj"):  # the three joined (the engine's native kernels: one matmul)
      qkv = _dense((h + 2 * kvh) * d, "qkv_proj", dtype, cfg.attention_bias)(x, rows)
      q, k, v = jnp.split(qkv, [h * d, (h + kvh) * d], axis=-1)
    else:
      q = _dense(h * d, "q_proj", dtype, cfg.attention_bias)(x, rows)
      k = _dense(kvh * d, "k_proj", dtype, cfg.attention_bias)(x, rows)
      v = _dense(kvh * d, "v_proj", dtype, cfg.attention_bias)(x, rows)
    q, k, v = q.reshape(b, t, h, d), k.reshape(b, t, kvh, d), v.reshape(b, t, kvh, d)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    out, layer_kv = self.attn(self.layer, q, k, v, layer_kv, meta)
    out = _dense(cfg.hidden_size, "o_proj", dtype, cfg.attention_out_bias)(out.reshape(b, t, h * d), rows)
    return out, layer_kv


def _silu(x: Array) -> Array:
  """SiLU computed in float32 and rounded once to x's dtype, as PyTorch does for bfloat16.

  ``jax.nn.silu`` on bfloat16 rounds the sigmoid before the product: about 40% of its results
  differed from PyTorch's by a unit. For float32 this is ``jax.nn.silu`` exactly.
  """
  xf = x.astype(jnp.float32)
  return (xf * jax.nn.sigmoid(xf)).astype(x.dtype)


class MLP(nn.Module):
  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x, rows=None):
    dtype, f = jnp.dtype(self.cfg.dtype), self.cfg.ffn(self.layer)
    if self.has_variable("params", "gate_up_proj"):  # joined, as for Attention's qkv_proj
      gate, up = jnp.split(_dense(2 * f, "gate_up_proj", dtype)(x, rows), [f], axis=-1)
    else:
      gate = _dense(f, "gate_proj", dtype)(x, rows)
      up = _dense(f, "up_proj", dtype)(x, rows)
    return _dense(self.cfg.hidden_size, "down_proj", dtype)(_silu(gate) * up, rows)


class Block(nn.Module):
  cfg: ModelConfig
  layer: int
  attn: AttentionBackend

  @nn.compact
  def __call__(self, x, cos, sin, layer_kv, meta, rows=None):
    dtype = jnp.dtype(self.cfg.dtype)
    h, layer_kv = Attention(self.cfg, self.layer, self.attn, name="self_attn")(
        RMSNorm(self.cfg.rms_norm_eps, dtype, name="input_layernorm")(x), cos, sin, layer_kv, meta, rows)
    x = x + h
    x = x + MLP(self.cfg, self.layer, name="mlp")(
        RMSNorm(self.cfg.rms_norm_eps, dtype, name="post_attention_layernorm")(x), rows)
    return x, layer_kv


def _first_layer_like(cfg: ModelConfig, i: int) -> int:
  """The first layer with layer ``i``'s heads, KV heads and MLP size (a block's trace depends on nothing else)."""
  shape = lambda j: (cfg.heads(j), cfg.kv_heads(j), cfg.ffn(j))
  return next(j for j in range(i + 1) if shape(j) == shape(i))


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "attn"))
def _jitted_block(block_params, x, cos, sin, layer_kv, meta, rows, *, cfg, layer, attn):
  return Block(cfg, layer, attn).apply({"params": block_params}, x, cos, sin, layer_kv, meta, rows)


class Llama(nn.Module):
  """The decoder stack. Use :func:`forward` rather than calling ``apply`` directly.

  ``jit_blocks``: each block runs as a nested ``jax.jit`` of its own (XLA inlines the calls: the compiled
  program is the same), traced once per distinct block shape instead of once per layer when the attention
  backend is ``layer_independent`` (see :class:`AttentionBackend`; else once per layer, each block given its
  own layer). The engine traces a step program per token bucket: the serving benchmark's 9 were traced and
  lowered in 0.84 s instead of 1.37 s (one run each, loaded machine).
  """

  cfg: ModelConfig
  attn: AttentionBackend
  jit_blocks: bool = False

  @nn.compact
  def __call__(self, tokens, positions, kv=None, meta=None, logits_index=None, return_layer_inputs=False,
               layers=None, rows=None, logits_rows=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, name="embed_tokens")
    x = embed(tokens)
    cos, sin = rope_tables(cfg, positions)
    new_kv, layer_inputs = [], []
    jit_blocks = self.jit_blocks and not self.is_initializing()
    for i in range(cfg.num_layers):
      if return_layer_inputs:
        layer_inputs.append(x)
      layer_kv = None if kv is None else kv[i]
      if jit_blocks:  # traced once per distinct block shape where the backend cannot tell the layers apart
        layer = _first_layer_like(cfg, i) if getattr(self.attn, "layer_independent", False) else i
        x, layer_kv = _jitted_block(self.variables["params"][f"layers_{i}"], x, cos, sin, layer_kv, meta, rows,
                                    cfg=cfg, layer=layer, attn=self.attn)
      else:
        x, layer_kv = Block(cfg, i, self.attn, name=f"layers_{i}")(x, cos, sin, layer_kv, meta, rows)
      new_kv.append(layer_kv)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index[..., None], axis=1)
    x = RMSNorm(cfg.rms_norm_eps, dtype, name="norm")(x)
    logits = (embed.attend(x) if cfg.tie_word_embeddings
              else _dense(cfg.vocab_size, "lm_head", dtype)(x, rows if logits_index is None else logits_rows))
    return ModelOutput(logits.astype(jnp.float32), new_kv if kv is not None else None,
                       layer_inputs if return_layer_inputs else None)


def default_attention(cfg: ModelConfig) -> CausalAttention:
  return CausalAttention(sliding_window=cfg.sliding_window)


def forward(params: Params, cfg: ModelConfig, tokens: Array, positions: Array | None = None, *,
            kv: list[Any] | None = None, attn: AttentionBackend | None = None, meta: Any = None,
            logits_index: Array | None = None, return_layer_inputs: bool = False, rows: Array | None = None,
            logits_rows: Array | None = None, jit_blocks: bool = False) -> ModelOutput:
  """Runs the model.

  Args:
    params: the parameter pytree (see module docstring).
    cfg: the model's configuration.
    tokens: ``[B, T]`` int32 token ids.
    positions: ``[B, T]`` int32 absolute positions; default ``arange(T)`` for every row.
    kv: per-layer cache state for ``attn`` (None for the cache-free causal backend).
    attn: attention backend; default :class:`CausalAttention` with the config's sliding window.
    meta: backend-specific metadata (arrays), passed to every layer.
    logits_index: optional ``[B, K]`` indices into T: logits only at those positions.
    return_layer_inputs: also return the hidden states entering each block.
    rows: optional int32 scalar: only the first ``rows`` of the ``B * T`` token rows are real (the
      rest pad the batch to a compiled size); the matmuls of native weight kernels then skip the
      others, whose outputs are unspecified. None: every row is computed.
    logits_rows: the same for the ``B * K`` rows picked by ``logits_index``.
    jit_blocks: trace one block per distinct block shape (see :class:`Llama`); the same results.

  Returns:
    ``ModelOutput(logits, kv, layer_inputs)``.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  attn = attn or default_attention(cfg)
  if meta is None:
    meta = {"positions": positions}
  return Llama(cfg, attn, jit_blocks).apply({"params": params}, tokens, positions, kv, meta, logits_index,
                                            return_layer_inputs, rows=rows, logits_rows=logits_rows)


class BlockOutput(NamedTuple):
  hidden: Array  # [B, T, hidden] the block's output
  kv: Any  # the layer's new cache state, as the backend keeps it (None for CausalAttention)
  linear_inputs: dict[str, Array] | None  # {"self_attn/q_proj": x [B, T, in], ...}, with return_linear_inputs


def _positions(tokens_or_x: Array, positions: Array | None) -> Array:
  b, t = tokens_or_x.shape[:2]
  if positions is None:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return jnp.asarray(positions, jnp.int32)


def embed(params: Params, cfg: ModelConfig, tokens: Array) -> Array:
  """Hidden states entering block 0: the token embeddings ``[B, T, hidden]`` in ``cfg.dtype``.

  Args:
    params: the whole parameter pytree (only ``embed_tokens`` is read).
    cfg: the model's configuration.
    tokens: ``[B, T]`` int token ids.
  """
  dtype = jnp.dtype(cfg.dtype)
  module = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype)
  return module.apply({"params": params["embed_tokens"]}, jnp.asarray(tokens, jnp.int32))


def block_forward(block_params: Params, cfg: ModelConfig, layer: int, x: Array, positions: Array | None = None, *,
                  attn: AttentionBackend | None = None, layer_kv: Any = None, meta: Any = None,
                  return_linear_inputs: bool = False) -> BlockOutput:
  """Runs decoder block ``layer`` on hidden states, as :func:`forward` does inside the stack.

  Args:
    block_params: the block's parameters, ``params[f"layers_{layer}"]``.
    cfg: the model's configuration.
    layer: the block's index (its head counts and MLP size when the model is not uniform).
    x: ``[B, T, hidden]`` hidden states entering the block.
    positions: ``[B, T]`` int32 absolute positions; default ``arange(T)`` for every row.
    attn: attention backend; default :class:`CausalAttention` with the config's sliding window.
    layer_kv: this layer's cache state for ``attn`` (None for the cache-free causal backend).
    meta: backend metadata; default ``{"positions": positions}``.
    return_linear_inputs: also return the input of every linear layer of the block, keyed by
      its path inside the block (``"self_attn/q_proj"``, ..., ``"mlp/down_proj"``).

  Returns:
    ``BlockOutput(hidden, kv, linear_inputs)``.
  """
  positions = _positions(x, positions)
  cos, sin = rope_tables(cfg, positions)
  meta = {"positions": positions} if meta is None else meta
  block = Block(cfg, layer, attn or default_attention(cfg))
  if not return_linear_inputs:
    y, new_kv = block.apply({"params": block_params}, x, cos, sin, layer_kv, meta)
    return BlockOutput(y, new_kv, None)
  (y, new_kv), state = block.apply({"params": block_params}, x, cos, sin, layer_kv, meta, mutable=["intermediates"])
  flat = jax.tree_util.tree_flatten_with_path(state["intermediates"], is_leaf=lambda v: isinstance(v, tuple))[0]
  inputs = {weights.path_name(path[:-1]): value[0] for path, value in flat}
  return BlockOutput(y, new_kv, inputs)


def head(params: Params, cfg: ModelConfig, x: Array) -> Array:
  """Logits ``[B, T, V]`` (float32) of the hidden states leaving the last block: final norm, then LM head.

  Args:
    params: the whole parameter pytree (reads ``norm`` and ``lm_head``, or ``embed_tokens`` when tied).
    cfg: the model's configuration.
    x: ``[B, T, hidden]`` hidden states.
  """
  dtype = jnp.dtype(cfg.dtype)
  x = RMSNorm(cfg.rms_norm_eps, dtype).apply({"params": params["norm"]}, x)
  if cfg.tie_word_embeddings:
    module = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype)
    logits = module.apply({"params": params["embed_tokens"]}, x, method=nn.Embed.attend)
  else:
    logits = Linear(cfg.vocab_size, dtype=dtype).apply({"params": params["lm_head"]}, x)
  return logits.astype(jnp.float32)


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
  """Random parameters (Flax default initializers; norms at one)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Llama(cfg, default_attention(cfg)).init(jax.random.PRNGKey(seed), tokens, tokens)
  return jax.tree.map(lambda x: x, dict(variables["params"]))


def param_shapes(cfg: ModelConfig) -> Params:
  """``jax.ShapeDtypeStruct`` pytree of the parameters ``cfg`` implies, without allocating them.

  Traces the model's ``init`` once per distinct layer shape (heads, KV heads, MLP size) on a one-layer
  model, not once for the whole stack: a loader checks every checkpoint against this, and tracing all
  layers of a model was a quarter of a warm engine start. Cached per config (a fresh tree each call).
  """
  return jax.tree.map(lambda s: s, _param_shapes(cfg))


@functools.lru_cache(maxsize=32)
def _param_shapes(cfg: ModelConfig) -> Params:
  layers, top = {}, None
  for i in range(cfg.num_layers):
    shape = (cfg.heads(i), cfg.kv_heads(i), cfg.ffn(i))
    if shape not in layers:
      one = cfg.replace(num_layers=1, num_heads=shape[0], num_kv_heads=shape[1], intermediate_size=shape[2],
                        layer_num_heads=None, layer_num_kv_heads=None, layer_intermediate_size=None)
      tree = jax.eval_shape(lambda one=one: init_params(one))
      layers[shape] = tree.pop("layers_0")
      top = top or tree
  out = dict(top or jax.eval_shape(lambda: init_params(cfg)))
  for i in range(cfg.num_layers):
    out[f"layers_{i}"] = layers[(cfg.heads(i), cfg.kv_heads(i), cfg.ffn(i))]
  return out
