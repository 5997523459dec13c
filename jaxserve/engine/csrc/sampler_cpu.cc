// The engine's sampler for the CPU, XLA FFI custom calls: the semantics of
// jaxserve.engine._sampler.sample (its specification) in one pass over each row, rows split over
// the threads of XLA's intra-op pool.
//
// Row r samples from logits[row_index[r]] ([N, V] float32): bans and penalties (the vocab-array
// variant), the greedy argmax (the first maximum, the first NaN where the row has one), and for
// rows with temperature > 0: temperature, top-k, top-p over the top-k distribution, min-p, then
// the Gumbel-max draw argmax(x + gumbel) with the row's own threefry2x32 stream, bit for bit the
// noise of jax.random.gumbel(key, (V,)) (jax_threefry_partitionable, mode "low"; only the log may
// differ from XLA's in the last bit). With logprobs: log_softmax of the raw row, the sampled
// token's logprob and rank, and the top K ids and logprobs in jax.lax.top_k's order.
//
// No sort of V: a cut-off is found by a radix pass over the logits' order-preserving integer keys
// (a histogram of their top 11 bits, with counts or probability mass per bucket), then by sorting
// the few keys of the one bucket that holds it. The noise is drawn only for tokens that can still
// win: those the masks keep and, of those, the ones within the noise's range (< 16) of the largest
// x + gumbel known so far.
//
// Built with the other kernels by jaxserve.engine._cpu_kernels.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kTiny = std::numeric_limits<float>::min();  // jax.random.gumbel's minval
// Above every Gumbel value a float32 uniform in [tiny, 1) gives: -log(-log(1 - 2^-23)) = 15.94
constexpr float kGumbelMax = 16.0f;
constexpr int kBucketBits = 11;
constexpr int kBuckets = 1 << kBucketBits;

inline uint32_t Bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}

// float32 -> uint32 in the same order (IEEE total order: -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN);
// _sampler._ordered_keys plus 2^31.
inline uint32_t OrderedKey(float x) {
  const uint32_t b = Bits(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// ---- threefry2x32, as jax._src.random.threefry2x32 (20 rounds)

inline uint32_t Rotl(uint32_t v, int r) { return (v << r) | (v >> (32 - r)); }

inline void Threefry(uint32_t k0, uint32_t k1, uint32_t& x0, uint32_t& x1) {
  const uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
  static constexpr int kRot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  x0 += ks[0];
  x1 += ks[1];
  for (int g = 0; g < 5; ++g) {
    for (int j = 0; j < 4; ++j) {
      x0 += x1;
      x1 = Rotl(x1, kRot[g % 2][j]);
      x1 ^= x0;
    }
    x0 += ks[(g + 1) % 3];
    x1 += ks[(g + 2) % 3] + static_cast<uint32_t>(g + 1);
  }
}

// jax.random.fold_in(key, data): threefry_2x32(key, [0, data]).
inline void FoldIn(uint32_t key[2], uint32_t data) {
  uint32_t x0 = 0, x1 = data;
  Threefry(key[0], key[1], x0, x1);
  key[0] = x0;
  key[1] = x1;
}

// _sampler._row_keys: PRNGKey(seed[0]), folded with seed[1], counter[0], counter[1].
inline void RowKey(const uint32_t seed[2], const int32_t counter[2], uint32_t key[2]) {
  key[0] = 0;
  key[1] = seed[0];
  FoldIn(key, seed[1]);
  FoldIn(key, static_cast<uint32_t>(counter[0]));
  FoldIn(key, static_cast<uint32_t>(counter[1]));
}

// bits[j] = jax.random.bits(key, (V,))[index[j]] (partitionable: the hash of the 64-bit counter).
void RandomBits(const uint32_t key[2], const int32_t* index, int64_t n, uint32_t* bits) {
  const uint32_t k0 = key[0], k1 = key[1];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    uint32_t x0 = 0, x1 = static_cast<uint32_t>(index[j]);
    Threefry(k0, k1, x0, x1);
    bits[j] = x0 ^ x1;
  }
}

// jax.random.uniform(key, minval=tiny, maxval=1) from its bits: [1, 2) from the top 23 bits, minus 1,
// times (1 - tiny) == 1, plus tiny, at least tiny.
inline float Uniform(uint32_t bits) {
  const uint32_t b = (bits >> 9) | 0x3F800000u;
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return std::max(kTiny, (f - 1.0f) + kTiny);
}

inline float Gumbel(uint32_t bits) { return -std::log(-std::log(Uniform(bits))); }

// exp(x) as XLA's CPU code computes it (Cephes' polynomial, FMAs, a result below 2^-126 flushed to
// 0), bit for bit for x < 88 (softmax arguments are <= 0): the probabilities the masks compare are
// then XLA's own. Measured against jnp.exp on 2.5M values: equal wherever x < 88.4. Vectorizes.
inline float XlaExp(float x) {
  x = std::min(std::max(x, -87.8f), 88.8f);
  float n = std::floor(std::fma(x, 1.44269504088896341f, 0.5f));
  n = std::min(std::max(n, -127.0f), 128.0f);
  float a = std::fma(-0.693359375f, n, x);  // Cody-Waite: x - n log(2)
  a = std::fma(2.12194440e-4f, n, a);
  float z = std::fma(a, 1.9875691500e-4f, 1.3981999507e-3f);
  z = std::fma(z, a, 8.3334519073e-3f);
  z = std::fma(z, a, 4.1665795894e-2f);
  z = std::fma(z, a, 1.6666665459e-1f);
  z = std::fma(z, a, 5.0000001201e-1f);
  z = 1.0f + std::fma(z, a * a, a);
  const uint32_t biased = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n, 2^128 split in two
  const uint32_t pow2 = std::min(biased, 0x7F000000u);
  uint32_t zb;
  std::memcpy(&zb, &z, sizeof(zb));
  zb += biased - pow2;
  float scale;
  std::memcpy(&z, &zb, sizeof(z));
  std::memcpy(&scale, &pow2, sizeof(scale));
  const float r = z * scale;
  return std::fabs(r) < kTiny ? 0.0f : r;
}

// e[i] = XlaExp(x[i] - m) where keep(i), else 0; returns their sum (in double).
template <typename Keep>
double Exps(const float* x, float m, int64_t v, const Keep& keep, float* e) {
#pragma omp simd
  for (int64_t i = 0; i < v; ++i) e[i] = keep(i) ? XlaExp(x[i] - m) : 0.0f;
  double z = 0.0;
#pragma omp simd reduction(+ : z)
  for (int64_t i = 0; i < v; ++i) z += e[i];
  return z;
}

// ---- argmax: the first maximum, the first NaN where there is one (_sampler.argmax)

constexpr int kLanes = 16;
typedef float VF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(kLanes * sizeof(int32_t))));

