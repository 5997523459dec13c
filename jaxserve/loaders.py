"""Load models (embedded default, llama2.c, Hugging Face, native checkpoints) and export them to Hugging Face."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import weights
from jaxserve.config import SUPPORTED_MODEL_TYPES, ModelConfig
from jaxserve.model import Params
from jaxserve.tokenizer import Tokenizer, load_tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DEFAULT_MODEL = os.path.join(ASSETS, "stories260K.bin")
DEFAULT_TOKENIZER = os.path.join(ASSETS, "tok512.model")
EVAL_TEXT = os.path.join(ASSETS, "tinystories_valid_prefix.txt")
CALIB_TEXT = os.path.join(ASSETS, "tinystories_train_first2MiB.txt")
NATIVE_CONFIG = "model_config.json"
_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class LoadedModel(NamedTuple):
  cfg: ModelConfig
  params: Params
  tokenizer: Tokenizer | None
  source: str = ""


# Loaders of other formats (e.g. jaxprune's pruned checkpoints) register here: a predicate on
# the path and a loader ``(path, dtype) -> LoadedModel``.
_EXTRA_LOADERS: list[tuple[Callable[[str], bool], Callable[[str, str], LoadedModel]]] = []


def register_loader(matches: Callable[[str], bool], load: Callable[[str, str], LoadedModel]) -> None:
  """Teaches :func:`load_model` a new directory format."""
  _EXTRA_LOADERS.append((matches, load))


def load_model(path: str | None = None, dtype: str = "float32", tokenizer: str | None = None, *,
               dense: bool = False) -> LoadedModel:
  """Loads a model.

  Args:
    path: None for the embedded stories260K; a llama2.c ``.bin`` file; a Hugging Face directory
      (``config.json`` + safetensors); or a directory saved by :func:`save_native`.
    dtype: ``"float32"`` or ``"bfloat16"``.
    tokenizer: optional tokenizer path (default: found beside the model).
    dense: return every kernel as a dense array; default False keeps a compressed checkpoint's
      kernels as the typed leaves of :mod:`jaxserve.weights` (the engine runs them compressed;
      tools that transform parameters, such as pruning, want ``dense=True``).

  Returns:
    ``LoadedModel(cfg, params, tokenizer, source)``.
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  loaded = _load(path, dtype, tokenizer)
  return loaded._replace(params=weights.densify(loaded.params)) if dense else loaded


def _load(path: str | None, dtype: str, tokenizer: str | None) -> LoadedModel:
  if path is None:
    return load_llama2c(DEFAULT_MODEL, tokenizer or DEFAULT_TOKENIZER, dtype)
  if not os.path.exists(path):
    raise ValueError(f"{path}: no such model file or directory")
  for matches, load in _EXTRA_LOADERS:
    if matches(path):
      return load(path, dtype)
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, NATIVE_CONFIG)):
      return load_native(path, dtype)
    if os.path.exists(os.path.join(path, "config.json")):
      return load_hf(path, dtype, tokenizer)
    raise ValueError(f"{path}: directory has neither config.json (Hugging Face) nor {NATIVE_CONFIG} (jaxserve)")
  if path.endswith(".bin"):
    return load_llama2c(path, tokenizer, dtype)
  raise ValueError(f"{path}: unknown model format (expected a llama2.c .bin file or a model directory)")


def _cast(params: Params, dtype: str) -> Params:
  """Every parameter in ``dtype`` (typed kernels: their values; their index arrays keep their types)."""
  def cast(x):
    return x.astype(jnp.dtype(dtype)) if weights.is_typed(x) else weights.on_device(x, jnp.dtype(dtype))
  return jax.tree.map(cast, params, is_leaf=weights.is_typed)


# ----------------------------------------------------------------------------- llama2.c

