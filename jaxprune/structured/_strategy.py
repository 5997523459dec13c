"""Structured pruning strategies: block-wise, channel-wise and layer-wise; local or global; iterative."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxprune._data import check_windows
from jaxprune._validate import check_finite, check_sparsity
from jaxprune.structured._groups import PrunePlan, compose
from jaxprune.structured._importance import GradientStats, Importance, calibration_gradients, unit_scores
from jaxprune.structured._removal import count_parameters, remove_groups
from jaxserve.config import ModelConfig

Params = dict[str, Any]
MODES = ("block", "channel", "layer")
SCOPES = ("local", "global")
ATTENTION_UNITS = ("kv_group", "query_head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredConfig:
  """What to prune and how.

  Attributes:
    ratio: fraction in [0, 1) of the groups of each pruned kind to remove (block-wise: KV groups
      (or query heads) and MLP channels of each layer in range; channel-wise: hidden channels;
      layer-wise: blocks). Groups of one kind have equal size, so it is also the fraction of
      their parameters.
    mode: ``block``, ``channel`` or ``layer``.
    attention_layers: half-open ``(start, end)`` of layers whose attention is pruned (block-wise);
      None = every layer; ``start == end`` prunes no attention.
    mlp_layers: the same for MLP channels.
    attention_unit: ``kv_group`` (a KV head with all query heads reading it; keeps GQA valid for
      any ratio) or ``query_head`` (the same number of query heads removed from every KV group).
    importance: how groups are scored (see :class:`Importance`).
    scope: ``local`` (each layer loses ``ratio`` of its groups) or ``global`` (groups of one kind
      ranked across layers; every layer keeps at least one KV group / ``round_to`` channels).
    iterative_steps: prune in this many equal steps, re-scoring the smaller model each time.
    round_to: kept MLP and hidden channel counts are rounded to a multiple of this.
    keep_layers: layer-wise only: keep this many blocks (LLM-Pruner's ``--layer``); overrides ``ratio``.
    seed: seed of the ``random`` importance.
  """

  ratio: float
  mode: str = "block"
  attention_layers: tuple[int, int] | None = None
  mlp_layers: tuple[int, int] | None = None
  attention_unit: str = "kv_group"
  importance: Importance = Importance()
  scope: str = "local"
  iterative_steps: int = 1
  round_to: int = 1
  keep_layers: int | None = None
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "ratio", check_sparsity(self.ratio, "pruning ratio"))
    for name, allowed in (("mode", MODES), ("scope", SCOPES), ("attention_unit", ATTENTION_UNITS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if not isinstance(self.importance, Importance):
      raise ValueError(f"importance must be an Importance, got {type(self.importance).__name__}")
    for name in ("iterative_steps", "round_to"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.keep_layers is not None and self.mode != "layer":
      raise ValueError(f"keep_layers applies to mode='layer' only, got mode={self.mode!r}")
    if self.scope == "global" and self.mode != "block":
      raise ValueError(f"scope='global' ranks groups across layers; it applies to mode='block' only, "
                       f"got mode={self.mode!r}")
    for name in ("attention_layers", "mlp_layers"):
      value = getattr(self, name)
      if value is not None:
        try:
          start, end = (int(v) for v in value)
        except (TypeError, ValueError):
          raise ValueError(f"{name} must be a (start, end) pair of layer indices, got {value!r}") from None
        object.__setattr__(self, name, (start, end))


class StructuredResult(NamedTuple):
  params: Params  # the smaller model
  cfg: ModelConfig
  plan: PrunePlan  # what survives, as indices into the original model
  report: dict[str, Any]


def _round_half_up(x: float) -> int:
  return int(math.floor(x + 0.5))


def _layer_range(cfg: ModelConfig, value: tuple[int, int] | None, name: str) -> list[int]:
  if value is None:
    return list(range(cfg.num_layers))
  start, end = value
  if not 0 <= start <= end <= cfg.num_layers:
    raise ValueError(f"{name} range [{start}, {end}) is outside the model's layers [0, {cfg.num_layers}]: "
                     f"need 0 <= start <= end <= {cfg.num_layers}")
  return list(range(start, end))


class _Kind(NamedTuple):
  """One kind of unit pruned by a strategy, with its original per-layer sizes."""
  unit: str  # attn | head | mlp | hidden | layer
  sizes: dict[int, int]  # original units per layer (-1 for hidden / layer)
  multiple: int  # kept count is a multiple of this
  min_keep: int


def _kinds(cfg: ModelConfig, sc: StructuredConfig) -> list[_Kind]:
  if sc.mode == "channel":
    return [_Kind("hidden", {-1: cfg.hidden_size}, sc.round_to, sc.round_to)]
  if sc.mode == "layer":
    return [_Kind("layer", {-1: cfg.num_layers}, 1, 1)]
  attn = _layer_range(cfg, sc.attention_layers, "attention layer")
  mlp = _layer_range(cfg, sc.mlp_layers, "MLP layer")
  kinds = []
  if attn:
    if sc.attention_unit == "kv_group":
      kinds.append(_Kind("attn", {i: cfg.kv_heads(i) for i in attn}, 1, 1))
    else:
      kinds.append(_Kind("head", {i: cfg.heads(i) // cfg.kv_heads(i) for i in attn}, 1, 1))
  if mlp:
    kinds.append(_Kind("mlp", {i: cfg.ffn(i) for i in mlp}, sc.round_to, sc.round_to))
  return kinds


_WHAT = {"attn": "KV groups (a KV head with its query heads)", "head": "query heads per KV group",
         "mlp": "MLP channels", "hidden": "hidden channels", "layer": "blocks"}


def _local_remove(kind: _Kind, layer: int, ratio: float, final: bool) -> int:
  """Units of ``layer`` removed at cumulative ``ratio`` (kept count rounded to the multiple)."""
  n, m = kind.sizes[layer], kind.multiple
  if ratio == 0.0:
    return 0
  if n < m:
    raise ValueError(f"round_to={m} exceeds the {n} {_WHAT[kind.unit]} of layer {layer}")
  if m == 1:  # whole units: remove the nearest count (halves round up)
    kept = n - _round_half_up(n * ratio)
  else:  # keep the nearest multiple of m (at most n)
    kept = min(_round_half_up(n * (1.0 - ratio) / m) * m, n // m * m)
  where = f"layer {layer}" if layer >= 0 else "the model"
  if kept < kind.min_keep:
    raise ValueError(f"pruning ratio {ratio:g} would remove every one of the {n} {_WHAT[kind.unit]} of {where}; "
                     f"use a smaller ratio (at most {(n - kind.min_keep) / n:g})")
  if final and kind.unit in ("attn", "head") and kept == n:
    raise ValueError(
        f"pruning ratio {ratio:g} is incompatible with the GQA grouping of layer {layer}: attention is pruned "
        f"in whole {_WHAT[kind.unit]} (1/{n} = {1 / n:g} each), so {ratio:g} removes less than one; use a "
        f"ratio of at least {0.5 / n:g}, or an empty attention layer range to prune only MLP channels")
  return n - kept


def _targets(cfg0: ModelConfig, sc: StructuredConfig, kind: _Kind, step: int) -> dict[int, int]:
  """Cumulative units removed after ``step`` (1-based) of ``sc.iterative_steps``: per layer or ``{-2: total}``."""
  frac = step / sc.iterative_steps
  if kind.unit == "layer" and sc.keep_layers is not None:
    if not 1 <= sc.keep_layers <= cfg0.num_layers:
      raise ValueError(f"keep_layers must be in [1, {cfg0.num_layers}], got {sc.keep_layers}")
    return {-1: _round_half_up((cfg0.num_layers - sc.keep_layers) * frac)}
  ratio = sc.ratio * frac
  if sc.scope == "local":
    return {layer: _local_remove(kind, layer, ratio, step == sc.iterative_steps) for layer in kind.sizes}
  total = _round_half_up(ratio * sum(kind.sizes.values()))
  room = sum(n - max(kind.min_keep, kind.multiple) for n in kind.sizes.values())
  if total > room:
    raise ValueError(f"pruning ratio {sc.ratio:g} with global ranking would remove {total} {_WHAT[kind.unit]}, but "
                     f"only {room} can go while every layer keeps at least {max(kind.min_keep, kind.multiple)}")
  return {-2: total}


def validate(cfg: ModelConfig, sc: StructuredConfig) -> None:
  """Raises a ValueError if ``sc`` cannot be applied to ``cfg`` (run before any work)."""
  kinds = _kinds(cfg, sc)
  for kind in kinds:
    for step in range(1, sc.iterative_steps + 1):
      _targets(cfg, sc, kind, step)


def planned_layer_sizes(cfg: ModelConfig, sc: StructuredConfig) -> list[tuple[int, int, int]] | None:
  """Per-layer ``(heads, kv_heads, intermediate_size)`` after pruning, known before scoring.

  Returns None when the sizes depend on the scores (global ranking, or dropping blocks of a model
  whose layers already differ). Lets callers refuse a Hugging Face export before any work.
  """
  validate(cfg, sc)
  if sc.scope == "global" or (sc.mode == "layer" and not cfg.is_uniform):
    return None
  sizes = [[cfg.heads(i), cfg.kv_heads(i), cfg.ffn(i)] for i in range(cfg.num_layers)]
  for kind in _kinds(cfg, sc):
    for layer, removed in _targets(cfg, sc, kind, sc.iterative_steps).items():
      if kind.unit == "layer":
        sizes = sizes[:cfg.num_layers - removed]
      elif kind.unit == "attn":
        group = cfg.heads(layer) // cfg.kv_heads(layer)
        sizes[layer][0] -= removed * group
        sizes[layer][1] -= removed
      elif kind.unit == "head":
        sizes[layer][0] -= removed * cfg.kv_heads(layer)
      elif kind.unit == "mlp":
        sizes[layer][2] -= removed
  return [tuple(s) for s in sizes]


def _current_sizes(cfg: ModelConfig, kind: _Kind) -> dict[int, int]:
  if kind.unit == "attn":
    return {i: cfg.kv_heads(i) for i in kind.sizes}
  if kind.unit == "head":
    return {i: cfg.heads(i) // cfg.kv_heads(i) for i in kind.sizes}
  if kind.unit == "mlp":
    return {i: cfg.ffn(i) for i in kind.sizes}
  return {-1: cfg.hidden_size if kind.unit == "hidden" else cfg.num_layers}


def _choose(scores: dict[int, np.ndarray], remove: dict[int, int]) -> dict[int, np.ndarray]:
  """Per layer, the ``remove[layer]`` lowest-scoring units (ties: lower index first)."""
  return {k: np.sort(np.argsort(scores[k], kind="stable")[:remove[k]]) for k in remove}


def _global_counts(scores: dict[int, np.ndarray], total: int, kind: _Kind, cur: dict[int, int]) -> dict[int, int]:
  """Units removed per layer when ranking across layers, then kept counts rounded to the multiple."""
  m, floor = kind.multiple, max(kind.min_keep, kind.multiple)
  order = sorted((float(s), layer, j) for layer, v in scores.items() for j, s in enumerate(v))
  counts = {layer: 0 for layer in scores}
  for _, layer, _ in order:
    if total <= 0:
      break
    if cur[layer] - counts[layer] > floor:
      counts[layer] += 1
      total -= 1
  for layer, c in counts.items():
    if c and m > 1:
      kept = min(max(_round_half_up((cur[layer] - c) / m) * m, floor), cur[layer] // m * m)
      counts[layer] = cur[layer] - kept
  return counts


def _slice_scores(head_scores: np.ndarray, kvh: int) -> tuple[np.ndarray, np.ndarray]:
  """Query heads ranked inside each KV group: slice s = the s-th least important head of every group."""
  per_group = head_scores.reshape(kvh, -1)
  order = np.argsort(per_group, axis=1, kind="stable")
  return np.take_along_axis(per_group, order, axis=1).sum(0), order


def _step_plan(params: Params, cfg: ModelConfig, cfg0: ModelConfig, sc: StructuredConfig, step: int,
               stats: GradientStats | None) -> PrunePlan:
  plan = PrunePlan.full(cfg)
  for kind in _kinds(cfg0, sc):
    cur = _current_sizes(cfg, kind)
    target = _targets(cfg0, sc, kind, step)
    scores = unit_scores(params, cfg, sc.importance, kind.unit, [k for k in kind.sizes if k >= 0], stats,
                         seed=sc.seed + step)
    orders = {}
    if kind.unit == "head":
      for i in list(scores):
        scores[i], orders[i] = _slice_scores(scores[i], cfg.kv_heads(i))
    if -2 in target:
      done = sum(kind.sizes[k] - cur[k] for k in kind.sizes)
      remove = _global_counts(scores, target[-2] - done, kind, cur)
    else:
      remove = {k: target[k] - (kind.sizes[k] - cur[k]) for k in kind.sizes}
    chosen = _choose(scores, remove)
    for layer, drop in chosen.items():
      if not len(drop):
        continue
      if kind.unit == "attn":
        group = cfg.heads(layer) // cfg.kv_heads(layer)
        plan = plan.with_layer("kv_heads", layer, sorted(set(range(cfg.kv_heads(layer))) - set(drop.tolist())))
        plan = plan.with_layer("heads", layer, [h for h in range(cfg.heads(layer)) if h // group not in set(drop.tolist())])
      elif kind.unit == "head":
        group = cfg.heads(layer) // cfg.kv_heads(layer)
        gone = orders[layer][:, :len(drop)] + np.arange(cfg.kv_heads(layer))[:, None] * group
        plan = plan.with_layer("heads", layer, sorted(set(range(cfg.heads(layer))) - set(gone.ravel().tolist())))
      elif kind.unit == "mlp":
        plan = plan.with_layer("mlp", layer, sorted(set(range(cfg.ffn(layer))) - set(drop.tolist())))
      elif kind.unit == "hidden":
        plan = plan.replace(hidden=sorted(set(range(cfg.hidden_size)) - set(drop.tolist())))
      else:
        plan = plan.replace(layers=sorted(set(range(cfg.num_layers)) - set(drop.tolist())))
  return plan


def _block_params(cfg: ModelConfig) -> int:
  return cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) \
      - cfg.hidden_size


def prune_structured(params: Params, cfg: ModelConfig, config: StructuredConfig, calibration: Any = None, *,
                     key: jax.Array | None = None, progress: bool = False) -> StructuredResult:
  """Scores the groups, removes the least important ones and returns the smaller model.

  Everything is checked before any gradient is computed: the ratio, the layer ranges, that no
  layer would lose all its heads or channels, and the calibration data (Taylor importance).

  Args:
    params: parameters of ``cfg``.
    cfg: the model configuration.
    config: what to prune and how.
    calibration: ``Windows`` ``[N, T]`` or ``[N, T + 1]`` int token windows (BOS first), needed by
      ``taylor`` (checked by :func:`jaxprune.check_windows`).
    key: PRNG key for Hutchinson probes.
    progress: show a progress bar over iterative steps.

  Returns:
    ``StructuredResult(params, cfg, plan, report)``: the smaller model, what survives (indices into
    the original model) and a JSON-friendly report (parameter counts, kept sizes, each step).
  """
  validate(cfg, config)
  windows = (check_windows(calibration, cfg, needed_by="Taylor importance") if config.importance.needs_gradients
             else None)
  check_finite(params)
  plan, cur_params, cur_cfg, steps = PrunePlan.full(cfg), params, cfg, []
  for step in tqdm(range(1, config.iterative_steps + 1), desc="prune-structured", disable=not progress):
    stats = calibration_gradients(cur_params, cur_cfg, windows, config.importance, key) if windows is not None else None
    step_plan = _step_plan(cur_params, cur_cfg, cfg, config, step, stats)
    cur_params, cur_cfg = remove_groups(cur_params, cur_cfg, step_plan)
    plan = compose(plan, step_plan)
    steps.append({"step": step, "parameters": count_parameters(cur_params)})
  before, after = count_parameters(params), count_parameters(cur_params)
  report = {
      "mode": config.mode, "ratio": config.ratio, "scope": config.scope, "attention_unit": config.attention_unit,
      "importance": dataclasses.asdict(config.importance), "iterative_steps": config.iterative_steps,
      "round_to": config.round_to, "parameters_before": before, "parameters_after": after,
      "removed_fraction": 1.0 - after / before, "block_parameters_before": _block_params(cfg),
      "block_parameters_after": _block_params(cur_cfg),
      "block_removed_fraction": 1.0 - _block_params(cur_cfg) / _block_params(cfg),
      "plan": plan.describe(cfg), "steps": steps,
  }
  return StructuredResult(cur_params, cur_cfg, plan, report)
