// A float32 or bfloat16 matmul for the CPU over pre-packed weights, an XLA FFI custom call:
//   out[M, N] = x[M, K] @ W[K, N]
// where W (N a multiple of 16) is given packed in column panels: panels of 48 columns, then the
// last N % 48 columns in panels of 16; a panel of width P starting at column n0 is the
// contiguous run panel[k * P + j] = W[k, n0 + j], read front to back.
//
// Only the first `rows` rows of x (a scalar operand: an engine step's real tokens, the rest is
// padding up to its program's size) are multiplied; the output's other rows are zeros.
//
// A decode step multiplies a few dozen activation rows by every weight matrix of the model, and
// the matrices do not fit the caches: the step streams the weights from memory. XLA's matmul
// packs them on every call and reads them at about a third of the memory bandwidth at a handful
// of rows. Here a thread takes a panel (the calling thread from the front of the list, helpers on
// XLA's intra-op pool from the back: parallel.h's Items) and computes it for every row, R rows at
// a time with the R x P accumulators in vector registers: each weight is read from memory once,
// sequentially, then from the L2 cache for the panel's other row tiles.
//
// bfloat16: x [M, K] and W in bfloat16, out float32 (float32 accumulation). The panels hold
// pairs of rows: panel[(kp * P + j) * 2 + t] = W[2 * kp + t, n0 + j] (a zero row past an odd K),
// so one 32-bit lane holds the two weights that AVX-512 BF16's vdpbf16ps multiplies with a
// broadcast pair of x and adds into one float32 lane. Where the CPU lacks the instruction
// (checked at run time) or x has more rows than the caller's bf16_dot_rows, the pairs are
// widened to float32 in registers (a shift, a mask) and FMA'd with x widened once per call: the
// same layout serves both paths. Measured on the 2-core Sapphire Rapids VM (alternating runs,
// loaded machine), vdpbf16ps did about half the multiply-adds per cycle of the FMAs: it paid only
// in decode-sized, memory-bound calls (4 rows of a 2048 x 5632 matrix: ~0.9 ms vs ~1.2 ms
// widening), and from 8 rows widening was as fast or faster (16 rows: ~3.3 ms vs ~2.4 ms).
//
// Built with paged_attention_cpu.cc by jaxserve.engine._cpu_kernels.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "parallel.h"
#include "valid_rows.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccumulators = 24;  // of 32 vector registers
#else
constexpr int kLanes = 8;
constexpr int kAccumulators = 12;  // of 16
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
constexpr int64_t kWide = 48, kNarrow = 16;  // panel widths (floats)
constexpr int64_t kAhead = 16;  // rows of a panel prefetched ahead

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

// out[r0:r0+R, n0:n0+V*kLanes] from panel `w` ([K, V*kLanes], contiguous).
template <int R, int V>
void Tile(const float* x, const float* w, float* out, int64_t r0, int64_t n0, int64_t k_dim, int64_t n_dim) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
  const float* xr = x + r0 * k_dim;
  for (int64_t k = 0; k < k_dim; ++k) {
    // the stream prefetcher alone falls behind at a few rows (measured: 36 -> 48 GB/s at 8 rows)
    for (int j = 0; j < V * kLanes; j += 16) __builtin_prefetch(w + (k + kAhead) * V * kLanes + j, 0, 3);
    Vec b[V];
    for (int v = 0; v < V; ++v) b[v] = Load(w + k * V * kLanes + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float a = xr[r * k_dim + k];
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) Store(out + (r0 + r) * n_dim + n0 + v * kLanes, acc[r][v]);
}

// float32 x and weights: `Tile` above.
struct F32 {
  using X = float;  // x's elements
  using T = float;  // the weights'