def _permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Rows of a [out, in] q/k matrix from interleaved-pair RoPE order to rotate-half order."""
  out, inp = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(0, 2, 1, 3).reshape(out, inp)


def _find_llama2c_tokenizer(path: str) -> str:
  folder = os.path.dirname(os.path.abspath(path))
  for pattern in ("tokenizer.model", "tok*.model", "*.model", "tokenizer.bin", "tok*.bin"):
    found = sorted(p for p in glob.glob(os.path.join(folder, pattern)) if os.path.abspath(p) != os.path.abspath(path))
    if found:
      return found[0]
  raise ValueError(f"{path}: no tokenizer beside it (tokenizer.model or tokenizer.bin); pass tokenizer=PATH")


def load_llama2c(path: str, tokenizer: str | None = None, dtype: str = "float32") -> LoadedModel:
  """Reads a llama2.c legacy checkpoint (header of 7 int32, then float32 tensors)."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 28:
    raise ValueError(f"{path}: truncated llama2.c checkpoint: {len(data)} bytes, the header alone needs 28")
  dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", data)
  shared = vocab > 0
  vocab = abs(vocab)
  header = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                vocab_size=vocab, seq_len=seq_len)
  if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv_heads \
      or max(header.values()) > 1 << 20:
    raise ValueError(f"{path}: invalid llama2.c header {header}: sizes must be positive, dim divisible by n_heads "
                     "and n_heads by n_kv_heads")
  hs = dim // n_heads
  kv_dim = n_kv_heads * hs
  shapes = [("tok", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
            ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
            ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
            ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)), ("freq", (2, seq_len, hs // 2))]
  if not shared:
    shapes.append(("wcls", (vocab, dim)))
  need = 28 + 4 * sum(int(np.prod(s)) for _, s in shapes)
  if len(data) < need:
    raise ValueError(f"{path}: truncated llama2.c checkpoint: {len(data)} bytes, the header {header} needs {need}")
  if len(data) > need:
    raise ValueError(f"{path}: {len(data) - need} unexpected trailing bytes after the tensors for header {header}")
  t, off = {}, 28
  for name, shape in shapes:
    n = int(np.prod(shape))
    t[name] = np.frombuffer(data, np.float32, n, off).reshape(shape)
    off += 4 * n
  cfg = ModelConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_layers=n_layers,
                    num_heads=n_heads, num_kv_heads=n_kv_heads, head_dim=hs, rope_theta=10000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=shared, max_position_embeddings=seq_len, bos_token_id=1, eos_token_id=2,
                    dtype=dtype)
  params: Params = {"embed_tokens": {"embedding": t["tok"]}, "norm": {"scale": t["rms_final"]}}
  for i in range(n_layers):
    params[f"layers_{i}"] = {
        "input_layernorm": {"scale": t["rms_att"][i]},
        "post_attention_layernorm": {"scale": t["rms_ffn"][i]},
        "self_attn": {"q_proj": {"kernel": _permute_rope(t["wq"][i], n_heads).T},
                      "k_proj": {"kernel": _permute_rope(t["wk"][i], n_kv_heads).T},
                      "v_proj": {"kernel": t["wv"][i].T}, "o_proj": {"kernel": t["wo"][i].T}},
        "mlp": {"gate_proj": {"kernel": t["w1"][i].T}, "down_proj": {"kernel": t["w2"][i].T},
                "up_proj": {"kernel": t["w3"][i].T}},
    }
  if not shared:
    params["lm_head"] = {"kernel": t["wcls"].T}
  tok = load_tokenizer(tokenizer or _find_llama2c_tokenizer(path), vocab)
  if tok.vocab_size != vocab:
    raise ValueError(f"tokenizer has {tok.vocab_size} tokens but {path} has vocab_size {vocab}")
  return LoadedModel(cfg, _cast(params, dtype), tok, path)


# ----------------------------------------------------------------------------- Hugging Face

def _hf_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
  rope = dict(hf.get("rope_parameters") or {})
  theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
  scaling = hf.get("rope_scaling") or rope or None
  if scaling:
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
      scaling = None
  return theta, scaling


def config_from_hf(hf: dict[str, Any], dtype: str = "float32", source: str = "config.json") -> ModelConfig:
  """Our :class:`ModelConfig` from a Hugging Face ``config.json`` dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  if hf.get("mlp_bias"):
    raise ValueError(f"{source}: mlp_bias=True is not supported")
  try:
    heads = hf["num_attention_heads"]
    theta, scaling = _hf_rope(hf)
    window = hf.get("sliding_window") if (model_type == "mistral" or hf.get("use_sliding_window")) else None
    bias = model_type == "qwen2" or bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rope_theta=theta, rope_scaling=scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bias, attention_out_bias=model_type == "llama" and bias,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_first(hf.get("eos_token_id")), model_type=model_type, sliding_window=window, dtype=dtype)
  except KeyError as e:
    raise ValueError(f"{source}: missing required field {e.args[0]!r}") from e


def _first(x: Any) -> Any:
  return x[0] if isinstance(x, list) else x


def _hf_key_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (our param path, transpose?)."""
  m = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
       "model.norm.weight": (("norm", "scale"), False)}
  if not cfg.tie_word_embeddings:
    m["lm_head.weight"] = (("lm_head", "kernel"), True)
  for i in range(cfg.num_layers):
    pre, ours = f"model.layers.{i}.", f"layers_{i}"
    m[pre + "input_layernorm.weight"] = ((ours, "input_layernorm", "scale"), False)
    m[pre + "post_attention_layernorm.weight"] = ((ours, "post_attention_layernorm", "scale"), False)
    for mod, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
      for n in names:
        m[f"{pre}{mod}.{n}.weight"] = ((ours, mod, n, "kernel"), True)
    if cfg.attention_bias:
      for n in ("q_proj", "k_proj", "v_proj"):
        m[f"{pre}self_attn.{n}.bias"] = ((ours, "self_attn", n, "bias"), False)
    if cfg.attention_out_bias:
      m[f"{pre}self_attn.o_proj.bias"] = ((ours, "self_attn", "o_proj", "bias"), False)
  return m


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _safetensor_files(path: str) -> dict[str, str]:
  """Tensor name -> file, from model.safetensors or a sharded index."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no weight_map")
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  if os.path.exists(single):
    from safetensors import safe_open
    try:
      with safe_open(single, framework="flax") as f:
        return {k: single for k in f.keys()}
    except Exception as e:
      raise ValueError(f"{single}: not a readable safetensors file ({e})") from e
  raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf(path: str, dtype: str = "float32", tokenizer: str | None = None) -> LoadedModel:
  """Loads a Hugging Face LLaMA / Mistral / Qwen2 directory offline."""
  from safetensors import safe_open
  cfg_path = os.path.join(path, "config.json")
  try:
    with open(cfg_path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path}: invalid JSON ({e})") from e
  cfg = config_from_hf(hf, dtype, cfg_path)
  files = _safetensor_files(path)
  params: Params = {}
  by_file: dict[str, list[str]] = {}
  for name, (ours, transpose) in _hf_key_map(cfg).items():
    if name not in files:
      where = os.path.join(path, "model.safetensors")
      raise ValueError(f"{where}: missing tensor {name!r} required by {cfg_path}")
    by_file.setdefault(files[name], []).append(name)
  key_map = _hf_key_map(cfg)
  for file, names in by_file.items():
    try:
      # host arrays: a transpose here compiles nothing, and it is copied once, by _cast
      with safe_open(file, framework="numpy") as f:
        for name in names:
          ours, transpose = key_map[name]
          x = f.get_tensor(name)
          _set_path(params, ours, x.T if transpose else x)
    except ValueError:
      raise
    except Exception as e:
      raise ValueError(f"{file}: could not read tensors ({e})") from e
  _check_shapes(params, cfg, path)
  tok = None
  try:
    tok = load_tokenizer(tokenizer or path)
  except ValueError:
    if tokenizer:
      raise
  return LoadedModel(cfg, _cast(params, dtype), tok, path)


def _check_shapes(params: Params, cfg: ModelConfig, source: str) -> None:
  from jaxserve.model import param_shapes
  expected = param_shapes(cfg)
  flat_exp = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat = dict(jax.tree_util.tree_flatten_with_path(params, is_leaf=weights.is_typed)[0])
  for key, spec in flat_exp.items():
    if key not in flat:
      raise ValueError(f"{source}: missing parameter {jax.tree_util.keystr(key)}")
    if tuple(flat[key].shape) != tuple(spec.shape):
      raise ValueError(f"{source}: parameter {jax.tree_util.keystr(key)} has shape {tuple(flat[key].shape)}, "
                       f"the config implies {tuple(spec.shape)}")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """A Hugging Face ``config.json`` dict for a uniform ``cfg``."""
  if not cfg.is_uniform:
    sizes = [(cfg.heads(i), cfg.kv_heads(i), cfg.ffn(i)) for i in range(cfg.num_layers)]
    raise ValueError("cannot export to Hugging Face: its LLaMA config needs every layer to have the same heads, "
                     f"KV heads and MLP size, but layers have (heads, kv_heads, ffn) = {sizes}; "
                     "save with jaxserve.loaders.save_native instead")
  out = {
      "architectures": [_ARCHS[cfg.model_type]], "model_type": cfg.model_type, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling_dict or None,
      "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
      "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "hidden_act": "silu",
      "torch_dtype": cfg.dtype, "sliding_window": cfg.sliding_window,
  }
  if cfg.model_type == "llama":
    if cfg.attention_bias != cfg.attention_out_bias:
      raise ValueError("cannot export to Hugging Face LLaMA: it has one attention_bias flag for q/k/v and o")
    out["attention_bias"] = cfg.attention_bias
  if cfg.model_type == "qwen2":
    out["use_sliding_window"] = cfg.sliding_window is not None
  return out


def save_hf(cfg: ModelConfig, params: Params, out_dir: str, tokenizer: Tokenizer | None = None) -> str:
  """Writes ``config.json``, ``model.safetensors`` (float32) and the tokenizer files to ``out_dir``.

  A sentencepiece tokenizer is written as ``tokenizer.model`` plus its fast form ``tokenizer.json``.
  """
  from safetensors.numpy import save_file
  config = hf_config(cfg)
  os.makedirs(out_dir, exist_ok=True)
  tensors = {}
  flat = {tuple(k.key for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, (ours, transpose) in _hf_key_map(cfg).items():
    if ours not in flat:
      raise ValueError(f"params lack {'/'.join(ours)} needed for {name}")
    x = np.asarray(jnp.asarray(flat[ours], jnp.float32))
    tensors[name] = np.ascontiguousarray(x.T if transpose else x)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if tokenizer is not None:
    names = tokenizer.save(out_dir)
    if "tokenizer.model" in names and "tokenizer_config.json" not in names:
      with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                   "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}, f, indent=2)
      _write_fast_tokenizer(out_dir)
  return out_dir


def _write_fast_tokenizer(out_dir: str) -> None:
  """Converts the sentencepiece ``tokenizer.model`` in ``out_dir`` to a fast ``tokenizer.json``
  (what Hugging Face and vLLM load first, and what ``load_tokenizer`` then uses)."""
  from transformers import LlamaTokenizerFast
  try:
    fast = LlamaTokenizerFast.from_pretrained(out_dir, from_slow=True, legacy=True, local_files_only=True)
  except Exception as e:  # noqa: BLE001 - transformers raises many kinds
    raise ValueError(f"{out_dir}: could not convert tokenizer.model to tokenizer.json ({e})") from e
  fast.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


# ----------------------------------------------------------------------------- native

NATIVE_FORMAT = "jaxserve-native-v2"
_NATIVE_READABLE = ("jaxserve-native-v1", NATIVE_FORMAT)
_NATIVE_KEYS = ("format", "config", "params", "weights", "masks", "metadata")


class NativeCheckpoint(NamedTuple):
  """What a native directory holds (see :func:`save_native`)."""

  cfg: ModelConfig | None  # None when saved without a model config
  params: Params  # in their saved dtypes; compressed kernels as typed leaves of jaxserve.weights
  masks: dict[str, np.ndarray]  # {path: bool array} of the masks saved beside the params (often none)
  metadata: dict[str, Any]  # what the writer recorded (e.g. how the model was pruned)
  tokenizer: Tokenizer | None


def tree_from_paths(flat: dict[str, Any]) -> dict:
  """The nested dict of ``{path: leaf}`` (``{"a/b": x}`` -> ``{"a": {"b": x}}``; paths as :func:`weights.path_name`)."""
  out: dict = {}
  for path, x in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = x
  return out


def _orbax_save(path: str, tree: Any) -> None:
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, tree, force=True)
    ckpt.wait_until_finished()


def _orbax_restore(path: str, like: Any) -> Any:
  """Restores into host numpy arrays shaped like ``like`` (numpy leaves: no device sharding to guess)."""
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckpt:
    return ckpt.restore(path, like)


def save_native(cfg: ModelConfig | None, params: Params, out_dir: str, tokenizer: Tokenizer | None = None, *,
                masks: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> str:
  """Saves a model in the one native format: any model (non-uniform, compressed, pruned), masks and metadata optional.

  Layout::

    DIR/model_config.json  {"format": "jaxserve-native-v2", "config": the ModelConfig (or null),
                            "params": {path: [shape, dtype]} of every parameter (a typed kernel: its
                            dense shape and value dtype), "weights": {path: spec} of the typed kernels,
                            "masks": [paths of the saved masks], "metadata": {...}}
    DIR/params/            orbax checkpoint of the parameters; a typed kernel (:mod:`jaxserve.weights`:
                           N:M, bitmask, packed) as its arrays under the kernel's path
    DIR/masks/             orbax checkpoint of the masks (only when ``masks`` has any)
    DIR/tokenizer.*        the tokenizer's files (only with ``tokenizer``)

  Args:
    cfg: the model's configuration; None saves parameters that :func:`read_native` restores but
      :func:`load_model` cannot run.
    params: the parameter pytree (arrays or typed leaves).
    out_dir: the directory (created; an existing checkpoint there is overwritten).
    tokenizer: optional tokenizer, saved beside the model.
    masks: optional ``{path: bool array}`` saved beside the parameters (e.g. jaxprune's masks).
    metadata: optional JSON-serialisable dict (e.g. how the model was pruned).

  Returns:
    The absolute directory path.
  """
  masks = {p: np.asarray(m, bool) for p, m in (masks or {}).items()}
  try:
    json.dumps(metadata or {})
  except TypeError as e:
    raise ValueError(f"metadata must be JSON-serialisable ({e})") from None
  flat = {weights.path_name(k): x for k, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=weights.is_typed)[0]}
  for p, m in masks.items():
    if p not in flat or tuple(m.shape) != tuple(flat[p].shape):
      raise ValueError(f"mask {p!r} {tuple(m.shape)} matches no parameter of that shape")
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  specs = {}
  stored = {}
  for p, x in flat.items():
    if weights.is_typed(x):
      stored[p], specs[p] = weights.to_record(x)
    else:
      stored[p] = x
  _orbax_save(os.path.join(out_dir, "params"), tree_from_paths(stored))
  if masks:
    _orbax_save(os.path.join(out_dir, "masks"), tree_from_paths(masks))
  info = {"format": NATIVE_FORMAT, "config": None if cfg is None else cfg.to_dict(),
          "params": {p: [list(x.shape), str(np.dtype(x.dtype))] for p, x in flat.items()},
          "weights": specs, "masks": sorted(masks), "metadata": metadata or {}}
  with open(os.path.join(out_dir, NATIVE_CONFIG), "w") as f:
    json.dump(info, f, indent=2)
  if tokenizer is not None:
    tokenizer.save(out_dir)
  return out_dir


def read_native_info(path: str) -> dict[str, Any]:
  """The parsed ``model_config.json`` of a native directory (format checked), without reading any array."""
  file = os.path.join(path, NATIVE_CONFIG)
  if not os.path.isfile(file):
    raise ValueError(f"{path}: not a native model directory (no {NATIVE_CONFIG})")
  try:
    with open(file) as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: invalid JSON ({e})") from None
  if info.get("format") not in _NATIVE_READABLE:
    raise ValueError(f"{file}: unknown format {info.get('format')!r}, expected one of {_NATIVE_READABLE}")
  return info


def read_native(path: str) -> NativeCheckpoint:
  """Reads everything a directory written by :func:`save_native` holds (also the older ``jaxserve-native-v1``)."""
  path = os.path.abspath(path)
  info = read_native_info(path)
  cfg = None if info.get("config") is None else ModelConfig.from_dict(info["config"])
  specs = info.get("weights") or {}
  if "params" in info:
    shapes = {p: (tuple(shape), np.dtype(dtype)) for p, (shape, dtype) in info["params"].items()}
  else:  # v1 recorded no shapes: the config implies them (restored as float32, as v1 did)
    from jaxserve.model import param_shapes
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg.replace(dtype="float32")))[0]
    shapes = {weights.path_name(k): (tuple(s.shape), np.dtype(s.dtype)) for k, s in flat}

  def like(p, shape, dtype):  # a typed kernel restores as its arrays, rebuilt below
    if p in specs:
      return {k: np.zeros(s, np.dtype(d)) for k, (s, d) in specs[p]["arrays"].items()}
    return np.zeros(shape, dtype)
  params = _orbax_restore(os.path.join(path, "params"),
                          tree_from_paths({p: like(p, *sd) for p, sd in shapes.items()}))
  for key, spec in specs.items():
    *parents, leaf = key.split("/")
    node = params
    for k in parents:
      node = node[k]
    node[leaf] = weights.from_record(node[leaf], spec)
  masks: dict[str, np.ndarray] = {}
  if info.get("masks"):
    nested = _orbax_restore(os.path.join(path, "masks"),
                            tree_from_paths({p: np.zeros(shapes[p][0], bool) for p in info["masks"]}))
    masks = {weights.path_name(k): np.asarray(m, bool) for k, m in jax.tree_util.tree_flatten_with_path(nested)[0]}
  if info["format"] == NATIVE_FORMAT:
    metadata = info.get("metadata") or {}
  else:  # v1 kept what the writer added at the top level
    metadata = {k: v for k, v in info.items() if k not in _NATIVE_KEYS}
  tok = None
  for name in ("tokenizer.json", "tokenizer.model", "tokenizer.bin"):
    if os.path.exists(os.path.join(path, name)):
      tok = load_tokenizer(path, None if cfg is None else cfg.vocab_size)
      break
  return NativeCheckpoint(cfg, params, masks, metadata, tok)


def load_native(path: str, dtype: str | None = None) -> LoadedModel:
  """Loads a directory written by :func:`save_native` as a model to run (it needs its config)."""
  path = os.path.abspath(path)
  ck = read_native(path)
  if ck.cfg is None:
    raise ValueError(f"{path}: saved without a model config, so it cannot run as a model; read its parameters "
                     "with jaxserve.loaders.read_native or jaxprune.checkpoint.restore")
  cfg = ck.cfg if dtype is None or dtype == ck.cfg.dtype else ck.cfg.replace(dtype=dtype)
  _check_shapes(ck.params, cfg, path)
  return LoadedModel(cfg, _cast(ck.params, cfg.dtype), ck.tokenizer, path)
