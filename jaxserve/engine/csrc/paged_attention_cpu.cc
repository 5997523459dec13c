// Paged attention for the CPU, called from XLA as an FFI custom call.
//
// Each query row r belongs to sequence seq[r] and sees that sequence's first len[r] positions
// (a decode sees all its tokens; a prefill token at position p sees p + 1: causal). For KV head k
// and query head h = k * G + g:
//   out[r, h] = softmax_p(q[r, h] . K[seq[r], p, k] * scale) @ V[seq[r], p, k],  p < len[r]
// where position p lives in block tables[seq[r], p / BS] at offset p % BS of the pools
// k_pages / v_pages, laid out [num_blocks, KVH, BS, D] (jaxserve's "block" layout, so a
// block's keys for every head are one contiguous run). A row with length 0 gets zeros.
//
// Two ways through a row, both reading each K/V block once per pass:
// - a decode row (or a short run of rows) takes one dot product per (head, key) and a weighted
//   sum of values per head, prefetching ahead; memory bound in a decode batch. With AVX-512 and a
//   head dim of 16k (OneRowFast) it goes KV head by KV head, two query heads of the group at once
//   per key or value loaded, in registers; elsewhere the portable loops of OneRow.
// - a prefill run (consecutive causal rows of one sequence) is cut into tiles of up to 16
//   queries (rows x the G query heads of a KV head), one query per vector lane, with the tile's
//   queries transposed, so each key is one broadcast FMA per dimension for all 16 queries and no
//   horizontal sums are needed; values are summed four queries at a time in registers.
// Work items (rows, tiles) are handed out to XLA's intra-op threads through an atomic counter;
// the calling thread works too and never waits for a helper that has not started.
//
// Two entry points: attention alone, and the engine's step: write this step's K/V into their
// slots (pools aliased input to output, updated in place), then attention. Each for float32 and
// for bfloat16 pools (q and out float32 either way; keys and values are widened to float32 as
// they are read, a shift, and everything is computed in float32).
//
// Built on first use by jaxserve.engine._cpu_kernels with the system C++ compiler.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;         // queries per prefill tile
constexpr int kKeysPerStep = 8;    // keys scored together in a tile (independent FMA chains)
constexpr float kMasked = -1e30f;  // score of a key a query does not see (finite: exp(kMasked - m) is 0)

// e^x for x <= 0 (softmax weights), 0 below -87; relative error about 2e-7. Vectorizes.
inline float Exp(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float f = (t - n) * 0.693147180559945309f;  // e^f, |f| <= ln(2) / 2
  float p = 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}

// A pool element as float32: float32 as is, bfloat16 (its 16 bits) as the top half of one.
inline float Widen(float x) { return x; }
inline float Widen(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Asks for a block while an earlier one is processed: blocks sit at random places in the pool,
// and the hardware prefetcher does not cross the 4 KiB pages of a block. Into every cache level
// (hint 3), not non-temporal (hint 0): on the Intel Xeon (Sapphire Rapids) a non-temporal
// prefetch of a whole 16 KiB block, then read, made a decode batch 7x slower than no prefetch at
// all (64 rows of ~114 positions, 8 heads of 64, one thread: 8.6 ms vs 1.1 ms, the blocks in L3).
template <typename T>
inline void Prefetch(const T* p, int64_t elems) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < elems * static_cast<int64_t>(sizeof(T)); i += 64) __builtin_prefetch(c + i, 0, 3);
}

template <typename T>  // pool element: float, or uint16_t holding bfloat16
struct Step {
  const float* q;         // [T, H, D]
  const T* k_pages;       // [NB, KVH, BS, D]
  const T* v_pages;       // [NB, KVH, BS, D]
  const int32_t* tables;  // [S, W]
  const int32_t* row_seq; // [T]
  const int32_t* row_len; // [T]
  float* out;             // [T, H, D]
  int64_t rows, heads, dim, kv_heads, block, width, num_blocks, num_seqs;
  float scale;

  int64_t group() const { return heads / kv_heads; }
  int64_t block_elems() const { return kv_heads * block * dim; }
  // Clamped row length (0: the row is padding or invalid).
  int64_t Len(int64_t r) const {
    const int64_t s = row_seq[r];
    return (s < 0 || s >= num_seqs) ? 0 : std::min<int64_t>(row_len[r], width * block);
  }
  const T* BlockOf(const T* pages, int64_t seq, int64_t i) const {
    const int64_t b = tables[seq * width + i];
    return pages + ((b < 0 || b >= num_blocks) ? 0 : b) * block_elems();
  }
};

struct Item {
  int64_t row, num_rows;  // rows row..row+num_rows-1: one row, or a causal run of one sequence
};

struct Scratch {
  std::vector<float> scores, acc, qt, keys;
};

// The n elements at p as float32: p itself for float32, else widened into buf.
template <typename T>
inline const float* AsFloat(const T* p, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    buf.resize(n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = Widen(p[i]);
    return buf.data();
  }
}

template <int kD, typename T>
inline float Dot(const float* a, const T* b, int64_t dim) {
  const int64_t n = kD ? kD : dim;
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * Widen(b[i]);
  return s;
}

