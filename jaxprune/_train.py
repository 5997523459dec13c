"""The one training loop: any optax transformation applied to the trainable part of a parameter pytree.

Masked recovery fine-tuning (:func:`jaxprune.finetune`) and LoRA recovery
(:func:`jaxprune.structured.finetune_lora`) are two uses of :func:`train`: they differ in the
loss, the trainable filter and the transformation (``optax.chain(..., prune_updates(masks))``
keeps pruned weights at zero), not in the loop.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxprune._tree import map_with_path
from jaxprune._validate import check_int, check_real

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]  # (params, batch) -> scalar


class TrainResult(NamedTuple):
  params: PyTree  # the whole parameter pytree after training (frozen leaves unchanged)
  losses: np.ndarray  # [steps] float32 training loss of each step


def default_optimizer(learning_rate: float | optax.Schedule, steps: int, *, warmup_steps: int = 0,
                      weight_decay: float = 0.0, grad_clip: float | None = 1.0) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on a cosine schedule to 0 (with optional linear warmup).

  Args:
    learning_rate: the peak rate, or an optax schedule ``step -> rate`` used as it is.
    steps: the schedule's length.
    warmup_steps: linear warmup from 0 (ignored for a schedule).
    weight_decay: AdamW's decoupled weight decay.
    grad_clip: the global-norm bound, or None for no clipping.
  """
  check_int("steps", steps, 1)
  check_int("warmup_steps", warmup_steps, 0, steps - 1)
  if not callable(learning_rate):
    check_real("learning_rate", learning_rate, 0.0, open_lo=True)
  check_real("weight_decay", weight_decay, 0.0)
  if grad_clip is not None:
    check_real("grad_clip", grad_clip, 0.0, open_lo=True)
  if callable(learning_rate):
    lr = learning_rate
  elif warmup_steps:
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, steps)
  else:
    lr = optax.cosine_decay_schedule(learning_rate, steps)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip is not None else []
  return optax.chain(*parts, optax.adamw(lr, weight_decay=weight_decay))


def split(params: PyTree, trainable: Callable[[str], bool] | None) -> tuple[PyTree, PyTree]:
  """``(trainable part, frozen part)``: two trees like ``params`` with None at the other part's leaves."""
  if trainable is None:
    return params, map_with_path(lambda p, x: None, params)
  return (map_with_path(lambda p, x: x if trainable(p) else None, params),
          map_with_path(lambda p, x: None if trainable(p) else x, params))


def merge(trained: PyTree, frozen: PyTree) -> PyTree:
  """The inverse of :func:`split`."""
  return jax.tree.map(lambda a, b: b if a is None else a, trained, frozen, is_leaf=lambda x: x is None)


@functools.partial(jax.jit, static_argnames=("loss_fn", "update"), donate_argnums=(0, 1))
def train_step(trained: PyTree, opt_state: Any, frozen: PyTree, batch: Any, *, loss_fn: LossFn,
               update: optax.TransformUpdateFn) -> tuple[PyTree, Any, jax.Array]:
  """One optimizer step on the mean loss of a batch split into micro-batches.

  Args:
    trained: the trainable part (:func:`split`); donated.
    opt_state: the transformation's state; donated.
    frozen: the rest of the parameters (constants of the loss, not differentiated).
    batch: a pytree whose leaves have a leading micro-batch axis ``[micro_steps, ...]``;
      gradients are averaged over the micro-batches inside one ``scan`` (memory holds one).
    loss_fn: ``(params, micro_batch) -> scalar`` on the merged parameters (static).
    update: the transformation's ``update`` (static: the step compiles once per pair).

  Returns:
    ``(trained, opt_state, loss)``.
  """
  grad_fn = jax.value_and_grad(lambda tr, mb: loss_fn(merge(tr, frozen), mb))
  n = jax.tree.leaves(batch)[0].shape[0]
  if n == 1:
    loss, grads = grad_fn(trained, jax.tree.map(lambda x: x[0], batch))
  else:
    def accumulate(carry, mb):
      return jax.tree.map(jnp.add, carry, grad_fn(trained, mb)), None
    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trained))
    (loss, grads), _ = jax.lax.scan(accumulate, zero, batch)
    loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
  # optax's own transformations are not strict-promotion clean (Adam's bias correction computes
  # ``decay ** count`` with an int32 count), so the update traces under standard promotion: a caller
  # running with ``jax_numpy_dtype_promotion="strict"`` can still pass any optax ``tx``. The context
  # manager is thread-local and scoped to this trace; the loss and gradients above stay strict.
  with jax.numpy_dtype_promotion("standard"):
    updates, opt_state = update(grads, opt_state, trained)
  return optax.apply_updates(trained, updates), opt_state, loss


def train(params: PyTree, loss_fn: LossFn, batch_fn: Callable[[int], Any], steps: int, *,
          tx: optax.GradientTransformation | None = None, trainable: Callable[[str], bool] | None = None,
          learning_rate: float | optax.Schedule = 1e-3, progress: bool = False, desc: str = "train",
          callback: Callable[[int, float], None] | None = None) -> TrainResult:
  """Minimizes ``loss_fn`` over the trainable leaves of ``params`` for ``steps`` steps.

  Args:
    params: the parameter pytree.
    loss_fn: ``(params, micro_batch) -> scalar``; pass the same object across calls (and the same
      ``tx.update``) to reuse the compiled step.
    batch_fn: ``step -> batch``, each leaf ``[micro_steps, ...]`` (see :func:`train_step`).
    steps: number of optimizer steps (>= 1).
    tx: the optax transformation; default :func:`default_optimizer` (AdamW + cosine) at ``learning_rate``.
    trainable: ``path -> bool`` over leaf paths (``"layers_0/mlp/up_proj/kernel"``); default every leaf.
      The others are constants: no gradient, no optimizer state.
    learning_rate: the default optimizer's peak rate or schedule (ignored with ``tx``).
    progress: show a progress bar with the running loss.
    desc: the progress bar's label.
    callback: called as ``callback(step, loss)`` after each step.

  Returns:
    ``TrainResult(params, losses)``.
  """
  check_int("steps", steps, 1)
  tx = tx or default_optimizer(learning_rate, steps)
  trained, frozen = split(params, trainable)
  if not jax.tree.leaves(trained):
    raise ValueError("the trainable filter selects no parameter")
  trained = jax.tree.map(jnp.array, trained)  # private copies: the step donates its buffers
  opt_state = jax.tree.map(jnp.array, tx.init(trained))
  losses = np.zeros(int(steps), np.float32)
  with tqdm(total=int(steps), desc=desc, disable=not progress) as bar:
    for t in range(int(steps)):
      batch = jax.tree.map(jnp.asarray, batch_fn(t))
      trained, opt_state, loss = train_step(trained, opt_state, frozen, batch, loss_fn=loss_fn, update=tx.update)
      losses[t] = float(loss)
      if callback is not None:
        callback(t, float(losses[t]))
      bar.update(1)
      if t % 20 == 0:
        bar.set_postfix(loss=f"{losses[t]:.3f}")
  return TrainResult(merge(trained, frozen), losses)