  static constexpr int kLanes = ::kLanes, kAccumulators = ::kAccumulators;
  static int64_t PackedRows(int64_t k_dim) { return k_dim; }
  template <int R, int V>
  static void Run(const X* x, const T* w, float* out, int64_t r0, int64_t n0, int64_t k_dim, int64_t n_dim) {
    Tile<R, V>(x, w, out, r0, n0, k_dim, n_dim);
  }
};

// bfloat16 -> float32: the 16 bits are the float's top half.
inline float Widen(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Pair kp of a row of x (elements 2kp, 2kp + 1) as the 32 bits a vdpbf16ps lane reads: one load,
// except for the last pair of an odd K (its high half 0, not the next row's first element).
inline uint32_t XPair(const uint16_t* xr, int64_t kp) {
  uint32_t pair;
  std::memcpy(&pair, xr + 2 * kp, sizeof(pair));
  return pair;
}
inline uint32_t XLast(const uint16_t* xr, int64_t k_dim) { return xr[k_dim - 1]; }

typedef uint32_t UVec __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// Runs step(kp, pair of row r) over the pairs of rows r0 .. r0 + R - 1 of x: full pairs first,
// then the odd K's last element (high half 0).
template <int R, typename F>
inline void ForPairs(const uint16_t* xr, int64_t k_dim, const F& step) {
  uint32_t a[R];
  for (int64_t kp = 0; kp < k_dim / 2; ++kp) {
    for (int r = 0; r < R; ++r) a[r] = XPair(xr + r * k_dim, kp);
    step(kp, a);
  }
  if (k_dim % 2) {
    for (int r = 0; r < R; ++r) a[r] = XLast(xr + r * k_dim, k_dim);
    step(k_dim / 2, a);
  }
}

// bfloat16 weights widened to float32 in registers (any CPU), x widened once per call: a pair of
// rows per 32-bit lane, split into the even row (low halves shifted up) and the odd row (high
// halves masked), each FMA'd with its broadcast x.
struct Bf16Widen {
  using X = float;
  using T = uint16_t;
  static constexpr int kLanes = ::kLanes, kAccumulators = ::kAccumulators - 3;  // 2V weight registers
  static int64_t PackedRows(int64_t k_dim) { return (k_dim + 1) / 2 * 2; }
  template <int R, int V>
  static void Run(const X* x, const T* w, float* out, int64_t r0, int64_t n0, int64_t k_dim, int64_t n_dim) {
    Vec acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
    const X* xr = x + r0 * k_dim;
    auto step = [&](int64_t kp, auto pair) {  // pair: std::false_type for the last row of an odd K
      const T* row = w + kp * V * kLanes * 2;
      for (int j = 0; j < V * kLanes * 2; j += 32) __builtin_prefetch(row + kAhead * V * kLanes * 2 + j, 0, 3);
      Vec even[V], odd[V];
      for (int v = 0; v < V; ++v) {
        UVec u;
        std::memcpy(&u, row + v * kLanes * 2, sizeof(u));
        even[v] = (Vec)(u << 16);
        odd[v] = (Vec)(u & 0xFFFF0000u);
      }
      for (int r = 0; r < R; ++r) {
        const float a0 = xr[r * k_dim + 2 * kp];
        for (int v = 0; v < V; ++v) acc[r][v] += a0 * even[v];
        if constexpr (decltype(pair)::value) {
          const float a1 = xr[r * k_dim + 2 * kp + 1];
          for (int v = 0; v < V; ++v) acc[r][v] += a1 * odd[v];
        }
      }
    };
    for (int64_t kp = 0; kp < k_dim / 2; ++kp) step(kp, std::true_type{});
    if (k_dim % 2) step(k_dim / 2, std::false_type{});
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) Store(out + (r0 + r) * n_dim + n0 + v * kLanes, acc[r][v]);
  }
};