// acc[0:D] += sum_j w[j] * rows[j, 0:D], the accumulator in registers when D is known (two sets,
// even and odd j, so that consecutive FMAs do not wait for each other).
template <int kD, typename T>
inline void AddWeightedRows(float* acc, const float* w, const T* rows, int64_t n, int64_t dim) {
  if constexpr (kD > 0) {
    float a[kD], b[kD];
    for (int i = 0; i < kD; ++i) a[i] = acc[i], b[i] = 0.0f;
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
      const float w0 = w[j], w1 = w[j + 1];
      const T* v0 = rows + j * kD;
      const T* v1 = v0 + kD;
#pragma omp simd
      for (int i = 0; i < kD; ++i) {
        a[i] += w0 * Widen(v0[i]);
        b[i] += w1 * Widen(v1[i]);
      }
    }
    if (j < n) {
      const float wj = w[j];
      const T* v = rows + j * kD;
#pragma omp simd
      for (int i = 0; i < kD; ++i) a[i] += wj * Widen(v[i]);
    }
    for (int i = 0; i < kD; ++i) acc[i] = a[i] + b[i];
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const float wj = w[j];
      const T* v = rows + j * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) acc[i] += wj * Widen(v[i]);
    }
  }
}

// Softmax of each of `count` score rows of length n (stride `stride`), in place; returns nothing:
// weights are normalized.
inline void SoftmaxRows(float* scores, int64_t count, int64_t n, int64_t stride) {
  for (int64_t h = 0; h < count; ++h) {
    float* sc = scores + h * stride;
    float m = sc[0];
    for (int64_t p = 1; p < n; ++p) m = std::max(m, sc[p]);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t p = 0; p < n; ++p) {
      sc[p] = Exp(sc[p] - m);
      total += sc[p];
    }
    const float inv = 1.0f / total;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) sc[p] *= inv;
  }
}

// One query row: every head against the row's len keys.
template <int kD, typename T>
void OneRow(const Step<T>& st, int64_t r, Scratch& s) {
  const int64_t dim = kD ? kD : st.dim, heads = st.heads, group = st.group(), bs = st.block;
  const int64_t len = st.Len(r), seq = st.row_seq[r];
  const int64_t num_blocks = (len + bs - 1) / bs, stride = num_blocks * bs;
  s.scores.resize(heads * stride);
  s.qt.resize(heads * dim);
  const float* q = st.q + r * heads * dim;
  for (int64_t i = 0; i < heads * dim; ++i) s.qt[i] = q[i] * st.scale;
  // pass 1: scores
  for (int64_t b = 0; b < num_blocks; ++b) {
    const T* blk = st.BlockOf(st.k_pages, seq, b);
    Prefetch(b + 1 < num_blocks ? st.BlockOf(st.k_pages, seq, b + 1) : st.BlockOf(st.v_pages, seq, 0),
             st.block_elems());
    const int64_t n = std::min(bs, len - b * bs);
    for (int64_t h = 0; h < heads; ++h) {
      const T* keys = blk + (h / group) * bs * dim;
      const float* qh = s.qt.data() + h * dim;
      float* sc = s.scores.data() + h * stride + b * bs;
      for (int64_t j = 0; j < n; ++j) sc[j] = Dot<kD>(qh, keys + j * dim, dim);
    }
  }
  SoftmaxRows(s.scores.data(), heads, len, stride);
  // pass 2: weighted sum of values
  s.acc.assign(heads * dim, 0.0f);
  for (int64_t b = 0; b < num_blocks; ++b) {
    const T* blk = st.BlockOf(st.v_pages, seq, b);
    if (b + 1 < num_blocks) Prefetch(st.BlockOf(st.v_pages, seq, b + 1), st.block_elems());
    const int64_t n = std::min(bs, len - b * bs);
    for (int64_t h = 0; h < heads; ++h) {
      AddWeightedRows<kD>(s.acc.data() + h * dim, s.scores.data() + h * stride + b * bs,
                          blk + (h / group) * bs * dim, n, dim);
    }
  }
  std::copy(s.acc.begin(), s.acc.end(), st.out + r * heads * dim);
}

#if defined(__AVX512F__)
// A decode row with AVX-512, for head dims of kC * 16: the same two passes as OneRow, but per KV
// head, one tile (its bs x D keys or values in a block) at a time, for two query heads of the
// group at once (each key or value loaded once for both, independent FMA chains), dot products
// reduced by a shuffle tree (OneRow's vectorized dot ends in a serial chain of 16 scalar adds, and
// its value sums keep their accumulators on the stack). Measured on the Xeon, one thread, 64 rows
// of ~114 positions, 8 heads of 64 in 4 KV heads, blocks in L2: 0.65 -> 0.37 ms (float32), 1.08 ->
// 0.34 ms (bfloat16). Tiles are visited in a fixed order (K: head by head, block by block; then V
// likewise) and the tile kAhead places further on is prefetched (visiting a block's heads in turn
// instead was no faster). There a row reads its blocks at about 80% of a plain sum over the same
// blocks, one thread: memory bound.
inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 Load16(const uint16_t* p) {  // 16 bfloat16 widened to float32
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}

