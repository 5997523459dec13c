"""N:M sparse matmul for decode: `x @ W` with W stored as kept values + packed indices.

Three parts, as in the JAX Pallas ops: the kernel body, the wrapper
`nm_sparse_matmul` that validates its inputs and runs the jitted
`pallas_call`, and `nm_sparse_matmul_reference`, the pure-jnp specification.

Weight format (the library's `NMSparse` stores exactly this). W is dense
`[K, N]` (in, out); of every `m` consecutive rows along K each column keeps `n`
values. With `G = K // m` groups and `S = G * n` slot rows (slot row
`r = g * n + j` holds the j-th kept value of group g), columns are cut into
panels of `P` lanes (P a multiple of 16, `NP = ceil(N / P)`; padded lanes past
N hold value 0, index 0):

* `values`: `[NP, S, P]`, `values[p, r, l] = W[g * m + idx, P * p + l]`.
* `meta`: uint32 `[NP, S, P * b // 32]` with `b = 2` index bits if `m <= 4`,
  else 4; lane l's index is
  `(meta[p, r, l // (32 // b)] >> (b * (l % (32 // b)))) & (2**b - 1)`.
* `W[k, col]` is the sum of the values of group `k // m`'s slots whose index is
  `k % m` (slots with a duplicate index hold 0 in practice; they add).

The kernel streams the compressed tiles and expands them on chip, so it reads
`S * N * (itemsize + b / 8)` bytes of weight instead of `K * N * itemsize`
(0.56x for bfloat16 2:4). Grid `(column blocks, K splits, batch tiles)`; each
program loops over K steps of `block_k` rows. Per step it loads each slot's
`[block_k / m, block_n]` values and meta words, decodes the indices with
shifts and ands, builds for each in-group position i the weight rows
`sum_j where(idx_j == i, v_j, 0)` and multiplies them with x's columns
`i, i + m, ...` (m dots, float32 accumulation). The wrapper lays x out by
in-group position first (`[m, B, K / m]`, one small XLA op), so every tile
the kernel reads is contiguous and the compiler can pipeline it. Splits
(split-K, for enough programs at decode sizes) write float32 partials that
XLA sums.

Compiled path: the Pallas Triton lowering, as the paged-attention kernels
(`_compat` silences its JAX 0.11 deprecation warning); interpret mode runs
anywhere.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import _compat
from kernels_pallas._compat import pl

MIN_ROWS = 16  # Triton's dot needs at least 16 rows (and 16 along K and N).
MAX_BLOCK_B = 64  # x rows per program; larger batches get more batch tiles.
MAX_BLOCK_N = 128
TARGET_PROGRAMS = 256  # about two per SM of an H100/H200 (132 SMs).
SHARED_BUDGET = 100 << 10  # auto tiles: two programs fit one H100/H200 SM.
SHARED_LIMIT = 227 << 10  # shared memory one H100/H200 program may use.
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def index_bits(m: int) -> int:
  """Bits per packed in-group index: 2 when m <= 4, else 4."""
  return 2 if m <= 4 else 4


class SparseMatmulConfig(NamedTuple):
  """Static tuning knobs of one pallas_call (hashable)."""

  block_k: int  # K rows per inner step, a multiple of m
  block_n: int  # output lanes per program; divides the panel width P
  block_b: int  # x rows per program (batch tile)
  num_splits: int  # K ranges summed by XLA afterwards (split-K)
  num_warps: int
  num_stages: int
  interpret: bool
  poison_outputs: bool = False  # testing: outputs start as NaN


# -------------------------------------------------------------- reference
def nm_sparse_to_dense(values: jax.Array, meta: jax.Array, *, n: int, m: int,
                       n_out: int) -> jax.Array:
  """Expands the compressed weight to dense `[K, n_out]` in values' dtype.

  Args:
    values: [NP, S, P] kept values, S = (K // m) * n.
    meta: [NP, S, P * b // 32] uint32 packed in-group indices.
    n: values kept per group.
    m: group length along K.
    n_out: N, the real output width (<= NP * P).

  Returns:
    W [K, n_out]: each entry is the float32 sum of its group's slots whose
    index points at it, cast to values' dtype.
  """
  num_panels, slots, panel = values.shape
  bits = index_bits(m)
  per_word = 32 // bits
  lane = jnp.arange(panel)
  words = meta[:, :, lane // per_word]  # [NP, S, P]
  shift = jnp.broadcast_to((bits * (lane % per_word)).astype(jnp.uint32),
                           words.shape)
  idx = lax.shift_right_logical(words, shift) & jnp.uint32((1 << bits) - 1)
  groups = slots // n
  idx = idx.astype(jnp.int32).reshape(num_panels, groups, n, 1, panel)
  v = values.astype(jnp.float32).reshape(num_panels, groups, n, 1, panel)
  pos = jnp.arange(m, dtype=jnp.int32).reshape(1, 1, 1, m, 1)
  dense = jnp.sum(jnp.where(idx == pos, v, jnp.float32(0)), axis=2)
  # [NP, G, m, P] -> [K, NP * P]
  dense = jnp.transpose(dense, (1, 2, 0, 3)).reshape(groups * m,
                                                      num_panels * panel)
  return dense[:, :n_out].astype(values.dtype)


def nm_sparse_matmul_reference(x: jax.Array, values: jax.Array,
                               meta: jax.Array, *, n: int, m: int,
                               n_out: int) -> jax.Array:
  """`x @ W` by expanding W to dense first (the specification).

  Args:
    x: [B, K] activations.
    values: [NP, S, P] kept values (see the module docstring).
    meta: [NP, S, P * b // 32] uint32 packed in-group indices.
    n: values kept per group of m.
    m: group length along K.
    n_out: N, the output width.

  Returns:
    [B, n_out] in x's dtype, accumulated in float32.
  """
  w = nm_sparse_to_dense(values, meta, n=n, m=m, n_out=n_out)
  precision = (lax.Precision.HIGHEST
               if jnp.dtype(x.dtype) == jnp.float32 else None)
  out = jnp.dot(x, w.astype(x.dtype), precision=precision,
                preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


# ------------------------------------------------------------------ kernel
def _nm_kernel(
    x_ref,  # [m, block_b, G_pad] x by in-group position, [i, b, g] = x[b, gm+i]
    values_ref,  # [S, block_n] kept values of this program's lanes
    meta_ref,  # [S, block_n * bits // 32] uint32 packed indices
    *refs,  # [NaN input aliased to the output,] out [block_b, block_n]
    n: int,
    m: int,
    groups_per_step: int,
    steps_per_split: int,
    num_steps: int,
    num_groups: int,
    precision,
):
  out_ref = refs[-1]
  block_b, block_n = out_ref.shape[-2:]
  gs = groups_per_step
  bits = index_bits(m)
  per_word = 32 // bits
  ragged = num_groups % gs != 0  # the last step reaches past K
  words_per_row = block_n // per_word
  # Lane l of a row is bits [b * (l % per_word), ...) of word l // per_word.
  shift = (lax.broadcasted_iota(jnp.int32, (gs, words_per_row, per_word), 2)
           * bits).astype(jnp.uint32)
  mask = jnp.uint32((1 << bits) - 1)
  group_in_step = lax.broadcasted_iota(jnp.int32, (gs,), 0)
  zero = jnp.zeros((), values_ref.dtype)
  first = pl.program_id(1) * steps_per_split
  last = jnp.minimum(first + steps_per_split, num_steps)

  def step(t, acc):
    group = t * gs + group_in_step  # [gs]
    if ragged:  # clamp reads; a sentinel index m keeps the rows out
      live = (group < num_groups)[:, None]
      group = jnp.minimum(group, num_groups - 1)
    w = [None] * m  # w[i]: [gs, block_n] weights of position i of each group
    for j in range(n):
      rows = group * n + j  # [gs] slot rows
      v = values_ref[rows, :]  # [gs, block_n]
      words = meta_ref[rows, :]  # [gs, words_per_row]
      words = jnp.broadcast_to(words[:, :, None], shift.shape)
      idx = (lax.shift_right_logical(words, shift) & mask).astype(jnp.int32)
      idx = idx.reshape(gs, block_n)
      if ragged:
        idx = jnp.where(live, idx, m)
      for i in range(m):
        term = jnp.where(idx == i, v, zero)
        w[i] = term if j == 0 else w[i] + term
    for i in range(m):
      xi = x_ref[i, :, pl.ds(t * gs, gs)]  # [block_b, gs]: x[:, g * m + i]
      acc = acc + lax.dot_general(xi, w[i], (((1,), (0,)), ((), ())),
                                  precision=precision,
                                  preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(first, last, step,
                      jnp.zeros((block_b, block_n), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("n", "m", "n_out", "config"))
def _nm_sparse_matmul(x, values, meta, *, n: int, m: int, n_out: int,
                      config: SparseMatmulConfig):
  batch, k = x.shape
  num_panels, slots, panel = values.shape
  words = meta.shape[2]
  cfg = config
  gs = cfg.block_k // m
  num_groups = k // m
  num_steps = -(-num_groups // gs)
  splits = cfg.num_splits
  steps_per_split = -(-num_steps // splits)
  lane_blocks = panel // cfg.block_n  # column blocks per panel
  col_blocks = num_panels * lane_blocks
  b_tiles = -(-batch // cfg.block_b)
  b_pad = b_tiles * cfg.block_b
  n_pad = num_panels * panel
  meta_block = words // lane_blocks
  precision = (lax.Precision.HIGHEST
               if jnp.dtype(x.dtype) == jnp.float32 else None)
  kernel = functools.partial(
      _nm_kernel, n=n, m=m, groups_per_step=gs,
      steps_per_split=steps_per_split, num_steps=num_steps,
      num_groups=num_groups, precision=precision)

  def panel_map(c, s, b):
    del s, b
    return c // lane_blocks, 0, c % lane_blocks

  # x by in-group position, zero-padded: [m, B_pad, G_pad] (one small XLA op)
  # so that every x tile the kernel reads is contiguous.
  xt = jnp.transpose(x.reshape(batch, num_groups, m), (2, 0, 1))
  xt = jnp.pad(xt, ((0, 0), (0, b_pad - batch),
                    (0, num_steps * gs - num_groups)))
  in_specs = [
      pl.BlockSpec((m, cfg.block_b, num_steps * gs), lambda c, s, b: (0, b, 0)),
      pl.BlockSpec((None, slots, cfg.block_n), panel_map),
      pl.BlockSpec((None, slots, meta_block), panel_map),
  ]
  if splits > 1:
    out_shape = jax.ShapeDtypeStruct((splits, b_pad, n_pad), jnp.float32)
    out_spec = pl.BlockSpec((None, cfg.block_b, cfg.block_n),
                            lambda c, s, b: (s, b, c))
  else:
    out_shape = jax.ShapeDtypeStruct((b_pad, n_pad), x.dtype)
    out_spec = pl.BlockSpec((cfg.block_b, cfg.block_n),
                            lambda c, s, b: (b, c))
  inputs = [xt, values, meta]
  aliases = {}
  if cfg.poison_outputs:  # every element must be overwritten
    aliases[len(inputs)] = 0
    inputs.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
    in_specs.append(out_spec)
  compiler_params = None
  if not cfg.interpret:
    compiler_params = _compat.triton_compiler_params(cfg.num_warps,
                                                     cfg.num_stages)
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(col_blocks, splits, b_tiles),
      in_specs=in_specs,
      out_specs=out_spec,
      input_output_aliases=aliases,
      interpret=cfg.interpret,
      compiler_params=compiler_params,
      name=f"nm_sparse_matmul_{n}of{m}_k{cfg.block_k}_n{cfg.block_n}",
  )(*inputs)
  if splits > 1:
    out = jnp.sum(out[:, :batch, :n_out], axis=0)
  else:
    out = out[:batch, :n_out]
  return out.astype(x.dtype)


# ----------------------------------------------------------------- wrapper
def nm_sparse_matmul(
    x: jax.Array,
    values: jax.Array,
    meta: jax.Array,
    *,
    n: int,
    m: int,
    n_out: int,
    block_k: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
    poison_outputs: bool = False,
) -> jax.Array:
  """`x @ W` for an N:M-compressed W (Pallas kernel, decode-shaped batches).

  Args:
    x: [B, K] activations, float32 or bfloat16.
    values: [NP, S, P] kept values in x's dtype; S = (K // m) * n, P a
      multiple of 16, NP = ceil(n_out / P).
    meta: [NP, S, P * b // 32] uint32 packed in-group indices, b = 2 bits
      when m <= 4 else 4.
    n: values kept per group, 0 < n < m.
    m: group length along K, 2..16; K % m == 0.
    n_out: N, the output width.
    block_k: K rows per inner step, a multiple of m (compiled: block_k // m a
      power of 2 >= 16); default about 256.
    block_n: output lanes per program, dividing P (compiled: a power of 2 >=
      16); default up to 128, smaller when there are few column blocks.
    num_splits: K ranges computed by separate programs and summed in float32
      (split-K); default chosen so the GPU gets about TARGET_PROGRAMS programs.
    num_warps: Triton warps per program (GPU only).
    num_stages: Triton software-pipelining depth (GPU only).
    interpret: run the Pallas interpreter; None = unless the backend is a GPU.
    poison_outputs: testing aid: the kernel's output buffer starts as NaN so
      any element it fails to write shows up.

  Returns:
    [B, n_out] in x's dtype; products accumulated in float32.

  Raises:
    ValueError: on inconsistent shapes or dtypes, a bad N:M pattern, or bad
      tuning knobs (before any work is done).
  """
  _check_inputs(x, values, meta, n=n, m=m, n_out=n_out)
  interpret = _compat.resolve_interpret(interpret)
  batch, k = x.shape
  config = make_config(
      batch=batch, k=k, n_out=n_out, panel=values.shape[2], n=n, m=m,
      itemsize=jnp.dtype(values.dtype).itemsize,
      block_k=block_k, block_n=block_n, num_splits=num_splits,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret,
      poison_outputs=poison_outputs)
  with _compat.quiet_backend_warnings():
    return _nm_sparse_matmul(x, values, meta, n=n, m=m, n_out=n_out,
                             config=config)


def _is_pow2(v: int) -> bool:
  return v >= 1 and (v & (v - 1)) == 0


def _next_pow2(v: int) -> int:
  return 1 if v <= 1 else 1 << (int(v) - 1).bit_length()


def _largest_pow2_divisor(v: int) -> int:
  return v & -v


def _dtype(a: Any) -> Any:
  return jnp.dtype(a.dtype) if hasattr(a, "dtype") else type(a).__name__


def _check_inputs(x, values, meta, *, n, m, n_out) -> None:
  """Shapes, dtypes and the N:M pattern, with what would be right."""
  if not all(isinstance(v, int) and not isinstance(v, bool)
             for v in (n, m, n_out)):
    raise ValueError(f"n, m and n_out must be ints, got n={n!r}, m={m!r}, "
                     f"n_out={n_out!r}")
  if not 2 <= m <= 16:
    raise ValueError(f"m must be in [2, 16], got {m}")
  if not 0 < n < m:
    raise ValueError(f"n must be in [1, m) = [1, {m}), got {n}")
  for name, a, ndim in (("x", x, 2), ("values", values, 3), ("meta", meta, 3)):
    if not hasattr(a, "ndim") or a.ndim != ndim:
      raise ValueError(f"{name} must be a {ndim}-D array, got "
                       f"{getattr(a, 'shape', type(a).__name__)}")
  if _dtype(x) not in DTYPES:
    raise ValueError(f"x dtype must be float32 or bfloat16, got {_dtype(x)}")
  if _dtype(values) != _dtype(x):
    raise ValueError(f"values dtype must equal x dtype {_dtype(x)}, got "
                     f"{_dtype(values)}; cast one of them")
  if _dtype(meta) != jnp.dtype(jnp.uint32):
    raise ValueError(f"meta must be uint32, got {_dtype(meta)}")
  batch, k = x.shape
  num_panels, slots, panel = values.shape
  if batch < 1:
    raise ValueError(f"x needs at least one row, got shape {tuple(x.shape)}")
  if k < m or k % m:
    raise ValueError(f"K (x.shape[1] = {k}) must be a positive multiple of "
                     f"m = {m}")
  if slots != (k // m) * n:
    raise ValueError(f"values.shape[1] must be (K // m) * n = ({k} // {m}) * "
                     f"{n} = {(k // m) * n} slot rows, got {slots}")
  if panel < 16 or panel % 16:
    raise ValueError(f"the panel width values.shape[2] must be a multiple of "
                     f"16, got {panel}")
  if n_out < 1 or num_panels != -(-n_out // panel):
    raise ValueError(f"values must have ceil(n_out / P) = "
                     f"ceil({n_out} / {panel}) panels, got {num_panels}")
  want = (num_panels, slots, panel * index_bits(m) // 32)
  if tuple(meta.shape) != want:
    raise ValueError(f"meta must have shape {want} ({index_bits(m)}-bit "
                     f"indices for m = {m}), got {tuple(meta.shape)}")


def shared_memory_estimate(*, n: int, m: int, block_k: int, block_n: int,
                           block_b: int, num_stages: int,
                           itemsize: int) -> int:
  """Upper estimate of the Triton kernel's shared memory in bytes.

  (stages - 1) buffers of each step's values, meta and x tiles, plus the m
  weight and m x dot operands. Never below what Triton 3.6 allocated for
  sm_90a in 84 checked bfloat16 2:4 configurations (equal with 64 x rows,
  up to ~10% above with 16, more where Triton pipelined less); further above
  it for float32.
  """
  gs = block_k // m
  bits = index_bits(m)
  step = (n * gs * block_n * itemsize + n * gs * (block_n * bits // 32) * 4
          + block_b * block_k * itemsize)
  operands = m * gs * (block_n + block_b) * itemsize
  return max(1, num_stages - 1) * step + operands


def make_config(*, batch: int, k: int, n_out: int, panel: int, n: int, m: int,
                itemsize: int = 2, block_k: int | None = None,
                block_n: int | None = None, num_splits: int | None = None,
                num_warps: int = 4, num_stages: int = 3,
                interpret: bool = False,
                poison_outputs: bool = False) -> SparseMatmulConfig:
  """Validates the knobs and fills in defaults for one problem size.

  Defaults: `block_n` the largest power of 2 dividing P, at most 128, halved
  (not below 32) while there are fewer than 64 column blocks; `block_k` the
  largest of 256 // m .. 16 groups per step (a power of 2) whose tiles fit
  SHARED_BUDGET (then `block_n` halves, not below 32, until they fit);
  splits doubled while there are fewer than TARGET_PROGRAMS programs and
  every split keeps at least two steps.
  """
  num_groups = k // m
  block_b = min(MAX_BLOCK_B, _next_pow2(max(batch, MIN_ROWS)))
  if block_k is not None and not (isinstance(block_k, int) and block_k >= m
                                  and block_k % m == 0):
    raise ValueError(f"block_k must be a positive multiple of m = {m}, got "
                     f"{block_k}")
  auto_block_n = block_n is None
  if block_n is None:
    block_n = min(MAX_BLOCK_N, _largest_pow2_divisor(panel))
    while (-(-n_out // panel) * (panel // block_n) < 64 and block_n > 32
           and panel % (block_n // 2) == 0):
      block_n //= 2
  elif not (isinstance(block_n, int) and block_n >= 16 and block_n % 16 == 0
            and panel % block_n == 0):
    raise ValueError(f"block_n must be a multiple of 16 that divides the "
                     f"panel width {panel}, got {block_n}")
  for name, v in (("num_warps", num_warps), ("num_stages", num_stages)):
    if not (isinstance(v, int) and v >= 1):
      raise ValueError(f"{name} must be an int >= 1, got {v}")
  if block_k is None:
    gs = max(MIN_ROWS, 1 << max(0, (256 // m).bit_length() - 1))
    gs = min(gs, max(MIN_ROWS, _next_pow2(num_groups)))
    while shared_memory_estimate(
        n=n, m=m, block_k=gs * m, block_n=block_n, block_b=block_b,
        num_stages=num_stages, itemsize=itemsize) > SHARED_BUDGET:
      if gs > MIN_ROWS:  # shorter steps first, then narrower programs
        gs //= 2
      elif auto_block_n and block_n > 32:
        block_n //= 2
      else:
        break
    block_k = gs * m
  gs = block_k // m
  num_steps = -(-num_groups // gs)
  programs = -(-n_out // panel) * (panel // block_n) * -(-batch // block_b)
  if num_splits is None:
    num_splits = 1
    while (programs * num_splits < TARGET_PROGRAMS
           and num_steps // (2 * num_splits) >= 2):
      num_splits *= 2
  elif not (isinstance(num_splits, int) and num_splits >= 1):
    raise ValueError(f"num_splits must be an int >= 1, got {num_splits}")
  # No empty splits: every split gets at least one step.
  steps_per_split = -(-num_steps // num_splits)
  num_splits = -(-num_steps // steps_per_split)
  if not interpret:
    if not (_is_pow2(gs) and gs >= MIN_ROWS):
      raise ValueError(f"the compiled GPU kernel needs block_k // m a power "
                       f"of 2 >= 16, got {block_k} // {m} = {gs}; use "
                       "interpret=True or another block_k")
    if not _is_pow2(block_n):
      raise ValueError(f"the compiled GPU kernel needs block_n a power of 2, "
                       f"got {block_n}")
  return SparseMatmulConfig(block_k=block_k, block_n=block_n,
                            block_b=block_b, num_splits=num_splits,
                            num_warps=num_warps, num_stages=num_stages,
                            interpret=bool(interpret),
                            poison_outputs=bool(poison_outputs))

