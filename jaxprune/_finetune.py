"""Masked recovery fine-tuning of a pruned model on text: the trainer with the masks held fixed (or distillation)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune._data import Windows, loss_fn_for, next_token_nll, sample_windows
from jaxprune._masks import apply_masks
from jaxprune._optax import prune_updates
from jaxprune._train import TrainResult, default_optimizer, train
from jaxprune._validate import check_int, check_real, check_token_ids
from jaxserve.config import ModelConfig
from jaxserve.model import forward

PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
  """Recovery fine-tuning settings (defaults: 600 steps of 16 x 128 tokens, AdamW, cosine from 2e-3).

  With these defaults ``benchmarks/pruning.py`` recovers stories260K pruned by iterative OBS
  to within 1.05x (50%) and 1.19x (2:4) of dense perplexity; 128-token windows cost about
  a third of 256-token ones on CPU.

  ``learning_rate`` is the cosine schedule's peak, or an optax schedule ``step -> rate`` used as
  it is (``warmup_steps`` then does nothing). ``distill`` mixes in knowledge distillation from
  the dense model: the loss is ``(1 - distill) * CE(student) + distill * KL(teacher || student)``
  per token (the teacher is the model before pruning; :func:`finetune` needs ``teacher=``).
  """

  steps: int = 600
  batch_size: int = 16
  seq_len: int = 128
  learning_rate: float | optax.Schedule = 2e-3
  warmup_steps: int = 0
  weight_decay: float = 0.0
  grad_clip: float | None = 1.0
  distill: float = 0.0
  seed: int = 0

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len"):
      check_int(name, getattr(self, name), 1)
    check_int("seed", self.seed, None)
    if not callable(self.learning_rate):
      try:
        check_real("learning_rate", self.learning_rate, 0.0, open_lo=True)
      except ValueError:
        raise ValueError(f"learning_rate must be a finite number > 0 or an optax schedule (step -> rate), got "
                         f"{self.learning_rate!r}") from None
    check_int("warmup_steps", self.warmup_steps, 0, self.steps - 1)
    check_real("weight_decay", self.weight_decay, 0.0)
    if self.grad_clip is not None:
      check_real("grad_clip", self.grad_clip, 0.0, open_lo=True)
    if not 0.0 <= check_real("distill", self.distill, 0.0) <= 1.0:
      raise ValueError(f"distill must be in [0, 1], got {self.distill}")


FinetuneResult = TrainResult  # (params, losses [steps]): what every recovery fine-tuning returns


def distill_loss(params, teacher, cfg: ModelConfig, inputs, targets, alpha: float) -> jax.Array:
  """``(1 - alpha) * CE + alpha * KL(teacher || student)``, both averaged over tokens."""
  logits = forward(params, cfg, inputs).logits
  ce = next_token_nll(logits, targets)
  if teacher is None or alpha == 0.0:
    return ce
  logp = jax.nn.log_softmax(logits, axis=-1)
  t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(forward(teacher, cfg, inputs).logits), axis=-1)
  kl = jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - logp), axis=-1))
  return (1.0 - alpha) * ce + alpha * kl


@functools.lru_cache(maxsize=32)
def _distill_fn_for(cfg: ModelConfig, alpha: float):
  """``({"student", "teacher"}, batch) -> loss``, one object per (config, alpha) so the step compiles once."""
  return lambda p, batch: distill_loss(p["student"], p["teacher"], cfg, batch[0], batch[1], alpha)


def optimizer(config: FinetuneConfig, masks: PyTree, tx: optax.GradientTransformation | None = None
              ) -> optax.GradientTransformation:
  """``tx`` (default: clipping, AdamW on a cosine schedule from ``learning_rate`` to 0), then the mask keeper."""
  base = tx or default_optimizer(config.learning_rate, config.steps, warmup_steps=config.warmup_steps,
                                 weight_decay=config.weight_decay, grad_clip=config.grad_clip)
  return optax.chain(base, prune_updates(masks=masks))


@functools.lru_cache(maxsize=16)
def _cached_optimizer(config: FinetuneConfig) -> optax.GradientTransformation:
  return optimizer(config, None)


def _masked_optimizer(config: FinetuneConfig, masks: PyTree, tx: optax.GradientTransformation | None):
  """The masks live in the state (``init``); with the default ``tx`` the ``update`` is one object per config,
  so the compiled step is reused across calls."""
  if tx is not None:
    return optimizer(config, masks, tx)
  return optax.GradientTransformation(optimizer(config, masks).init, _cached_optimizer(config).update)


def finetune(params: PyTree, cfg: ModelConfig, masks: PyTree, token_ids: Any, config: FinetuneConfig = FinetuneConfig(),
             *, teacher: PyTree | None = None, tx: optax.GradientTransformation | None = None, progress: bool = False,
             callback: Callable[[int, float], None] | None = None) -> FinetuneResult:
  """Fine-tunes all parameters on ``token_ids`` while pruned weights stay exactly zero.

  One use of :func:`jaxprune.train`: every step draws ``config.batch_size`` random windows of
  ``config.seq_len`` tokens (BOS first) and applies ``tx`` followed by
  :func:`jaxprune.prune_updates` with ``masks`` (fixed).

  Args:
    params: model parameters (pruned).
    cfg: model config.
    masks: mask pytree (True = keep; None for dense leaves); fixed during training.
    token_ids: 1-D token stream of the training text (never the evaluation text).
    config: :class:`FinetuneConfig`.
    teacher: the dense parameters, required when ``config.distill > 0`` (frozen: no gradient, no state).
    tx: an optax transformation replacing the default (clipping + AdamW + cosine from ``config``).
    progress: show a progress bar with the running loss.
    callback: called as ``callback(step, loss)`` after each step.

  Returns:
    ``FinetuneResult(params, losses)``.
  """
  if not isinstance(config, FinetuneConfig):
    raise ValueError(f"config must be a FinetuneConfig, got {type(config).__name__}")
  if cfg.bos_token_id is None:
    raise ValueError("the model has no bos_token_id; windows start with BOS")
  if config.distill > 0 and teacher is None:
    raise ValueError(f"distill={config.distill} needs the dense model: pass teacher=params_before_pruning")
  if config.seq_len > cfg.max_position_embeddings:
    raise ValueError(f"seq_len={config.seq_len} exceeds the model's context of {cfg.max_position_embeddings} tokens")
  ids = check_token_ids(token_ids, cfg.vocab_size, "fine-tuning token_ids")
  if len(ids) <= config.seq_len:
    raise ValueError(f"fine-tuning text has {len(ids)} tokens; need more than seq_len={config.seq_len}")
  params = apply_masks(params, masks)

  def batch_fn(step: int) -> Windows:
    w = sample_windows(ids, nsamples=config.batch_size, seq_len=config.seq_len, bos_id=cfg.bos_token_id,
                       seed=config.seed * 1_000_003 + step, distinct=False)
    return Windows(w.inputs[None], w.targets[None])  # one micro-batch

  kw = dict(progress=progress, desc="fine-tune", callback=callback)
  if config.distill == 0:
    return train(params, loss_fn_for(cfg), batch_fn, config.steps, tx=_masked_optimizer(config, masks, tx), **kw)
  both = {"student": params, "teacher": teacher}
  masks = {"student": masks, "teacher": jax.tree.map(lambda _: None, teacher)}
  out = train(both, _distill_fn_for(cfg, config.distill), batch_fn, config.steps,
              tx=_masked_optimizer(config, masks, tx), trainable=lambda path: path.startswith("student/"), **kw)
  return FinetuneResult(out.params["student"], out.losses)
