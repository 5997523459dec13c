// Paged attention for the CPU, called from XLA as an FFI custom call.
//
// Each query row r belongs to sequence seq[r] and sees that sequence's first len[r] positions
// (a decode sees all its tokens; a prefill token at position p sees p + 1: causal). For KV head k
// and query head h = k * G + g:
//   out[r, h] = softmax_p(q[r, h] . K[seq[r], p, k] * scale) @ V[seq[r], p, k],  p < len[r]
// where position p lives in block tables[seq[r], p / BS] at offset p % BS of the pools
// k_pages / v_pages, laid out [num_blocks, KVH, BS, D] (jaxserve's "block" layout, so a
// block's keys for every head are one contiguous run). A row with length 0 gets zeros.
// Two passes per row: scores from K, then the weighted sum of V, each block read once.
// Sequences are split between XLA's intra-op threads (interleaved: the engine sorts them longest
// first).
//
// Built on first use by jaxserve.engine._cpu_attention with the system C++ compiler.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Asks for the next block while this one is processed: blocks sit at random places in the pool,
// and the hardware prefetcher does not cross the 4 KiB pages of a block.
inline void Prefetch(const float* p, int64_t floats) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < floats * 4; i += 64) __builtin_prefetch(c + i, 0, 0);
}

int64_t BlockAt(const int32_t* table, int64_t i, int64_t num_blocks) {
  const int64_t b = table[i];
  return (b < 0 || b >= num_blocks) ? 0 : b;
}

struct Dims {
  int64_t batch, heads, dim, kv_heads, block, width;
};

// Calls f(h, p, row) for every query head h and position p < len, where row is the D values of
// head h's KV head at p in `pages`, walking the row's blocks in order (each read once) and
// prefetching the block after the current one, or `next` after the last.
template <typename F>
void ForEachPosition(const float* pages, const int32_t* table, int64_t len, const Dims& d,
                     int64_t num_blocks, const float* next, F&& f) {
  const int64_t group = d.heads / d.kv_heads;
  const int64_t block_elems = d.kv_heads * d.block * d.dim;
  for (int64_t p0 = 0; p0 < len; p0 += d.block) {
    const float* blk = pages + BlockAt(table, p0 / d.block, num_blocks) * block_elems;
    Prefetch(p0 + d.block < len ? pages + BlockAt(table, p0 / d.block + 1, num_blocks) * block_elems : next,
             block_elems);
    const int64_t n = std::min<int64_t>(d.block, len - p0);
    for (int64_t k = 0; k < d.kv_heads; ++k) {
      for (int64_t j = 0; j < n; ++j) {
        const float* row = blk + (k * d.block + j) * d.dim;
        for (int64_t g = 0; g < group; ++g) f(k * group + g, p0 + j, row);
      }
    }
  }
}

