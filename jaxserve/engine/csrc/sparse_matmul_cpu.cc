// Float32 matmuls for the CPU over compressed (N:M or bitmask) weights, called from XLA as FFI
// custom calls:
//   out[M, N] = x[M, K] @ W[K, N]
// for the first `rows` rows of x (a scalar operand, as in matmul_cpu.cc: the rest is an engine
// step's padding, and its output rows are zeros). W is held in column panels of 16 lanes (panel p: columns 16p .. 16p + 15, NP = ceil(N / 16);
// lanes past N hold zeros and index/bit 0; only the first N output columns are written):
// - N:M: n values kept of every m consecutive rows (a group) of each column. values [NP, S, 16]
//   float32 and meta [NP, S, words] uint32, S = K / m * n slot rows, slot r = g * n + j the j-th
//   kept value of group g; lane l's index in its group is
//   (meta[p, r, l / (32 / b)] >> (b * (l % (32 / b)))) & (2^b - 1), b = 2 bits if m <= 4 else 4,
//   words = b / 2. Slots of a group add (a duplicate index with a zero value is harmless).
// - bitmask: bits [NP, K] uint16 (bit l of bits[p, k]: W[k, 16p + l] kept), values [nnz + 16]
//   float32 (per panel, per k ascending, the kept lanes' values in lane order, as
//   _mm512_maskz_expand_ps reads them; 16 trailing zeros), offsets [NP + 1] (int64, or int32
//   when JAX runs without x64): panel p's first value.
//
// A decode step reads every weight once from memory for a few rows, so fewer bytes is the
// speedup. A work item is a few panels for every row; the calling thread and helpers on XLA's
// intra-op pool take items from the two ends of the list (parallel.h: RunOnPool, Items). Two ways through
// an item:
// - decoded (AVX-512): the weights are decoded in registers, once per tile of up to 8 rows, and
//   multiplied with accumulators in registers. N:M: per (panel, slot row), the 16 indices are
//   decoded (a broadcast and a variable shift) and each row's group x[g*m : g*m + m] is permuted
//   by them (_mm512_permutexvar_ps) and FMA'd with the values: a permute and an FMA per 16
//   kept weights and row, the cost of a dense FMA per 16 weights, so this serves every row
//   count. Bitmask: per (panel, k), the kept values are expanded into their lanes
//   (_mm512_maskz_expand_ps) and FMA'd with each row's x[r, k].
// - expanded (bitmask from kBitmaskExpandRows rows; both formats without AVX-512): a chunk of
//   kChunk rows of three panels is expanded into a dense [chunk, 48] buffer in L1 once, and a
//   dense register tile runs over it for every row, so the expansion is paid once per chunk,
//   not once per row tile.
//
// Built with matmul_cpu.cc by jaxserve.engine._cpu_kernels (JAXSERVE_CPU_KERNEL_ISA=generic
// builds without AVX-512, to test the portable path).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "valid_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kP = 16;        // lanes of a panel
constexpr int kExpandPanels = 3;  // panels expanded together (48 columns, like matmul_cpu's wide panels)
constexpr int64_t kChunk = 128;   // K rows expanded at a time: 24 KB of 3 panels, in L1
constexpr int64_t kNever = INT64_MAX;
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccumulators = 24;  // of 32 vector registers
// Rows from which a call expands bitmask weights: measured on Sapphire Rapids, the decoded tile's
// expansions (three port-5 uops each) cost more than the buffer's stores and reloads from here.
constexpr int64_t kBitmaskExpandRows = 24;
constexpr int64_t kNmExpandRows = kNever;
#else
constexpr int kLanes = 8;
constexpr int kAccumulators = 12;  // of 16
constexpr int64_t kBitmaskExpandRows = 0, kNmExpandRows = 0;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// The dense register tile over an expanded chunk: buf [kc, V * kLanes] holds rows k0 .. k0 + kc
// of the columns n0 .. n0 + V * kLanes, of which the first `width` are real.

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// p[0 : count] (+)= v[0 : count] (count may be below kLanes or negative: a panel's last columns).
inline void StoreColumns(float* p, Vec v, int64_t count, bool accumulate) {
  if (count >= kLanes) {
    Store(p, accumulate ? v + Load(p) : v);
  } else if (count > 0) {
    float lanes[kLanes];  // through a copy: a lane-indexed vector would leave its register
    Store(lanes, v);
    for (int64_t i = 0; i < count; ++i) p[i] = accumulate ? p[i] + lanes[i] : lanes[i];
  }
}

