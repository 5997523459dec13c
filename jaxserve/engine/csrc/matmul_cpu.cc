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
// Where the CPU has AMX, calls with more rows than that (the caller's amx_min_rows) run on AMX
// tiles (tdpbf16ps, 16 x 16 x 32 multiply-adds per instruction) over the same packed layout: a
// panel's pairs of K rows are the VNNI layout of AMX's B tiles. Measured on the same VM (loaded,
// alternating runs, medians), 1 thread, AMX vs this file's earlier bfloat16 path: 512 x 1536 at 16
// rows ~59 us vs ~167 us, 4096 x 4096 at 32 rows ~2.5 ms vs ~10.9 ms, 256 rows ~11 ms vs ~69 ms;
// at 1-4 rows (memory-bound) vdpbf16ps was as fast or faster (4096 x 4096, 1 row: 2.0 vs 3.3 ms).
//
// Built with paged_attention_cpu.cc by jaxserve.engine._cpu_kernels.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
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

// AMX (Advanced Matrix Extensions, tdpbf16ps): for calls with many rows of x. Eight tile registers
// of 16 rows x 64 bytes (one config for all: A = 16 rows of x x 32 bfloat16, B = 16 pairs of K
// rows x 16 columns (the packed pair layout: a panel of width P is the B tiles of its 16-column
// groups, row stride P * 4 bytes), C = 16 x 16 float32). x is copied into a zero-padded scratch
// (rows rounded up to 16, K to 32) so every A tile is whole; the last K chunk's B tiles (fewer than
// 16 pairs) are copied into a zero-padded scratch per panel; the last row block's C tiles are stored
// into a scratch and only the real rows copied out. The CPU (cpuid) and the OS (XCR0) are checked at
// run time; Linux lets a process use the tile data only after arch_prctl(ARCH_REQ_XCOMP_PERM): asked
// once, at the first AMX call, unless already granted (XLA asks for it when it runs a bfloat16 dot).
#define JAXSERVE_AMX 1
#define JAXSERVE_AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))
constexpr int64_t kTileRows = 16, kTileK = 32;  // rows of x and elements of K per A tile

struct TileConfig {  // what ldtilecfg reads: palette 1, then each tile's bytes per row and rows
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The padded copy of x and the sizes the workers share.
struct AmxCall {
  const uint16_t* xs;   // [m_pad, ld] x, zero past row M and column K
  int64_t ld;           // xs's row stride (elements)
  int64_t m_dim, k_dim, n_dim;
  int64_t pairs;        // packed rows / 2: pair rows per panel
};

// C tiles (0 .. V - 1 for row block 0, V .. 2V - 1 for row block 1) to out rows r0 .., columns
// n0 ..; through `scratch` where the block has padding rows.
#define JAXSERVE_AMX_STORE(t, rb, v)                                                              \
  do {                                                                                            \
    if (direct) {                                                                                 \
      _tile_stored(t, out + (r0 + (rb) * kTileRows) * c.n_dim + n0 + (v) * 16, c.n_dim * 4);     \
    } else {                                                                                      \
      _tile_stored(t, scratch + (rb) * kTileRows * kP + (v) * 16, kP * 4);                       \
    }                                                                                             \
  } while (0)

// Rows r0 .. r0 + 16 * RB - 1 (RB = 1 or 2) of a panel of width 16 * V (V = 1 or 3) starting at
// column n0: w the panel, w_tail its last K chunk zero-padded (or null: K a multiple of 32).
template <int V, int RB>
JAXSERVE_AMX_TARGET void AmxBlock(const AmxCall& c, const uint16_t* w, const uint16_t* w_tail, float* out,
                                  int64_t r0, int64_t n0, float* scratch) {
  static_assert((V == 3 && RB == 1) || (V == 1 && (RB == 1 || RB == 2)), "tile registers: C, A, B <= 8");
  constexpr int64_t kP = 16 * V;  // panel width
  const int64_t chunks = (c.k_dim + kTileK - 1) / kTileK, full = c.k_dim / kTileK, b_stride = kP * 4;
  const int64_t a_stride = c.ld * 2;
  const uint16_t* a = c.xs + r0 * c.ld;
  if constexpr (V == 3) {  // C 0-2, A 3, B 4-6
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const uint16_t* b = ch < full ? w + ch * kTileRows * kP * 2 : w_tail;
      _tile_loadd(3, a + ch * kTileK, a_stride);
      _tile_loadd(4, b, b_stride);
      _tile_loadd(5, b + 32, b_stride);
      _tile_loadd(6, b + 64, b_stride);
      _tile_dpbf16ps(0, 3, 4);
      _tile_dpbf16ps(1, 3, 5);
      _tile_dpbf16ps(2, 3, 6);
    }
  } else if constexpr (RB == 2) {  // C 0-1, A 2-3, B 4
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const uint16_t* b = ch < full ? w + ch * kTileRows * kP * 2 : w_tail;
      _tile_loadd(4, b, b_stride);
      _tile_loadd(2, a + ch * kTileK, a_stride);
      _tile_loadd(3, a + kTileRows * c.ld + ch * kTileK, a_stride);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(1, 3, 4);
    }
  } else {  // C 0, A 2, B 4
    _tile_zero(0);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const uint16_t* b = ch < full ? w + ch * kTileRows * kP * 2 : w_tail;
      _tile_loadd(4, b, b_stride);
      _tile_loadd(2, a + ch * kTileK, a_stride);
      _tile_dpbf16ps(0, 2, 4);
    }
  }
  const int64_t real = std::min<int64_t>(RB * kTileRows, c.m_dim - r0);
  const bool direct = real == RB * kTileRows;
  JAXSERVE_AMX_STORE(0, 0, 0);
  if constexpr (V == 3) {
    JAXSERVE_AMX_STORE(1, 0, 1);
    JAXSERVE_AMX_STORE(2, 0, 2);
  }
  if constexpr (RB == 2) JAXSERVE_AMX_STORE(1, 1, 0);
  if (!direct) {
    for (int64_t r = 0; r < real; ++r) std::memcpy(out + (r0 + r) * c.n_dim + n0, scratch + r * kP, kP * 4);
  }
}
#undef JAXSERVE_AMX_STORE