void RowRange(const float* q, const float* kp, const float* vp, const int32_t* tables,
              const int32_t* row_seq, const int32_t* lens, float* out, const Dims& d, float scale,
              int64_t num_blocks, int64_t num_seqs, int64_t first, int64_t step) {
  const int64_t block_elems = d.kv_heads * d.block * d.dim;
  const int64_t dim = d.dim;
  std::vector<float> scores;
  std::vector<float> acc(d.heads * d.dim);
  for (int64_t s = first; s < d.batch; s += step) {
    float* o = out + s * d.heads * d.dim;
    const int64_t seq = row_seq[s];
    const int64_t len = std::min<int64_t>(lens[s], d.width * d.block);
    if (len <= 0 || seq < 0 || seq >= num_seqs) {
      std::fill(o, o + d.heads * d.dim, 0.0f);
      continue;
    }
    const float* qs = q + s * d.heads * d.dim;
    const int32_t* table = tables + seq * d.width;
    scores.assign(d.heads * len, 0.0f);  // [H, len]
    // pass 1: scores (prefetching the first V block at the end)
    ForEachPosition(kp, table, len, d, num_blocks, vp + BlockAt(table, 0, num_blocks) * block_elems,
                    [&](int64_t h, int64_t p, const float* key) {
                      const float* qh = qs + h * dim;
                      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                      for (int64_t i = 0; i < dim; ++i) dot += qh[i] * key[i];
                      scores[h * len + p] = dot * scale;
                    });
    // softmax per head
    for (int64_t h = 0; h < d.heads; ++h) {
      float* sc = scores.data() + h * len;
      float m = sc[0];
      for (int64_t p = 1; p < len; ++p) m = std::max(m, sc[p]);
      float total = 0.0f;
      for (int64_t p = 0; p < len; ++p) {
        sc[p] = std::exp(sc[p] - m);
        total += sc[p];
      }
      const float inv = 1.0f / total;
      for (int64_t p = 0; p < len; ++p) sc[p] *= inv;
    }
    // pass 2: weighted sum of values
    std::fill(acc.begin(), acc.end(), 0.0f);
    ForEachPosition(vp, table, len, d, num_blocks, vp, [&](int64_t h, int64_t p, const float* val) {
      const float w = scores[h * len + p];
      float* a = acc.data() + h * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) a[i] += w * val[i];
    });
    std::copy(acc.begin(), acc.end(), o);
  }
}

ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pages,
                           ffi::Buffer<ffi::F32> v_pages, ffi::Buffer<ffi::S32> tables,
                           ffi::Buffer<ffi::S32> row_seq, ffi::Buffer<ffi::S32> lens,
                           ffi::ResultBuffer<ffi::F32> out, float scale,
                           int64_t num_threads) {
  auto qd = q.dimensions();
  auto kd = k_pages.dimensions();
  auto td = tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || lens.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("paged_attention_cpu: expected q [T,H,D], pools [NB,KVH,BS,D], "
                                       "tables [S,W], row_seq [T], lens [T]");
  }
  Dims d{qd[0], qd[1], qd[2], kd[1], kd[2], td[1]};
  if (kd[3] != d.dim || lens.dimensions()[0] != d.batch || row_seq.dimensions().size() != 1 ||
      row_seq.dimensions()[0] != d.batch || d.kv_heads < 1 || d.heads % d.kv_heads != 0 ||
      v_pages.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("paged_attention_cpu: inconsistent shapes");
  }
  for (size_t i = 0; i < 4; ++i) {
    if (v_pages.dimensions()[i] != kd[i]) return ffi::Error::InvalidArgument("paged_attention_cpu: K/V pools differ");
  }
  // num_threads <= 0: one part per thread of XLA's intra-op pool (those threads would otherwise wait)
  const int64_t want = num_threads > 0 ? num_threads : std::max<int64_t>(1, pool.num_threads());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(want, d.batch));
  const float* qp = q.typed_data();
  const float* kp = k_pages.typed_data();
  const float* vp = v_pages.typed_data();
  const int32_t* tp = tables.typed_data();
  const int32_t* lp = lens.typed_data();
  const int32_t* sp = row_seq.typed_data();
  const int64_t num_seqs = td[0];
  float* op = out->typed_data();
  if (threads == 1) {
    RowRange(qp, kp, vp, tp, sp, lp, op, d, scale, kd[0], num_seqs, 0, 1);
  } else {
    // parts 1.. run as tasks on XLA's pool, part 0 here; wait for all before returning
    std::mutex mu;
    std::condition_variable cv;
    int64_t remaining = threads - 1;
    for (int64_t t = 1; t < threads; ++t) {
      pool.Schedule([&, t] {
        RowRange(qp, kp, vp, tp, sp, lp, op, d, scale, kd[0], num_seqs, t, threads);
        std::lock_guard<std::mutex> lock(mu);
        if (--remaining == 0) cv.notify_one();
      });
    }
    RowRange(qp, kp, vp, tp, sp, lp, op, d, scale, kd[0], num_seqs, 0, threads);
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return remaining == 0; });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedAttentionCpu, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("num_threads"));
