"""jaxprune: functional pruning transforms for LLaMA-family models in JAX."""

from jaxprune.eval import perplexity, perplexity_of_text

# Unstructured and N:M pruning (masks, scores, SparseGPT/Wanda/OBS, optax schedules, checkpoints).
from jaxprune import checkpoint
from jaxprune._data import Windows, calibration_windows, check_windows, lm_loss, sample_windows, text_token_ids
from jaxprune._finetune import FinetuneConfig, FinetuneResult, finetune
from jaxprune._hessian import exact_hessian_diagonal, hutchinson_diagonal, hvp
from jaxprune._masks import (DEFAULT_INCLUDE, SparsityReport, apply_masks, combine_masks, dense_masks,
                             masks_from_params, prunable_paths, sparsity)
from jaxprune._obs import obs_layer
from jaxprune._optax import PruningState, find_pruning_state, prune_updates
from jaxprune._prune import METHODS, PruneConfig, PruneReport, PruneResult, prune
from jaxprune._schedules import Fixed, Iterative, OneShot, Polynomial
from jaxprune._scores import (fisher_diagonal, fisher_scores, magnitude_scores, obd_scores, random_scores,
                              taylor_scores, wanda_scores)
from jaxprune._sparsegpt import sparsegpt_layer
from jaxprune._train import TrainResult, default_optimizer, train
from jaxprune._topk import keep_mask, nm_incompatible, nm_masks, num_pruned, topk_masks
from jaxprune._wanda import wanda_layer

__all__ = ["perplexity", "perplexity_of_text",
           "checkpoint", "Windows", "calibration_windows", "check_windows", "lm_loss", "sample_windows",
           "text_token_ids", "TrainResult", "default_optimizer", "train", "FinetuneConfig",
           "FinetuneResult", "finetune", "exact_hessian_diagonal", "hutchinson_diagonal", "hvp", "DEFAULT_INCLUDE",
           "SparsityReport", "apply_masks", "combine_masks", "dense_masks", "masks_from_params", "prunable_paths",
           "sparsity", "obs_layer", "PruningState", "find_pruning_state", "prune_updates", "METHODS", "PruneConfig",
           "PruneReport", "PruneResult", "prune", "Fixed", "Iterative", "OneShot", "Polynomial", "fisher_diagonal",
           "fisher_scores", "magnitude_scores", "obd_scores", "random_scores", "taylor_scores", "wanda_scores",
           "sparsegpt_layer", "keep_mask", "nm_incompatible", "nm_masks", "num_pruned", "topk_masks", "wanda_layer"]
