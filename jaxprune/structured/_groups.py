"""Dependency groups of LLaMA-family models: which weight slices are coupled and must go together.

Every axis of every parameter is tagged with the *coupled dimension* it indexes: the hidden
channels (shared by the embedding, every norm and every projection), the query-head channels of
layer ``i`` (q_proj columns and o_proj rows), the key/value-head channels of layer ``i`` (k/v_proj
columns) or the MLP channels of layer ``i`` (gate/up columns and down rows). A structured pruning
decision is a :class:`PrunePlan`: the indices of the original model that survive in each coupled
dimension. Removal and masking both read the same tags, so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np

from jaxserve.config import ModelConfig

# A coupled dimension: ("hidden", -1), ("q", layer), ("kv", layer) or ("mlp", layer).
Dim = tuple[str, int]
HIDDEN: Dim = ("hidden", -1)

_LAYER_RE = re.compile(r"^layers_(\d+)/(.+)$")
_BLOCK_DIMS = {
    "input_layernorm/scale": lambda i: (HIDDEN,),
    "post_attention_layernorm/scale": lambda i: (HIDDEN,),
    "self_attn/q_proj/kernel": lambda i: (HIDDEN, ("q", i)),
    "self_attn/q_proj/bias": lambda i: (("q", i),),
    "self_attn/k_proj/kernel": lambda i: (HIDDEN, ("kv", i)),
    "self_attn/k_proj/bias": lambda i: (("kv", i),),
    "self_attn/v_proj/kernel": lambda i: (HIDDEN, ("kv", i)),
    "self_attn/v_proj/bias": lambda i: (("kv", i),),
    "self_attn/o_proj/kernel": lambda i: (("q", i), HIDDEN),
    "self_attn/o_proj/bias": lambda i: (HIDDEN,),
    "mlp/gate_proj/kernel": lambda i: (HIDDEN, ("mlp", i)),
    "mlp/up_proj/kernel": lambda i: (HIDDEN, ("mlp", i)),
    "mlp/down_proj/kernel": lambda i: (("mlp", i), HIDDEN),
}
_TOP_DIMS = {"embed_tokens/embedding": (None, HIDDEN), "norm/scale": (HIDDEN,), "lm_head/kernel": (HIDDEN, None)}
# Member order inside a group: "first" aggregation uses the first member present.
MEMBER_ORDER = ("embed_tokens/embedding", "self_attn/q_proj/kernel", "self_attn/q_proj/bias", "self_attn/k_proj/kernel",
                "self_attn/k_proj/bias", "self_attn/v_proj/kernel", "self_attn/v_proj/bias", "self_attn/o_proj/kernel",
                "self_attn/o_proj/bias", "mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel",
                "input_layernorm/scale", "post_attention_layernorm/scale", "norm/scale", "lm_head/kernel")


def split_layer(path: str) -> tuple[int | None, str]:
  """``"layers_3/mlp/up_proj/kernel"`` -> ``(3, "mlp/up_proj/kernel")``; top-level leaves get ``None``."""
  m = _LAYER_RE.match(path)
  return (int(m.group(1)), m.group(2)) if m else (None, path)


def leaf_dims(path: str) -> tuple[Dim | None, ...]:
  """The coupled dimension behind each axis of the parameter at ``path`` (None: not prunable)."""
  layer, rest = split_layer(path)
  if layer is None and rest in _TOP_DIMS:
    return _TOP_DIMS[rest]
  if layer is not None and rest in _BLOCK_DIMS:
    return _BLOCK_DIMS[rest](layer)
  raise ValueError(f"parameter {path!r} is not part of a LLaMA-family model; structured pruning knows "
                   f"embed_tokens, norm, lm_head and layers_i/{{{', '.join(sorted(_BLOCK_DIMS))}}}")


def member_rank(path: str) -> int:
  """Position of a leaf in :data:`MEMBER_ORDER` (for the ``first`` aggregation)."""
  return MEMBER_ORDER.index(split_layer(path)[1])


def dim_size(cfg: ModelConfig, dim: Dim) -> int:
  """Number of channels of a coupled dimension in ``cfg``."""
  kind, i = dim
  return {"hidden": lambda: cfg.hidden_size, "q": lambda: cfg.heads(i) * cfg.head_dim,
          "kv": lambda: cfg.kv_heads(i) * cfg.head_dim, "mlp": lambda: cfg.ffn(i)}[kind]()


def _as_tuple(x: Iterable[int]) -> tuple[int, ...]:
  return tuple(int(v) for v in x)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrunePlan:
  """What survives a structured pruning, as indices into the *original* model.

  Attributes:
    layers: kept blocks, increasing.
    heads: per original layer, the kept query heads (increasing).
    kv_heads: per original layer, the kept key/value heads (increasing).
    mlp: per original layer, the kept MLP channels (increasing).
    hidden: the kept hidden channels (increasing).

  Entries of removed layers are ignored. A plan is valid for a config when every kept KV head
  keeps the same number (at least one) of its query heads and no kept query head reads a removed
  KV head; query head ``h`` reads KV head ``h // (H // KVH)``.
  """

  layers: tuple[int, ...]
  heads: tuple[tuple[int, ...], ...]
  kv_heads: tuple[tuple[int, ...], ...]
  mlp: tuple[tuple[int, ...], ...]
  hidden: tuple[int, ...]

  def __post_init__(self):
    object.__setattr__(self, "layers", _as_tuple(self.layers))
    object.__setattr__(self, "hidden", _as_tuple(self.hidden))
    for name in ("heads", "kv_heads", "mlp"):
      object.__setattr__(self, name, tuple(_as_tuple(x) for x in getattr(self, name)))

  @classmethod
  def full(cls, cfg: ModelConfig) -> "PrunePlan":
    """The plan that keeps everything."""
    n = cfg.num_layers
    return cls(layers=range(n), heads=[range(cfg.heads(i)) for i in range(n)],
               kv_heads=[range(cfg.kv_heads(i)) for i in range(n)], mlp=[range(cfg.ffn(i)) for i in range(n)],
               hidden=range(cfg.hidden_size))

  def replace(self, **changes) -> "PrunePlan":
    return dataclasses.replace(self, **changes)

  def with_layer(self, field: str, layer: int, keep: Sequence[int]) -> "PrunePlan":
    """A copy whose ``field`` (heads, kv_heads or mlp) keeps ``keep`` in ``layer``."""
    values = list(getattr(self, field))
    values[layer] = tuple(sorted(int(k) for k in keep))
    return self.replace(**{field: values})

  def keep_indices(self, cfg: ModelConfig, dim: Dim) -> np.ndarray:
    """Kept channel indices of a coupled dimension (head channels expanded by ``head_dim``)."""
    kind, i = dim
    if kind == "hidden":
      return np.asarray(self.hidden, np.int64)
    if kind == "mlp":
      return np.asarray(self.mlp[i], np.int64)
    heads = self.heads[i] if kind == "q" else self.kv_heads[i]
    d = cfg.head_dim
    return (np.asarray(heads, np.int64)[:, None] * d + np.arange(d)).reshape(-1)

  def describe(self, cfg: ModelConfig) -> dict:
    """JSON-friendly summary: kept sizes and what was removed, per layer."""
    return {
        "layers_kept": list(self.layers), "hidden_size": len(self.hidden),
        "removed_hidden_channels": sorted(set(range(cfg.hidden_size)) - set(self.hidden)),
        "per_layer": [{"layer": i, "heads": len(self.heads[i]), "kv_heads": len(self.kv_heads[i]),
                       "intermediate_size": len(self.mlp[i]),
                       "removed_kv_heads": sorted(set(range(cfg.kv_heads(i))) - set(self.kv_heads[i])),
                       "removed_heads": sorted(set(range(cfg.heads(i))) - set(self.heads[i]))}
                      for i in self.layers],
    }


def _check_subset(what: str, idx: tuple[int, ...], n: int, allow_empty: bool = False) -> None:
  if not idx and not allow_empty:
    raise ValueError(f"plan keeps no {what}; at least one must remain")
  if list(idx) != sorted(set(idx)) or (idx and (idx[0] < 0 or idx[-1] >= n)):
    raise ValueError(f"plan's {what} must be increasing, distinct indices in [0, {n}), got {list(idx)}")


def check_plan(cfg: ModelConfig, plan: PrunePlan) -> None:
  """Raises a ValueError unless ``plan`` describes a valid smaller model of ``cfg``."""
  n = cfg.num_layers
  for name in ("heads", "kv_heads", "mlp"):
    if len(getattr(plan, name)) != n:
      raise ValueError(f"plan.{name} has {len(getattr(plan, name))} entries, the model has {n} layers")
  _check_subset("layers", plan.layers, n)
  _check_subset("hidden channels", plan.hidden, cfg.hidden_size)
  for i in plan.layers:
    h, kvh = cfg.heads(i), cfg.kv_heads(i)
    _check_subset(f"query heads of layer {i}", plan.heads[i], h)
    _check_subset(f"KV heads of layer {i}", plan.kv_heads[i], kvh)
    _check_subset(f"MLP channels of layer {i}", plan.mlp[i], cfg.ffn(i))
    group = h // kvh
    per_kv = {k: 0 for k in plan.kv_heads[i]}
    for q in plan.heads[i]:
      if q // group not in per_kv:
        raise ValueError(f"layer {i}: query head {q} is kept but its KV head {q // group} is removed")
      per_kv[q // group] += 1
    if len(set(per_kv.values())) != 1 or 0 in per_kv.values():
      raise ValueError(f"layer {i}: every kept KV head must keep the same number (>= 1) of its query heads "
                       f"(GQA), got {per_kv}")


def compose(outer: PrunePlan, inner: PrunePlan) -> PrunePlan:
  """The plan on the original model of applying ``outer`` and then ``inner`` (a plan on outer's result)."""
  layers = tuple(outer.layers[j] for j in inner.layers)
  fields = {}
  for name in ("heads", "kv_heads", "mlp"):
    values = list(getattr(outer, name))
    for j, orig in enumerate(outer.layers):
      if orig in layers:
        values[orig] = tuple(getattr(outer, name)[orig][x] for x in getattr(inner, name)[j])
    fields[name] = values
  return PrunePlan(layers=layers, hidden=tuple(outer.hidden[x] for x in inner.hidden), **fields)
