// A float32 matmul for the CPU over pre-packed weights, called from XLA as an FFI custom call:
//   out[M, N] = x[M, K] @ W[K, N]
// where W (N a multiple of 16) is given packed in column panels: panels of 48 columns, then the
// last N % 48 columns in panels of 16; a panel of width P starting at column n0 is the
// contiguous run panel[k * P + j] = W[k, n0 + j], read front to back.
//
// A decode step multiplies a few dozen activation rows by every weight matrix of the model, and
// the matrices do not fit the caches: the step streams the weights from memory. XLA's matmul
// packs them on every call and reads them at about a third of the memory bandwidth at a handful
// of rows. Here a thread takes a panel (the calling thread from the front of the list, helpers on
// XLA's intra-op pool from the back: parallel.h's Items) and computes it for every row, R rows at
// a time with the R x P accumulators in vector registers: each weight is read from memory once,
// sequentially, then from the L2 cache for the panel's other row tiles.
//
// Built with paged_attention_cpu.cc by jaxserve.engine._cpu_kernels.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
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

template <int V, int R = std::max(1, kAccumulators / V)>
void Panel(const float* x, const float* w, float* out, int64_t m_dim, int64_t n0, int64_t k_dim, int64_t n_dim) {
  int64_t r = 0;
  for (; r + R <= m_dim; r += R) Tile<R, V>(x, w, out, r, n0, k_dim, n_dim);
  if constexpr (R > 1) {  // the last rows, fewer than R
    if (r < m_dim) Panel<V, R / 2>(x + r * k_dim, w, out + r * n_dim, m_dim - r, n0, k_dim, n_dim);
  }
}

inline int64_t NumPanels(int64_t n_dim) { return n_dim / kWide + (n_dim % kWide) / kNarrow; }

// Work item i: the i-th 48-column panel, then the 16-column panels of the last columns; from the
// front of the list for the calling thread, from the back for a helper.
void RunPanels(const float* x, const float* w, float* out, int64_t m_dim, int64_t k_dim, int64_t n_dim,
               jaxserve::Items& items, bool front) {
  const int64_t wide = n_dim / kWide;
  for (int64_t i = items.Next(front); i >= 0; i = items.Next(front)) {
    if (i < wide) {
      Panel<kWide / kLanes>(x, w + i * k_dim * kWide, out, m_dim, i * kWide, k_dim, n_dim);
    } else {
      const int64_t n0 = wide * kWide + (i - wide) * kNarrow;
      Panel<kNarrow / kLanes>(x, w + k_dim * n0, out, m_dim, n0, k_dim, n_dim);
    }
  }
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> out, int64_t num_threads) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || out->dimensions().size() != 2 ||
      out->dimensions()[0] != xd[0] || out->dimensions()[1] != wd[1]) {
    return ffi::Error::InvalidArgument("matmul_cpu: expected x [M, K], packed w [K, N], out [M, N]");
  }
  const int64_t m_dim = xd[0], k_dim = xd[1], n_dim = wd[1];
  if (n_dim % kNarrow != 0) return ffi::Error::InvalidArgument("matmul_cpu: N must be a multiple of 16");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  jaxserve::Items items(NumPanels(n_dim));
  auto run = [=, &items](bool caller) { RunPanels(xp, wp, op, m_dim, k_dim, n_dim, items, caller); };
  jaxserve::RunOnPool(pool, num_threads, NumPanels(n_dim), run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveMatmulCpu, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed w, [K, N] elements
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [M, N]
                                  .Attr<int64_t>("num_threads"));