// out[r0 : r0 + R, n0 : n0 + width] (+)= x[r0 : r0 + R, k0 : k0 + kc] @ buf.
template <int R, int V>
void DenseTile(const float* x, int64_t k_dim, int64_t k0, int64_t kc, const float* buf, float* out,
               int64_t n_dim, int64_t r0, int64_t n0, int64_t width, bool accumulate) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
  const float* xr = x + r0 * k_dim + k0;
  for (int64_t k = 0; k < kc; ++k) {
    Vec b[V];
    for (int v = 0; v < V; ++v) b[v] = Load(buf + (k * V + v) * kLanes);
    for (int r = 0; r < R; ++r) {
      const float a = xr[r * k_dim + k];
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      StoreColumns(out + (r0 + r) * n_dim + n0 + v * kLanes, acc[r][v], width - v * kLanes, accumulate);
}

// Every row from r0 on, R at a time, then the rest with halved tiles.
template <int V, int R = std::max(1, kAccumulators / V)>
void DenseRows(const float* x, int64_t k_dim, int64_t k0, int64_t kc, const float* buf, float* out, int64_t n_dim,
               int64_t r0, int64_t m_dim, int64_t n0, int64_t width, bool accumulate) {
  int64_t r = r0;
  for (; r + R <= m_dim; r += R) DenseTile<R, V>(x, k_dim, k0, kc, buf, out, n_dim, r, n0, width, accumulate);
  if constexpr (R > 1) {
    if (r < m_dim) DenseRows<V, R / 2>(x, k_dim, k0, kc, buf, out, n_dim, r, m_dim, n0, width, accumulate);
  }
}

// ---------------------------------------------------------------------------------------------
// The formats: where panel p's weights are, and how to expand rows k0 .. k0 + kc of a panel into
// a dense [kc, 16] block (row stride `stride` floats). `cursor` is the panel's read position,
// carried from one chunk to the next (the bitmask's value index; unused by N:M).

struct NmWeights {
  const float* values;    // [NP, S, 16]
  const uint32_t* meta;   // [NP, S, words]
  int64_t n, m, bits, words, slots;
  static constexpr int64_t kExpandRows = kNmExpandRows;

  int64_t Chunk() const { return CeilDiv(kChunk, m) * m; }  // whole groups
  int64_t Start(int64_t) const { return 0; }

  // Exact index (0 .. m - 1) of lane l of slot row s of panel p.
  int64_t Index(const uint32_t* meta_row, int l) const {
    const int per_word = 32 / bits;
    return (meta_row[l / per_word] >> (bits * (l % per_word))) & ((1u << bits) - 1);
  }

  void Expand(int64_t p, int64_t k0, int64_t kc, float* dst, int64_t stride, int64_t*) const;
};

struct BitmaskWeights {
  const uint16_t* bits;   // [NP, K]
  const float* values;    // [nnz + 16]
  const void* offsets;    // [NP + 1], int64 or int32
  bool offsets64;
  int64_t k_dim;
  static constexpr int64_t kExpandRows = kBitmaskExpandRows;

  int64_t Chunk() const { return kChunk; }
  int64_t Start(int64_t p) const {
    return offsets64 ? static_cast<const int64_t*>(offsets)[p] : static_cast<const int32_t*>(offsets)[p];
  }

  void Expand(int64_t p, int64_t k0, int64_t kc, float* dst, int64_t stride, int64_t* cursor) const;
};

#if defined(__AVX512F__)

// The 16 indices of a slot row; only the low 4 bits of a lane are meaningful (what
// _mm512_permutexvar_ps reads). b = 2: lane l holds idx_l + 4 * idx_{l+1}, which picks idx_l from
// an x group broadcast to the four 128-bit lanes; b = 4: the low nibble is idx_l itself.
template <int B>
inline __m512i NmIndices(const uint32_t* meta_row) {
  if constexpr (B == 2) {
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(meta_row[0])), shifts);
  } else {
    const __m512i shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    const __m512i words = _mm512_mask_mov_epi32(_mm512_set1_epi32(static_cast<int>(meta_row[0])), 0xFF00,
                                                _mm512_set1_epi32(static_cast<int>(meta_row[1])));
    return _mm512_srlv_epi32(words, shifts);
  }
}

