"""Structured pruning of LLaMA-family models: dependency groups, importance, physical removal, LoRA recovery.

Typical use::

  from jaxprune.structured import StructuredConfig, Importance, prune_structured
  result = prune_structured(params, cfg, StructuredConfig(ratio=0.25, importance=Importance(kind="taylor")),
                            calibration=windows)
  save_native(result.cfg, result.params, "out", tokenizer)
"""

from jaxprune.structured._data import calibration_windows, text_token_ids
from jaxprune.structured._groups import PrunePlan, check_plan, compose, leaf_dims
from jaxprune.structured._importance import (AGGREGATIONS, IMPORTANCES, TAYLOR_VARIANTS, GradientStats, Importance,
                                             calibration_gradients, element_saliences, lm_loss, unit_scores)
from jaxprune.structured._lora import LORA_TARGETS, FinetuneResult, LoraConfig, finetune_lora, init_lora, merge_lora
from jaxprune.structured._removal import count_parameters, group_masks, mask_groups, pruned_config, remove_groups
from jaxprune.structured._strategy import (StructuredConfig, StructuredResult, check_calibration_windows,
                                           planned_layer_sizes, prune_structured, validate)

__all__ = [
    "AGGREGATIONS", "IMPORTANCES", "LORA_TARGETS", "TAYLOR_VARIANTS", "FinetuneResult", "GradientStats", "Importance",
    "LoraConfig", "PrunePlan", "StructuredConfig", "StructuredResult", "calibration_gradients", "calibration_windows",
    "check_calibration_windows", "check_plan", "compose", "count_parameters", "element_saliences", "finetune_lora",
    "group_masks", "init_lora", "leaf_dims", "lm_loss", "mask_groups", "merge_lora", "planned_layer_sizes",
    "prune_structured", "pruned_config", "remove_groups", "text_token_ids", "unit_scores", "validate",
]