struct Best {
  float value;
  int64_t index;  // first index of `value`
  int64_t nan;    // first NaN (-1: none)
};

// The best of x[begin:end] (end > begin).
Best ArgmaxRange(const float* x, int64_t begin, int64_t end) {
  Best b{x[begin], begin, -1};
  int64_t i = begin;
  if (end - begin >= 2 * kLanes) {
    VF best, v;
    VI idx, bidx, nan;
    std::memcpy(&best, x + begin, sizeof(best));
    for (int l = 0; l < kLanes; ++l) idx[l] = static_cast<int32_t>(l);
    bidx = idx;
    nan = idx - idx - 1;
    for (i = begin + kLanes; i + kLanes <= end; i += kLanes) {
      idx += kLanes;
      std::memcpy(&v, x + i, sizeof(v));
      const VI gt = v > best;
      best = gt ? v : best;
      bidx = gt ? idx : bidx;
      nan = (v != v) & (nan < 0) ? idx : nan;
    }
    // the first NaN: of the first vector (best was seeded with it), else of a lane
    for (int l = 0; l < kLanes && b.nan < 0; ++l) {
      if (std::isnan(x[begin + l])) b.nan = begin + l;
    }
    if (b.nan < 0) {
      for (int l = 0; l < kLanes; ++l) {
        if (nan[l] >= 0 && (b.nan < 0 || begin + nan[l] < b.nan)) b.nan = begin + nan[l];
      }
    }
    b.value = best[0], b.index = begin + bidx[0];
    for (int l = 1; l < kLanes; ++l) {
      const int64_t at = begin + bidx[l];
      if (best[l] > b.value || (best[l] == b.value && at < b.index)) b.value = best[l], b.index = at;
    }
  }
  for (; i < end; ++i) {
    const float v = x[i];
    if (v > b.value) b.value = v, b.index = i;
    if (v != v && b.nan < 0) b.nan = i;
  }
  if (b.nan < 0 && std::isnan(b.value)) b.nan = b.index;  // a NaN in the first element
  return b;
}

// Best of consecutive parts (in order) of one row.
inline void Merge(Best& a, const Best& b) {
  if (a.nan < 0 && b.nan >= 0) a.nan = b.nan;
  if (b.value > a.value) a.value = b.value, a.index = b.index;
}

