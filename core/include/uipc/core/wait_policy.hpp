// How a thread that waits on shared memory spends the time before it sleeps:
// spin, then yield, then sleep, learnt per thread at run time.
#pragma once

#include <chrono>
#include <cstdint>

namespace uipc {

/// One pause of a spin loop: tells the CPU (and a hypervisor) that we spin.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

/// Gives the calling thread's CPU to another runnable thread, if any (sched_yield).
void yield_cpu() noexcept;

/// The adaptive spin -> yield -> sleep policy of a waiter on shared memory (a
/// futex word and the state beside it).
///
/// Spinning pays only while the signaller runs on another CPU: there a peer that
/// spins on the shared word sees a change in well under a microsecond, where a
/// futex wake costs tens of them on a VM. When both share one CPU, a spin only
/// delays the signaller by a whole time slice. Which case holds depends on the
/// machine, its load and the scheduler, so each thread learns it as it goes:
///  - spin budget: at most the caller's limit. A spin that ends asleep halves it
///    (below 0.5 us it is zero), one that succeeds doubles it (to at least
///    1 us); a thread at zero spins `probe_spin` on every `probe_every`th wait,
///    and a success there brings it back.
///  - yield: before it sleeps a waiter gives its CPU away once. When the
///    signaller shares the CPU it runs at once and the wait succeeds with no
///    futex sleep and no wake on either side; when it does not, the yield
///    returns at once. A yield followed by a sleep anyway makes the thread skip
///    the next 1, 2, 4 ... `max_yield_skip` yields; one that pays resets that.
///  - sleep: the caller's futex sleep (see futex.hpp), not part of this object.
///
/// Threading: an object serves one thread at a time. this_thread() is the calling
/// thread's own; a caller may also keep one per waiter. No system call or clock
/// read happens except in spin_then_yield() (the clock while it spins, one
/// sched_yield).
class wait_policy {
 public:
  using clock = std::chrono::steady_clock;

  /// Bounds, not machine constants: what the adaptation starts from and stops at.
  static constexpr std::chrono::nanoseconds smallest_spin{500};
  static constexpr std::chrono::nanoseconds probe_spin{4'000};
  static constexpr std::uint32_t probe_every = 256;
  static constexpr std::uint32_t max_yield_skip = 256;

  /// The calling thread's policy (thread_local).
  static wait_policy& this_thread() noexcept;

  /// How long the coming wait may spin: this thread's budget, at most `limit`
  /// (0 or less: no spin). The first call starts the budget at `limit`.
  std::chrono::nanoseconds spin_budget(std::chrono::nanoseconds limit) noexcept;
  /// Feedback after a spin with budget from spin_budget(limit): `satisfied` when
  /// the condition came true while spinning. A spin cut short by the caller's own
  /// deadline teaches nothing: do not report it.
  void spin_ended(std::chrono::nanoseconds limit, bool satisfied) noexcept;
  /// Whether the coming wait should yield before it sleeps (counts a skip).
  bool yield_due() noexcept;
  /// Feedback after a yield: whether the condition was true right after it.
  void yield_ended(bool satisfied) noexcept;

  /// Everything before the sleep, with the feedback: spins for `budget` (from
  /// spin_budget(limit)) counted from `start`, never past `deadline`, calling
  /// `ready()` after every `look_every` pauses (1: every pause); then, if due,
  /// yields once and calls `ready()` again. Returns true as soon as `ready()`
  /// does (the caller has its outcome); false when the caller should sleep.
  /// `start` is needed only when the budget is positive (the caller has read
  /// the clock for it already). A `ready()` that takes something (a
  /// compare-exchange) where others contend may want a larger `look_every`.
  template <class Ready>
  bool spin_then_yield(std::chrono::nanoseconds limit, std::chrono::nanoseconds budget,
                       clock::time_point start, clock::time_point deadline, Ready&& ready,
                       unsigned look_every = 1);

  /// The current budget (-1 before the first spin_budget()) and yield skip state,
  /// for tests.
  std::chrono::nanoseconds budget() const noexcept { return std::chrono::nanoseconds(budget_ns_); }
  std::uint32_t yields_to_skip() const noexcept { return yield_skip_; }

 private:
  std::int64_t budget_ns_ = -1;  // -1: not adapted yet, start from the limit
  std::uint32_t waits_without_spin_ = 0;
  std::uint32_t yield_skip_ = 0;       // waits left that skip the yield
  std::uint32_t next_yield_skip_ = 0;  // how many to skip after the next failure
};

template <class Ready>
bool wait_policy::spin_then_yield(std::chrono::nanoseconds limit, std::chrono::nanoseconds budget,
                                  clock::time_point start, clock::time_point deadline,
                                  Ready&& ready, unsigned look_every) {
  if (budget.count() > 0) {
    const auto spin_until = start + budget < deadline ? start + budget : deadline;
    // ready() after every pause by default: a pause costs 30 ns on some
    // machines, and looking only every 16th added up to half a microsecond to
    // each hand-off. The clock (a vDSO call of about the same cost) every 16th.
    const unsigned every = look_every == 0 ? 1 : look_every;
    unsigned to_look = every;
    for (unsigned round = 1;; ++round) {
      cpu_relax();
      if (--to_look == 0) {
        to_look = every;
        if (ready()) {
          spin_ended(limit, true);
          return true;
        }
      }
      if ((round & 15) == 0 && clock::now() >= spin_until) break;
    }
    if (spin_until < deadline) spin_ended(limit, false);
  }
  if (yield_due()) {
    yield_cpu();
    const bool satisfied = ready();
    yield_ended(satisfied);
    if (satisfied) return true;
  }
  return false;
}

}  // namespace uipc
