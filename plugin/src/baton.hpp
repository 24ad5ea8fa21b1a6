// The baton of a cooperative plug-in: the one thread inside it holds it. A
// thread that finds it held sleeps on a futex until it is handed back or the
// caller's deadline passes. Not a lock of the host's data: it stands for "a
// thread runs this plug-in's code", so the host holds it exactly while a
// cooperative plug-in runs, and drops it at every yield point.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include "uipc/core/futex.hpp"
#include "uipc/core/wait_policy.hpp"

namespace uipc::plugin::detail {

class baton {
 public:
  using clock = std::chrono::steady_clock;

  bool try_take() noexcept {
    std::uint32_t free = 0;
    return state_.compare_exchange_strong(free, 1, std::memory_order_acquire, std::memory_order_relaxed);
  }

  /// Takes the baton, waiting until `deadline`; false when it passed.
  bool take(clock::time_point deadline) noexcept {
    if (try_take()) [[likely]]
      return true;
    return take_slow(deadline);
  }
  /// take() with the deadline computed only when it has to wait.
  template <class Deadline>
  bool take_by(Deadline&& deadline) noexcept {
    if (try_take()) [[likely]]
      return true;
    return take_slow(deadline());
  }

  void give_back() noexcept {
    if (state_.exchange(0, std::memory_order_release) == 2) futex::wake(state_, 1);
  }

  bool held() const noexcept { return state_.load(std::memory_order_relaxed) != 0; }

 private:
  bool take_slow(clock::time_point deadline) noexcept {
    // A short spin first: the holder may be about to yield.
    for (int i = 0; i < 64; ++i) {
      cpu_relax();
      if (state_.load(std::memory_order_relaxed) == 0 && try_take()) return true;
    }
    // 2: held, with sleepers. Whoever takes it from here marks it 2 as well,
    // since other sleepers may remain.
    while (state_.exchange(2, std::memory_order_acquire) != 0) {
      if (clock::now() >= deadline) return false;
      (void)futex::wait_until(state_, 2, deadline);
    }
    return true;
  }

  std::atomic<std::uint32_t> state_{0};  // 0 free, 1 held, 2 held with sleepers
};

}  // namespace uipc::plugin::detail
