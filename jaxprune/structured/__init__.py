"""Structured pruning of LLaMA-family models: dependency groups, importance, physical removal, LoRA recovery.

Typical use::

  from jaxprune import sample_windows, text_token_ids
  from jaxprune.structured import StructuredConfig, Importance, prune_structured
  ids = text_token_ids(tokenizer)
  windows = sample_windows(ids, nsamples=32, seq_len=128, bos_id=cfg.bos_token_id, distinct=False)
  result = prune_structured(params, cfg, StructuredConfig(ratio=0.25, importance=Importance(kind="taylor")),
                            calibration=windows)
  save_native(result.cfg, result.params, "out", tokenizer)

Windows, the loss and the trainer are jaxprune's (:mod:`jaxprune._data`, :func:`jaxprune.train`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxprune._data import lm_loss, sample_windows, text_token_ids
from jaxprune._train import TrainResult as FinetuneResult
from jaxprune.structured._groups import PrunePlan, check_plan, compose, leaf_dims
from jaxprune.structured._importance import (AGGREGATIONS, IMPORTANCES, TAYLOR_VARIANTS, GradientStats, Importance,
                                             calibration_gradients, element_saliences, unit_scores)
from jaxprune.structured._lora import LORA_TARGETS, LoraConfig, finetune_lora, init_lora, merge_lora
from jaxprune.structured._removal import count_parameters, group_masks, mask_groups, pruned_config, remove_groups
from jaxprune.structured._strategy import (StructuredConfig, StructuredResult, planned_layer_sizes, prune_structured,
                                           validate)


def calibration_windows(token_ids: Any, num: int, seq_len: int, bos_id: int, seed: int = 0) -> np.ndarray:
  """Kept for old callers: ``sample_windows(..., distinct=False)`` as one int32 array ``[num, seq_len + 1]``."""
  w = sample_windows(token_ids, nsamples=num, seq_len=seq_len, bos_id=bos_id, seed=seed, distinct=False)
  return np.concatenate([w.inputs, w.targets[:, -1:]], axis=1)


__all__ = [
    "AGGREGATIONS", "IMPORTANCES", "LORA_TARGETS", "TAYLOR_VARIANTS", "FinetuneResult", "GradientStats", "Importance",
    "LoraConfig", "PrunePlan", "StructuredConfig", "StructuredResult", "calibration_gradients", "calibration_windows",
    "check_plan", "compose", "count_parameters", "element_saliences", "finetune_lora",
    "group_masks", "init_lora", "leaf_dims", "lm_loss", "mask_groups", "merge_lora", "planned_layer_sizes",
    "prune_structured", "pruned_config", "remove_groups", "sample_windows", "text_token_ids", "unit_scores", "validate",
]
