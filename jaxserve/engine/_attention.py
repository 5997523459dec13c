"""Paged attention backends for ``jaxserve.model.forward``: a chunked XLA path (CPU) and the Pallas kernels (GPU).

The KV pool of layer ``i`` is ``(k_pages, v_pages)``. Its layout depends on the backend
(:attr:`PagedAttention.kv_layout`): ``"head"`` is ``[num_kv_heads(i), num_blocks, block_size,
head_dim]`` (the layout of ``kernels_pallas``); ``"block"`` is ``[num_blocks, num_kv_heads(i),
block_size, head_dim]``, used by the XLA path because gathering whole blocks (every head of a
block is one contiguous run) reads about twice as fast on the CPU. A step's tokens are flattened into
one row ``[1, T]``; sequence ``s`` owns rows ``cu_q_lens[s]:cu_q_lens[s+1]``, which are the
last ``q_len`` of its ``kv_lens[s]`` tokens. The first ``num_decode`` sequences have at most
one query token each (decodes); the rest are prefill chunks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_NEG = -1e30


@flax.struct.dataclass
class PagedMeta:
  """Per-step device metadata shared by every layer (host builds it with numpy)."""

  slot_mapping: Array  # [T] int32: flat slot (block * block_size + offset) receiving each token's K/V
  block_tables: Array  # [S, W] int32: physical blocks of each sequence, padded with the null block 0
  kv_lens: Array  # [S] int32: tokens of each sequence once this step's are written (0 = padding)
  cu_q_lens: Array  # [S + 1] int32: cumulative query tokens
  num_seqs: Array  # [] int32: sequence slots S (decode + prefill, padding included: a padding slot has 0 tokens)
  # static: leading decode slots, padding included (the host's padded decode bucket; 0: no decode batch)
  num_decode: int = flax.struct.field(pytree_node=False, default=0)
  # [T] int32 each row's sequence and visible length (the C++ kernel's view, ``_cpu_kernels.step_rows``):
  # derived once per step on the device by :meth:`with_rows`, else by each layer
  row_seq: Array | None = None
  row_len: Array | None = None

  def with_rows(self, num_rows: int) -> "PagedMeta":
    """This metadata with ``row_seq``/``row_len`` for a ``num_rows``-token step (traced once, read by every layer)."""
    from jaxserve.engine import _cpu_kernels
    row_seq, row_len = _cpu_kernels.step_rows(jnp.asarray(self.cu_q_lens), jnp.asarray(self.kv_lens), num_rows)
    return self.replace(row_seq=row_seq, row_len=row_len)

  def rows(self, num_rows: int) -> tuple[Array, Array]:
    if self.row_seq is not None and self.row_seq.shape[0] == num_rows:
      return self.row_seq, self.row_len
    from jaxserve.engine import _cpu_kernels
    return _cpu_kernels.step_rows(self.cu_q_lens, self.kv_lens, num_rows)


def make_meta(seqs: list[tuple[int, int, tuple[int, ...]]], num_decode: int, *, num_tokens: int,
              decode_slots: int, prefill_slots: int, block_size: int, table_width: int) -> PagedMeta:
  """Builds a step's metadata on the host (numpy), padded to the given bucket sizes.

  Args:
    seqs: ``(q_len, kv_len, block_ids)`` per scheduled sequence, decodes first; their query
      tokens are laid out in this order from row 0.
    num_decode: how many of ``seqs`` are decodes (``q_len == 1``).
    num_tokens: padded token count T (rows past the real tokens are padding).
    decode_slots, prefill_slots: padded counts of decode and prefill sequences.
    block_size: tokens per block.
    table_width: block-table columns (a multiple of the XLA path's ``kv_chunk``).
  """
  s_total = decode_slots + prefill_slots
  tables = np.zeros((s_total, table_width), np.int32)
  kv_lens = np.zeros(s_total, np.int32)
  q_lens = np.zeros(s_total, np.int32)
  slots = np.zeros(num_tokens, np.int32)  # padding tokens write into the null block
  row = 0
  for i, (q_len, kv_len, blocks) in enumerate(seqs):
    j = i if i < num_decode else decode_slots + i - num_decode
    tables[j, :len(blocks)] = blocks
    kv_lens[j], q_lens[j] = kv_len, q_len
    pos = np.arange(kv_len - q_len, kv_len)
    slots[row:row + q_len] = np.asarray(blocks, np.int32)[pos // block_size] * block_size + pos % block_size
    row += q_len
  cu = np.zeros(s_total + 1, np.int32)
  np.cumsum(q_lens, out=cu[1:])
  return PagedMeta(slot_mapping=slots, block_tables=tables, kv_lens=kv_lens, cu_q_lens=cu,
                   num_seqs=np.int32(s_total), num_decode=decode_slots)


KV_LAYOUTS = ("head", "block")


def _check_layout(layout: str) -> None:
  if layout not in KV_LAYOUTS:
    raise ValueError(f"KV layout must be one of {KV_LAYOUTS}, got {layout!r}")


def pool_shape(num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int, layout: str) -> tuple[int, ...]:
  """Shape of one K (or V) pool in ``layout`` (``"head"``: heads first; ``"block"``: blocks first)."""
  _check_layout(layout)
  if layout == "head":
    return (num_kv_heads, num_blocks, block_size, head_dim)
  return (num_blocks, num_kv_heads, block_size, head_dim)


def to_head_layout(pages: Array, layout: str) -> Array:
  """A pool in ``layout`` as ``[KVH, NB, bs, D]`` (a transpose for ``"block"``)."""
  _check_layout(layout)
  return pages if layout == "head" else jnp.swapaxes(pages, 0, 1)


def write_kv(k_pages: Array, v_pages: Array, k: Array, v: Array, slot_mapping: Array,
             layout: str = "head") -> tuple[Array, Array]:
  """Scatters new keys/values ``[T, KVH, D]`` into their slots (padding tokens go to the null block)."""
  _check_layout(layout)
  shape = k_pages.shape
  if layout == "head":
    kvh, nb, bs, d = shape
    k_flat = k_pages.reshape(kvh, nb * bs, d).at[:, slot_mapping].set(jnp.swapaxes(k, 0, 1).astype(k_pages.dtype))
    v_flat = v_pages.reshape(kvh, nb * bs, d).at[:, slot_mapping].set(jnp.swapaxes(v, 0, 1).astype(v_pages.dtype))
    return k_flat.reshape(shape), v_flat.reshape(shape)
  _, _, bs, _ = shape
  blocks, offsets = slot_mapping // bs, slot_mapping % bs
  return (k_pages.at[blocks, :, offsets].set(k.astype(k_pages.dtype)),
          v_pages.at[blocks, :, offsets].set(v.astype(v_pages.dtype)))


def copy_blocks(kv_pools: list[tuple[Array, Array]], src: Array, dst: Array,
                layout: str = "head", native: bool = False) -> list[tuple[Array, Array]]:
  """Copy-on-write: block ``dst[i]`` becomes a copy of ``src[i]`` in every layer (pad with 0 -> 0).

  ``native``: the C++ copy (:func:`_cpu_kernels.copy_blocks`, ``"block"`` layout on the CPU): the same
  result, each pool updated in place, and a program that compiles in a moment (XLA's gather and scatter
  of 16 pools took about 0.4 s to compile per copy-count bucket).
  """
  _check_layout(layout)
  if native and layout == "block":
    from jaxserve.engine import _cpu_kernels
    return [(_cpu_kernels.copy_blocks(k, src, dst), _cpu_kernels.copy_blocks(v, src, dst)) for k, v in kv_pools]
  if layout == "block":
    return [(k.at[dst].set(k[src]), v.at[dst].set(v[src])) for k, v in kv_pools]
  return [(k.at[:, dst].set(k[:, src]), v.at[:, dst].set(v[:, src])) for k, v in kv_pools]


def paged_attention_reference(q: Array, k_pages: Array, v_pages: Array, meta: PagedMeta, *,
                              sliding_window: int | None = None, layout: str = "head") -> Array:
  """The specification: each sequence's tokens gathered densely, causal softmax attention.

  Args:
    q: ``[T, H, D]`` queries of the flattened step.
    k_pages, v_pages: pools in ``layout`` (this step's K/V already written).
    meta: the step's :class:`PagedMeta`.
    sliding_window: optional window (a query at p sees keys in ``(p - window, p]``).
    layout: ``"head"`` (``[KVH, num_blocks, block_size, D]``) or ``"block"`` (blocks first).

  Returns:
    ``[T, H, D]``; rows of padding tokens are zero.
  """
  q_np = np.asarray(q, np.float32)
  kp = np.asarray(to_head_layout(k_pages, layout), np.float32)
  vp = np.asarray(to_head_layout(v_pages, layout), np.float32)
  t, h, d = q_np.shape
  kvh, _, bs, _ = kp.shape
  out = np.zeros((t, h, d), np.float32)
  cu, kv_lens, tables = np.asarray(meta.cu_q_lens), np.asarray(meta.kv_lens), np.asarray(meta.block_tables)
  for s in range(int(meta.num_seqs)):
    q_len, kv_len = int(cu[s + 1] - cu[s]), int(kv_lens[s])
    if q_len == 0:
      continue
    slots = np.arange(kv_len)
    blocks = tables[s][slots // bs]
    k = kp[:, blocks, slots % bs]  # [KVH, L, D]
    v = vp[:, blocks, slots % bs]
    q_pos = np.arange(kv_len - q_len, kv_len)
    mask = slots[None, :] <= q_pos[:, None]
    if sliding_window is not None:
      mask &= slots[None, :] > q_pos[:, None] - sliding_window
    for head in range(h):
      g = head // (h // kvh)
      scores = q_np[cu[s]:cu[s + 1], head] @ k[g].T / math.sqrt(d)
      scores = np.where(mask, scores, -np.inf)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      out[cu[s]:cu[s + 1], head] = (p / p.sum(-1, keepdims=True)) @ v[g]
  return jnp.asarray(out)


def _visible(k_pos: Array, q_pos: Array, sliding_window: int | None) -> Array:
  """``[len(q_pos), len(k_pos)]``: which key positions each query position sees (causal, windowed)."""
  mask = k_pos[None, :] <= q_pos[:, None]
  if sliding_window is not None:
    mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
  return mask


def _sequence_attention(q: Array, k_pages: Array, v_pages: Array, meta: PagedMeta, out: Array,
                        seq_lo: int, seq_hi: int, q_tile: int, kv_chunk: int, sliding_window: int | None) -> Array:
  """Online-softmax attention of sequences ``seq_lo..seq_hi``, query tile by tile, kv chunk by chunk.

  Loops have data-dependent trip counts, so each sequence reads only the KV blocks it owns
  (rounded up to ``kv_chunk`` blocks) and padding sequences cost nothing.

  Shapes: q ``[T + q_tile, H, D]`` (padded so that a tile never runs off the end), pages
  ``[NB, KVH, bs, D]`` (block layout), out like q (float32).
  """
  _, h, d = q.shape
  _, kvh, bs, _ = k_pages.shape
  g = h // kvh
  span = kv_chunk * bs
  scale = 1.0 / math.sqrt(d)

  def seq_body(s, out):
    q_start, q_len, kv_len = meta.cu_q_lens[s], meta.cu_q_lens[s + 1] - meta.cu_q_lens[s], meta.kv_lens[s]
    first_pos = kv_len - q_len
    table = meta.block_tables[s]

    def tile_body(t, out):
      tok0 = q_start + t * q_tile
      rows = t * q_tile + jnp.arange(q_tile)
      q_pos = first_pos + rows  # [Qt]
      valid = rows < q_len
      qt = jax.lax.dynamic_slice_in_dim(q, tok0, q_tile).astype(jnp.float32).reshape(q_tile, kvh, g, d) * scale
      last = first_pos + jnp.minimum(q_len, (t + 1) * q_tile)  # one past the tile's last position
      c_hi = (last + span - 1) // span
      c_lo = 0 if sliding_window is None else jnp.maximum(first_pos + t * q_tile - sliding_window + 1, 0) // span

      def kv_body(c, carry):
        m, l, acc = carry
        ids = jax.lax.dynamic_slice_in_dim(table, c * kv_chunk, kv_chunk)
        k = k_pages[ids].astype(jnp.float32)  # [kc, KVH, bs, D]
        v = v_pages[ids].astype(jnp.float32)
        mask = _visible(c * span + jnp.arange(span), q_pos, sliding_window)  # [Qt, span]
        sc = jnp.einsum("qkgd,ckpd->kgqcp", qt, k).reshape(kvh, g, q_tile, span)
        sc = jnp.where(mask, sc, _NEG)
        m_new = jnp.maximum(m, sc.max(-1))
        p = jnp.exp(sc - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("kgqcp,ckpd->kgqd", p.reshape(kvh, g, q_tile, kv_chunk, bs), v)
        return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

      init = (jnp.full((kvh, g, q_tile), _NEG, jnp.float32), jnp.zeros((kvh, g, q_tile), jnp.float32),
              jnp.zeros((kvh, g, q_tile, d), jnp.float32))
      _, l, acc = jax.lax.fori_loop(c_lo, c_hi, kv_body, init)
      o = acc / jnp.where(l > 0, l, 1.0)[..., None]  # padding rows stay finite (zero)
      o = jnp.transpose(o, (2, 0, 1, 3)).reshape(q_tile, h, d)
      old = jax.lax.dynamic_slice_in_dim(out, tok0, q_tile)
      return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(valid[:, None, None], o, old), tok0, 0)

    return jax.lax.fori_loop(0, (q_len + q_tile - 1) // q_tile, tile_body, out)

  return jax.lax.fori_loop(seq_lo, seq_hi, seq_body, out)


def _decode_attention(q: Array, k_pages: Array, v_pages: Array, meta: PagedMeta, out: Array, kv_chunk: int,
                      sliding_window: int | None, groups: int) -> Array:
  """Online-softmax attention of the decode slots, batched, ``kv_chunk`` blocks per iteration.

  Decode slot ``s`` owns query row ``s`` (when its ``q_len`` is 1). The slots are cut into
  ``groups`` equal groups, each looping to its own longest sequence; shorter sequences read
  the null block past their end (masked). The host orders decode slots longest first, so the
  groups of short sequences stop early. A batch costs a few large operations per layer
  instead of many small per-sequence ones.

  Shapes: q ``[T', H, D]``, pages ``[NB, KVH, bs, D]`` (block layout), out ``[T', H, D]`` float32.
  """
  _, h, d = q.shape
  _, kvh, bs, _ = k_pages.shape
  g = h // kvh
  span = kv_chunk * bs
  live = (meta.cu_q_lens[1:meta.num_decode + 1] - meta.cu_q_lens[:meta.num_decode]) == 1  # [S_dec]
  lens = jnp.where(live, meta.kv_lens[:meta.num_decode], 0)
  qd = q[:meta.num_decode].astype(jnp.float32).reshape(-1, kvh, g, d) * (1.0 / math.sqrt(d))
  size = max(1, meta.num_decode // groups)
  outs = []
  for lo in range(0, meta.num_decode, size):
    b = min(size, meta.num_decode - lo)
    q_pos, tables, qg = lens[lo:lo + b] - 1, meta.block_tables[lo:lo + b], qd[lo:lo + b]

    def body(c, carry, q_pos=q_pos, tables=tables, qg=qg, b=b):
      m, l, acc = carry
      ids = jax.lax.dynamic_slice_in_dim(tables, c * kv_chunk, kv_chunk, axis=1)  # [b, kc]
      k = k_pages[ids].astype(jnp.float32)  # [b, kc, KVH, bs, D]: whole blocks, contiguous
      v = v_pages[ids].astype(jnp.float32)
      mask = _visible(c * span + jnp.arange(span), q_pos, sliding_window)  # [b, span]
      sc = jnp.einsum("bkgd,bckpd->bkgcp", qg, k).reshape(b, kvh, g, span)
      sc = jnp.where(mask[:, None, None, :], sc, _NEG)
      m_new = jnp.maximum(m, sc.max(-1))
      p = jnp.exp(sc - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgcp,bckpd->bkgd", p.reshape(b, kvh, g, kv_chunk, bs), v)
      return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

    n = (jnp.max(lens[lo:lo + b]) + span - 1) // span
    init = (jnp.full((b, kvh, g), _NEG, jnp.float32), jnp.zeros((b, kvh, g), jnp.float32),
            jnp.zeros((b, kvh, g, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n, body, init)
    outs.append((acc / jnp.where(l > 0, l, 1.0)[..., None]).reshape(b, h, d))
  o = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
  return out.at[:meta.num_decode].set(jnp.where(live[:, None, None], o, out[:meta.num_decode]))


@dataclasses.dataclass(frozen=True)
class PagedAttention:
  """Attention backend over the paged pools (hashable: a static argument of the jitted step).

  Attributes:
    impl: ``"xla"`` (chunked loops, reads only owned blocks; the CPU path) or ``"pallas"``
      (``kernels_pallas``: the decode kernel for decode-only steps, the ragged kernel otherwise).
    sliding_window: the model's window, or None.
    q_tile: query tokens per tile of a prefill chunk (XLA path).
    kv_chunk: KV blocks read per inner iteration of a prefill chunk (XLA path); block tables are
      padded to a multiple of it.
    decode_kv_chunk: KV blocks per iteration of the batched decode loop (XLA path; divides kv_chunk).
    decode_groups: decode slots are split into this many groups, each looping to its own longest
      sequence (XLA path; the runner puts the longest sequences first).
    interpret: run the Pallas kernels in interpret mode (CPU tests).
    cpu_kernel: attention (with the K/V write) through the C++ kernel of ``_cpu_kernels`` instead of
      the XLA loops (CPU, float32 or bfloat16 pools, no sliding window, one device); the model runner
      then also runs every Dense on the native matmuls (packed, N:M or bitmask kernels:
      ``jaxserve.weights``).
      None: when it builds and applies; False: never.
  """

  layer_independent: ClassVar[bool] = True  # blocks of one shape share a trace (model.AttentionBackend)
  impl: str = "xla"
  sliding_window: int | None = None
  q_tile: int = 32
  kv_chunk: int = 8
  decode_kv_chunk: int = 2
  decode_groups: int = 8
  interpret: bool | None = None
  cpu_kernel: bool | None = None

  def use_cpu_kernel(self, dtype) -> bool:
    """Whether the step's attention goes through the C++ kernel (decided when the step is traced)."""
    from jaxserve.engine import _cpu_kernels
    if self.impl != "xla" or self.cpu_kernel is False or jax.default_backend() != "cpu":
      return False
    if not _cpu_kernels.supported(dtype, self.sliding_window):
      return False
    return _cpu_kernels.available()

  @property
  def kv_layout(self) -> str:
    """Pool layout this backend reads: ``"block"`` (XLA) or ``"head"`` (Pallas kernels)."""
    return "head" if self.impl == "pallas" else "block"

  def __post_init__(self):
    if self.impl not in ("xla", "pallas"):
      raise ValueError(f"impl must be 'xla' or 'pallas', got {self.impl!r}")
    if self.kv_chunk % self.decode_kv_chunk:
      raise ValueError(f"decode_kv_chunk ({self.decode_kv_chunk}) must divide kv_chunk ({self.kv_chunk})")
    if self.impl == "pallas" and self.sliding_window is not None:
      raise ValueError("the Pallas kernels have no sliding window; use impl='xla' for this model")

  def __call__(self, layer: int, q: Array, k: Array, v: Array, layer_pools: Any, meta: PagedMeta):
    del layer
    if self.use_cpu_kernel(layer_pools[0].dtype):  # K/V write and attention in one kernel call, pools in place
      from jaxserve.engine import _cpu_kernels
      meta = jax.tree.map(jnp.asarray, meta)
      row_seq, row_len = meta.rows(q.shape[1])
      out, k_pages, v_pages = _cpu_kernels.write_paged_rows(
          q[0], k[0], v[0], meta.slot_mapping, *layer_pools, meta.block_tables, row_seq, row_len,
          scale=1.0 / math.sqrt(q.shape[-1]))
      return out[None].astype(q.dtype), (k_pages, v_pages)
    k_pages, v_pages = write_kv(*layer_pools, k[0], v[0], meta.slot_mapping, self.kv_layout)
    out = self.attend(q[0], k_pages, v_pages, meta)
    return out[None].astype(q.dtype), (k_pages, v_pages)

  def attend(self, q: Array, k_pages: Array, v_pages: Array, meta: PagedMeta) -> Array:
    """``[T, H, D]`` attention output for the step's queries (K/V already in pools of ``kv_layout``)."""
    meta = jax.tree.map(jnp.asarray, meta)
    if self.impl == "pallas":
      return self._attend_pallas(q, k_pages, v_pages, meta)
    t = q.shape[0]
    if self.use_cpu_kernel(k_pages.dtype):  # every row (decodes and prefill chunks) in one kernel call
      from jaxserve.engine import _cpu_kernels
      row_seq, row_len = meta.rows(t)
      return _cpu_kernels.paged_rows(q, k_pages, v_pages, meta.block_tables, row_seq, row_len,
                                       scale=1.0 / math.sqrt(q.shape[-1]))
    qp = jnp.pad(q, ((0, self.q_tile), (0, 0), (0, 0)))
    out = jnp.zeros(qp.shape, jnp.float32)
    num_seqs = meta.kv_lens.shape[0]
    if meta.num_decode:
      out = _decode_attention(qp, k_pages, v_pages, meta, out, self.decode_kv_chunk, self.sliding_window,
                              self.decode_groups)
    if num_seqs > meta.num_decode:
      out = _sequence_attention(qp, k_pages, v_pages, meta, out, meta.num_decode, num_seqs, self.q_tile,
                                self.kv_chunk, self.sliding_window)
    return out[:t]

  def _attend_pallas(self, q, k_pages, v_pages, meta):
    import kernels_pallas
    if meta.num_decode == meta.kv_lens.shape[0] == q.shape[0]:  # decode only: row s is sequence s
      return kernels_pallas.paged_attention(q, k_pages, v_pages, meta.block_tables, meta.kv_lens,
                                            interpret=self.interpret)
    return kernels_pallas.ragged_paged_attention(q, k_pages, v_pages, meta.block_tables, meta.kv_lens,
                                                 meta.cu_q_lens, meta.num_seqs, interpret=self.interpret)