inline int32_t Argmax(const float* x, int64_t n) {
  const Best b = ArgmaxRange(x, 0, n);
  return static_cast<int32_t>(b.nan >= 0 ? b.nan : b.index);
}

// ---- selection over ordered keys

// The k-th largest (1 <= k <= n) of keys[0:n]; `tmp` is scratch.
uint32_t KthLargest(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& tmp) {
  int64_t hist[kBuckets] = {};
  for (int64_t i = 0; i < n; ++i) ++hist[keys[i] >> (32 - kBucketBits)];
  int64_t above = 0, b = kBuckets - 1;
  for (; b > 0 && above + hist[b] < k; --b) above += hist[b];
  tmp.clear();
  for (int64_t i = 0; i < n; ++i) {
    if ((keys[i] >> (32 - kBucketBits)) == static_cast<uint32_t>(b)) tmp.push_back(keys[i]);
  }
  const int64_t at = k - above - 1;  // index in tmp sorted descending
  std::nth_element(tmp.begin(), tmp.begin() + at, tmp.end(), std::greater<uint32_t>());
  return tmp[at];
}

struct Scratch {
  std::vector<float> x, logp;
  std::vector<uint32_t> keys, tmp, bits;
  std::vector<int32_t> cand;
  std::vector<std::pair<uint32_t, float>> group;
  void Resize(int64_t v) {
    x.resize(v);
    logp.resize(v);
    keys.resize(v);
    bits.resize(v);
    cand.resize(v);
  }
};

struct Settings {
  float temperature, top_p, min_p;
  int64_t top_k;  // clipped to [1, V]
};

// The top-k and top-p mask of a sampled row x[0:v] (after temperature), in place (to -inf):
// _sampler.top_k_top_p_min_p(use_min_p=False) row by row.
void TopKTopP(float* x, int64_t v, const Settings& s, Scratch& sc) {
  uint32_t* keys = sc.keys.data();
  uint32_t hi = 0;
  for (int64_t i = 0; i < v; ++i) keys[i] = OrderedKey(x[i]), hi = std::max(hi, keys[i]);
  const uint32_t kth = s.top_k < v ? KthLargest(keys, v, s.top_k, sc.tmp) : 0;
  uint32_t cut = 0;
  if (s.top_p < 1.0f) {
    // softmax over the top k; its max is NaN where any kept logit is NaN
    float m = -kInf;
    bool nan = false;
    for (int64_t i = 0; i < v; ++i) {
      if (keys[i] >= kth) {
        nan |= std::isnan(x[i]);
        m = std::max(m, x[i]);
      }
    }
    if (nan || !std::isfinite(m)) {
      cut = hi;  // every probability NaN: every sum above a key below the largest is NaN, none < top_p
    } else {
      float* prob = sc.logp.data();
      const double z = Exps(x, m, v, [keys, kth](int64_t i) { return keys[i] >= kth; }, prob);
      const float inv_z = 1.0f / static_cast<float>(z);  // XLA divides by a broadcast value so
      // mass per bucket of the top 11 key bits, then the bucket's keys in order: the cut is the first
      // key (descending) at which the mass of the keys >= it reaches top_p
      double mass[kBuckets] = {};
      int64_t count[kBuckets] = {};
      for (int64_t i = 0; i < v; ++i) {
        prob[i] *= inv_z;
        mass[keys[i] >> (32 - kBucketBits)] += prob[i];
        count[keys[i] >> (32 - kBucketBits)] += keys[i] >= kth ? 1 : 0;
      }
      const double p = s.top_p;
      double above = 0.0;
      int64_t b = kBuckets - 1;
      for (; b > 0 && (count[b] == 0 || above + mass[b] < p); --b) above += mass[b];
      auto& group = sc.group;
      group.clear();
      for (int64_t i = 0; i < v; ++i) {
        if ((keys[i] >> (32 - kBucketBits)) == static_cast<uint32_t>(b) && keys[i] >= kth) {
          group.emplace_back(keys[i], prob[i]);
        }
      }
      std::sort(group.begin(), group.end(), [](const auto& a, const auto& c) { return a.first > c.first; });
      cut = group.empty() ? kth : group.back().first;
      for (size_t j = 0; j < group.size();) {
        size_t e = j;
        double g = 0.0;
        for (; e < group.size() && group[e].first == group[j].first; ++e) g += group[e].second;
        if (above + g >= p) {
          cut = group[j].first;
          break;
        }
        above += g;
        j = e;
      }
    }
  }
  const uint32_t keep = std::max(kth, cut);
  for (int64_t i = 0; i < v; ++i) x[i] = keys[i] < keep ? -kInf : x[i];
}

