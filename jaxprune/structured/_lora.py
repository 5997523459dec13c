"""LoRA recovery fine-tuning with optax: low-rank adapters on the projections, merged at the end."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxprune._tree import leaves_with_paths, map_with_path
from jaxprune.structured._data import calibration_windows
from jaxprune.structured._importance import lm_loss
from jaxserve.config import ModelConfig

Params = dict[str, Any]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """Recovery fine-tuning settings.

  Attributes:
    rank: adapter rank r (W' = W + alpha / r * A @ B, A ``[in, r]``, B ``[r, out]``, B starts at 0).
    alpha: adapter scale numerator.
    targets: projection names that get adapters (subset of :data:`LORA_TARGETS`).
    steps: optimizer steps.
    learning_rate: peak AdamW learning rate (linear warmup over 5% of the steps, then cosine to 0).
    batch_size: windows per step.
    micro_batch: windows per gradient evaluation; gradients are accumulated over
      ``batch_size / micro_batch`` evaluations, so memory does not grow with the batch.
    seq_len: tokens per window (BOS is prepended).
    weight_decay: AdamW weight decay on the adapters.
    seed: seed of the adapter initialization and the window sampling.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = LORA_TARGETS
  steps: int = 200
  learning_rate: float = 2e-3
  batch_size: int = 16
  micro_batch: int = 8
  seq_len: int = 128
  weight_decay: float = 0.0
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    bad = [t for t in self.targets if t not in LORA_TARGETS]
    if bad or not self.targets:
      raise ValueError(f"LoRA targets must be a non-empty subset of {LORA_TARGETS}, got {list(self.targets)}")
    for name in ("rank", "steps", "batch_size", "micro_batch", "seq_len"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"LoRA {name} must be >= 1, got {getattr(self, name)}")
    if self.batch_size % self.micro_batch:
      raise ValueError(f"LoRA batch_size ({self.batch_size}) must be a multiple of micro_batch ({self.micro_batch})")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _targets(params: Params, targets: tuple[str, ...]) -> list[tuple[str, Any]]:
  return [(p, x) for p, x in leaves_with_paths(params)
          if p.endswith("/kernel") and p.split("/")[-2] in targets and p.startswith("layers_")]


def init_lora(params: Params, cfg: LoraConfig, key: jax.Array) -> Params:
  """Adapters ``{path: {"a": [in, r], "b": [r, out]}}`` (float32) for every targeted kernel.

  ``a`` is uniform in ``+-1/sqrt(in)`` and ``b`` is zero, so the adapted model starts equal to the original.
  """
  out: Params = {}
  for i, (path, w) in enumerate(_targets(params, cfg.targets)):
    fan_in, fan_out = w.shape
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, cfg.rank), jnp.float32, -bound, bound)
    out[path] = {"a": a, "b": jnp.zeros((cfg.rank, fan_out), jnp.float32)}
  return out


def merge_lora(params: Params, lora: Params, scale: float) -> Params:
  """``params`` with every adapted kernel replaced by ``W + scale * A @ B`` (in W's dtype)."""
  def merge(path, w):
    if path not in lora:
      return w
    delta = scale * (lora[path]["a"] @ lora[path]["b"])
    return (jnp.asarray(w, jnp.float32) + delta).astype(jnp.asarray(w).dtype)
  return map_with_path(merge, params)


class FinetuneResult(NamedTuple):
  params: Params  # adapters merged in
  losses: list[float]  # training loss of each step


@functools.partial(jax.jit, static_argnames=("cfg", "scale", "tx"), donate_argnums=(0, 1))
def _train_step(lora, opt_state, params, batch, cfg, scale, tx):
  """One optimizer step; ``batch`` is ``[micro_steps, micro_batch, T + 1]``, gradients are accumulated."""
  loss_fn = lambda lo, mb: lm_loss(merge_lora(params, lo, scale), cfg, mb)

  def accumulate(carry, mb):
    loss, grads = jax.value_and_grad(loss_fn)(lora, mb)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, lora))
  (loss, grads), _ = jax.lax.scan(accumulate, zero, batch)
  n = batch.shape[0]
  grads = jax.tree.map(lambda g: g / n, grads)
  updates, opt_state = tx.update(grads, opt_state, lora)
  return optax.apply_updates(lora, updates), opt_state, loss / n


def _optimizer(cfg: LoraConfig) -> optax.GradientTransformation:
  warmup = max(1, cfg.steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1))
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=cfg.weight_decay))


def finetune_lora(params: Params, model_cfg: ModelConfig, token_ids: Any, cfg: LoraConfig, *,
                  progress: bool = False) -> FinetuneResult:
  """Recovers a pruned model: trains LoRA adapters on random windows of ``token_ids``, then merges them.

  Each step draws ``cfg.batch_size`` windows of ``cfg.seq_len`` tokens (BOS first) from the token
  stream (use the calibration text, never the evaluation text) and averages the gradients of
  ``batch_size / micro_batch`` micro-batches inside one jitted scan: memory holds one micro-batch's
  activations and one gradient of the adapters at a time.

  Args:
    params: the (pruned) model's parameters; they stay frozen, only adapters train.
    model_cfg: its configuration.
    token_ids: 1-D token ids of the training text.
    cfg: LoRA and optimizer settings.
    progress: show a progress bar.

  Returns:
    ``FinetuneResult(params, losses)`` with the adapters merged into the weights.
  """
  if cfg.seq_len > model_cfg.max_position_embeddings:
    raise ValueError(f"LoRA seq_len={cfg.seq_len} exceeds the model's context of {model_cfg.max_position_embeddings}")
  if model_cfg.bos_token_id is None:
    raise ValueError("the model has no bos_token_id; recovery windows start with BOS")
  ids = np.asarray(token_ids, np.int32)
  if ids.ndim != 1 or len(ids) < cfg.seq_len:
    raise ValueError(f"recovery text must be 1-D token ids with at least seq_len={cfg.seq_len} tokens, "
                     f"got shape {ids.shape}")
  if not _targets(params, cfg.targets):
    raise ValueError(f"no kernel of the model matches LoRA targets {list(cfg.targets)}")
  key = jax.random.PRNGKey(cfg.seed)
  lora = init_lora(params, cfg, key)
  tx = _optimizer(cfg)
  opt_state = tx.init(lora)
  losses = []
  shape = (cfg.batch_size // cfg.micro_batch, cfg.micro_batch, cfg.seq_len + 1)
  for step in tqdm(range(cfg.steps), desc="lora", disable=not progress):
    batch = calibration_windows(ids, cfg.batch_size, cfg.seq_len, model_cfg.bos_token_id,
                                seed=cfg.seed * 1_000_003 + step).reshape(shape)
    lora, opt_state, loss = _train_step(lora, opt_state, params, jnp.asarray(batch), model_cfg, cfg.scale, tx)
    losses.append(float(loss))
  return FinetuneResult(merge_lora(params, lora, cfg.scale), losses)
