"""Model configuration of the LLaMA family (LLaMA, Mistral, Qwen2), with optional per-layer sizes."""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Hyper-parameters of a LLaMA-family decoder.

  Per-layer tuples (``layer_num_heads``, ``layer_num_kv_heads``,
  ``layer_intermediate_size``) describe structurally pruned models whose layers
  differ; when None every layer uses the global value.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # biases on q/k/v projections (Qwen2; LLaMA's attention_bias)
  attention_out_bias: bool = False  # bias on o_proj (LLaMA's attention_bias sets both)
  max_position_embeddings: int = 2048
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  model_type: str = "llama"
  sliding_window: int | None = None
  dtype: str = "float32"
  layer_num_heads: tuple[int, ...] | None = None
  layer_num_kv_heads: tuple[int, ...] | None = None
  layer_intermediate_size: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.dtype not in SUPPORTED_DTYPES:
      raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
    rope_type = self.rope_scaling_dict.get("rope_type", self.rope_scaling_dict.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    for name in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size"):
      value = getattr(self, name)
      if value is not None:
        value = tuple(int(v) for v in value)
        object.__setattr__(self, name, value)
        if len(value) != self.num_layers:
          raise ValueError(f"{name} has {len(value)} entries, expected num_layers={self.num_layers}")
    for i in range(self.num_layers):
      h, kvh = self.heads(i), self.kv_heads(i)
      if kvh < 1 or h < 1 or h % kvh:
        raise ValueError(f"layer {i}: num_heads={h} must be a positive multiple of num_kv_heads={kvh}")

  @property
  def rope_scaling_dict(self) -> dict[str, Any]:
    return dict(self.rope_scaling or ())

  def heads(self, layer: int) -> int:
    """Number of query heads of ``layer``."""
    return self.layer_num_heads[layer] if self.layer_num_heads else self.num_heads

  def kv_heads(self, layer: int) -> int:
    """Number of key/value heads of ``layer``."""
    return self.layer_num_kv_heads[layer] if self.layer_num_kv_heads else self.num_kv_heads

  def ffn(self, layer: int) -> int:
    """MLP intermediate size of ``layer``."""
    return self.layer_intermediate_size[layer] if self.layer_intermediate_size else self.intermediate_size

  @property
  def is_uniform(self) -> bool:
    """True when every layer has the same head counts and MLP size (exportable to Hugging Face)."""
    return all(
        (self.heads(i), self.kv_heads(i), self.ffn(i)) == (self.num_heads, self.num_kv_heads, self.intermediate_size)
        for i in range(self.num_layers))

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["rope_scaling"] = self.rope_scaling_dict or None
    for name in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_size"):
      if out[name] is not None:
        out[name] = list(out[name])
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
    return cls(**d)

  def num_parameters(self) -> int:
    """Parameter count implied by the configuration."""
    hd, d = self.hidden_size, self.head_dim
    n = self.vocab_size * hd * (1 if self.tie_word_embeddings else 2) + hd
    for i in range(self.num_layers):
      h, kvh, f = self.heads(i), self.kv_heads(i), self.ffn(i)
      n += 2 * hd + hd * h * d * 2 + hd * kvh * d * 2 + 3 * hd * f
      if self.attention_bias:
        n += (h + 2 * kvh) * d
      if self.attention_out_bias:
        n += hd
    return n
