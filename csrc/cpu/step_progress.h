// How many steps of a layer are done, for the layer above to wait on: a short spin, then asleep in the kernel
// (futex) rather than spinning or yielding. On a busy machine the layer below may have been descheduled; a spinning
// waiter would keep the core it could run on, and every chunk would cost a scheduler time slice.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace rnn_fast::cpu {

class StepProgress {
 public:
  void publish(int32_t steps) {
    steps_.store(steps, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      wake();
    }
  }

  void wait_for(int32_t steps) {
    for (int spins = 0; spins < kSpins; ++spins) {
      if (steps_.load(std::memory_order_acquire) >= steps) {
        return;
      }
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    }
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    for (int32_t seen = steps_.load(std::memory_order_seq_cst); seen < steps;
         seen = steps_.load(std::memory_order_seq_cst)) {
      sleep_while(seen);
    }
    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }

 private:
  static constexpr int kSpins = 2000;  // about 20 us of pause instructions

  void sleep_while(int32_t seen) {
#if defined(__linux__)
    // Returns at once if the count is no longer `seen`, so a publish between the load and the call is not lost.
    syscall(SYS_futex, reinterpret_cast<int32_t*>(&steps_), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
    (void)seen;
    std::this_thread::yield();
#endif
  }

  void wake() {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<int32_t*>(&steps_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
#endif
  }

  std::atomic<int32_t> steps_{0};
  std::atomic<int32_t> sleepers_{0};
  static_assert(sizeof(std::atomic<int32_t>) == sizeof(int32_t), "futex needs a plain 32-bit word");
};

}  // namespace rnn_fast::cpu