// 64 tiles ahead (float32 256 KiB, bfloat16 128 KiB at D = 64: within L2), i.e. a whole decode row of
// the serving shape asked for at its start. Measured on the Xeon, the serving decode shape (batch 64,
// mean context 121, 8 layers), benchmarks/attention_cpu.py with the other build as baseline,
// interleaved pairs, time with N ahead / time with 2 ahead: bfloat16, loaded machine, 64: 0.81 and 0.81
// (128: 0.80, 32: 0.91 once, 8: 0.93 once); float32, idle machine, 40 pairs, 64: 0.91 (14.7 GB/s
// against a plain read's 15.9). Earlier, float32 2 ahead had measured the same as no prefetch, 4 or 8.
constexpr int kAhead = 64;

// sc[p * stride + j] = q_p . keys[j] for the kP query heads at q (rows of kC * 16, pre-scaled).
template <int kC, int kP, typename T>
inline void TileScores(const float* q, const T* keys, int64_t n, float* sc, int64_t stride) {
  __m512 qv[kP][kC];
  for (int p = 0; p < kP; ++p)
    for (int c = 0; c < kC; ++c) qv[p][c] = _mm512_loadu_ps(q + (p * kC + c) * 16);
  for (int64_t j = 0; j < n; ++j) {
    __m512 kv[kC];
    for (int c = 0; c < kC; ++c) kv[c] = Load16(keys + (j * kC + c) * 16);
    for (int p = 0; p < kP; ++p) {
      __m512 a = _mm512_mul_ps(qv[p][0], kv[0]);
      __m512 b = kC > 1 ? _mm512_mul_ps(qv[p][kC > 1 ? 1 : 0], kv[kC > 1 ? 1 : 0]) : _mm512_setzero_ps();
      for (int c = 2; c + 1 < kC; c += 2) {
        a = _mm512_fmadd_ps(qv[p][c], kv[c], a);
        b = _mm512_fmadd_ps(qv[p][c + 1], kv[c + 1], b);
      }
      if (kC > 2 && kC % 2) a = _mm512_fmadd_ps(qv[p][kC - 1], kv[kC - 1], a);
      sc[p * stride + j] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
  }
}

// acc[p] += sum_j w[p * stride + j] * vals[j] for kP query heads.
template <int kC, int kP, typename T>
inline void TileValues(__m512 (&acc)[kP][kC], const float* w, int64_t stride, const T* vals, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    __m512 vv[kC];
    for (int c = 0; c < kC; ++c) vv[c] = Load16(vals + (j * kC + c) * 16);
    for (int p = 0; p < kP; ++p) {
      const __m512 wp = _mm512_set1_ps(w[p * stride + j]);
      for (int c = 0; c < kC; ++c) acc[p][c] = _mm512_fmadd_ps(wp, vv[c], acc[p][c]);
    }
  }
}

// bfloat16 pools, head dims of 32m: K and V read 32 elements (one vector) at a time and widened
// without a cross-lane shuffle: a shift gives the 16 even elements, a mask the 16 odd ones, so a
// chunk c of the widened row is even (c = 2m) or odd (c = 2m + 1) elements of 32-element chunk m.
// The query (pre-scaled) is rearranged once per row to match (QEvenOdd); the value sums come out
// in that order and are interleaved back when stored (StoreEvenOdd). A dot product's order of
// summation changes; every product is the same. With Scores16's reduction: the serving decode
// shape (64 rows, mean context 121, 8 heads of 64 in 4 KV heads, 8 layers), old / new 1.05-1.14
// (benchmarks/attention_cpu.py --baseline-rev, interleaved pairs, loaded 2-core Xeon). vdpbf16ps on
// a query of bfloat16 values (exact products) measured slower than this, 0.91-0.94: not used.
inline __m512 WidenEven(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
inline __m512 WidenOdd(__m512i x) {
  return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}
inline __m512i Load32(const uint16_t* p) { return _mm512_loadu_si512(p); }

// dst[32m + 2i] -> even chunk, dst[32m + 2i + 1] -> odd chunk, for n elements (n % 32 == 0).
inline void QEvenOdd(const float* q, float scale, int64_t n, float* dst) {
  for (int64_t m = 0; m < n; m += 32)
    for (int i = 0; i < 16; ++i) dst[m + i] = q[m + 2 * i] * scale, dst[m + 16 + i] = q[m + 2 * i + 1] * scale;
}

inline void StoreEvenOdd(float* o, __m512 even, __m512 odd) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  _mm512_storeu_ps(o, _mm512_permutex2var_ps(even, lo, odd));
  _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(even, hi, odd));
}

// The sums of 16 vectors at once: lane j of the result = the sum of v[j]'s lanes (a transposing
// tree, 45 shuffles and adds for the 16, where _mm512_reduce_add_ps takes about 8 each and a chain).
// Level 1: keys j, j+1 -> (j, j+1, j, j+1) partial sums per 128-bit lane.
inline __m512 Sum2(__m512 a, __m512 b) { return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); }
// Level 2: (j, j+1) and (j+2, j+3) -> (j..j+3) per 128-bit lane.
inline __m512 Sum4(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE));
}
// Levels 3 and 4: 128-bit lanes.
inline __m512 SumLanes(__m512 x, __m512 y) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}