// The min-p mask, in place: tokens whose probability is below min_p times the largest.
void MinP(float* x, int64_t v, float min_p, float* e) {
  float m = -kInf;
  bool nan = false;
  for (int64_t i = 0; i < v; ++i) nan |= std::isnan(x[i]), m = std::max(m, x[i]);
  if (nan || !std::isfinite(m)) return;  // every probability NaN: nothing is below
  const double z = Exps(x, m, v, [](int64_t) { return true; }, e);
  const float inv_z = 1.0f / static_cast<float>(z);  // XLA divides by a broadcast value so
  const float threshold = min_p * inv_z;              // the largest probability: exp(0) / z
#pragma omp simd
  for (int64_t i = 0; i < v; ++i) x[i] = e[i] * inv_z < threshold ? -kInf : x[i];
}

// Bounds of the Gumbel noise of the random bits with each value of their top 12 bits (the uniform, and
// so the noise, grows with the bits), widened by a margin far above any last-bit wobble of the log.
struct GumbelRange {
  static constexpr float kMargin = 1e-3f;
  float lo[4096], hi[4096];
  GumbelRange() {
    for (uint32_t t = 0; t < 4096; ++t) lo[t] = Gumbel(t << 20) - kMargin, hi[t] = Gumbel(t << 20 | 0xFFFFFu) + kMargin;
  }
  static const GumbelRange& Get() {
    static const GumbelRange range;
    return range;
  }
};

// argmax(x + gumbel) over x[0:v] (masked tokens -inf), the noise drawn only where it can matter.
int32_t GumbelArgmax(const float* x, int64_t v, const uint32_t key[2], Scratch& sc) {
  const Best b = ArgmaxRange(x, 0, v);
  if (b.nan >= 0) return static_cast<int32_t>(b.nan);  // x + gumbel is NaN there first
  if (b.value == -kInf) return 0;                       // all -inf: the first
  int32_t* cand = sc.cand.data();
  cand[0] = static_cast<int32_t>(b.index);
  uint32_t first_bits;
  RandomBits(key, cand, 1, &first_bits);
  const float bound = b.value + Gumbel(first_bits);  // a token below bound - 16 cannot reach it
  int64_t n = 0;
  for (int64_t i = 0; i < v; ++i) {
    cand[n] = static_cast<int32_t>(i);
    n += (x[i] + kGumbelMax >= bound) ? 1 : 0;
  }
  uint32_t* bits = sc.bits.data();
  RandomBits(key, cand, n, bits);
  // the noise's range from the top 12 bits (a table): the largest lower bound of x + gumbel, then the
  // logs only where the upper bound reaches it (in index order: the first of tied maxima wins)
  const GumbelRange& range = GumbelRange::Get();
  float lower = -kInf;
#pragma omp simd reduction(max : lower)
  for (int64_t j = 0; j < n; ++j) lower = std::max(lower, x[cand[j]] + range.lo[bits[j] >> 20]);
  float best = -kInf;
  int32_t token = static_cast<int32_t>(b.index);
  for (int64_t j = 0; j < n; ++j) {
    if (!(x[cand[j]] + range.hi[bits[j] >> 20] >= lower)) continue;
    const float y = x[cand[j]] + Gumbel(bits[j]);
    if (y > best) best = y, token = cand[j];
  }
  return token;
}

struct Outputs {
  int32_t* tokens;
  float* logprob;
  int32_t* rank;
  int32_t* top_ids;
  float* top_lp;
  float* processed;  // [R, V] or null (a test's view of the masks)
};

