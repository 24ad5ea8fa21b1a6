// The baton of a cooperative plug-in: the one thread inside it holds it. A
// thread that finds it held sleeps on a futex until it is handed back or the
// caller's deadline passes. Not a lock of the host's data: it stands for "a
// thread runs this plug-in's code", so the host holds it exactly while a
// cooperative plug-in runs, and drops it at every yield point.
//
// Biased to its last thread: a plug-in called again and again from one thread
// (the common case: a request's calls on the thread serving it) is entered
// with plain stores, no atomic read-modify-write. The thread the baton is
// biased to announces itself in `inside_` and re-checks the bias; another
// thread that wants the baton takes the futex lock, clears the bias, and runs
// membarrier (heavy_fence) so that either the biased thread sees the bias
// gone, or it sees the biased thread inside and waits for it to leave — the
// asymmetric Dekker handshake the registry's grace periods also use. Taking
// the futex lock 16 times in a row from one thread, uncontended, biases the
// baton to it. Without membarrier there is no bias.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

#include "epoch.hpp"
#include "uipc/core/futex.hpp"
#include "uipc/core/wait_policy.hpp"

namespace uipc::plugin::detail {

class baton {
 public:
  using clock = std::chrono::steady_clock;

  /// Takes the baton, waiting until `deadline`; false when it passed.
  bool take(clock::time_point deadline) noexcept {
    return take_by([deadline] { return deadline; });
  }
  /// take() with the deadline computed only when it has to wait.
  template <class Deadline>
  bool take_by(Deadline&& deadline) noexcept {
    const std::uintptr_t me = token();
    if (bias_.load(std::memory_order_acquire) == me) [[likely]] {
      inside_.store(me, std::memory_order_relaxed);
      std::atomic_signal_fence(std::memory_order_seq_cst);  // the revoker's membarrier orders it
      if (bias_.load(std::memory_order_acquire) == me) [[likely]]
        return true;
      inside_.store(0, std::memory_order_release);  // revoked meanwhile: take the slow way
    }
    std::uint32_t free = 0;
    if (!state_.compare_exchange_strong(free, 1, std::memory_order_acquire,
                                        std::memory_order_relaxed) &&
        !take_slow(deadline()))
      return false;
    return revoke_bias(me, deadline);
  }

  void give_back() noexcept {
    const std::uintptr_t me = token();
    if (inside_.load(std::memory_order_relaxed) == me) {  // a biased hold
      inside_.store(0, std::memory_order_release);
      return;
    }
    // A locked hold. Bias to this thread after a streak of its own takes.
    if (last_taker_ == me) {
      if (++streak_ >= 16 && !readers_fence && state_.load(std::memory_order_relaxed) == 1) {
        streak_ = 0;
        last_taker_ = 0;
        bias_.store(me, std::memory_order_release);
      }
    } else {
      last_taker_ = me;
      streak_ = 1;
    }
    if (state_.exchange(0, std::memory_order_release) == 2) futex::wake(state_, 1);
  }

 private:
  static std::uintptr_t token() noexcept { return reinterpret_cast<std::uintptr_t>(&current_slot); }

  // Holding the futex lock: clear a bias, and wait for its thread to leave.
  template <class Deadline>
  bool revoke_bias(std::uintptr_t me, Deadline& deadline) noexcept {
    const std::uintptr_t biased = bias_.load(std::memory_order_relaxed);
    if (biased == 0) return true;
    bias_.store(0, std::memory_order_relaxed);
    last_taker_ = 0;
    if (biased == me) return true;  // our own bias, and we are not inside
    heavy_fence();
    if (inside_.load(std::memory_order_acquire) == 0) return true;
    // The biased thread is inside: wait for it to give back (rare; a poll).
    const auto until = deadline();
    for (int round = 0; inside_.load(std::memory_order_acquire) != 0; ++round) {
      if (round < 64) {
        cpu_relax();
        continue;
      }
      if (clock::now() >= until) {
        give_back_lock();
        return false;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(round < 256 ? 20 : 200));
    }
    return true;
  }

  bool take_slow(clock::time_point deadline) noexcept {
    // A short spin first: the holder may be about to yield.
    for (int i = 0; i < 64; ++i) {
      cpu_relax();
      std::uint32_t free = 0;
      if (state_.load(std::memory_order_relaxed) == 0 &&
          state_.compare_exchange_strong(free, 1, std::memory_order_acquire,
                                         std::memory_order_relaxed))
        return true;
    }
    // 2: held, with sleepers. Whoever takes it from here marks it 2 as well,
    // since other sleepers may remain.
    while (state_.exchange(2, std::memory_order_acquire) != 0) {
      if (clock::now() >= deadline) return false;
      (void)futex::wait_until(state_, 2, deadline);
    }
    return true;
  }

  void give_back_lock() noexcept {
    if (state_.exchange(0, std::memory_order_release) == 2) futex::wake(state_, 1);
  }

  std::atomic<std::uint32_t> state_{0};    // the futex lock: 0 free, 1 held, 2 held with sleepers
  std::atomic<std::uintptr_t> bias_{0};    // the thread entering without the lock, or 0
  std::atomic<std::uintptr_t> inside_{0};  // the biased thread while it holds the baton
  std::uintptr_t last_taker_ = 0;  // under the lock: who took it last, and how often in a row
  unsigned streak_ = 0;
};

}  // namespace uipc::plugin::detail
