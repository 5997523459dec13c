"""One entry point for unstructured and N:M pruning: ``prune(params, cfg, PruneConfig(...), calib)``."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxprune._data import Windows, batches_of, check_windows, loss_fn_for
from jaxprune._finetune import FinetuneConfig, finetune
from jaxprune._hessian import expand
from jaxprune._masks import DEFAULT_INCLUDE, SparsityReport, apply_masks, prunable_paths, sparsity
from jaxprune._obs import obs_layer
from jaxprune._scores import fisher_scores, magnitude_scores, obd_scores, random_scores, taylor_scores
from jaxprune._sequential import BLOCK_LINEARS, prune_sequential
from jaxprune._sparsegpt import sparsegpt_layer
from jaxprune._topk import nm_compatible, nm_masks, topk_masks
from jaxprune._tree import leaves_with_paths
from jaxprune._validate import check_finite, check_int, check_real, check_scope, resolve_target
from jaxprune._wanda import wanda_layer
from jaxserve.config import ModelConfig

PyTree = Any
SCORE_METHODS = ("magnitude", "random", "taylor", "fisher", "obd")
LAYERWISE_METHODS = ("wanda", "sparsegpt", "obs")
METHODS = SCORE_METHODS + LAYERWISE_METHODS
DATA_METHODS = ("taylor", "fisher", "obd") + LAYERWISE_METHODS


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig:
  """What to prune and how.

  Attributes:
    method: one of ``magnitude, random, taylor, fisher, obd`` (scores, no weight update),
      ``wanda`` (activation-aware scores), ``sparsegpt`` or ``obs`` (weight-updating,
      layer by layer).
    sparsity: target fraction in [0, 1); may be omitted with ``pattern``.
    pattern: N:M pattern such as ``"2:4"`` (N nonzeros in every M inputs).
    scope: ``layer`` / ``global`` / ``output`` ranking; None = the method's own
      (``output`` for Wanda, ``layer`` otherwise). SparseGPT and OBS are per layer.
    include, exclude: regexes over parameter paths (default: the blocks' projection kernels).
    seed: seed for ``random`` scores and OBD's Hutchinson probes.
    hessian, num_probes: OBD's Hessian diagonal (``hutchinson`` with k probes, or ``exact``).
    blocksize, percdamp: SparseGPT's lazy-update block and dampening (also OBS's dampening).
    obs_rounds: prune/refit rounds of iterative OBS.
    rounds, round_steps: iterative pruning for score methods: ``rounds`` prunings to
      targets ``1 - (1 - s)^(r / rounds)``, each followed by ``round_steps`` masked
      fine-tuning steps on the calibration windows (the OBD / Han et al. loop).
    batch_size: calibration windows per forward pass.
    true_sequential: for the layer-wise methods (Wanda, SparseGPT, OBS), prune the linears of a
      block in execution order (q/k/v, o, gate/up, down), each group seeing inputs recomputed
      through the already-pruned linears before it (up to four passes per block). False takes all
      four groups' inputs from one pass over the unpruned block, as the reference SparseGPT and
      Wanda do by default: cheaper, but errors of earlier linears are not compensated. Default
      True: SparseGPT's own ``--true-sequential`` option and GPTQ/OBC use it for the better
      compensation, and it is what every figure in the README was measured with.
  """

  method: str = "magnitude"
  sparsity: float | None = None
  pattern: str | tuple[int, int] | None = None
  scope: str | None = None
  include: str = DEFAULT_INCLUDE
  exclude: str | None = None
  seed: int = 0
  hessian: str = "hutchinson"
  num_probes: int = 16
  blocksize: int = 128
  percdamp: float = 0.01
  obs_rounds: int = 4
  rounds: int = 1
  round_steps: int = 0
  batch_size: int = 8
  true_sequential: bool = True

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
    resolve_target(self.sparsity, self.pattern)
    if self.scope is not None:
      check_scope(self.scope)
      if self.method in ("sparsegpt", "obs") and self.scope != "layer":
        raise ValueError(f"{self.method} prunes each layer on its own; scope must be 'layer' or None")
      if self.method == "wanda" and self.scope == "global":
        raise ValueError("wanda ranks within a layer ('output' or 'layer'); scope='global' is not supported")
    for name, lo in (("rounds", 1), ("round_steps", 0), ("batch_size", 1), ("seed", None), ("num_probes", 1),
                     ("blocksize", 1), ("obs_rounds", 1)):
      check_int(name, getattr(self, name), lo)
    check_real("percdamp", self.percdamp, 0.0)
    if self.hessian not in ("hutchinson", "exact"):
      raise ValueError(f"hessian must be 'hutchinson' or 'exact', got {self.hessian!r}")
    if self.rounds > 1 and self.method not in SCORE_METHODS:
      raise ValueError(f"rounds > 1 is for score methods {SCORE_METHODS}; {self.method} has its own procedure")

  @property
  def target(self) -> tuple[float, tuple[int, int] | None]:
    return resolve_target(self.sparsity, self.pattern)

  @property
  def effective_scope(self) -> str:
    return self.scope or ("output" if self.method == "wanda" else "layer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneReport:
  """What a pruning run did: achieved sparsity per leaf, leaves left dense, time taken."""

  method: str
  target_sparsity: float
  pattern: str | None
  scope: str
  achieved: SparsityReport
  dense_leaves: tuple[str, ...]
  seconds: float

  def to_dict(self) -> dict[str, Any]:
    return {"method": self.method, "target_sparsity": self.target_sparsity, "pattern": self.pattern,
            "scope": self.scope, "sparsity": self.achieved.total, "pruned_weights": self.achieved.zeros,
            "prunable_weights": self.achieved.size, "per_leaf": self.achieved.per_leaf,
            "dense_leaves": list(self.dense_leaves), "seconds": self.seconds}


class PruneResult(NamedTuple):
  params: PyTree  # pruned parameters: masked entries are exactly zero
  masks: PyTree  # bool arrays (True = keep) at pruned leaves, None elsewhere
  report: PruneReport


def prune(params: PyTree, cfg: ModelConfig, config: PruneConfig, calib: Windows | None = None, *,
          progress: bool = False) -> PruneResult:
  """Prunes a model; every input is checked before any work starts.

  Args:
    params: model parameters.
    cfg: model config.
    config: :class:`PruneConfig`.
    calib: calibration windows ``(inputs, targets)`` ``[N, T]`` (or token windows ``[N, T + 1]``)
      for data-dependent methods (see :func:`jaxprune.calibration_windows`; checked by
      :func:`jaxprune.check_windows`); never the evaluation text.
    progress: progress bars on long work.

  Returns:
    ``PruneResult(params, masks, report)``.
  """
  if not isinstance(config, PruneConfig):
    raise ValueError(f"config must be a PruneConfig, got {type(config).__name__}")
  if not isinstance(cfg, ModelConfig):
    raise ValueError(f"cfg must be the model's ModelConfig, got {type(cfg).__name__}")
  s, nm = config.target
  selected = prunable_paths(params, include=config.include, exclude=config.exclude)
  if not selected:
    raise ValueError(f"no parameter path matches include={config.include!r} (exclude={config.exclude!r})")
  shapes = {p: tuple(x.shape) for p, x in leaves_with_paths(params)}
  dense = tuple(p for p in selected if nm is not None and not nm_compatible(shapes[p], nm[1]))
  if dense and len(dense) == len(selected):
    inputs = sorted({shapes[p][0] for p in selected if len(shapes[p]) == 2})
    raise ValueError(f"pattern {nm[0]}:{nm[1]} fits none of the {len(selected)} selected leaves: an N:M leaf is 2-D "
                     f"with its input dimension a multiple of M, and the input dimensions here are {inputs}; "
                     "choose an M that divides them")
  if config.method in DATA_METHODS or calib is not None:
    calib = check_windows(calib, cfg, needed_by=f"method {config.method!r}")
  chosen = set(selected)
  check_finite(expand(params, {p: x for p, x in leaves_with_paths(params) if p in chosen}))
  if config.method in LAYERWISE_METHODS:
    outside = [p for p in selected if not _is_block_linear(p)]
    if outside:
      raise ValueError(f"{config.method} prunes the blocks' linear layers only; include also selects {outside[:3]}")
  t0 = time.perf_counter()
  if config.method in LAYERWISE_METHODS:
    new_params, masks = _layerwise(params, cfg, config, calib, [p for p in selected if p not in dense], progress)
  else:
    new_params, masks = _score_based(params, cfg, config, calib, selected, progress)
  jax.block_until_ready(jax.tree.leaves(new_params))
  seconds = time.perf_counter() - t0
  # Achieved sparsity over every selected leaf; those left dense (N:M-incompatible) count as unpruned.
  by_path = dict(leaves_with_paths(masks))
  counted = expand(params, {p: by_path[p] if by_path.get(p) is not None else np.ones(shapes[p], bool)
                            for p in selected})
  report = PruneReport(method=config.method, target_sparsity=s, pattern=None if nm is None else f"{nm[0]}:{nm[1]}",
                       scope=config.effective_scope, achieved=sparsity(counted), dense_leaves=dense, seconds=seconds)
  return PruneResult(new_params, masks, report)


def _is_block_linear(path: str) -> bool:
  parts = path.split("/")
  return (len(parts) == 4 and parts[0].startswith("layers_") and parts[-1] == "kernel"
          and "/".join(parts[1:3]) in BLOCK_LINEARS)


def _layerwise(params, cfg, config, calib, selected, progress):
  s, nm = config.target
  pattern = None if nm is None else nm
  kw = dict(sparsity=None if nm else s, pattern=pattern)
  if config.method == "sparsegpt":
    fn = lambda path, k, g, n: sparsegpt_layer(k, g, blocksize=config.blocksize, percdamp=config.percdamp, **kw)
  elif config.method == "obs":
    fn = lambda path, k, g, n: obs_layer(k, g, rounds=config.obs_rounds, percdamp=config.percdamp, **kw)
  else:
    fn = lambda path, k, g, n: wanda_layer(k, g, scope=config.effective_scope, **kw)
  new_params, by_path = prune_sequential(params, cfg, np.asarray(calib[0]), fn, set(selected),
                                         batch_size=config.batch_size, true_sequential=config.true_sequential,
                                         progress=progress, desc=config.method)
  return new_params, expand(new_params, by_path)


def _scores(params, cfg, config, batches, progress):
  sel = dict(include=config.include, exclude=config.exclude)
  if config.method == "magnitude":
    return magnitude_scores(params, **sel)
  if config.method == "random":
    return random_scores(params, config.seed, **sel)
  loss = loss_fn_for(cfg)
  if config.method == "taylor":
    return taylor_scores(loss, params, batches, **sel)
  if config.method == "fisher":
    return fisher_scores(loss, params, batches, **sel)
  return obd_scores(loss, params, batches, hessian=config.hessian, num_probes=config.num_probes, seed=config.seed,
                    progress=progress, **sel)


def _score_based(params, cfg, config, calib, selected, progress):
  s, nm = config.target
  batches = batches_of(calib, config.batch_size) if calib is not None else None
  masks = None
  for r in range(config.rounds):
    scores = _scores(params, cfg, config, batches, progress)
    if nm is not None:
      masks = nm_masks(scores, nm, masks=masks)
    else:
      target = s if r == config.rounds - 1 else 1.0 - (1.0 - s) ** ((r + 1) / config.rounds)
      masks = topk_masks(scores, target, scope=config.effective_scope, masks=masks)
    params = apply_masks(params, masks)
    if config.round_steps and r < config.rounds - 1:
      params = _finetune_on_windows(params, cfg, masks, calib, config, progress)
  return params, masks


def _finetune_on_windows(params, cfg, masks, calib, config, progress):
  """Masked fine-tuning between rounds, on the calibration windows' token stream."""
  stream = np.asarray(calib[1]).reshape(-1)
  ft = FinetuneConfig(steps=config.round_steps, batch_size=min(8, len(calib[1])),
                      seq_len=min(np.asarray(calib[1]).shape[1], len(stream) - 1), seed=config.seed)
  return finetune(params, cfg, masks, stream, ft, progress=progress).params