#if defined(__AVX512F__)
#define JAXSERVE_BF16_DOT 1
// AVX-512 BF16: one vdpbf16ps per 16 columns and pair of rows. Compiled for the instruction
// whatever -march says; JaxserveCpuBf16Dot() decides at run time whether it may run.
#define JAXSERVE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
struct Bf16Dot {
  using X = uint16_t;
  using T = uint16_t;
  static constexpr int kLanes = 16, kAccumulators = 24;
  static int64_t PackedRows(int64_t k_dim) { return (k_dim + 1) / 2 * 2; }
  template <int R, int V>
  JAXSERVE_BF16_TARGET static void Run(const X* x, const T* w, float* out, int64_t r0, int64_t n0, int64_t k_dim,
                                       int64_t n_dim) {
    __m512 acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
    ForPairs<R>(x + r0 * k_dim, k_dim, [&](int64_t kp, const uint32_t* a) JAXSERVE_BF16_TARGET {
      const T* row = w + kp * V * 32;
      for (int j = 0; j < V * 32; j += 32) __builtin_prefetch(row + kAhead * V * 32 + j, 0, 3);
      __m512i b[V];
      for (int v = 0; v < V; ++v) b[v] = _mm512_loadu_si512(row + v * 32);
      for (int r = 0; r < R; ++r) {
        const __m512bh pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r]));
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], pair, (__m512bh)b[v]);
      }
    });
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) _mm512_storeu_ps(out + (r0 + r) * n_dim + n0 + v * 16, acc[r][v]);
  }
};
#endif

}  // namespace

// Whether the bfloat16 matmul can run vdpbf16ps here (compiled in and the CPU has AVX-512 BF16).
extern "C" int JaxserveCpuBf16Dot() {
#if defined(JAXSERVE_BF16_DOT)
  return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
  return 0;
#endif
}

namespace {

template <class K, int V, int R = std::max(1, K::kAccumulators / V)>
void Panel(const typename K::X* x, const typename K::T* w, float* out, int64_t m_dim, int64_t n0, int64_t k_dim,
           int64_t n_dim) {
  int64_t r = 0;
  for (; r + R <= m_dim; r += R) K::template Run<R, V>(x, w, out, r, n0, k_dim, n_dim);
  if constexpr (R > 1) {  // the last rows, fewer than R
    if (r < m_dim) Panel<K, V, R / 2>(x + r * k_dim, w, out + r * n_dim, m_dim - r, n0, k_dim, n_dim);
  }
}

inline int64_t NumPanels(int64_t n_dim) { return n_dim / kWide + (n_dim % kWide) / kNarrow; }

// Work item i: the i-th 48-column panel, then the 16-column panels of the last columns; from the
// front of the list for the calling thread, from the back for a helper.
template <class K>
void RunPanels(const typename K::X* x, const typename K::T* w, float* out, int64_t m_dim, int64_t k_dim,
               int64_t n_dim, jaxserve::Items& items, bool front) {
  const int64_t wide = n_dim / kWide, rows = K::PackedRows(k_dim);
  for (int64_t i = items.Next(front); i >= 0; i = items.Next(front)) {
    if (i < wide) {
      Panel<K, kWide / K::kLanes>(x, w + i * rows * kWide, out, m_dim, i * kWide, k_dim, n_dim);
    } else {
      const int64_t n0 = wide * kWide + (i - wide) * kNarrow;
      Panel<K, kNarrow / K::kLanes>(x, w + rows * n0, out, m_dim, n0, k_dim, n_dim);
    }
  }
}

template <class K>
ffi::Error Matmul(ffi::ThreadPool& pool, const typename K::X* x, const typename K::T* w, float* out,
                  int64_t m_dim, int64_t k_dim, int64_t n_dim, int64_t num_threads) {
  jaxserve::Items items(NumPanels(n_dim));
  auto run = [=, &items](bool caller) { RunPanels<K>(x, w, out, m_dim, k_dim, n_dim, items, caller); };
  jaxserve::RunOnPool(pool, num_threads, NumPanels(n_dim), run);
  return ffi::Error::Success();
}

// Checks x [M, K], packed w [rows, N] (rows: K, or K rounded up to even for bfloat16), out [M, N].
ffi::Error CheckShapes(ffi::AnyBuffer::Dimensions xd, ffi::AnyBuffer::Dimensions wd, ffi::AnyBuffer::Dimensions od,
                       bool pairs) {
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2 || od[0] != xd[0] || od[1] != wd[1] ||
      wd[0] != (pairs ? (xd[1] + 1) / 2 * 2 : xd[1])) {
    return ffi::Error::InvalidArgument(pairs ? "matmul_cpu: expected x [M, K], packed w [K rounded up to even, N], "
                                               "out [M, N]"
                                             : "matmul_cpu: expected x [M, K], packed w [K, N], out [M, N]");
  }
  if (wd[1] % kNarrow != 0) return ffi::Error::InvalidArgument("matmul_cpu: N must be a multiple of 16");
  return ffi::Error::Success();
}

