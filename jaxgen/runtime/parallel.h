// The CPU kernels' thread pool helper (weight_matmul.cc, cache_attention.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxgen {

struct Tasks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  int64_t count = 0;
  std::function<void(int64_t)> run;

  void Drain() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      run(t);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
};

// Runs tasks 0..count-1 on this thread and the pool's: helpers take tasks from a shared
// counter, and this thread runs whatever is left, so it never waits on a task nobody runs.
// The calling thread runs tasks too, so num_threads - 1 helpers make num_threads threads
// in all; one more put three threads on two cores here, and a decode step took 7.9-8.0 ms instead of
// 7.1-7.5 (GPT-2 124M int8-head, benchmarks/RESULTS.md).
inline void Parallel(xla::ffi::ThreadPool pool, int64_t count, int64_t bytes, std::function<void(int64_t)> run) {
  auto tasks = std::make_shared<Tasks>();
  tasks->count = count;
  tasks->run = std::move(run);
  const int64_t helpers = bytes < (256 << 10) ? 0 : std::min<int64_t>(pool.num_threads() - 1, count - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([tasks] { tasks->Drain(); });
  tasks->Drain();
  while (tasks->finished.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace jaxgen
