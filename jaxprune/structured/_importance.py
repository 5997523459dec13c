"""Group importance: l1, l2, random and LLM-Pruner's Taylor variants, aggregated over coupled slices.

Per-element saliences (``|W|``, ``W^2``, ``|W g|``, ``|W F W|``, ``|W g - W F W / 2|``) are
summed into one value per *channel* of every member (a parameter touching the group), then into
one value per *unit* (a KV group, a query head, an MLP channel, a hidden channel, a block), and
the members' values are combined by ``sum``, ``mean``, ``max``, ``prod`` or ``first``.
``vectorize`` is LLM-Pruner's ``|sum(W g)|``: the sum is taken over each channel of a member
before the absolute value. ``g`` is the gradient of the mean next-token loss on the calibration
windows; ``F`` is the Fisher diagonal (mean of per-example ``g^2``, accumulated one example at
a time) or the Hessian diagonal (Hutchinson's estimator).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._data import Windows, as_windows, batches_of, lm_loss
from jaxprune._hessian import hutchinson_diagonal
from jaxprune._tree import leaves_with_paths
from jaxprune.structured._groups import Dim, leaf_dims, member_rank, split_layer
from jaxserve.config import ModelConfig

Params = dict[str, Any]
IMPORTANCES = ("l1", "l2", "random", "taylor")
TAYLOR_VARIANTS = ("vectorize", "param_first", "param_second", "param_mix")
AGGREGATIONS = ("sum", "mean", "max", "prod", "first")
HESSIANS = ("fisher", "hutchinson")
# Unit kinds: "attn" (one KV head with its query heads), "head" (one query head), "mlp", "hidden", "layer".
UNIT_KINDS = ("attn", "head", "mlp", "hidden", "layer")
_EVERY_LEAF = r".*"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Importance:
  """How groups are scored.

  Attributes:
    kind: ``l1``, ``l2``, ``random`` or ``taylor``.
    taylor: Taylor variant: ``vectorize`` (|sum W g|), ``param_first`` (|W g|),
      ``param_second`` (|W F W|) or ``param_mix`` (|W g - W F W / 2|).
    aggregation: how a group's members combine: ``sum``, ``mean``, ``max``, ``prod`` or ``first``
      (``prod`` ranks by the sum of logarithms, the same order without underflow).
    hessian: second-order diagonal F: ``fisher`` (mean per-example g^2) or ``hutchinson``
      (:func:`jaxprune._hessian.hutchinson_diagonal`: E[v * Hv] with Rademacher probes,
      Hessian-vector products by forward-over-reverse).
    hutchinson_probes: number of probes for ``hessian="hutchinson"``.
    micro_batch: calibration windows per gradient evaluation for first-order variants
      (second-order Fisher always uses one window at a time).
  """

  kind: str = "taylor"
  taylor: str = "param_first"
  aggregation: str = "sum"
  hessian: str = "fisher"
  hutchinson_probes: int = 8
  micro_batch: int = 8

  def __post_init__(self):
    for name, allowed in (("kind", IMPORTANCES), ("taylor", TAYLOR_VARIANTS), ("aggregation", AGGREGATIONS),
                          ("hessian", HESSIANS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"importance {name} must be one of {allowed}, got {getattr(self, name)!r}")
    for name in ("hutchinson_probes", "micro_batch"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

  @property
  def needs_gradients(self) -> bool:
    return self.kind == "taylor"

  @property
  def needs_second_order(self) -> bool:
    return self.kind == "taylor" and self.taylor in ("param_second", "param_mix")


class GradientStats(NamedTuple):
  grad: Params  # gradient of the mean loss over the calibration windows
  curvature: Params | None  # Fisher or Hessian diagonal (second-order variants only)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _grad(params: Params, cfg: ModelConfig, windows: Windows) -> Params:
  return jax.grad(lm_loss)(params, cfg, windows)


def _accumulate(fn, params: Params, chunks: list[Windows]) -> Params:
  """Weighted mean of ``fn(chunk)`` over chunks (weights = rows); one result in memory at a time."""
  total = sum(len(c.inputs) for c in chunks)
  acc = jax.tree.map(jnp.zeros_like, params)
  for c in chunks:
    acc = jax.tree.map(lambda a, x, n=len(c.inputs): a + x * (n / total), acc, fn(c))
  return acc


def calibration_gradients(params: Params, cfg: ModelConfig, windows: Any, importance: Importance,
                          key: jax.Array | None = None) -> GradientStats:
  """Gradient (and, for second-order variants, the curvature diagonal) on calibration windows.

  ``windows``: ``Windows`` ``[N, T]`` or token windows ``[N, T + 1]`` (see :func:`jaxprune.lm_loss`).
  Memory stays at a few copies of the parameters: gradients are accumulated chunk by chunk
  (per example for the Fisher diagonal), never stored per sample.
  """
  windows = as_windows(windows)
  windows = Windows(jnp.asarray(windows.inputs, jnp.int32), jnp.asarray(windows.targets, jnp.int32))
  chunks = batches_of(windows, importance.micro_batch)
  grad = _accumulate(lambda c: _grad(params, cfg, c), params, chunks)
  curvature = None
  if importance.needs_second_order and importance.hessian == "fisher":
    singles = batches_of(windows, 1)
    curvature = _accumulate(lambda c: jax.tree.map(jnp.square, _grad(params, cfg, c)), params, singles)
  elif importance.needs_second_order:  # jaxprune's Hutchinson estimator over every parameter
    key = jax.random.PRNGKey(0) if key is None else key
    curvature = hutchinson_diagonal(lambda p, batch: lm_loss(p, cfg, batch), params, chunks, key,
                                    num_probes=importance.hutchinson_probes, include=_EVERY_LEAF)
  return GradientStats(grad, curvature)


def element_saliences(params: Params, importance: Importance, stats: GradientStats | None) -> Params:
  """Per-element salience (float32) for the element-wise kinds, or ``W g`` (signed) for ``vectorize``."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if importance.kind == "l1":
    return jax.tree.map(lambda w: jnp.abs(f32(w)), params)
  if importance.kind == "l2":
    return jax.tree.map(lambda w: jnp.square(f32(w)), params)
  if stats is None:
    raise ValueError("Taylor importance needs calibration gradients")
  first = jax.tree.map(lambda w, g: f32(w) * f32(g), params, stats.grad)
  if importance.taylor == "vectorize":
    return first
  if importance.taylor == "param_first":
    return jax.tree.map(jnp.abs, first)
  second = jax.tree.map(lambda w, h: f32(w) * f32(h) * f32(w), params, stats.curvature)
  if importance.taylor == "param_second":
    return jax.tree.map(jnp.abs, second)
  return jax.tree.map(lambda a, b: jnp.abs(a - 0.5 * b), first, second)