// Every row of x times the panel of width 16 * V at w (column n0).
template <int V>
JAXSERVE_AMX_TARGET void AmxPanel(const AmxCall& c, const uint16_t* w, float* out, int64_t n0) {
  constexpr int64_t kP = 16 * V;
  alignas(64) uint16_t tail[kTileRows * kP * 2];  // the last K chunk's pairs, zero-padded to 16
  alignas(64) float scratch[2 * kTileRows * kP];
  const uint16_t* w_tail = nullptr;
  if (c.k_dim % kTileK) {
    const int64_t first = c.k_dim / kTileK * kTileRows, have = c.pairs - first;
    std::memset(tail, 0, sizeof(tail));
    std::memcpy(tail, w + first * kP * 2, have * kP * 4);
    w_tail = tail;
    asm volatile("" ::: "memory");  // the tile loads' inline asm does not tell the compiler it reads `tail`
  }
  int64_t r0 = 0;
  if constexpr (V == 1) {  // two row blocks at a time while the second has real rows (x's copy holds them)
    for (; r0 + kTileRows < c.m_dim; r0 += 2 * kTileRows) AmxBlock<1, 2>(c, w, w_tail, out, r0, n0, scratch);
  }
  for (; r0 < c.m_dim; r0 += kTileRows) AmxBlock<V, 1>(c, w, w_tail, out, r0, n0, scratch);
}

std::atomic<int> amx_permission{-1};  // -1: not asked yet, 0: refused, 1: granted
std::atomic<int64_t> amx_calls{0};      // calls that ran on AMX (for tests: the path is not only chosen but run)

bool AmxCpu() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;  // tile, bf16
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE: xgetbv may run
  uint32_t lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo & (3u << 17)) == (3u << 17);  // the OS saves XTILECFG and XTILEDATA
}

// Whether this process may use the tile data: granted already, or asked for now (once).
bool AmxPermitted() {
  int state = amx_permission.load(std::memory_order_acquire);
  if (state < 0) {
    constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    unsigned long mask = 0;
    const bool granted = syscall(SYS_arch_prctl, kArchGetXcompPerm, &mask) == 0 && (mask >> kXfeatureXtiledata) & 1;
    state = granted || syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 1 : 0;
    amx_permission.store(state, std::memory_order_release);
  }
  return state == 1;
}
#endif

}  // namespace

