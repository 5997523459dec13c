"""Layer-by-layer pruning of a model: each block sees calibration inputs from the already-pruned blocks before it.

Inside a block the linears are pruned in execution order ("true sequential"): q/k/v, then
o (its inputs recomputed with the pruned q/k/v), then gate/up, then down. Their inputs are
captured by intercepting the model's ``nn.Dense`` calls, so the model code is used as is.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxserve import model as model_lib
from jaxserve.config import ModelConfig

PyTree = Any
# (path inside a block, sharing one input) in execution order.
GROUPS = (("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), ("self_attn/o_proj",),
          ("mlp/gate_proj", "mlp/up_proj"), ("mlp/down_proj",))
BLOCK_LINEARS = tuple(name for group in GROUPS for name in group)
# (path, kernel [in, out], gram [in, in] = X^T X, tokens) -> (new kernel, mask)
LayerFn = Callable[[str, jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]]


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "capture"))
def block_forward(block_params: PyTree, x: jax.Array, *, cfg: ModelConfig, layer: int, capture: str | None = None
                  ) -> tuple[jax.Array, jax.Array | None]:
  """Runs one decoder block on hidden states ``x`` ``[B, T, hidden]``.

  Returns:
    ``(y, gram)``: the block's output and, when ``capture`` names one of its linears
    (``"mlp/up_proj"``), the float32 ``X^T X`` ``[in, in]`` of that linear's inputs.
  """
  grams = {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if capture and context.method_name == "__call__" and isinstance(mod, nn.Dense):
      if "/".join(mod.path[-2:]) == capture:
        xin = args[0].reshape(-1, args[0].shape[-1]).astype(jnp.float32)
        grams["g"] = jnp.matmul(xin.T, xin, precision=jax.lax.Precision.HIGHEST)
    return next_fun(*args, **kwargs)

  b, t, _ = x.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = model_lib._rope_tables(cfg, positions)
  block = model_lib.Block(cfg, layer, model_lib.default_attention(cfg))
  with nn.intercept_methods(interceptor):
    y, _ = block.apply({"params": block_params}, x, cos, sin, None, {"positions": positions})
  if capture and "g" not in grams:
    raise ValueError(f"block {layer} has no linear {capture!r}")
  return y, grams.get("g")


def embed_inputs(params: PyTree, cfg: ModelConfig, tokens: Any, batch_size: int) -> list[jax.Array]:
  """Hidden states entering block 0 for each batch of calibration token windows."""
  fwd = jax.jit(lambda p, t: model_lib.forward(p, cfg, t, return_layer_inputs=True).layer_inputs[0])
  return [fwd(params, jnp.asarray(tokens[i:i + batch_size])) for i in range(0, len(tokens), batch_size)]


def prune_sequential(params: PyTree, cfg: ModelConfig, tokens: Any, layer_fn: LayerFn, selected: set[str], *,
                     batch_size: int = 8, progress: bool = False, desc: str = "pruning") -> tuple[PyTree, dict]:
  """Applies ``layer_fn`` to every selected block linear, block by block.

  Args:
    params: model parameters.
    cfg: model config.
    tokens: ``[N, T]`` int calibration inputs.
    layer_fn: ``(path, kernel, gram, ntokens) -> (new_kernel, mask)``.
    selected: full paths (``"layers_3/mlp/up_proj/kernel"``) to prune; others stay as they are.
    batch_size: calibration windows per forward pass.
    progress: show a progress bar over blocks.

  Returns:
    ``(new_params, {path: mask})``.
  """
  xs = embed_inputs(params, cfg, tokens, batch_size)
  ntokens = int(sum(x.shape[0] * x.shape[1] for x in xs))
  params = dict(params)
  masks: dict[str, jax.Array] = {}
  for i in tqdm(range(cfg.num_layers), desc=desc, disable=not progress):
    name = f"layers_{i}"
    block = jax.tree.map(lambda a: a, params[name])
    static_layer = 0 if cfg.is_uniform else i  # one compilation serves all blocks of a uniform model
    for group in GROUPS:
      todo = [p for p in group if f"{name}/{p}/kernel" in selected]
      if not todo:
        continue
      gram = None
      for x in xs:
        g = block_forward(block, x, cfg=cfg, layer=static_layer, capture=todo[0])[1]
        gram = g if gram is None else gram + g
      for p in todo:
        sub, leaf = p.split("/")
        path = f"{name}/{p}/kernel"
        new, mask = layer_fn(path, block[sub][leaf]["kernel"], gram, ntokens)
        block[sub] = {**block[sub], leaf: {**block[sub][leaf], "kernel": new}}
        masks[path] = mask
    params[name] = block
    xs = [block_forward(block, x, cfg=cfg, layer=static_layer)[0] for x in xs]
  return params, masks