// A row's group x[g*m : g*m + m] as NmIndices<B> indexes it. Masked: reads only m floats.
template <int B, bool kMasked>
inline __m512 NmGroup(const float* xg, __mmask16 mask) {
  if constexpr (B == 2) {
    return _mm512_broadcast_f32x4(kMasked ? _mm_maskz_loadu_ps(mask, xg) : _mm_loadu_ps(xg));
  } else {
    return kMasked ? _mm512_maskz_loadu_ps(mask, xg) : _mm512_loadu_ps(xg);
  }
}

// Row k of a bitmask panel: its kept values (at `cursor`, which moves past them) in their lanes.
inline __m512 ExpandRow(const uint16_t* bits_k, const float*& cursor) {
  uint32_t keep = *bits_k;
  asm("" : "+r"(keep));  // a 32-bit popcnt: a 16-bit one merges into its register, chaining the rows
  __m512 v = _mm512_loadu_ps(cursor);
  asm("" : "+v"(v));  // a register vexpandps: the memory form is slower
  cursor += __builtin_popcount(keep);
  return _mm512_maskz_expand_ps(static_cast<__mmask16>(keep), v);
}

void BitmaskWeights::Expand(int64_t p, int64_t k0, int64_t kc, float* dst, int64_t stride, int64_t* cursor) const {
  const uint16_t* b = bits + p * k_dim + k0;
  const float* v = values + *cursor;
  for (int64_t k = 0; k < kc; ++k) _mm512_storeu_ps(dst + k * stride, ExpandRow(b + k, v));
  *cursor = v - values;
}

#else  // portable: expanded items only

void NmWeights::Expand(int64_t p, int64_t k0, int64_t kc, float* dst, int64_t stride, int64_t*) const {
  const float* vp = values + p * slots * kP;
  const uint32_t* mp = meta + p * slots * words;
  for (int64_t k = 0; k < kc; ++k) std::fill(dst + k * stride, dst + k * stride + kP, 0.0f);
  for (int64_t s = k0 / m * n; s < (k0 + kc) / m * n; ++s) {
    float* d = dst + (s / n * m - k0) * stride;
    for (int l = 0; l < kP; ++l) d[Index(mp + s * words, l) * stride + l] += vp[s * kP + l];
  }
}

void BitmaskWeights::Expand(int64_t p, int64_t k0, int64_t kc, float* dst, int64_t stride, int64_t* cursor) const {
  const uint16_t* b = bits + p * k_dim + k0;
  int64_t c = *cursor;
  for (int64_t k = 0; k < kc; ++k)
    for (int l = 0; l < kP; ++l) dst[k * stride + l] = (b[k] >> l) & 1 ? values[c++] : 0.0f;
  *cursor = c;
}

#endif

// ---------------------------------------------------------------------------------------------
// Expanded items: panels p0 .. p0 + Q - 1, chunk by chunk, every row.

template <int Q, class F>
void ExpandItem(const F& f, const float* x, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim, int64_t p0,
                int64_t* end_cursor) {
  constexpr int V = Q * kP / kLanes;
  alignas(64) float buf[(kChunk + kP) * Q * kP];  // a chunk of whole N:M groups: up to kChunk + m - 1 rows
  const int64_t chunk = std::min(f.Chunk(), k_dim);
  int64_t cursor[Q];
  for (int q = 0; q < Q; ++q) cursor[q] = f.Start(p0 + q);
  const int64_t n0 = p0 * kP, width = std::min<int64_t>(Q * kP, n_dim - n0);
  for (int64_t k0 = 0; k0 < k_dim; k0 += chunk) {
    const int64_t kc = std::min(chunk, k_dim - k0);
    for (int q = 0; q < Q; ++q) f.Expand(p0 + q, k0, kc, buf + q * kP, Q * kP, &cursor[q]);
    DenseRows<V>(x, k_dim, k0, kc, buf, out, n_dim, 0, m_dim, n0, width, k0 > 0);
  }
  for (int q = 0; q < Q; ++q) end_cursor[q] = cursor[q];
}

