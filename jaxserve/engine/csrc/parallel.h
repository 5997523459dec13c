// Runs a work function on the calling thread and on helpers of XLA's intra-op pool.
//
// run() is called once per worker (num_threads workers, or with num_threads <= 0 one per thread of
// the pool, which would otherwise wait; never more than max_workers); the workers share their
// items through the caller's own atomic counter. A helper that starts after the caller has finished every item returns at once
// and is not waited for: the caller never waits for a thread to wake up, only for helpers still
// working on an item. The shared state outlives the call (a late helper reads it).

#pragma once

#include <algorithm>
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
      run();
      std::lock_guard<std::mutex> lock(helpers->mu);
      if (--helpers->active == 0) helpers->cv.notify_one();
    });
  }
  run();
  std::unique_lock<std::mutex> lock(helpers->mu);
  helpers->closed = true;
  helpers->cv.wait(lock, [&] { return helpers->active == 0; });
}

}  // namespace jaxserve
