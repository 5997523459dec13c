"""Layer-by-layer pruning of a model: each block sees calibration inputs from the already-pruned blocks before it.

With ``true_sequential`` the linears inside a block are pruned in execution order: q/k/v, then
o (its inputs recomputed with the pruned q/k/v), then gate/up, then down; without it all four
groups see the inputs of one pass over the unpruned block (the reference SparseGPT and Wanda).
Blocks run through the model's public per-block API (:func:`jaxserve.model.embed`,
:func:`jaxserve.model.block_forward` with ``return_linear_inputs``), so the model code is used as is.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

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
def block_pass(block_params: PyTree, x: jax.Array, *, cfg: ModelConfig, layer: int, capture: bool = False
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Runs one decoder block on hidden states ``x`` ``[B, T, hidden]``.

  Returns:
    ``(y, grams)``: the block's output and, with ``capture``, ``{name: X^T X}`` (float32,
    ``[in, in]``) of the inputs of every linear, keyed by the first linear of each group
    sharing an input (``"self_attn/q_proj"``, ``"self_attn/o_proj"``, ``"mlp/gate_proj"``,
    ``"mlp/down_proj"``).
  """
  out = model_lib.block_forward(block_params, cfg, layer, x, return_linear_inputs=capture)
  grams = {}
  for name in (group[0] for group in GROUPS) if capture else ():
    xin = out.linear_inputs[name]
    xin = xin.reshape(-1, xin.shape[-1]).astype(jnp.float32)
    grams[name] = jnp.matmul(xin.T, xin, precision=jax.lax.Precision.HIGHEST)
  return out.hidden, grams


def block_grams(block_params: PyTree, xs: list[jax.Array], *, cfg: ModelConfig, layer: int) -> dict[str, jax.Array]:
  """``{group head: X^T X}`` summed over the batches ``xs`` of block inputs."""
  total: dict[str, jax.Array] = {}
  for x in xs:
    for k, g in block_pass(block_params, x, cfg=cfg, layer=layer, capture=True)[1].items():
      total[k] = total[k] + g if k in total else g
  return total


def embed_inputs(params: PyTree, cfg: ModelConfig, tokens: Any, batch_size: int) -> list[jax.Array]:
  """Hidden states entering block 0 for each batch of calibration token windows."""
  fwd = jax.jit(lambda p, t: model_lib.embed(p, cfg, t))
  return [fwd(params, jnp.asarray(tokens[i:i + batch_size])) for i in range(0, len(tokens), batch_size)]


def prune_sequential(params: PyTree, cfg: ModelConfig, tokens: Any, layer_fn: LayerFn, selected: set[str], *,
                     batch_size: int = 8, true_sequential: bool = True, progress: bool = False,
                     desc: str = "pruning") -> tuple[PyTree, dict]:
  """Applies ``layer_fn`` to every selected block linear, block by block.

  Args:
    params: model parameters.
    cfg: model config.
    tokens: ``[N, T]`` int calibration inputs.
    layer_fn: ``(path, kernel, gram, ntokens) -> (new_kernel, mask)``.
    selected: full paths (``"layers_3/mlp/up_proj/kernel"``) to prune; others stay as they are.
    batch_size: calibration windows per forward pass.
    true_sequential: recompute a block's later inputs after pruning its earlier linears
      (q/k/v, o, gate/up, down: up to four passes); False captures all from one pass.
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
    grams = None
    for group in GROUPS:
      todo = [p for p in group if f"{name}/{p}/kernel" in selected]
      if not todo:
        continue
      if grams is None or true_sequential:
        grams = block_grams(block, xs, cfg=cfg, layer=static_layer)
      for p in todo:
        sub, leaf = p.split("/")
        path = f"{name}/{p}/kernel"
        new, mask = layer_fn(path, block[sub][leaf]["kernel"], grams[group[0]], ntokens)
        block[sub] = {**block[sub], leaf: {**block[sub][leaf], "kernel": new}}
        masks[path] = mask
    params[name] = block
    xs = [block_pass(block, x, cfg=cfg, layer=static_layer)[0] for x in xs]
  return params, masks