// Scores of up to 16 keys (n) for kP query heads, each key's kP partial-sum vectors from
// part(j, out[kP]) (keys past n: zero vectors), reduced together into sc[p * stride + j].
template <int kP, typename Part>
inline void Scores16(const Part& part, int64_t n, float* sc, int64_t stride) {
  __m512 quad[kP][4];
  for (int qd = 0; qd < 4; ++qd) {
    __m512 pair[kP][2];
    for (int u = 0; u < 2; ++u) {
      __m512 a[kP], b[kP];
      const int j = qd * 4 + u * 2;
      if (j < n) part(j, a); else for (int p = 0; p < kP; ++p) a[p] = _mm512_setzero_ps();
      if (j + 1 < n) part(j + 1, b); else for (int p = 0; p < kP; ++p) b[p] = _mm512_setzero_ps();
      for (int p = 0; p < kP; ++p) pair[p][u] = Sum2(a[p], b[p]);
    }
    for (int p = 0; p < kP; ++p) quad[p][qd] = Sum4(pair[p][0], pair[p][1]);
  }
  const __mmask16 mask = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
  for (int p = 0; p < kP; ++p) {
    const __m512 s = SumLanes(SumLanes(quad[p][0], quad[p][1]), SumLanes(quad[p][2], quad[p][3]));
    _mm512_mask_storeu_ps(sc + p * stride, mask, s);
  }
}

// TileScores for bfloat16 keys with the query in QEvenOdd's order (pre-scaled).
template <int kC, int kP>
inline void TileScoresEvenOdd(const float* q, const uint16_t* keys, int64_t n, float* sc, int64_t stride) {
  __m512 qv[kP][kC];
  for (int p = 0; p < kP; ++p)
    for (int c = 0; c < kC; ++c) qv[p][c] = _mm512_loadu_ps(q + (p * kC + c) * 16);
  auto part = [&](int64_t j, __m512 (&out)[kP]) {
    const uint16_t* key = keys + j * kC * 16;
    __m512 a[kP], b[kP];
    for (int m = 0; m < kC / 2; ++m) {
      const __m512i x = Load32(key + m * 32);
      const __m512 e = WidenEven(x), o = WidenOdd(x);
      for (int p = 0; p < kP; ++p) {
        a[p] = m ? _mm512_fmadd_ps(qv[p][2 * m], e, a[p]) : _mm512_mul_ps(qv[p][0], e);
        b[p] = m ? _mm512_fmadd_ps(qv[p][2 * m + 1], o, b[p]) : _mm512_mul_ps(qv[p][1], o);
      }
    }
    for (int p = 0; p < kP; ++p) out[p] = _mm512_add_ps(a[p], b[p]);
  };
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    auto at = [&](int64_t j, __m512 (&out)[kP]) { part(j0 + j, out); };
    Scores16<kP>(at, std::min<int64_t>(16, n - j0), sc + j0, stride);
  }
}

// TileValues for bfloat16 values, acc in even/odd order (see QEvenOdd).
template <int kC, int kP>
inline void TileValuesEvenOdd(__m512 (&acc)[kP][kC], const float* w, int64_t stride, const uint16_t* vals,
                              int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* v = vals + j * kC * 16;
    __m512 wp[kP];
    for (int p = 0; p < kP; ++p) wp[p] = _mm512_set1_ps(w[p * stride + j]);
    for (int m = 0; m < kC / 2; ++m) {
      const __m512i x = Load32(v + m * 32);
      const __m512 e = WidenEven(x), o = WidenOdd(x);
      for (int p = 0; p < kP; ++p) {
        acc[p][2 * m] = _mm512_fmadd_ps(wp[p], e, acc[p][2 * m]);
        acc[p][2 * m + 1] = _mm512_fmadd_ps(wp[p], o, acc[p][2 * m + 1]);
      }
    }
  }
}

