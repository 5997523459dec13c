"""LoRA recovery: low-rank adapters on the projections, trained by :func:`jaxprune.train`, merged at the end."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune._data import Windows, lm_loss, sample_windows
from jaxprune._train import TrainResult as FinetuneResult
from jaxprune._train import default_optimizer, train
from jaxprune._tree import leaves_with_paths, map_with_path
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
    learning_rate: peak AdamW learning rate (linear warmup over 5% of the steps, then cosine to 0),
      or an optax schedule ``step -> rate`` used as it is.
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
  learning_rate: float | optax.Schedule = 2e-3
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
    if not (callable(self.learning_rate) or (self.learning_rate > 0 and math.isfinite(self.learning_rate))):
      raise ValueError(f"learning_rate must be a positive number or an optax schedule, got {self.learning_rate}")

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


def _optimizer(cfg: LoraConfig) -> optax.GradientTransformation:
  """Clipping and AdamW with linear warmup over 5% of the steps, then cosine to 0."""
  if callable(cfg.learning_rate):
    return default_optimizer(cfg.learning_rate, cfg.steps, weight_decay=cfg.weight_decay)
  warmup = max(1, cfg.steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1))
  return default_optimizer(schedule, cfg.steps, weight_decay=cfg.weight_decay)


@functools.lru_cache(maxsize=32)
def lora_loss_fn(model_cfg: ModelConfig, scale: float):
  """``({"model", "lora"}, batch) -> loss`` of the merged model; one object per (config, scale),
  so the trainer's compiled step is reused."""
  return lambda p, batch: lm_loss(merge_lora(p["model"], p["lora"], scale), model_cfg, batch)


def _is_adapter(path: str) -> bool:
  return path.startswith("lora/")


def finetune_lora(params: Params, model_cfg: ModelConfig, token_ids: Any, cfg: LoraConfig, *,
                  tx: optax.GradientTransformation | None = None, progress: bool = False) -> FinetuneResult:
  """Recovers a pruned model: trains LoRA adapters on random windows of ``token_ids``, then merges them.

  One use of :func:`jaxprune.train`: the parameters are ``{"model": params, "lora": adapters}``
  and only the adapters are trainable. Each step draws ``cfg.batch_size`` windows of
  ``cfg.seq_len`` tokens (BOS first) from the token stream (use the calibration text, never the
  evaluation text) and averages the gradients of ``batch_size / micro_batch`` micro-batches inside
  one jitted scan: memory holds one micro-batch's activations and one gradient of the adapters at a time.

  Args:
    params: the (pruned) model's parameters; they stay frozen, only adapters train.
    model_cfg: its configuration.
    token_ids: 1-D token ids of the training text.
    cfg: LoRA and optimizer settings.
    tx: an optax transformation replacing the default (clipping + AdamW, warmup and cosine).
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
  lora = init_lora(params, cfg, jax.random.PRNGKey(cfg.seed))
  micro = (cfg.batch_size // cfg.micro_batch, cfg.micro_batch, cfg.seq_len)

  def batch_fn(step: int) -> Windows:
    w = sample_windows(ids, nsamples=cfg.batch_size, seq_len=cfg.seq_len, bos_id=model_cfg.bos_token_id,
                       seed=cfg.seed * 1_000_003 + step, distinct=False)
    return Windows(w.inputs.reshape(micro), w.targets.reshape(micro))

  out = train({"model": params, "lora": lora}, lora_loss_fn(model_cfg, cfg.scale), batch_fn, cfg.steps,
              tx=tx or _optimizer(cfg), trainable=_is_adapter, progress=progress, desc="lora")
  return FinetuneResult(merge_lora(params, out.params["lora"], cfg.scale), out.losses)