def _channel_vector(x: jax.Array, axis: int, signed: bool) -> np.ndarray:
  """Per-channel sum along ``axis`` (``|sum|`` of the signed ``W g`` for ``vectorize``)."""
  v = jnp.sum(x, axis=tuple(a for a in range(x.ndim) if a != axis))
  return np.asarray(jnp.abs(v) if signed else v, np.float64)


# The coupled dimensions whose channels belong to each unit kind.
_RELATED = {"attn": ("q", "kv"), "head": ("q",), "mlp": ("mlp",), "hidden": ("hidden",)}


def _units(cfg: ModelConfig, dim: Dim, vec: np.ndarray, unit_kind: str) -> np.ndarray:
  """Channel vector of a coupled dim -> per-unit sums for ``unit_kind``."""
  kind, i = dim
  if unit_kind == "attn":
    return vec.reshape(cfg.kv_heads(i), -1).sum(1)
  if unit_kind == "head":
    return vec.reshape(cfg.heads(i), -1).sum(1)
  return vec


def _aggregate(members: list[tuple[int, np.ndarray]], how: str) -> np.ndarray:
  m = np.stack([v for _, v in sorted(members, key=lambda t: t[0])])
  if how == "sum":
    return m.sum(0)
  if how == "mean":
    return m.mean(0)
  if how == "max":
    return m.max(0)
  if how == "prod":
    return np.log(np.maximum(m, np.finfo(np.float64).tiny)).sum(0)
  return m[0]


def unit_scores(params: Params, cfg: ModelConfig, importance: Importance, unit_kind: str,
                layers: list[int] | None = None, stats: GradientStats | None = None,
                seed: int = 0) -> dict[int, np.ndarray]:
  """Importance of every unit of one kind: ``{layer: scores[n_units]}`` (layer -1 for hidden).

  Args:
    params: model parameters.
    cfg: their configuration.
    importance: scoring rule.
    unit_kind: ``attn`` (KV groups), ``head`` (query heads), ``mlp``, ``hidden`` or ``layer``
      (for ``layer`` the result is ``{-1: scores[num_layers]}``).
    layers: the layers to score (default all; ignored for ``hidden`` and ``layer``).
    stats: calibration gradients (Taylor only).
    seed: seed of ``random``.
  """
  if unit_kind not in UNIT_KINDS:
    raise ValueError(f"unit_kind must be one of {UNIT_KINDS}, got {unit_kind!r}")
  layers = list(range(cfg.num_layers)) if layers is None else list(layers)
  keys = [-1] if unit_kind in ("hidden", "layer") else layers
  if importance.kind == "random":
    rng = np.random.default_rng(seed)
    sizes = {"attn": cfg.kv_heads, "head": cfg.heads, "mlp": cfg.ffn}
    return {k: rng.random(cfg.num_layers if unit_kind == "layer" else cfg.hidden_size if unit_kind == "hidden"
                          else sizes[unit_kind](k)) for k in keys}
  signed = importance.kind == "taylor" and importance.taylor == "vectorize"
  sal = dict(leaves_with_paths(element_saliences(params, importance, stats)))
  wanted = set(keys)
  members: dict[int, list[tuple[int, np.ndarray]]] = {k: [] for k in keys}
  if unit_kind == "layer":
    per_layer: dict[int, list[tuple[int, float]]] = {i: [] for i in range(cfg.num_layers)}
    for path, x in sal.items():
      layer, _ = split_layer(path)
      if layer is not None:
        per_layer[layer].append((member_rank(path), float(_channel_vector(x, x.ndim - 1, signed).sum())))
    ranks = sorted({r for v in per_layer.values() for r, _ in v})
    table = [(r, np.array([dict(per_layer[i]).get(r, 0.0) for i in range(cfg.num_layers)])) for r in ranks]
    return {-1: _aggregate(table, importance.aggregation)}
  for path, x in sal.items():
    for axis, dim in enumerate(leaf_dims(path)):
      if dim is not None and dim[0] in _RELATED[unit_kind] and dim[1] in wanted:
        units = _units(cfg, dim, _channel_vector(x, axis, signed), unit_kind)
        members[dim[1]].append((member_rank(path), units))
  return {k: _aggregate(v, importance.aggregation) for k, v in members.items()}