// Logprobs of row `raw` (jax.nn.log_softmax; lax.top_k's order: total order, then index).
void Logprobs(const float* raw, int64_t v, int32_t token, int64_t k, Scratch& sc, float* lp_out, int32_t* rank_out,
              int32_t* ids_out, float* top_out) {
  float m = -kInf;
  bool nan = false;
  for (int64_t i = 0; i < v; ++i) nan |= std::isnan(raw[i]), m = std::max(m, raw[i]);
  // XLA's max of a row with a NaN is the negative default NaN: the row's own NaNs then order above the others'
  // NaN logprobs (IEEE total order), as lax.top_k sees them
  if (nan) m = -std::numeric_limits<float>::quiet_NaN();
  float* logp = sc.logp.data();
  const float lse = std::log(static_cast<float>(Exps(raw, m, v, [](int64_t) { return true; }, logp)));
  uint32_t* keys = sc.keys.data();
  for (int64_t i = 0; i < v; ++i) logp[i] = (raw[i] - m) - lse, keys[i] = OrderedKey(logp[i]);
  const float lp = logp[token];
  int32_t above = 0;
  for (int64_t i = 0; i < v; ++i) above += logp[i] > lp ? 1 : 0;
  *lp_out = lp;
  *rank_out = above + 1;
  const uint32_t t = KthLargest(keys, v, k, sc.tmp);
  int32_t* ids = sc.cand.data();
  int64_t n = 0;
  for (int64_t i = 0; i < v; ++i) {
    if (keys[i] > t) ids[n++] = static_cast<int32_t>(i);
  }
  for (int64_t i = 0; i < v && n < k; ++i) {
    if (keys[i] == t) ids[n++] = static_cast<int32_t>(i);
  }
  std::sort(ids, ids + n, [&](int32_t a, int32_t b) { return keys[a] > keys[b] || (keys[a] == keys[b] && a < b); });
  for (int64_t j = 0; j < k; ++j) ids_out[j] = ids[j], top_out[j] = logp[ids[j]];
}

struct Batch {
  const float* logits;
  int64_t n, v, k;
  const int32_t* row_index;
  const float *temperature, *top_p, *min_p, *repetition, *presence, *frequency;
  const int32_t* top_k;
  const uint32_t* seed;
  const int32_t* counter;
  bool logprobs;
  const bool *prompt_mask, *banned;  // null without vocab arrays
  const int32_t* output_counts;
};

void SampleRow(const Batch& in, int64_t r, const Outputs& out, Scratch& sc) {
  const int64_t v = in.v;
  int64_t row = in.row_index[r];
  if (row < 0) row += in.n;
  row = std::clamp<int64_t>(row, 0, in.n - 1);  // as XLA's gather clamps
  const float* raw = in.logits + row * v;
  const float* x = raw;
  float* buf = out.processed ? out.processed + r * v : sc.x.data();
  if (in.prompt_mask != nullptr) {
    const bool* pm = in.prompt_mask + r * v;
    const bool* ban = in.banned + r * v;
    const int32_t* cnt = in.output_counts + r * v;
    const float rep = in.repetition[r], pres = in.presence[r], freq = in.frequency[r];
    const float inv_rep = 1.0f / rep;  // XLA divides by a broadcast value so
    for (int64_t i = 0; i < v; ++i) {
      float y = ban[i] ? -kInf : raw[i];
      if (pm[i] || cnt[i] > 0) y = y > 0 ? y * inv_rep : y * rep;
      y = std::fma(-freq, static_cast<float>(cnt[i]), y);  // XLA contracts these into FMAs
      buf[i] = std::fma(-pres, cnt[i] > 0 ? 1.0f : 0.0f, y);
    }
    x = buf;
  }
  const float temperature = in.temperature[r];
  int32_t token;
  if (!(temperature > 0)) {
    token = Argmax(x, v);
    if (out.processed && x != buf) std::memcpy(buf, x, v * sizeof(float));
  } else {
    const float inv_t = 1.0f / temperature;  // XLA divides by a broadcast value so
    for (int64_t i = 0; i < v; ++i) buf[i] = x[i] * inv_t;
    const Settings s{temperature, in.top_p[r], in.min_p[r], std::clamp<int64_t>(in.top_k[r], 1, v)};
    if (s.top_k < v || s.top_p < 1.0f) TopKTopP(buf, v, s, sc);
    if (s.min_p > 0) MinP(buf, v, s.min_p, sc.logp.data());
    uint32_t key[2];
    RowKey(in.seed + 2 * r, in.counter + 2 * r, key);
    token = GumbelArgmax(buf, v, key, sc);
  }
  out.tokens[r] = token;
  const int64_t k = in.k;
  if (in.logprobs) {
    Logprobs(raw, v, token, k, sc, out.logprob + r, out.rank + r, out.top_ids + r * k, out.top_lp + r * k);
  } else {
    out.logprob[r] = 0.0f;
    out.rank[r] = 0;
    std::fill(out.top_ids + r * k, out.top_ids + (r + 1) * k, 0);
    std::fill(out.top_lp + r * k, out.top_lp + (r + 1) * k, 0.0f);
  }
}