// Whether the bfloat16 matmul can run AMX here: 0 no (not compiled in, the CPU or the OS lacks
// it, or the process's permission was refused), 1 yes (the permission is asked for at the first
// AMX call), 2 yes and an AMX call has run (the permission checked and granted).
extern "C" int JaxserveCpuAmx() {
#if defined(JAXSERVE_AMX)
  static const bool cpu = AmxCpu();
  const int permission = amx_permission.load(std::memory_order_acquire);
  return cpu ? (permission < 0 ? 1 : 2 * permission) : 0;
#else
  return 0;
#endif
}

// How many bfloat16 matmul calls have run on AMX in this process.
extern "C" int64_t JaxserveCpuAmxCalls() {
#if defined(JAXSERVE_AMX)
  return amx_calls.load(std::memory_order_relaxed);
#else
  return 0;
#endif
}

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

#if defined(JAXSERVE_AMX)
// The AMX matmul: x copied into its zero-padded scratch by the caller, then the panels split between
// the workers as in Matmul; each worker loads the tile config and releases the tiles when done.
ffi::Error MatmulAmx(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* w, float* out, int64_t m_dim,
                     int64_t k_dim, int64_t n_dim, int64_t num_threads) {
  const int64_t m_pad = (m_dim + kTileRows - 1) / kTileRows * kTileRows;
  int64_t ld = (k_dim + kTileK - 1) / kTileK * kTileK;
  if ((ld * 2) % 4096 == 0) ld += kTileK;  // rows 4 KiB apart would share L1 sets: a tile's 16 rows thrash
  std::vector<uint16_t> xs(m_pad * ld, 0);
  for (int64_t r = 0; r < m_dim; ++r) std::memcpy(xs.data() + r * ld, x + r * k_dim, k_dim * 2);
  const AmxCall c{xs.data(), ld, m_dim, k_dim, n_dim, (k_dim + 1) / 2};
  amx_calls.fetch_add(1, std::memory_order_relaxed);
  jaxserve::Items items(NumPanels(n_dim));
  auto run = [&c, w, out, &items](bool front) JAXSERVE_AMX_TARGET {
    int64_t i = items.Next(front);
    if (i < 0) return;  // a late helper: no tiles configured
    TileConfig config;
    for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = kTileRows;
    _tile_loadconfig(&config);
    const int64_t wide = c.n_dim / kWide, rows = 2 * c.pairs;
    for (; i >= 0; i = items.Next(front)) {
      if (i < wide) {
        AmxPanel<kWide / 16>(c, w + i * rows * kWide, out, i * kWide);
      } else {
        const int64_t n0 = wide * kWide + (i - wide) * kNarrow;
        AmxPanel<kNarrow / 16>(c, w + rows * n0, out, n0);
      }
    }
    _tile_release();
  };
  jaxserve::RunOnPool(pool, num_threads, NumPanels(n_dim), run);
  return ffi::Error::Success();
}
#endif

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
                          int64_t bf16_dot_rows, int64_t amx_min_rows) {
  if (ffi::Error e = CheckShapes(x.dimensions(), w.dimensions(), out->dimensions(), true); e.failure()) return e;
  const int64_t m_dim = jaxserve::ValidRows(rows, x.dimensions()[0]), k_dim = x.dimensions()[1];
  const int64_t n_dim = w.dimensions()[1];
  if (m_dim < 0) return ffi::Error::InvalidArgument(kRowsError);
  jaxserve::ZeroPaddingRows(out->typed_data(), m_dim, x.dimensions()[0], n_dim);
  if (m_dim == 0) return ffi::Error::Success();
#if defined(JAXSERVE_AMX)
  if (amx_min_rows > 0 && m_dim >= amx_min_rows && JaxserveCpuAmx() && AmxPermitted()) {
    return MatmulAmx(pool, x.typed_data(), w.typed_data(), out->typed_data(), m_dim, k_dim, n_dim, num_threads);
  }
#endif
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
                                  .Attr<int64_t>("bf16_dot_rows")   // vdpbf16ps (where the CPU has it) up to
                                                                    // this many rows of x; widen above
                                  .Attr<int64_t>("amx_min_rows"));  // AMX (where the CPU and the OS let it
                                                                    // run) from this many rows; 0: never
