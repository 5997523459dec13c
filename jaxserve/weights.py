"""Typed weight leaves (packed, N:M, bitmask) for a Dense kernel, their conversions, and the one matmul that dispatches on them.

A ``Dense`` kernel ``[K, N]`` (in, out) is a plain array or one of these pytree nodes; its kind is
its type, never its shape (a packed or compressed kernel is not an array that merely has the
dense shape). Every ``Dense`` of :mod:`jaxserve.model` reaches its matmul through :func:`matmul`,
which dispatches on the leaf's type: a plain array goes to ``lax.dot_general``; a typed leaf to the
first registered native kernel that accepts it (the engine registers its C++ CPU kernels and the
Pallas GPU kernel), or else to the leaf's exact dense expansion (correct everywhere, not fast).

Layouts (all use column panels: columns ``P*p .. P*p + P - 1`` form panel ``p``; ``NP = ceil(N / P)``;
lanes past N hold zero values and index/bit 0):

* :class:`PackedDense`: the whole matrix in panels of 48 columns, then the last ``N % 48`` in
  panels of 16, each ``[K, width]`` contiguous (the CPU matmul's streaming order). ``N % 16 == 0``.
  bfloat16 ones (``pairs``) interleave pairs of rows, as AVX-512 BF16's dot product reads them.
* :class:`NMSparse`: ``n`` kept values of every ``m`` consecutive rows along K, per column
  (``0 < n < m <= 16``, ``K % m == 0``). ``values [NP, S, P]`` with ``S = K / m * n`` slot rows (row
  ``g*n + j``: the j-th kept value of group g, ascending index) and ``meta`` uint32
  ``[NP, S, P*b/32]``: lane l's index within its group is ``(meta[p, r, l // (32/b)] >> (b*(l % (32/b)))) & (2**b-1)``
  with ``b = 2`` bits for ``m <= 4`` and 4 otherwise. 2:4 float32 is 0.53x the dense bytes.
* :class:`BitmaskSparse`: ``P = 16``. ``bits`` uint16 ``[NP, K]`` (bit l: lane l kept), ``values``
  ``[nnz + 16]`` (panel by panel, row by row, kept lanes in ascending order, then 16 zeros) and
  ``offsets`` int32 ``[NP + 1]`` (each panel's first value). 70% sparse float32 is 0.33x the dense bytes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
WIDE, NARROW = 48, 16  # PackedDense panel widths
DEFAULT_PANEL = 16  # NMSparse panel width of the CPU kernels
MAX_BYTES_FRACTION = 0.7  # compress a leaf only when its compressed form is at most this share of its dense bytes


def _pytree(data: tuple[str, ...], meta: tuple[str, ...]):
  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
  return wrap


def _nbytes(*arrays) -> int:
  return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays))


class _Leaf:
  """What every typed leaf answers: its value dtype, its bytes, a cast of its values."""

  _values = "values"  # the field holding the weight values (the others: indices, bits, offsets)

  @property
  def dtype(self):
    return getattr(self, self._values).dtype

  @property
  def nbytes(self) -> int:
    return _nbytes(*jax.tree_util.tree_leaves(self))

  def astype(self, dtype):
    return dataclasses.replace(self, **{self._values: getattr(self, self._values).astype(dtype)})

  def __array__(self, dtype=None, copy=None):
    # without this, np.asarray(leaf) is a 0-d object array that fails far from here, or not at all
    raise TypeError(f"a {type(self).__name__} weight is not an array of its dense shape {self.shape}: multiply with "
                    f"jaxserve.weights.matmul(x, w), or expand it with w.to_dense()")


def on_device(a: Any, dtype: Any = None) -> Array:
  """``a`` (in ``dtype``, if given) as a jax.Array; a host (numpy) array is converted on the host and put
  on the device: ``jnp.asarray`` compiles a copy program for each new shape (ten of them slowed an
  engine's start by a third of a second)."""
  if isinstance(a, np.ndarray):
    return jax.device_put(np.ascontiguousarray(a, dtype))
  return jnp.asarray(a, dtype)


def concatenate(parts: list[Any], axis: int = 0) -> Array:
  """``jnp.concatenate``; concrete arrays are joined on the host (:func:`on_device`), traced ones by jnp."""
  if any(isinstance(p, jax.core.Tracer) for p in parts):
    return jnp.concatenate(parts, axis=axis)
  return on_device(np.concatenate([np.asarray(p) for p in parts], axis=axis))


# ----------------------------------------------------------------------------- packed dense


@_pytree(("panels",), ("shape", "pairs"))
class PackedDense(_Leaf):
  """A dense ``[K, N]`` float kernel in the CPU matmul's column-panel order (``panels``: ``[rows * N]``).

  With ``pairs`` (the bfloat16 kernel's layout), each panel holds pairs of rows side by side:
  ``panel[(kp * width + j) * 2 + t] = W[2 * kp + t, n0 + j]``, ``rows = K`` rounded up to even
  (a zero row past an odd K); without, ``panel[k * width + j] = W[k, n0 + j]`` and ``rows = K``.
  """

  _values = "panels"
  panels: Array
  shape: tuple[int, int]
  pairs: bool = False

  @staticmethod
  def packable(shape: tuple[int, ...]) -> bool:
    """Whether a kernel of this shape can be packed (2-D, N a multiple of 16)."""
    return len(shape) == 2 and shape[1] % NARROW == 0

  @property
  def rows(self) -> int:
    """Rows of the packed matrix: K, or K rounded up to even with ``pairs``."""
    k = self.shape[0]
    return k + k % 2 if self.pairs else k

  @classmethod
  def pack(cls, w: Array, *, pairs: bool | None = None) -> PackedDense:
    """Packs a ``[K, N]`` matrix (``N % 16 == 0``); ``pairs`` defaults to True for bfloat16 (its kernel's layout)."""
    if not cls.packable(w.shape):
      raise ValueError(f"PackedDense needs a [K, N] matrix with N a multiple of 16, got shape {tuple(w.shape)}")
    pairs = jnp.dtype(w.dtype) == jnp.bfloat16 if pairs is None else pairs
    k, n = w.shape
    wide = n // WIDE * WIDE
    # a concrete kernel is rearranged on the host (numpy): loading a model packs every kernel, and
    # eager jnp ops would compile a program for each new shape
    xp = jnp if isinstance(w, jax.core.Tracer) else np
    w = xp.asarray(w)
    if pairs:
      w = xp.pad(w, ((0, k % 2), (0, 0)))
      panel = lambda a, p: xp.transpose(a.reshape(a.shape[0] // 2, 2, -1, p), (2, 0, 3, 1)).reshape(-1)
    else:
      panel = lambda a, p: xp.transpose(a.reshape(a.shape[0], -1, p), (1, 0, 2)).reshape(-1)
    return cls(on_device(xp.concatenate([panel(w[:, :wide], WIDE), panel(w[:, wide:], NARROW)])), (k, n), pairs)

  def to_dense(self) -> Array:
    k, n = self.shape
    rows, wide = self.rows, n // WIDE * WIDE
    xp = jnp if isinstance(self.panels, jax.core.Tracer) else np  # concrete: on the host, as in pack
    panels = xp.asarray(self.panels)
    head, tail = panels[:rows * wide], panels[rows * wide:]
    if self.pairs:  # [panels, rows / 2, width, 2] -> [rows, cols]
      unpanel = lambda a, p: xp.transpose(a.reshape(-1, rows // 2, p, 2), (1, 3, 0, 2)).reshape(rows, -1)
    else:
      unpanel = lambda a, p: xp.transpose(a.reshape(-1, rows, p), (1, 0, 2)).reshape(rows, -1)
    return on_device(xp.concatenate([unpanel(head, WIDE), unpanel(tail, NARROW)], axis=1)[:k])


# ----------------------------------------------------------------------------- N:M


def _index_bits(m: int) -> int:
  return 2 if m <= 4 else 4


def _with_mask(w, mask, name: str) -> tuple[np.ndarray, np.ndarray]:
  """``(w, mask)`` as host arrays, checked: a 2-D ``[in, out]`` kernel and a mask of its shape (default: its nonzeros)."""
  w = np.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"{name}: only 2-D [in, out] kernels compress, got shape {w.shape}")
  mask = (w != 0) if mask is None else np.asarray(mask, bool)
  if mask.shape != w.shape:
    raise ValueError(f"{name}: mask shape {mask.shape} differs from the weight's {w.shape}")
  return w, mask


def _panels(n_cols: int, panel: int) -> int:
  return -(-n_cols // panel)


@_pytree(("values", "meta"), ("n", "m", "shape", "panel"))
class NMSparse(_Leaf):
  """``n`` of every ``m`` weights along the input dimension kept: values plus 2- or 4-bit indices (module docstring)."""

  values: Array  # [NP, S, P]
  meta: Array  # uint32 [NP, S, P * b / 32]
  n: int
  m: int
  shape: tuple[int, int]
  panel: int = DEFAULT_PANEL

  @staticmethod
  def check_pattern(n: int, m: int, panel: int = DEFAULT_PANEL) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m <= 16):
      raise ValueError(f"an N:M pattern needs ints 0 < n < m <= 16, got {n}:{m}")
    if panel < 16 or panel % 16:
      raise ValueError(f"panel must be a positive multiple of 16, got {panel}")

  @classmethod
  def compress(cls, w, mask=None, *, n: int, m: int, panel: int = DEFAULT_PANEL, name: str = "weight") -> NMSparse:
    """Compresses ``w`` ``[K, N]`` keeping the entries of ``mask`` (default: the nonzeros of ``w``).

    Every group of ``m`` consecutive rows of a column must keep at most ``n`` entries (a group
    keeping fewer is filled with zero values at its first unkept positions). Raises ValueError
    naming ``name`` and the first bad group otherwise, or when ``K % m != 0``.
    """
    cls.check_pattern(n, m, panel)
    w, mask = _with_mask(w, mask, name)
    k, cols = w.shape
    if k % m:
      raise ValueError(f"{name}: the input dimension {k} is not a multiple of m={m}; {n}:{m} needs K % {m} == 0")
    groups = k // m
    counts = mask.reshape(groups, m, cols).sum(axis=1)
    if (counts > n).any():
      g, c = np.argwhere(counts > n)[0]
      raise ValueError(f"{name}: not {n}:{m} sparse: group {g} (rows {g * m}..{g * m + m - 1}) of column {c} keeps "
                       f"{counts[g, c]} of {m} entries, at most {n} allowed")
    num_panels = _panels(cols, panel)
    pad = num_panels * panel - cols
    wg = np.pad(np.where(mask, w, 0).reshape(groups, m, cols), ((0, 0), (0, 0), (0, pad)))
    mg = np.pad(mask.reshape(groups, m, cols), ((0, 0), (0, 0), (0, pad)))
    idx = np.argsort(~mg, axis=1, kind="stable")[:, :n]  # kept positions first, ascending; then unkept ones
    vals = np.take_along_axis(wg, idx, axis=1)  # [G, n, Npad]
    bits = _index_bits(m)
    per_word = 32 // bits
    slots = groups * n
    to_panels = lambda a: a.reshape(slots, num_panels, panel).transpose(1, 0, 2)  # [NP, S, P]
    lanes = to_panels(idx.astype(np.uint32)).reshape(num_panels, slots, panel // per_word, per_word)
    meta = (lanes << (bits * np.arange(per_word, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    return cls(on_device(to_panels(vals)), on_device(meta), n, m, (k, cols), panel)

  def indices(self) -> Array:
    """Each kept value's index within its group, ``[NP, S, P]`` int32."""
    bits = _index_bits(self.m)
    per_word = 32 // bits
    shifts = jnp.asarray(bits * np.arange(per_word), jnp.uint32).reshape(1, 1, 1, per_word)
    lanes = (self.meta[..., None] >> shifts) & jnp.uint32((1 << bits) - 1)
    return lanes.reshape(self.values.shape).astype(jnp.int32)

  def _expand(self, x: Array) -> Array:
    """Scatters ``x`` ``[NP, S, P]`` (one entry per slot) to ``[K, N]`` (slots at the same place add)."""
    k, cols = self.shape
    num_panels, slots, panel = self.values.shape
    groups = slots // self.n
    onehot = self.indices().reshape(num_panels, groups, self.n, 1, panel) == jnp.arange(self.m).reshape(1, 1, 1, -1, 1)
    xs = x.reshape(num_panels, groups, self.n, 1, panel)
    dense = jnp.where(onehot, xs, jnp.zeros((), x.dtype)).sum(axis=2, dtype=x.dtype)  # [NP, G, m, P]
    return jnp.transpose(dense.reshape(num_panels, k, panel), (1, 0, 2)).reshape(k, num_panels * panel)[:, :cols]

  def to_dense(self) -> Array:
    """The exact dense ``[K, N]`` matrix (traceable: the fallback matmul uses it)."""
    return self._expand(self.values)

  def mask(self) -> Array:
    """Where the stored slots are (exactly the compressed mask when it kept ``n`` of every ``m``)."""
    return self._expand(jnp.ones(self.values.shape, jnp.int32)) > 0


# ----------------------------------------------------------------------------- bitmask

BITMASK_PANEL = 16


@_pytree(("bits", "values", "offsets"), ("shape",))
class BitmaskSparse(_Leaf):
  """Unstructured sparsity: one bit per weight plus the kept values, panel by panel (module docstring)."""

  bits: Array  # uint16 [NP, K]
  values: Array  # [nnz + 16]
  offsets: Array  # int32 [NP + 1]
  shape: tuple[int, int]

  @classmethod
  def compress(cls, w, mask=None, *, name: str = "weight") -> BitmaskSparse:
    """Compresses ``w`` ``[K, N]`` keeping the entries of ``mask`` (default: the nonzeros of ``w``)."""
    w, mask = _with_mask(w, mask, name)
    k, cols = w.shape
    num_panels = _panels(cols, BITMASK_PANEL)
    pad = num_panels * BITMASK_PANEL - cols
    to_panels = lambda a: np.pad(a, ((0, 0), (0, pad))).reshape(k, num_panels, BITMASK_PANEL).transpose(1, 0, 2)
    mp, wp = to_panels(mask), to_panels(w)  # [NP, K, 16]
    bits = (mp.astype(np.uint32) << np.arange(BITMASK_PANEL, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    values = np.concatenate([wp[mp], np.zeros(BITMASK_PANEL, w.dtype)])
    if values.size >= 2**31:
      raise ValueError(f"{name}: {values.size} kept values do not fit int32 offsets")
    offsets = np.concatenate([[0], np.cumsum(mp.sum(axis=(1, 2)))]).astype(np.int32)
    return cls(on_device(bits.astype(np.uint16)), on_device(values), on_device(offsets), (k, cols))

  def _lanes(self) -> Array:
    """``[NP, K, 16]`` bool: the kept lanes."""
    lanes = jnp.arange(BITMASK_PANEL, dtype=jnp.uint32).reshape(1, 1, BITMASK_PANEL)
    return ((self.bits.astype(jnp.uint32)[..., None] >> lanes) & 1) > 0

  def _unpanel(self, a: Array) -> Array:
    k, cols = self.shape
    return jnp.transpose(a, (1, 0, 2)).reshape(k, -1)[:, :cols]

  def to_dense(self) -> Array:
    """The exact dense ``[K, N]`` matrix (traceable)."""
    kept = self._lanes()
    flat = kept.reshape(-1)
    pos = jnp.cumsum(flat.astype(jnp.int32)) - 1
    dense = jnp.where(flat, self.values[jnp.maximum(pos, 0)], jnp.zeros((), self.values.dtype))
    return self._unpanel(dense.reshape(kept.shape))

  def mask(self) -> Array:
    return self._unpanel(self._lanes())



# ----------------------------------------------------------------------------- dispatch

TYPES = (PackedDense, NMSparse, BitmaskSparse)
Typed = PackedDense | NMSparse | BitmaskSparse
_KERNELS: dict[type, list[Callable[[Array, Any], Array | None]]] = {t: [] for t in TYPES}


def path_name(path: tuple) -> str:
  """A JAX key path as ``"layers_0/mlp/up_proj/kernel"`` (the name errors and checkpoints use)."""
  return "/".join(str(getattr(k, "key", k)) for k in path)


def is_typed(x: Any) -> bool:
  """Whether ``x`` is a typed weight leaf (use as ``is_leaf`` to keep them whole in tree maps)."""
  return isinstance(x, TYPES)


def register_kernel(kind: type, fn: Callable[[Array, Any, Array | None], Array | None]) -> None:
  """Adds a native matmul for leaves of type ``kind``: ``fn(x [M, K], w, rows) -> [M, N]`` or None to decline.

  ``rows`` is None or an int32 scalar: only the first ``rows`` rows of x are real (the kernel may
  skip the others; their output rows must then be zeros). Kernels are tried in registration order;
  registering the same function twice has no effect.
  """
  if kind not in _KERNELS:
    raise ValueError(f"kind must be one of {[t.__name__ for t in TYPES]}, got {kind!r}")
  if fn not in _KERNELS[kind]:
    _KERNELS[kind].append(fn)


def matmul(x: Array, w: Array | Typed, dtype: Any = None, *, rows: Array | None = None) -> Array:
  """``x @ w`` over the last axis of ``x`` for a dense array or a typed leaf ``w`` ``[K, N]``.

  Computed in ``dtype`` (default: x's); a typed leaf goes to the first registered kernel that
  accepts it, else to its exact dense expansion. ``rows`` (an int32 scalar, or None: all) says
  that only the first ``rows`` rows of ``x`` (its leading axes flattened) are real: a native
  kernel may skip the others and return zeros for them; every other path computes them.
  """
  dtype = jnp.dtype(dtype or x.dtype)
  x = x.astype(dtype)
  if not is_typed(w):
    w = jnp.asarray(w, dtype)
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
  k, n = w.shape
  if x.shape[-1] != k:
    raise ValueError(f"matmul: x has {x.shape[-1]} features, the {type(w).__name__} kernel expects {k}")
  x2 = x.reshape(-1, k)
  for fn in _KERNELS[type(w)]:
    out = fn(x2, w, rows)
    if out is not None:
      return out.astype(dtype).reshape(*x.shape[:-1], n)
  return jax.lax.dot_general(x2, to_dense(w).astype(dtype), (((1,), (0,)), ((), ()))).reshape(*x.shape[:-1], n)


def to_dense(w: Any) -> Any:
  """A typed leaf's dense ``[K, N]`` array; anything else unchanged."""
  return w.to_dense() if is_typed(w) else w


def concat_columns(kernels: list[Any]) -> Any:
  """``[A | B | ...]``: kernels ``[K, N_i]`` of one kind side by side, in that kind; None where they cannot be.

  Plain arrays concatenate; packed ones are re-packed (same dtype and ``pairs``); N:M ones (same
  pattern and panel) and bitmask ones join their panels as they are, which needs every ``N_i`` but
  the last to be a multiple of the panel width. Different kinds, dtypes or K give None.
  """
  first = kernels[0]
  kind, k = type(first), first.shape[0]
  if any(type(w) is not kind or w.shape[0] != k or w.dtype != first.dtype for w in kernels):
    return None
  n = sum(w.shape[1] for w in kernels)
  aligned = lambda panel: all(w.shape[1] % panel == 0 for w in kernels[:-1])
  if not is_typed(first):
    return concatenate(kernels, axis=1)
  if kind is PackedDense:
    if any(w.pairs != first.pairs for w in kernels):
      return None
    return PackedDense.pack(np.concatenate([np.asarray(w.to_dense()) for w in kernels], axis=1), pairs=first.pairs)
  if kind is NMSparse:
    if any((w.n, w.m, w.panel) != (first.n, first.m, first.panel) for w in kernels) or not aligned(first.panel):
      return None
    return NMSparse(concatenate([w.values for w in kernels]), concatenate([w.meta for w in kernels]),
                    first.n, first.m, (k, n), first.panel)
  odt = first.offsets.dtype
  if not aligned(BITMASK_PANEL) or any(w.offsets.dtype != odt for w in kernels):
    return None
  offs = [np.asarray(w.offsets) for w in kernels]  # concrete: each part's value count is needed here
  nnz = [int(o[-1]) for o in offs]
  if sum(nnz) + BITMASK_PANEL >= np.iinfo(odt).max:
    return None
  base = np.concatenate([[0], np.cumsum(nnz)])
  offsets = [o[:-1] + odt.type(b) for o, b in zip(offs, base)]  # on the host, as every part here
  offsets.append(np.asarray([base[-1]], odt))
  values = [np.asarray(w.values)[:c] for w, c in zip(kernels, nnz)] + [np.zeros(BITMASK_PANEL, first.dtype)]
  return BitmaskSparse(concatenate([w.bits for w in kernels]), concatenate(values), concatenate(offsets), (k, n))


def nbytes(tree: Any) -> int:
  """Bytes of every array in ``tree`` (typed leaves count their compressed arrays)."""
  return _nbytes(*jax.tree_util.tree_leaves(tree))


def densify(params: Any) -> Any:
  """``params`` with every typed leaf replaced by its dense array."""
  return jax.tree_util.tree_map(to_dense, params, is_leaf=is_typed)


# ----------------------------------------------------------------------------- choosing a format


def _nm_fit(mask: np.ndarray, m: int, exact: bool = False) -> int | None:
  """The smallest n with at most n kept of every m along K (None if K % m or no gain: n == m).

  With ``exact``, only when every group keeps exactly n (so the stored slots are the mask).
  """
  k, cols = mask.shape
  if k % m or k == 0 or cols == 0:
    return None
  counts = mask.reshape(k // m, m, cols).sum(axis=1)
  n = int(counts.max())
  if exact and int(counts.min()) != n:
    return None
  return max(n, 1) if n < m else None


def compressed_bytes(mask: np.ndarray, itemsize: int, exact_mask: bool = False) -> dict[str, tuple[int, Any]]:
  """Bytes of each format that can hold ``mask`` ``[K, N]``: ``{name: (bytes, spec)}``."""
  k, cols = mask.shape
  out: dict[str, tuple[int, Any]] = {"dense": (k * cols * itemsize, None)}
  for m in (4, 8, 16):
    n = _nm_fit(mask, m, exact_mask)
    if n is not None:
      padded = _panels(cols, DEFAULT_PANEL) * DEFAULT_PANEL
      out[f"{n}:{m}"] = (k // m * n * padded * (itemsize + _index_bits(m) / 8), (n, m))
  padded = _panels(cols, BITMASK_PANEL) * BITMASK_PANEL
  out["bitmask"] = (padded // BITMASK_PANEL * k * 2 + (int(mask.sum()) + 16) * itemsize, None)
  return out


def compress(w, mask=None, *, formats: tuple[str, ...] = ("nm", "bitmask"), max_fraction: float = MAX_BYTES_FRACTION,
             exact_mask: bool = False, name: str = "weight") -> Array | NMSparse | BitmaskSparse:
  """The smallest form of ``w`` ``[K, N]`` among dense and ``formats``, keeping ``mask`` (default nonzeros).

  With ``exact_mask``, N:M only where every group keeps exactly n, so that the leaf's ``mask()``
  gives ``mask`` back (a checkpoint's masks are not stored beside compressed leaves).

  A compressed form is chosen only when its bytes are at most ``max_fraction`` of the dense
  bytes (default 0.7: 50% unstructured is 0.53x, 2:4 is 0.53x; 30% sparsity, 0.73x, stays dense
  because the kernels' decoding work would eat the gain of reading fewer bytes); N:M is preferred
  to a bitmask unless the bitmask is over 10% smaller. Dense ``w`` comes back as a masked array.
  """
  w_np, mask_np = _with_mask(w, mask, name)
  options = compressed_bytes(mask_np, w_np.dtype.itemsize, exact_mask)
  dense_bytes = options["dense"][0]
  allowed = {key: v for key, v in options.items()
             if key != "dense" and ("nm" if ":" in key else key) in formats and v[0] <= max_fraction * dense_bytes}
  if not allowed:
    return on_device(np.where(mask_np, w_np, 0)) if mask is not None else w
  # N:M decodes cheaper than a bitmask: preferred unless the bitmask is over 10% smaller
  key = min(allowed, key=lambda kk: allowed[kk][0] * (1.1 if kk == "bitmask" else 1.0))
  if key == "bitmask":
    return BitmaskSparse.compress(w_np, mask_np, name=name)
  n, m = allowed[key][1]
  return NMSparse.compress(w_np, mask_np, n=n, m=m, name=name)


# ----------------------------------------------------------------------------- serialization


def to_record(w: Typed) -> tuple[dict[str, Array], dict[str, Any]]:
  """``(arrays, spec)`` of a typed leaf: its arrays by field name, and a JSON-able spec to rebuild it."""
  arrays = {f.name: getattr(w, f.name) for f in dataclasses.fields(w)
            if isinstance(getattr(w, f.name), (jax.Array, np.ndarray))}
  static = {f.name: getattr(w, f.name) for f in dataclasses.fields(w) if f.name not in arrays}
  static["shape"] = list(static["shape"])
  spec = {"type": type(w).__name__, **static,
          "arrays": {k: [list(a.shape), str(np.dtype(a.dtype))] for k, a in arrays.items()}}
  return arrays, spec


def from_record(arrays: dict[str, Any], spec: dict[str, Any]) -> Typed:
  """The inverse of :func:`to_record`."""
  kinds = {t.__name__: t for t in TYPES}
  if spec.get("type") not in kinds:
    raise ValueError(f"unknown weight type {spec.get('type')!r}; expected one of {sorted(kinds)}")
  static = {k: v for k, v in spec.items() if k not in ("type", "arrays")}
  static["shape"] = tuple(static["shape"])
  return kinds[spec["type"]](**{k: on_device(v) for k, v in arrays.items()}, **static)


def compress_params(params: Any, masks: Any = None, **kwargs) -> Any:
  """``params`` with each 2-D ``kernel`` in its smallest form (:func:`compress`; others unchanged).

  ``masks``: a pytree like ``params`` (bool arrays; None for leaves left alone), e.g. jaxprune's;
  default: every kernel, keeping its nonzeros. ``kwargs`` go to :func:`compress`.
  """
  def one(path, x, m=True):
    name = path_name(path)
    if m is None or is_typed(x) or np.ndim(x) != 2 or getattr(path[-1], "key", None) != "kernel":
      return x
    return compress(x, None if m is True else m, name=name, **kwargs)
  if masks is None:
    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_typed)
  return jax.tree_util.tree_map_with_path(one, params, masks, is_leaf=lambda x: x is None or is_typed(x))