template <class F>
void RunExpandItems(const F& f, const float* x, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim,
                    int64_t* end_cursor, jaxserve::Items& items, bool front) {
  const int64_t panels = CeilDiv(n_dim, kP);
  for (int64_t i = items.Next(front); i >= 0; i = items.Next(front)) {
    const int64_t p0 = i * kExpandPanels;
    switch (std::min<int64_t>(kExpandPanels, panels - p0)) {
      case 3: ExpandItem<3>(f, x, out, m_dim, k_dim, n_dim, p0, end_cursor + p0); break;
      case 2: ExpandItem<2>(f, x, out, m_dim, k_dim, n_dim, p0, end_cursor + p0); break;
      default: ExpandItem<1>(f, x, out, m_dim, k_dim, n_dim, p0, end_cursor + p0); break;
    }
  }
}

#if defined(__AVX512F__)
// ---------------------------------------------------------------------------------------------
// Decoded items (a few rows): Q panels at a time, R rows per tile, accumulators in registers.

constexpr int64_t kAhead = 16;  // slot rows (N:M) or k (bitmask) prefetched ahead

// Panels per item for a tile of R rows: enough independent accumulators to hide the FMA latency.
constexpr int PanelsFor(int r) { return r <= 3 ? 4 : 2; }
// Up to this many panels, a call of up to 3 rows takes items of one panel (and more accumulator
// chains): 4-panel items left too few items to balance between threads. Measured on a 2-core VM,
// 2 threads, weights from L3 (medians): 2:4 1408 x 512 at M = 1 took 42-47 us with 4-panel
// items, 35-38 us with 1-panel items; 512 x 1408 (88 panels) was 2-4 us slower with 1-panel
// items, so it keeps 4.
constexpr int64_t kSinglePanelItems = 32;
// Independent accumulator chains per (row, panel): R * Q * chains >= 4 (the FMA latency).
constexpr int ChainsFor(int r, int q) { return r * q >= 3 ? 1 : 4 / (r * q); }

// Panels per decoded item of a call.
inline int64_t ItemPanels(int64_t m_dim, int64_t panels) {
  const int per_item = PanelsFor(static_cast<int>(std::min<int64_t>(m_dim, 8)));
  return m_dim <= 3 && panels <= kSinglePanelItems ? 1 : per_item;
}

inline void StorePanel(float* out, __m512 v, int64_t n0, int64_t n_dim) {
  if (n0 + kP <= n_dim) {
    _mm512_storeu_ps(out + n0, v);
  } else {
    _mm512_mask_storeu_ps(out + n0, static_cast<__mmask16>((1u << (n_dim - n0)) - 1), v);
  }
}