ffi::Error Sample(ffi::ThreadPool& pool, const Batch& in, int64_t rows, const Outputs& out, int64_t num_threads) {
  auto items = std::make_shared<jaxserve::Items>(rows);
  jaxserve::RunOnPool(pool, num_threads, rows, [&in, &out, items](bool caller) {
    thread_local Scratch sc;
    sc.Resize(in.v);
    for (int64_t r; (r = items->Next(caller)) >= 0;) SampleRow(in, r, out, sc);
  });
  return ffi::Error::Success();
}

bool Is(ffi::Span<const int64_t> dims, std::initializer_list<int64_t> want) {
  return dims.size() == want.size() && std::equal(dims.begin(), dims.end(), want.begin());
}

template <bool kVocab, bool kProcessed>
struct SampleKernel {
  static ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> row_index,
                        ffi::Buffer<ffi::F32> temperature, ffi::Buffer<ffi::S32> top_k, ffi::Buffer<ffi::F32> top_p,
                        ffi::Buffer<ffi::F32> min_p, ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::S32> counter,
                        ffi::Buffer<ffi::PRED> logprobs, ffi::Buffer<ffi::F32> repetition,
                        ffi::Buffer<ffi::F32> presence, ffi::Buffer<ffi::F32> frequency,
                        ffi::Buffer<ffi::PRED> prompt_mask, ffi::Buffer<ffi::S32> output_counts,
                        ffi::Buffer<ffi::PRED> banned, ffi::ResultBuffer<ffi::S32> tokens,
                        ffi::ResultBuffer<ffi::F32> logprob, ffi::ResultBuffer<ffi::S32> rank,
                        ffi::ResultBuffer<ffi::S32> top_ids, ffi::ResultBuffer<ffi::F32> top_lp, float* processed,
                        int64_t num_threads) {
    auto ld = logits.dimensions();
    if (ld.size() != 2 || ld[0] < 1 || ld[1] < 1) {
      return ffi::Error::InvalidArgument("sampler_cpu: logits must be [N, V] with N, V >= 1");
    }
    const int64_t n = ld[0], v = ld[1], r = row_index.element_count();
    const int64_t k = top_ids->dimensions().size() == 2 ? top_ids->dimensions()[1] : -1;
    bool ok = Is(row_index.dimensions(), {r}) && Is(seed.dimensions(), {r, 2}) && Is(counter.dimensions(), {r, 2}) &&
              logprobs.element_count() == 1 && 1 <= k && k <= v && Is(top_ids->dimensions(), {r, k}) &&
              Is(top_lp->dimensions(), {r, k}) && Is(tokens->dimensions(), {r});
    ok = ok && Is(temperature.dimensions(), {r}) && Is(top_k.dimensions(), {r}) && Is(top_p.dimensions(), {r}) &&
         Is(min_p.dimensions(), {r});
    if (kVocab) {
      ok = ok && Is(repetition.dimensions(), {r}) && Is(presence.dimensions(), {r}) &&
           Is(frequency.dimensions(), {r}) && Is(prompt_mask.dimensions(), {r, v}) &&
           Is(output_counts.dimensions(), {r, v}) && Is(banned.dimensions(), {r, v});
    }
    if (!ok) return ffi::Error::InvalidArgument("sampler_cpu: operand shapes do not match [R] rows of [N, V] logits");
    if (r == 0) return ffi::Error::Success();
    const Batch in{logits.typed_data(), n, v, k, row_index.typed_data(), temperature.typed_data(),
                   top_p.typed_data(), min_p.typed_data(), repetition.typed_data(), presence.typed_data(),
                   frequency.typed_data(), top_k.typed_data(), seed.typed_data(), counter.typed_data(),
                   logprobs.typed_data()[0], kVocab ? prompt_mask.typed_data() : nullptr,
                   kVocab ? banned.typed_data() : nullptr, kVocab ? output_counts.typed_data() : nullptr};
    const Outputs out{tokens->typed_data(), logprob->typed_data(), rank->typed_data(), top_ids->typed_data(),
                      top_lp->typed_data(), processed};
    return Sample(pool, in, r, out, num_threads);
  }
};

#define JAXSERVE_SAMPLE_ARGS                                                                                    \
  ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> row_index,                            \
      ffi::Buffer<ffi::F32> temperature, ffi::Buffer<ffi::S32> top_k, ffi::Buffer<ffi::F32> top_p,                \
      ffi::Buffer<ffi::F32> min_p, ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::S32> counter,                     \
      ffi::Buffer<ffi::PRED> logprobs
