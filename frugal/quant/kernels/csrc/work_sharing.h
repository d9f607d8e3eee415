// Work sharing for the streaming (memory-bound) kernels, robust to a busy machine.
//
// OpenMP's parallel regions (at::parallel_for) split the work statically and end in a barrier: when one
// thread of the team is not scheduled for a few milliseconds — routine on a shared 2-core box — every
// kernel call waits for it, and a 0.3 ms GEMV takes 10 ms. Here the calling thread and persistent helper
// threads claim chunks from a shared counter; the caller runs chunks itself and then waits only for the
// chunks a helper has already claimed, never for a helper that has not started. With no helper running
// at all the caller simply does all the work.
//
// Invariants: every chunk index in [0, num_chunks) runs exactly once, with the job that was current when
// it was claimed; `run` returns only when no claimed chunk is still running. Helpers spin briefly for the
// next job, then sleep on a condition variable. Thread count follows at::get_num_threads() at each call.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace frugal {

class WorkSharing {
 public:
  static WorkSharing& instance() {
    static WorkSharing* pool = new WorkSharing();  // never destroyed: helpers may outlive static teardown
    return *pool;
  }

  // Runs fn(c) for c in [0, |num_chunks|) on the calling thread plus up to at::get_num_threads() - 1 helpers;
  // a negative count runs them all on the calling thread (work too small to share).
  void run(int64_t num_chunks, const std::function<void(int64_t)>& fn) {
    const int threads = std::max(1, at::get_num_threads());
    const bool share = num_chunks > 0;
    num_chunks = num_chunks < 0 ? -num_chunks : num_chunks;
    if (threads == 1 || num_chunks <= 1 || !share || at::in_parallel_region()) {
      for (int64_t c = 0; c < num_chunks; ++c) fn(c);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(job_mutex_);
    ensure_helpers(threads - 1);
    max_helpers_.store(threads - 1);
    fn_.store(&fn);
    num_chunks_.store(num_chunks);
    next_.store(0);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      generation_.fetch_add(1);
    }
    if (sleepers_.load() > 0) wake_.notify_all();
    work();
    while (active_.load() != 0) _mm_pause();
  }

 private:
  WorkSharing() = default;

  void work() {
    for (;;) {
      const int64_t c = next_.fetch_add(1);
      if (c >= num_chunks_.load()) return;
      (*fn_.load())(c);
    }
  }

  void ensure_helpers(int count) {
    while (static_cast<int>(helpers_.size()) < count) {
      const int index = static_cast<int>(helpers_.size());
      helpers_.emplace_back([this, index] { helper_loop(index); });
      helpers_.back().detach();
    }
  }

  void helper_loop(int index) {
    uint64_t seen = generation_.load();
    for (;;) {
      // Spin ~50 us for the next job (kernels of one decode step come back to back), then sleep.
      for (int spin = 0; spin < 50000 && generation_.load() == seen; ++spin) _mm_pause();
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleepers_.fetch_sub(1);
      }
      seen = generation_.load();
      if (index >= max_helpers_.load()) continue;
      active_.fetch_add(1);
      if (generation_.load() == seen) work();  // a late helper finds the counter exhausted and leaves
      active_.fetch_sub(1);
    }
  }

  std::mutex job_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::vector<std::thread> helpers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0}, active_{0}, max_helpers_{0};
  std::atomic<int64_t> next_{0}, num_chunks_{0};
  std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
};

}  // namespace frugal