// out[r0 : r0 + R, panels p0 .. p0 + Q - 1] from N:M weights with b = B bits per index.
template <int B, int R, int Q>
void NmTile(const NmWeights& f, const float* x, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim, int64_t r0,
            int64_t p0) {
  constexpr int A = ChainsFor(R, Q);
  __m512 acc[A][R][Q];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q) acc[a][r][q] = _mm512_setzero_ps();
  const int64_t n = f.n, m = f.m, groups = k_dim / m;
  const float* vals[Q];
  const uint32_t* meta[Q];
  for (int q = 0; q < Q; ++q) {
    vals[q] = f.values + (p0 + q) * f.slots * kP;
    meta[q] = f.meta + (p0 + q) * f.slots * B / 2;
  }
  const float* xr = x + r0 * k_dim;
  const __mmask16 xmask = static_cast<__mmask16>((1u << m) - 1);
  auto group = [&](int64_t g, auto masked, auto chain) {
    constexpr int a = decltype(chain)::value;
    __m512 xg[R];
    for (int r = 0; r < R; ++r) xg[r] = NmGroup<B, decltype(masked)::value>(xr + r * k_dim + g * m, xmask);
    for (int64_t s = g * n; s < g * n + n; ++s) {
      for (int q = 0; q < Q; ++q) {
        __builtin_prefetch(vals[q] + (s + kAhead) * kP, 0, 3);
        const __m512i idx = NmIndices<B>(meta[q] + s * B / 2);
        const __m512 v = _mm512_loadu_ps(vals[q] + s * kP);
        for (int r = 0; r < R; ++r)
          acc[a][r][q] = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, xg[r]), v, acc[a][r][q]);
      }
    }
  };
  // A full-width load of the last row's group must stay inside x: the groups past `safe` load m floats only.
  const int64_t width = B == 2 ? 4 : 16;
  const int64_t room = (m_dim - r0 - R + 1) * k_dim - width;
  const int64_t safe = room < 0 ? 0 : std::min(groups, room / m + 1);
  int64_t g = 0;
  for (; g + A <= safe; g += A) {
    group(g, std::false_type{}, std::integral_constant<int, 0>{});
    if constexpr (A > 1) group(g + 1, std::false_type{}, std::integral_constant<int, 1 % A>{});
    if constexpr (A > 2) group(g + 2, std::false_type{}, std::integral_constant<int, 2 % A>{});
    if constexpr (A > 3) group(g + 3, std::false_type{}, std::integral_constant<int, 3 % A>{});
  }
  for (; g < safe; ++g) group(g, std::false_type{}, std::integral_constant<int, 0>{});
  for (; g < groups; ++g) group(g, std::true_type{}, std::integral_constant<int, 0>{});
  for (int a = 1; a < A; ++a)
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q) acc[0][r][q] = _mm512_add_ps(acc[0][r][q], acc[a][r][q]);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) StorePanel(out + (r0 + r) * n_dim, acc[0][r][q], (p0 + q) * kP, n_dim);
}

// out[r0 : r0 + R, panels p0 .. p0 + Q - 1] from bitmask weights; returns each panel's end cursor.
template <int R, int Q>
void BitmaskTile(const BitmaskWeights& f, const float* x, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim,
                 int64_t r0, int64_t p0, int64_t* end_cursor) {
  constexpr int A = ChainsFor(R, Q);
  __m512 acc[A][R][Q];
  for (int a = 0; a < A; ++a)
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q) acc[a][r][q] = _mm512_setzero_ps();
  const float* cur[Q];
  const uint16_t* bits[Q];
  for (int q = 0; q < Q; ++q) {
    cur[q] = f.values + f.Start(p0 + q);
    bits[q] = f.bits + (p0 + q) * k_dim;
  }
  const float* xr = x + r0 * k_dim;
  auto row = [&](int64_t k, auto chain) {
    constexpr int a = decltype(chain)::value;
    __m512 xb[R];
    for (int r = 0; r < R; ++r) xb[r] = _mm512_set1_ps(xr[r * k_dim + k]);
    for (int q = 0; q < Q; ++q) {
      const __m512 v = ExpandRow(bits[q] + k, cur[q]);
      __builtin_prefetch(cur[q] + kAhead * kP, 0, 3);
      for (int r = 0; r < R; ++r) acc[a][r][q] = _mm512_fmadd_ps(xb[r], v, acc[a][r][q]);
    }
  };
  int64_t k = 0;
  for (; k + A <= k_dim; k += A) {
    row(k, std::integral_constant<int, 0>{});
    if constexpr (A > 1) row(k + 1, std::integral_constant<int, 1 % A>{});
    if constexpr (A > 2) row(k + 2, std::integral_constant<int, 2 % A>{});
    if constexpr (A > 3) row(k + 3, std::integral_constant<int, 3 % A>{});
  }
  for (; k < k_dim; ++k) row(k, std::integral_constant<int, 0>{});
  for (int a = 1; a < A; ++a)
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q) acc[0][r][q] = _mm512_add_ps(acc[0][r][q], acc[a][r][q]);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < Q; ++q) StorePanel(out + (r0 + r) * n_dim, acc[0][r][q], (p0 + q) * kP, n_dim);
  for (int q = 0; q < Q; ++q) end_cursor[q] = cur[q] - f.values;
}