#define JAXSERVE_VOCAB_ARGS                                                                                     \
  ffi::Buffer<ffi::F32> repetition, ffi::Buffer<ffi::F32> presence, ffi::Buffer<ffi::F32> frequency,              \
      ffi::Buffer<ffi::PRED> prompt_mask, ffi::Buffer<ffi::S32> output_counts, ffi::Buffer<ffi::PRED> banned
#define JAXSERVE_SAMPLE_RETS                                                                                    \
  ffi::ResultBuffer<ffi::S32> tokens, ffi::ResultBuffer<ffi::F32> logprob, ffi::ResultBuffer<ffi::S32> rank,      \
      ffi::ResultBuffer<ffi::S32> top_ids, ffi::ResultBuffer<ffi::F32> top_lp

ffi::Error SampleImpl(JAXSERVE_SAMPLE_ARGS, JAXSERVE_SAMPLE_RETS, int64_t num_threads) {
  // without vocab arrays the penalty operands are never read: any buffers of the right types stand in
  return SampleKernel<false, false>::Run(pool, logits, row_index, temperature, top_k, top_p, min_p, seed, counter,
                                         logprobs, temperature, temperature, temperature, logprobs, row_index,
                                         logprobs, tokens, logprob, rank, top_ids, top_lp, nullptr, num_threads);
}

ffi::Error SampleVocabImpl(JAXSERVE_SAMPLE_ARGS, JAXSERVE_VOCAB_ARGS, JAXSERVE_SAMPLE_RETS, int64_t num_threads) {
  return SampleKernel<true, false>::Run(pool, logits, row_index, temperature, top_k, top_p, min_p, seed, counter,
                                        logprobs, repetition, presence, frequency, prompt_mask, output_counts, banned,
                                        tokens, logprob, rank, top_ids, top_lp, nullptr, num_threads);
}

// The vocab-array sampler that also returns each row's processed logits (greedy rows: after bans and
// penalties; sampled rows: after the masks, what the noise is added to): for tests.
ffi::Error SampleProcessedImpl(JAXSERVE_SAMPLE_ARGS, JAXSERVE_VOCAB_ARGS, JAXSERVE_SAMPLE_RETS,
                               ffi::ResultBuffer<ffi::F32> processed, int64_t num_threads) {
  if (!Is(processed->dimensions(), {static_cast<int64_t>(row_index.element_count()), logits.dimensions().back()})) {
    return ffi::Error::InvalidArgument("sampler_cpu: processed must be [R, V]");
  }
  return SampleKernel<true, true>::Run(pool, logits, row_index, temperature, top_k, top_p, min_p, seed, counter,
                                       logprobs, repetition, presence, frequency, prompt_mask, output_counts, banned,
                                       tokens, logprob, rank, top_ids, top_lp, processed->typed_data(), num_threads);
}

// Each row's random stream as the sampler draws it, for tests: bits [R, V] (jax.random.bits of the
// row key), the uniform floats [R, V] of jax.random.gumbel and the Gumbel noise [R, V].
ffi::Error NoiseImpl(ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::S32> counter, ffi::ResultBuffer<ffi::U32> bits,
                     ffi::ResultBuffer<ffi::F32> uniform, ffi::ResultBuffer<ffi::F32> gumbel) {
  auto d = bits->dimensions();
  if (d.size() != 2 || !Is(seed.dimensions(), {d[0], 2}) || !Is(counter.dimensions(), {d[0], 2})) {
    return ffi::Error::InvalidArgument("sampler_cpu: noise needs seed, counter [R, 2] and outputs [R, V]");
  }
  const int64_t r_dim = d[0], v = d[1];
  std::vector<int32_t> index(v);
  for (int64_t i = 0; i < v; ++i) index[i] = static_cast<int32_t>(i);
  for (int64_t r = 0; r < r_dim; ++r) {
    uint32_t key[2];
    RowKey(seed.typed_data() + 2 * r, counter.typed_data() + 2 * r, key);
    uint32_t* b = bits->typed_data() + r * v;
    RandomBits(key, index.data(), v, b);
    for (int64_t i = 0; i < v; ++i) {
      uniform->typed_data()[r * v + i] = Uniform(b[i]);
      gumbel->typed_data()[r * v + i] = Gumbel(b[i]);
    }
  }
  return ffi::Error::Success();
}