template <int kC, typename T>
void OneRowFast(const Step<T>& st, int64_t r, Scratch& s) {
  constexpr int64_t kD = kC * 16;
  const int64_t heads = st.heads, group = st.group(), kvh = st.kv_heads, bs = st.block;
  const int64_t len = st.Len(r), seq = st.row_seq[r];
  const int64_t num_blocks = (len + bs - 1) / bs, stride = num_blocks * bs, tile = bs * kD;
  s.scores.resize(heads * stride);
  s.qt.resize(heads * kD);
  const float* q = st.q + r * heads * kD;
  constexpr bool kEvenOdd = std::is_same_v<T, uint16_t> && kC % 2 == 0;  // bfloat16, head dim 32m
  if constexpr (kEvenOdd) {
    QEvenOdd(q, st.scale, heads * kD, s.qt.data());
  } else {
    for (int64_t i = 0; i < heads * kD; ++i) s.qt[i] = q[i] * st.scale;
  }
  // the tiles in the order they are read: K of head 0, blocks 0..nb-1, ..., then V likewise
  const int64_t count = 2 * kvh * num_blocks;
  auto tile_at = [&](int64_t i) {
    const int64_t b = i % num_blocks, k = (i / num_blocks) % kvh;
    return st.BlockOf(i < kvh * num_blocks ? st.k_pages : st.v_pages, seq, b) + k * tile;
  };
  for (int64_t i = 0; i < kAhead && i < count; ++i) Prefetch(tile_at(i), tile);
  auto ahead = [&](int64_t i) {
    if (i + kAhead < count) Prefetch(tile_at(i + kAhead), tile);
  };
  // pass 1: scores[h, p]
  for (int64_t k = 0; k < kvh; ++k) {
    for (int64_t g = 0; g < group; g += 2) {
      const int64_t h = k * group + g;
      for (int64_t b = 0; b < num_blocks; ++b) {
        if (g == 0) ahead(k * num_blocks + b);
        const T* keys = st.BlockOf(st.k_pages, seq, b) + k * tile;
        const int64_t n = std::min(bs, len - b * bs);
        float* sc = s.scores.data() + h * stride + b * bs;
        const bool pair = g + 1 < group;
        if constexpr (kEvenOdd) {
          if (pair) {
            TileScoresEvenOdd<kC, 2>(s.qt.data() + h * kD, keys, n, sc, stride);
          } else {
            TileScoresEvenOdd<kC, 1>(s.qt.data() + h * kD, keys, n, sc, stride);
          }
        } else if (pair) {
          TileScores<kC, 2>(s.qt.data() + h * kD, keys, n, sc, stride);
        } else {
          TileScores<kC, 1>(s.qt.data() + h * kD, keys, n, sc, stride);
        }
      }
    }
  }
  SoftmaxRows(s.scores.data(), heads, len, stride);
  // pass 2: out[h] = sum_p scores[h, p] V[p]
  for (int64_t k = 0; k < kvh; ++k) {
    for (int64_t g = 0; g < group; g += 2) {
      const int64_t h = k * group + g;
      const bool pair = g + 1 < group;
      __m512 acc2[2][kC];
      __m512 acc1[1][kC];
      for (int c = 0; c < kC; ++c) acc2[0][c] = acc2[1][c] = acc1[0][c] = _mm512_setzero_ps();
      for (int64_t b = 0; b < num_blocks; ++b) {
        if (g == 0) ahead((kvh + k) * num_blocks + b);
        const T* vals = st.BlockOf(st.v_pages, seq, b) + k * tile;
        const int64_t n = std::min(bs, len - b * bs);
        const float* w = s.scores.data() + h * stride + b * bs;
        if constexpr (kEvenOdd) {
          if (pair) {
            TileValuesEvenOdd<kC, 2>(acc2, w, stride, vals, n);
          } else {
            TileValuesEvenOdd<kC, 1>(acc1, w, stride, vals, n);
          }
        } else if (pair) {
          TileValues<kC, 2>(acc2, w, stride, vals, n);
        } else {
          TileValues<kC, 1>(acc1, w, stride, vals, n);
        }
      }
      float* o = st.out + (r * heads + h) * kD;
      if constexpr (kEvenOdd) {
        for (int c = 0; c < kC; c += 2) {
          StoreEvenOdd(o + c * 16, pair ? acc2[0][c] : acc1[0][c], pair ? acc2[0][c + 1] : acc1[0][c + 1]);
          if (pair) StoreEvenOdd(o + kD + c * 16, acc2[1][c], acc2[1][c + 1]);
        }
        continue;
      }
      for (int c = 0; c < kC; ++c) {
        _mm512_storeu_ps(o + c * 16, pair ? acc2[0][c] : acc1[0][c]);
        if (pair) _mm512_storeu_ps(o + kD + c * 16, acc2[1][c]);
      }
    }
  }
}
#endif