constexpr char kRowsError[] = "matmul_cpu: rows must hold one int32 (the real rows of x)";

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out, int64_t num_threads) {
  if (ffi::Error e = CheckShapes(x.dimensions(), w.dimensions(), out->dimensions(), false); e.failure()) return e;
  const int64_t m_dim = jaxserve::ValidRows(rows, x.dimensions()[0]), n_dim = w.dimensions()[1];
  if (m_dim < 0) return ffi::Error::InvalidArgument(kRowsError);
  jaxserve::ZeroPaddingRows(out->typed_data(), m_dim, x.dimensions()[0], n_dim);
  if (m_dim == 0) return ffi::Error::Success();
  return Matmul<F32>(pool, x.typed_data(), w.typed_data(), out->typed_data(), m_dim, x.dimensions()[1], n_dim,
                     num_threads);
}

ffi::Error MatmulBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                          ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out, int64_t num_threads,
                          int64_t bf16_dot_rows) {
  if (ffi::Error e = CheckShapes(x.dimensions(), w.dimensions(), out->dimensions(), true); e.failure()) return e;
  const int64_t m_dim = jaxserve::ValidRows(rows, x.dimensions()[0]), k_dim = x.dimensions()[1];
  const int64_t n_dim = w.dimensions()[1];
  if (m_dim < 0) return ffi::Error::InvalidArgument(kRowsError);
  jaxserve::ZeroPaddingRows(out->typed_data(), m_dim, x.dimensions()[0], n_dim);
  if (m_dim == 0) return ffi::Error::Success();
#if defined(JAXSERVE_BF16_DOT)
  if (m_dim <= bf16_dot_rows && JaxserveCpuBf16Dot()) {
    return Matmul<Bf16Dot>(pool, x.typed_data(), w.typed_data(), out->typed_data(), m_dim, k_dim, n_dim,
                           num_threads);
  }
#endif
  std::vector<float> xf(m_dim * k_dim);  // x widened once (an L2-sized copy), broadcast from memory by the FMAs
  const uint16_t* xp = x.typed_data();
  for (int64_t i = 0; i < m_dim * k_dim; ++i) xf[i] = Widen(xp[i]);
  return Matmul<Bf16Widen>(pool, xf.data(), w.typed_data(), out->typed_data(), m_dim, k_dim, n_dim, num_threads);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulCpu, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed w, [K, N] elements
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows [1]: x's real rows (the rest: 0 out)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [M, N]
                                  .Attr<int64_t>("num_threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulBf16Cpu, MatmulBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // packed w, [K rounded up to even, N] elements
                                  .Arg<ffi::Buffer<ffi::S32>>()   // rows [1]: x's real rows (the rest: 0 out)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [M, N]
                                  .Attr<int64_t>("num_threads")
                                  .Attr<int64_t>("bf16_dot_rows"));  // vdpbf16ps (where the CPU has it) up to
                                                                     // this many rows of x; widen above