// The first maximum (the first NaN) of each row of x [N, V]: rows, and parts of rows when there are
// few, split over the pool's threads.
ffi::Error ArgmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out,
                      int64_t num_threads) {
  auto d = x.dimensions();
  if (d.size() != 2 || d[1] < 1 || !Is(out->dimensions(), {d[0]})) {
    return ffi::Error::InvalidArgument("argmax_cpu: x must be [N, V] with V >= 1 and out [N]");
  }
  const int64_t rows = d[0], v = d[1];
  if (rows == 0) return ffi::Error::Success();
  const int64_t threads = num_threads > 0 ? num_threads : std::max<int64_t>(1, pool.num_threads());
  constexpr int64_t kMinPart = 4096;
  const int64_t parts = std::clamp<int64_t>((2 * threads + rows - 1) / rows, 1, std::max<int64_t>(1, v / kMinPart));
  const int64_t step = (v + parts - 1) / parts;
  std::vector<Best> best(rows * parts);
  auto items = std::make_shared<jaxserve::Items>(rows * parts);
  const float* xp = x.typed_data();
  jaxserve::RunOnPool(pool, num_threads, rows * parts, [&, items](bool caller) {
    for (int64_t it; (it = items->Next(caller)) >= 0;) {
      const int64_t r = it / parts, p = it % parts;
      best[it] = ArgmaxRange(xp + r * v, p * step, std::min(v, (p + 1) * step));
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    Best b = best[r * parts];
    for (int64_t p = 1; p < parts; ++p) Merge(b, best[r * parts + p]);
    out->typed_data()[r] = static_cast<int32_t>(b.nan >= 0 ? b.nan : b.index);
  }
  return ffi::Error::Success();
}

template <typename B>
auto SampleArgs(B bind) {
  return std::move(bind).template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()   // logits [N, V]
      .template Arg<ffi::Buffer<ffi::S32>>()   // row_index [R]
      .template Arg<ffi::Buffer<ffi::F32>>()   // temperature [R]
      .template Arg<ffi::Buffer<ffi::S32>>()   // top_k [R]
      .template Arg<ffi::Buffer<ffi::F32>>()   // top_p [R]
      .template Arg<ffi::Buffer<ffi::F32>>()   // min_p [R]
      .template Arg<ffi::Buffer<ffi::U32>>()   // seed [R, 2]
      .template Arg<ffi::Buffer<ffi::S32>>()   // counter [R, 2]
      .template Arg<ffi::Buffer<ffi::PRED>>();  // logprobs []
}

template <typename B>
auto VocabArgs(B bind) {
  return std::move(bind).template Arg<ffi::Buffer<ffi::F32>>()  // repetition_penalty [R]
      .template Arg<ffi::Buffer<ffi::F32>>()                     // presence_penalty [R]
      .template Arg<ffi::Buffer<ffi::F32>>()                     // frequency_penalty [R]
      .template Arg<ffi::Buffer<ffi::PRED>>()                    // prompt_mask [R, V]
      .template Arg<ffi::Buffer<ffi::S32>>()                     // output_counts [R, V]
      .template Arg<ffi::Buffer<ffi::PRED>>();                   // banned [R, V]
}

template <typename B>
auto SampleRets(B bind) {
  return std::move(bind).template Ret<ffi::Buffer<ffi::S32>>()  // tokens [R]
      .template Ret<ffi::Buffer<ffi::F32>>()         // logprob [R]
      .template Ret<ffi::Buffer<ffi::S32>>()         // rank [R]
      .template Ret<ffi::Buffer<ffi::S32>>()         // top_ids [R, K]
      .template Ret<ffi::Buffer<ffi::F32>>();        // top_logprobs [R, K]
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveSampleCpu, SampleImpl,
                              SampleRets(SampleArgs(ffi::Ffi::Bind())).Attr<int64_t>("num_threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveSampleVocabCpu, SampleVocabImpl,
                              SampleRets(VocabArgs(SampleArgs(ffi::Ffi::Bind()))).Attr<int64_t>("num_threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveSampleProcessedCpu, SampleProcessedImpl,
                              SampleRets(VocabArgs(SampleArgs(ffi::Ffi::Bind())))
                                  .Ret<ffi::Buffer<ffi::F32>>()  // processed [R, V]
                                  .Attr<int64_t>("num_threads"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveSampleNoiseCpu, NoiseImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seed [R, 2]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // counter [R, 2]
                                  .Ret<ffi::Buffer<ffi::U32>>()  // bits [R, V]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // uniform [R, V]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // gumbel [R, V]
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveArgmaxCpu, ArgmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [N, V]
                                  .Ret<ffi::Buffer<ffi::S32>>()  // out [N]
                                  .Attr<int64_t>("num_threads"));