// A causal run of rows row..row+num_rows-1 of one sequence (lengths increasing by one), with
// num_rows * G <= kLanes: per KV head, lane i * G + g holds row i's query head k * G + g.
template <int kD, typename T>
void Tile(const Step<T>& st, const Item& it, Scratch& s) {
  const int64_t dim = kD ? kD : st.dim, heads = st.heads, group = st.group(), bs = st.block;
  const int64_t seq = st.row_seq[it.row], last = st.Len(it.row + it.num_rows - 1);
  const int64_t num_blocks = (last + bs - 1) / bs, used = it.num_rows * group;
  s.qt.assign(dim * kLanes, 0.0f);  // [D, lanes]
  s.scores.resize(num_blocks * bs * kLanes);  // [positions, lanes]
  float lane_len[kLanes];
  for (int l = 0; l < kLanes; ++l) lane_len[l] = l < used ? static_cast<float>(st.Len(it.row + l / group)) : 0.0f;
  for (int64_t k = 0; k < st.kv_heads; ++k) {
    for (int64_t l = 0; l < used; ++l) {
      const float* qh = st.q + ((it.row + l / group) * heads + k * group + l % group) * dim;
      for (int64_t i = 0; i < dim; ++i) s.qt[i * kLanes + l] = qh[i] * st.scale;
    }
    // scores[p, lane] for every key of every block (masked past each lane's length)
    for (int64_t b = 0; b < num_blocks; ++b) {
      // each key element is broadcast to 16 lanes: widened once per block, not once per use
      const float* keys = AsFloat(st.BlockOf(st.k_pages, seq, b) + k * bs * dim, bs * dim, s.keys);
      if (b + 1 < num_blocks) Prefetch(st.BlockOf(st.k_pages, seq, b + 1) + k * bs * dim, bs * dim);
      const int64_t step = bs % kKeysPerStep == 0 ? kKeysPerStep : 1;
      for (int64_t j0 = 0; j0 < bs; j0 += step) {
        float a[kKeysPerStep][kLanes] = {};
        for (int64_t i = 0; i < dim; ++i) {
          const float* qt = s.qt.data() + i * kLanes;
          for (int64_t u = 0; u < step; ++u) {
            const float kv = keys[(j0 + u) * dim + i];
#pragma omp simd
            for (int l = 0; l < kLanes; ++l) a[u][l] += qt[l] * kv;
          }
        }
        for (int64_t u = 0; u < step; ++u) {
          const float pos = static_cast<float>(b * bs + j0 + u);
          float* sc = s.scores.data() + (b * bs + j0 + u) * kLanes;
#pragma omp simd
          for (int l = 0; l < kLanes; ++l) sc[l] = pos < lane_len[l] ? a[u][l] : kMasked;
        }
      }
    }
    // softmax per lane over the tile's last length (later keys are masked for every lane)
    float m[kLanes], total[kLanes];
    for (int l = 0; l < kLanes; ++l) m[l] = kMasked, total[l] = 0.0f;
    for (int64_t p = 0; p < last; ++p) {
      const float* sc = s.scores.data() + p * kLanes;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) m[l] = std::max(m[l], sc[l]);
    }
    for (int64_t p = 0; p < last; ++p) {
      float* sc = s.scores.data() + p * kLanes;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) sc[l] = Exp(sc[l] - m[l]);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) total[l] += sc[l];
    }
    // out[lane] = sum_p w[p, lane] V[p] / total[lane], a few lanes at a time in registers
    constexpr int kGroup = kD > 0 && kD <= 64 ? 4 : (kD > 0 && kD <= 128 ? 2 : 1);
    for (int64_t l0 = 0; l0 < used; l0 += kGroup) {
      float acc[kGroup][kD > 0 ? kD : 1];
      float* dyn = nullptr;
      if constexpr (kD == 0) {
        s.acc.assign(dim, 0.0f);
        dyn = s.acc.data();
      } else {
        for (int u = 0; u < kGroup; ++u)
          for (int i = 0; i < kD; ++i) acc[u][i] = 0.0f;
      }
      for (int64_t b = 0; b < num_blocks; ++b) {
        const T* vals = st.BlockOf(st.v_pages, seq, b) + k * bs * dim;
        const int64_t n = std::min(bs, last - b * bs);
        for (int64_t j = 0; j < n; ++j) {
          const T* v = vals + j * dim;
          const float* w = s.scores.data() + (b * bs + j) * kLanes + l0;
          if constexpr (kD == 0) {
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) dyn[i] += w[0] * Widen(v[i]);
          } else {
            for (int u = 0; u < kGroup; ++u) {
              const float wu = w[u];
#pragma omp simd
              for (int i = 0; i < kD; ++i) acc[u][i] += wu * Widen(v[i]);
            }
          }
        }
      }
      for (int u = 0; u < kGroup && l0 + u < used; ++u) {
        const int64_t l = l0 + u;
        float* o = st.out + ((it.row + l / group) * heads + k * group + l % group) * dim;
        const float inv = 1.0f / total[l];
        const float* a = kD == 0 ? dyn : acc[u];
        for (int64_t i = 0; i < dim; ++i) o[i] = a[i] * inv;
      }
    }
  }
}

template <int kD, typename T>
void RunItems(const Step<T>& st, const std::vector<Item>& items, std::atomic<int64_t>& next) {
  Scratch s;
  for (int64_t i = next++; i < static_cast<int64_t>(items.size()); i = next++) {
    const Item& it = items[i];
    if (it.num_rows == 1) {
#if defined(__AVX512F__)
      if constexpr (kD > 0 && kD % 16 == 0) {
        OneRowFast<kD / 16>(st, it.row, s);
        continue;
      }
#endif
      OneRow<kD>(st, it.row, s);
    } else {
      Tile<kD>(st, it, s);
    }
  }
}

template <typename T>
void RunAll(const Step<T>& st, const std::vector<Item>& items, std::atomic<int64_t>& next) {
  switch (st.dim) {
    case 32: return RunItems<32, T>(st, items, next);
    case 64: return RunItems<64, T>(st, items, next);
    case 128: return RunItems<128, T>(st, items, next);
    default: return RunItems<0, T>(st, items, next);
  }
}

// Cuts the rows into work items (padding rows are zeroed here): a causal run of one sequence
// becomes tiles when a tile fills at least half of its lanes, single rows otherwise.
template <typename T>
std::vector<Item> MakeItems(const Step<T>& st) {
  std::vector<Item> items;
  const int64_t group = st.group();
  const int64_t tile_rows = std::max<int64_t>(1, kLanes / group);
  const bool tiles = group <= kLanes / 2;
  for (int64_t r = 0; r < st.rows;) {
    const int64_t len = st.Len(r);
    if (len <= 0) {
      std::fill(st.out + r * st.heads * st.dim, st.out + (r + 1) * st.heads * st.dim, 0.0f);
      ++r;
      continue;
    }
    int64_t n = 1;
    while (tiles && n < tile_rows && r + n < st.rows && st.row_seq[r + n] == st.row_seq[r] &&
           st.Len(r + n) == len + n) {
      ++n;
    }
    if (n * group * 2 >= kLanes) {
      items.push_back({r, n});
    } else {
      for (int64_t i = 0; i < n; ++i) items.push_back({r + i, 1});
    }
    r += n;
  }
  return items;
}

