// Futex sleeps and wakes on 32-bit words in shared memory, for a waiter and a
// waker in different processes (or threads of one).
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>

#include "uipc/core/error.hpp"

/// Thin wrappers of futex(2) and futex_waitv(2). Never with FUTEX_PRIVATE_FLAG:
/// the words are meant for MAP_SHARED memory that several processes map (a
/// private futex is keyed by the process's address space, so a wake from another
/// process would never reach the sleeper).
///
/// A futex sleep promises little: it may end early for no reason, and a wake can
/// be missed only if the word did not change. So every caller keeps its state in
/// memory, changes the word before it wakes, and re-checks its condition after
/// each return, whatever the returned reason.
///
/// Threading: every function may be called from any thread at once. Timeouts are
/// CLOCK_MONOTONIC (`std::chrono::steady_clock`); a negative relative timeout or
/// `time_point::max()` is forever, a huge one saturates to forever.
namespace uipc::futex {

using clock = std::chrono::steady_clock;

/// Why a sleep ended. None of these is a failure.
enum class wake_reason : std::uint8_t {
  woken,        ///< a wake (or a spurious return)
  changed,      ///< a word did not hold its expected value (EAGAIN): nothing slept
  timed_out,    ///< the timeout passed
  interrupted,  ///< a signal handler ran (EINTR)
};

/// Sleeps while `word` holds `expected`, for at most `timeout` (relative).
/// Errors (system category): EFAULT, EINVAL for a word that is not a mapped,
/// 4-byte aligned address, which the atomic type rules out; EPERM and ENOSYS
/// where a sandbox refuses futex(2).
result<wake_reason> wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                         std::chrono::nanoseconds timeout) noexcept;

/// wait() with an absolute deadline (FUTEX_WAIT_BITSET on CLOCK_MONOTONIC): no
/// clock is read here, and a retry after an interruption keeps the deadline.
result<wake_reason> wait_until(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                               clock::time_point deadline) noexcept;

/// Wakes up to `count` sleepers on `word` (INT_MAX: every one) in any process.
/// Returns how many were woken (0 also when the call failed: a wake has no one
/// to report to, and the word's change is what a re-checking waiter sees).
int wake(std::atomic<std::uint32_t>& word, int count) noexcept;

/// One word of a wait on several. No member initializers: a waiter keeps an
/// array of them on its stack, and zeroing it on every wait would show.
struct watch {
  const std::atomic<std::uint32_t>* word;
  std::uint32_t expected;
};

/// The most words wait_any() sleeps on (the kernel's FUTEX_WAITV_MAX).
inline constexpr std::size_t max_wait_any = 128;

/// Sleeps until any of `words` is woken or no longer holds its expected value,
/// or until the timeout. One word: FUTEX_WAIT. Several: futex_waitv (Linux
/// 5.16). Where futex_waitv fails other than by a wake, a change, a timeout or
/// an interruption (ENOSYS on an older kernel, EPERM from a seccomp filter), the
/// first failure switches this and every later call of the process to the
/// fallback: each word in turn is checked, then slept on for at most
/// `fallback_slice`. In the fallback a change of any word is seen within one
/// slice; a wake of a word whose value did not change is seen only on the word
/// slept on, which is why wakers change the word first.
/// Errors: EINVAL (system category) for no words or more than max_wait_any.
result<wake_reason> wait_any(std::span<const watch> words,
                             std::chrono::nanoseconds timeout) noexcept;
/// wait_any() with an absolute deadline.
result<wake_reason> wait_any_until(std::span<const watch> words,
                                   clock::time_point deadline) noexcept;

/// How long the fallback of wait_any() sleeps on one word before it looks at the
/// others.
inline constexpr std::chrono::milliseconds fallback_slice{2};

/// Whether wait_any() uses futex_waitv (false once it failed, or while forced).
bool waitv_usable() noexcept;
/// Forces wait_any() onto its fallback (on = true) or lets it try futex_waitv
/// again (false): tests of the fallback, and programs that know better.
void force_fallback(bool on) noexcept;

}  // namespace uipc::futex