// A tile of R rows over panels p0 .. p0 + q - 1 (q <= Q: the last item may be short).
template <int R, int Q>
void DecodedTile(const NmWeights& f, const float* x, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim,
                 int64_t r0, int64_t p0, int64_t q, int64_t*) {
  if (q == Q) {
    f.bits == 2 ? NmTile<2, R, Q>(f, x, out, m_dim, k_dim, n_dim, r0, p0)
                : NmTile<4, R, Q>(f, x, out, m_dim, k_dim, n_dim, r0, p0);
  } else {
    for (int64_t i = 0; i < q; ++i)
      f.bits == 2 ? NmTile<2, R, 1>(f, x, out, m_dim, k_dim, n_dim, r0, p0 + i)
                  : NmTile<4, R, 1>(f, x, out, m_dim, k_dim, n_dim, r0, p0 + i);
  }
}

template <int R, int Q>
void DecodedTile(const BitmaskWeights& f, const float* x, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim,
                 int64_t r0, int64_t p0, int64_t q, int64_t* end_cursor) {
  if (q == Q) {
    BitmaskTile<R, Q>(f, x, out, m_dim, k_dim, n_dim, r0, p0, end_cursor);
  } else {
    for (int64_t i = 0; i < q; ++i) BitmaskTile<R, 1>(f, x, out, m_dim, k_dim, n_dim, r0, p0 + i, end_cursor + i);
  }
}

// Rows r0 .. r0 + rows - 1 (rows <= 8) of panels p0 .. p0 + q - 1.
template <class F>
void DecodedRows(const F& f, const float* x, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim, int64_t r0,
                 int64_t rows, int64_t p0, int64_t q, int64_t* end_cursor) {
  switch (rows) {
#define JAXSERVE_ROWS_CASE(R) \
  case R: DecodedTile<R, PanelsFor(R)>(f, x, out, m_dim, k_dim, n_dim, r0, p0, q, end_cursor); break;
    JAXSERVE_ROWS_CASE(1)
    JAXSERVE_ROWS_CASE(2)
    JAXSERVE_ROWS_CASE(3)
    JAXSERVE_ROWS_CASE(4)
    JAXSERVE_ROWS_CASE(5)
    JAXSERVE_ROWS_CASE(6)
    JAXSERVE_ROWS_CASE(7)
    JAXSERVE_ROWS_CASE(8)
#undef JAXSERVE_ROWS_CASE
    default: break;
  }
}

// Items of ItemPanels panels; tiles of up to 8 rows.
template <class F>
void RunDecodedItems(const F& f, const float* x, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim,
                     int64_t* end_cursor, jaxserve::Items& items, bool front) {
  const int64_t panels = CeilDiv(n_dim, kP), per_item = ItemPanels(m_dim, panels);
  for (int64_t i = items.Next(front); i >= 0; i = items.Next(front)) {
    const int64_t p0 = i * per_item, q = std::min(per_item, panels - p0);
    for (int64_t r0 = 0; r0 < m_dim; r0 += 8) {
      const int64_t rows = std::min<int64_t>(8, m_dim - r0);
      if (PanelsFor(static_cast<int>(rows)) == per_item) {
        DecodedRows(f, x, out, m_dim, k_dim, n_dim, r0, rows, p0, q, end_cursor + p0);
      } else {  // a last tile with another item width: its panels one at a time
        for (int64_t j = 0; j < q; ++j) {
          DecodedRows(f, x, out, m_dim, k_dim, n_dim, r0, rows, p0 + j, 1, end_cursor + p0 + j);
        }
      }
    }
  }
}
#endif

