// Runs a work function on the calling thread and on helpers of XLA's intra-op pool, and hands the
// workers a call's items (Items).
//
// run(caller) is called once per worker (num_threads workers, or with num_threads <= 0 one per
// thread of the pool, which would otherwise wait; never more than max_workers), with caller true
// on the calling thread and false on a helper; the workers share their items through the caller's
// own Items (or counter). A helper that starts after the caller has finished every item returns at
// once and is not waited for: the caller never waits for a thread to wake up, only for helpers
// still working on an item. The shared state outlives the call (a late helper reads it).

#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

template <typename F>
void RunOnPool(xla::ffi::ThreadPool& pool, int64_t num_threads, int64_t max_workers, const F& run) {
  const int64_t want = num_threads > 0 ? num_threads : std::max<int64_t>(1, pool.num_threads());
  const int64_t workers = std::max<int64_t>(1, std::min(want, max_workers));
  struct Helpers {
    std::mutex mu;
    std::condition_variable cv;
    bool closed = false;  // the caller is done: late helpers return at once
    int64_t active = 0;   // helpers working on items (the caller waits for these)
  };
  auto helpers = std::make_shared<Helpers>();
  for (int64_t t = 1; t < workers; ++t) {
    pool.Schedule([helpers, &run] {
      {
        std::lock_guard<std::mutex> lock(helpers->mu);
        if (helpers->closed) return;
        ++helpers->active;
      }
      run(false);
      std::lock_guard<std::mutex> lock(helpers->mu);
      if (--helpers->active == 0) helpers->cv.notify_one();
    });
  }
  run(true);
  std::unique_lock<std::mutex> lock(helpers->mu);
  helpers->closed = true;
  helpers->cv.wait(lock, [&] { return helpers->active == 0; });
}

// A call's work items, handed out from both ends: the calling thread takes them from the front,
// helpers from the back, and helpers leave the last kCallerItems to the caller. From one call to
// the next a thread then mostly gets the same panels, still in its core's L2 cache (from one
// shared counter they move between cores, and are read from the other core's cache); and a helper
// that starts late (waking a parked pool thread took about 45 us on a 2-core VM) cannot take the
// last item and keep the caller waiting. Measured on a 2-core VM, 2 threads (medians): a 2:4
// 512 x 1408 decode (M = 1) took 44 us with one shared counter, 15 us so; the dense 512 x 512
// matmul 35 us at M = 1 and 46 us at M = 8, 11 and 19 us so. Leaving the caller 2 items instead
// of 1 costs when the items are long: 512 x 512 at M = 64, 140 us (dense) with 2, 103 us with 1.
class Items {
 public:
  explicit Items(int64_t count) : ends_(static_cast<uint64_t>(count)) {}  // 0 <= count < 2^32

  // The next item (-1: none left), from the front (the caller) or the back (a helper).
  int64_t Next(bool front) {
    uint64_t ends = ends_.load(std::memory_order_relaxed);
    while (true) {
      const uint64_t first = ends >> 32, last = ends & 0xFFFFFFFFu;  // items first .. last - 1 are left
      if (first >= last || (!front && last - first <= kCallerItems)) return -1;
      if (ends_.compare_exchange_weak(ends, front ? ends + (uint64_t{1} << 32) : ends - 1)) {
        return static_cast<int64_t>(front ? first : last - 1);
      }
    }
  }

 private:
  static constexpr uint64_t kCallerItems = 1;
  std::atomic<uint64_t> ends_;  // first item left << 32 | one past the last
};

}  // namespace jaxserve