// One shared counter, not parallel.h's Items (the caller from the front, helpers from the back):
// measured on a 2-core VM, 2 threads, 8 heads of 64, Items made a decode batch of 64 rows (20 to
// 250 positions) slower, 2.5 ms vs 1.6 ms, and a 256-row prefill 5 to 10% faster.
template <typename T>
ffi::Error Attend(ffi::ThreadPool& pool, const Step<T>& st, int64_t num_threads) {
  const std::vector<Item> items = MakeItems(st);
  std::atomic<int64_t> next{0};
  jaxserve::RunOnPool(pool, num_threads, static_cast<int64_t>(items.size()), [&](bool) { RunAll(st, items, next); });
  return ffi::Error::Success();
}

template <ffi::DataType DT>
using Pool = ffi::Buffer<DT>;
template <ffi::DataType DT>
using Elem = ffi::NativeType<DT>;

template <ffi::DataType DT>
ffi::Error MakeStep(ffi::Buffer<ffi::F32>& q, Pool<DT>& k_pages, Pool<DT>& v_pages, ffi::Buffer<ffi::S32>& tables,
                    ffi::Buffer<ffi::S32>& row_seq, ffi::Buffer<ffi::S32>& row_len, float scale, Step<Elem<DT>>* st) {
  auto qd = q.dimensions();
  auto kd = k_pages.dimensions();
  auto td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || row_len.dimensions().size() != 1 ||
      row_seq.dimensions().size() != 1 || v_pages.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("paged_attention_cpu: expected q [T,H,D], pools [NB,KVH,BS,D], "
                                       "tables [S,W], row_seq [T], row_len [T]");
  }
  for (size_t i = 0; i < 4; ++i) {
    if (v_pages.dimensions()[i] != kd[i]) return ffi::Error::InvalidArgument("paged_attention_cpu: K/V pools differ");
  }
  *st = Step<Elem<DT>>{q.typed_data(), k_pages.typed_data(), v_pages.typed_data(), tables.typed_data(),
                       row_seq.typed_data(), row_len.typed_data(), nullptr, qd[0], qd[1], qd[2], kd[1], kd[2],
                       td[1], kd[0], td[0], scale};
  if (kd[3] != st->dim || row_len.dimensions()[0] != st->rows || row_seq.dimensions()[0] != st->rows ||
      st->kv_heads < 1 || st->heads % st->kv_heads != 0) {
    return ffi::Error::InvalidArgument("paged_attention_cpu: inconsistent shapes");
  }
  return ffi::Error::Success();
}

template <ffi::DataType DT>
ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, Pool<DT> k_pages, Pool<DT> v_pages,
                         ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> row_seq, ffi::Buffer<ffi::S32> row_len,
                         ffi::ResultBuffer<ffi::F32> out, float scale, int64_t num_threads) {
  Step<Elem<DT>> st;
  if (ffi::Error e = MakeStep<DT>(q, k_pages, v_pages, tables, row_seq, row_len, scale, &st); e.failure()) return e;
  st.out = out->typed_data();
  return Attend(pool, st, num_threads);
}

// Writes new[t, k, :] into slot slots[t] (block slots[t] / BS, offset slots[t] % BS) of `pages`;
// slots outside the pool are skipped.
template <typename T>
void WriteSlots(T* pages, const T* new_rows, const int32_t* slots, int64_t count, const Step<T>& st) {
  const int64_t dim = st.dim, limit = st.num_blocks * st.block;
  for (int64_t t = 0; t < count; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0 || slot >= limit) continue;
    const int64_t b = slot / st.block, off = slot % st.block;
    for (int64_t k = 0; k < st.kv_heads; ++k) {
      std::memcpy(pages + ((b * st.kv_heads + k) * st.block + off) * dim, new_rows + (t * st.kv_heads + k) * dim,
                  dim * sizeof(T));
    }
  }
}

template <ffi::DataType DT>
ffi::Error WriteAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, Pool<DT> k_new, Pool<DT> v_new,
                              ffi::Buffer<ffi::S32> slots, Pool<DT> k_pages, Pool<DT> v_pages,
                              ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> row_seq,
                              ffi::Buffer<ffi::S32> row_len, ffi::ResultBuffer<ffi::F32> out,
                              ffi::ResultBuffer<DT> k_out, ffi::ResultBuffer<DT> v_out, float scale,
                              int64_t num_threads) {
  using T = Elem<DT>;
  Step<T> st;
  if (ffi::Error e = MakeStep<DT>(q, k_pages, v_pages, tables, row_seq, row_len, scale, &st); e.failure()) return e;
  auto nd = k_new.dimensions();
  const int64_t count = slots.dimensions().size() == 1 ? slots.dimensions()[0] : -1;
  if (nd.size() != 3 || nd[0] != count || nd[1] != st.kv_heads || nd[2] != st.dim ||
      v_new.dimensions().size() != 3 || v_new.dimensions()[0] != count || v_new.dimensions()[1] != st.kv_heads ||
      v_new.dimensions()[2] != st.dim) {
    return ffi::Error::InvalidArgument("paged_attention_cpu: expected new K/V [N,KVH,D] and slots [N]");
  }
  // the pools are aliased to the outputs (updated in place); copy first if XLA did not alias them
  T* kp = k_out->typed_data();
  T* vp = v_out->typed_data();
  const size_t pool_bytes = k_pages.element_count() * sizeof(T);
  if (kp != k_pages.typed_data()) std::memcpy(kp, k_pages.typed_data(), pool_bytes);
  if (vp != v_pages.typed_data()) std::memcpy(vp, v_pages.typed_data(), pool_bytes);
  WriteSlots(kp, k_new.typed_data(), slots.typed_data(), count, st);
  WriteSlots(vp, v_new.typed_data(), slots.typed_data(), count, st);
  st.k_pages = kp;
  st.v_pages = vp;
  st.out = out->typed_data();
  return Attend(pool, st, num_threads);
}