// Runs a call: decoded or expanded items on the pool. end_cursor [NP] receives each panel's
// read position after the call (checked against the bitmask's offsets); returns false when
// nothing was read (no rows or columns).
template <class F>
bool Run(ffi::ThreadPool& pool, const F& f, const float* x, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim,
         int64_t num_threads, int64_t* end_cursor) {
  const int64_t panels = CeilDiv(n_dim, kP);
  if (m_dim == 0 || n_dim == 0) return false;
  if (k_dim == 0) {
    std::fill(out, out + m_dim * n_dim, 0.0f);
    for (int64_t p = 0; p < panels; ++p) end_cursor[p] = f.Start(p);
    return true;
  }
#if defined(__AVX512F__)
  if (m_dim < F::kExpandRows) {
    const int64_t count = CeilDiv(panels, ItemPanels(m_dim, panels));
    jaxserve::Items items(count);
    auto run = [&](bool caller) { RunDecodedItems(f, x, out, m_dim, k_dim, n_dim, end_cursor, items, caller); };
    jaxserve::RunOnPool(pool, num_threads, count, run);
    return true;
  }
#endif
  if constexpr (F::kExpandRows != kNever) {
    const int64_t count = CeilDiv(panels, kExpandPanels);
    jaxserve::Items items(count);
    auto run = [&](bool caller) { RunExpandItems(f, x, out, m_dim, k_dim, n_dim, end_cursor, items, caller); };
    jaxserve::RunOnPool(pool, num_threads, count, run);
  }
  return true;
}

ffi::Error Invalid(const std::string& msg) { return ffi::Error::InvalidArgument(msg); }

std::string Dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

ffi::Error NmMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> values,
                        ffi::Buffer<ffi::U32> meta, ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out,
                        int64_t n, int64_t m, int64_t num_threads) {
  auto xd = x.dimensions(), vd = values.dimensions(), md = meta.dimensions(), od = out->dimensions();
  if (m < 2 || m > 16 || n <= 0 || n >= m) {
    return Invalid("nm_matmul_cpu: need 2 <= m <= 16 and 0 < n < m, got n=" + std::to_string(n) +
                   " m=" + std::to_string(m));
  }
  if (xd.size() != 2 || vd.size() != 3 || md.size() != 3 || od.size() != 2 || vd[2] != kP) {
    return Invalid("nm_matmul_cpu: expected x [M, K], values [NP, S, 16], meta [NP, S, W], out [M, N]; got x " +
                   Dims(xd) + ", values " + Dims(vd) + ", meta " + Dims(md) + ", out " + Dims(od));
  }
  const int64_t m_dim = xd[0], k_dim = xd[1], n_dim = od[1], bits = m <= 4 ? 2 : 4;
  if (k_dim % m != 0) return Invalid("nm_matmul_cpu: K=" + std::to_string(k_dim) + " is not a multiple of m");
  const int64_t slots = k_dim / m * n;
  if (od[0] != m_dim || vd[0] != CeilDiv(n_dim, kP) || vd[1] != slots || md[0] != vd[0] || md[1] != slots ||
      md[2] != bits / 2) {
    return Invalid("nm_matmul_cpu: for x " + Dims(xd) + ", out " + Dims(od) + " and " + std::to_string(n) + ":" +
                   std::to_string(m) + " expected values [" + std::to_string(CeilDiv(n_dim, kP)) + ", " +
                   std::to_string(slots) + ", 16] and meta [" + std::to_string(CeilDiv(n_dim, kP)) + ", " +
                   std::to_string(slots) + ", " + std::to_string(bits / 2) + "], got " + Dims(vd) + " and " +
                   Dims(md));
  }
  const int64_t valid = jaxserve::ValidRows(rows, m_dim);
  if (valid < 0) return Invalid("nm_matmul_cpu: rows must hold one int32 (the real rows of x)");
  jaxserve::ZeroPaddingRows(out->typed_data(), valid, m_dim, n_dim);
  const NmWeights f{values.typed_data(), meta.typed_data(), n, m, bits, bits / 2, slots};
  std::vector<int64_t> end_cursor(vd[0]);
  Run(pool, f, x.typed_data(), out->typed_data(), valid, k_dim, n_dim, num_threads, end_cursor.data());
  return ffi::Error::Success();
}

ffi::Error BitmaskMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U16> bits,
                             ffi::Buffer<ffi::F32> values, ffi::AnyBuffer offsets, ffi::Buffer<ffi::S32> rows,
                             ffi::ResultBuffer<ffi::F32> out, int64_t num_threads) {
  auto xd = x.dimensions(), bd = bits.dimensions(), vd = values.dimensions(), od = out->dimensions();
  auto offd = offsets.dimensions();
  if (xd.size() != 2 || bd.size() != 2 || vd.size() != 1 || offd.size() != 1 || od.size() != 2) {
    return Invalid("bitmask_matmul_cpu: expected x [M, K], bits [NP, K], values [L], offsets [NP + 1], out [M, N]; "
                   "got x " + Dims(xd) + ", bits " + Dims(bd) + ", values " + Dims(vd) + ", offsets " + Dims(offd) +
                   ", out " + Dims(od));
  }
  const int64_t m_dim = xd[0], k_dim = xd[1], n_dim = od[1], panels = CeilDiv(n_dim, kP);
  if (od[0] != m_dim || bd[0] != panels || bd[1] != k_dim || offd[0] != panels + 1) {
    return Invalid("bitmask_matmul_cpu: for x " + Dims(xd) + " and out " + Dims(od) + " expected bits [" +
                   std::to_string(panels) + ", " + std::to_string(k_dim) + "] and offsets [" +
                   std::to_string(panels + 1) + "], got " + Dims(bd) + " and " + Dims(offd));
  }
  const bool wide = offsets.element_type() == ffi::DataType::S64;
  if (!wide && offsets.element_type() != ffi::DataType::S32) {
    return Invalid("bitmask_matmul_cpu: offsets must be int64 or int32");
  }
  const BitmaskWeights f{bits.typed_data(), values.typed_data(), offsets.untyped_data(), wide, k_dim};
  // Offsets must be ascending and leave the 16 padding floats: then a panel whose bits agree with
  // its offsets reads inside values.
  if (f.Start(0) != 0) return Invalid("bitmask_matmul_cpu: offsets[0] must be 0");
  for (int64_t p = 0; p < panels; ++p) {
    if (f.Start(p + 1) < f.Start(p) || f.Start(p + 1) - f.Start(p) > kP * k_dim) {
      return Invalid("bitmask_matmul_cpu: offsets[" + std::to_string(p + 1) + "] - offsets[" + std::to_string(p) +
                     "] must be in [0, 16 K]");
    }
  }
  if (vd[0] < f.Start(panels) + kP) {
    return Invalid("bitmask_matmul_cpu: values needs nnz + 16 = " + std::to_string(f.Start(panels) + kP) +
                   " floats (offsets[NP] = nnz), got " + std::to_string(vd[0]));
  }
  const int64_t valid = jaxserve::ValidRows(rows, m_dim);
  if (valid < 0) return Invalid("bitmask_matmul_cpu: rows must hold one int32 (the real rows of x)");
  jaxserve::ZeroPaddingRows(out->typed_data(), valid, m_dim, n_dim);
  std::vector<int64_t> end_cursor(panels);
  if (!Run(pool, f, x.typed_data(), out->typed_data(), valid, k_dim, n_dim, num_threads, end_cursor.data())) {
    return ffi::Error::Success();
  }
  for (int64_t p = 0; p < panels; ++p) {
    if (end_cursor[p] != f.Start(p + 1)) {
      return Invalid("bitmask_matmul_cpu: panel " + std::to_string(p) + " has " +
                     std::to_string(end_cursor[p] - f.Start(p)) + " kept bits but offsets give it " +
                     std::to_string(f.Start(p + 1) - f.Start(p)) + " values");
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveNmMatmulCpu, NmMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values [NP, S, 16]
                                  .Arg<ffi::Buffer<ffi::U32>>()  // meta [NP, S, W]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows [1]: x's real rows (the rest: 0 out)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [M, N]
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("num_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveBitmaskMatmulCpu, BitmaskMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U16>>()  // bits [NP, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values [nnz + 16]
                                  .Arg<ffi::AnyBuffer>()         // offsets [NP + 1], int64 or int32
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows [1]: x's real rows (the rest: 0 out)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [M, N]
                                  .Attr<int64_t>("num_threads"));