template <ffi::DataType DT>
auto AttentionBinding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // q [T, H, D]
      .template Arg<Pool<DT>>()               // k_pages [NB, KVH, BS, D]
      .template Arg<Pool<DT>>()               // v_pages [NB, KVH, BS, D]
      .template Arg<ffi::Buffer<ffi::S32>>()  // block tables [S, W]
      .template Arg<ffi::Buffer<ffi::S32>>()  // row_seq [T]
      .template Arg<ffi::Buffer<ffi::S32>>()  // row_len [T]
      .template Ret<ffi::Buffer<ffi::F32>>()  // out [T, H, D]
      .template Attr<float>("scale")
      .template Attr<int64_t>("num_threads");
}

template <ffi::DataType DT>
auto WriteAttentionBinding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // q [T, H, D]
      .template Arg<Pool<DT>>()               // new keys [N, KVH, D]
      .template Arg<Pool<DT>>()               // new values [N, KVH, D]
      .template Arg<ffi::Buffer<ffi::S32>>()  // slots [N]
      .template Arg<Pool<DT>>()               // k_pages [NB, KVH, BS, D] (aliased to k_out)
      .template Arg<Pool<DT>>()               // v_pages (aliased to v_out)
      .template Arg<ffi::Buffer<ffi::S32>>()  // block tables [S, W]
      .template Arg<ffi::Buffer<ffi::S32>>()  // row_seq [T]
      .template Arg<ffi::Buffer<ffi::S32>>()  // row_len [T]
      .template Ret<ffi::Buffer<ffi::F32>>()  // out [T, H, D]
      .template Ret<Pool<DT>>()               // k_out
      .template Ret<Pool<DT>>()               // v_out
      .template Attr<float>("scale")
      .template Attr<int64_t>("num_threads");
}

// Copy-on-write of whole blocks: block dst[i] of the pool becomes a copy of block src[i] (pairs
// with src == dst, the padding, are skipped), the sources read before any block is written (as
// XLA's gather then scatter: a block both copied from and written reads its old contents). A block
// is contiguous ([NB, ...] layout). An index outside the pool is an error. The pool is aliased to
// the output (updated in place; copied over first if XLA did not alias it).
ffi::Error CopyBlocksImpl(ffi::AnyBuffer pages, ffi::Buffer<ffi::S32> src, ffi::Buffer<ffi::S32> dst,
                          ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = pages.dimensions();
  const int64_t n = src.element_count();
  if (dims.size() < 1 || src.dimensions().size() != 1 || dst.dimensions().size() != 1 || dst.element_count() != n) {
    return ffi::Error::InvalidArgument("copy_blocks_cpu: expected a pool [NB, ...] and src, dst [N]");
  }
  const int64_t num_blocks = dims[0];
  const size_t bytes = pages.size_bytes(), block = num_blocks ? bytes / num_blocks : 0;
  char* pool = static_cast<char*>(out->untyped_data());
  if (pool != pages.untyped_data()) std::memcpy(pool, pages.untyped_data(), bytes);
  const int32_t* s = src.typed_data();
  const int32_t* d = dst.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] < 0 || s[i] >= num_blocks || d[i] < 0 || d[i] >= num_blocks) {
      return ffi::Error::InvalidArgument("copy_blocks_cpu: block index " + std::to_string(i) + " (" +
                                         std::to_string(s[i]) + " -> " + std::to_string(d[i]) +
                                         ") outside a pool of " + std::to_string(num_blocks) + " blocks");
    }
  }
  std::vector<char> staged;
  std::vector<int64_t> moves;  // indices of the pairs that copy something
  for (int64_t i = 0; i < n; ++i) {
    if (s[i] != d[i]) moves.push_back(i);
  }
  staged.resize(moves.size() * block);
  for (size_t j = 0; j < moves.size(); ++j) std::memcpy(staged.data() + j * block, pool + s[moves[j]] * block, block);
  for (size_t j = 0; j < moves.size(); ++j) std::memcpy(pool + d[moves[j]] * block, staged.data() + j * block, block);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveCopyBlocksCpu, CopyBlocksImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // pool [NB, ...] (aliased to the output)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // src [N]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // dst [N]
                                  .Ret<ffi::AnyBuffer>());        // the pool
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedAttentionCpu, AttentionImpl<ffi::F32>, AttentionBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedAttentionBf16Cpu, AttentionImpl<ffi::BF16>, AttentionBinding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveWritePagedAttentionCpu, WriteAttentionImpl<ffi::F32>,
                              WriteAttentionBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveWritePagedAttentionBf16Cpu, WriteAttentionImpl<ffi::BF16>,
                              WriteAttentionBinding<ffi::BF16>());
