// futex(2) and futex_waitv(2) on shared words, with the fallback for kernels and
// sandboxes without futex_waitv.
#include "uipc/core/futex.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>

namespace uipc::futex {

static_assert(sizeof(std::atomic<std::uint32_t>) == 4 &&
              std::atomic<std::uint32_t>::is_always_lock_free);

namespace {

// The kernel's struct futex_waitv (include/uapi/linux/futex.h, 5.16), spelled
// out so that older headers still build; the call itself then fails with ENOSYS
// and the fallback takes over.
struct waitv_entry {
  std::uint64_t val;
  std::uint64_t uaddr;
  std::uint32_t flags;
  std::uint32_t reserved;
};
constexpr std::uint32_t futex_size_u32 = 0x02;  // FUTEX_32: shared, not FUTEX_PRIVATE_FLAG

// futex_waitv needs Linux 5.16, and a seccomp filter may refuse it: the first
// failure other than a wake, a timeout or a changed word switches every later
// call to the fallback, or every wait would pay for the failing call first.
std::atomic<bool> waitv_unusable{false};

auto* address_of(const std::atomic<std::uint32_t>& word) noexcept {
  return reinterpret_cast<std::uint32_t*>(const_cast<std::atomic<std::uint32_t>*>(&word));
}

timespec to_timespec(std::chrono::nanoseconds d) noexcept {
  if (d.count() < 0) d = std::chrono::nanoseconds(0);
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(d.count() / 1'000'000'000);
  ts.tv_nsec = static_cast<long>(d.count() % 1'000'000'000);
  return ts;
}

// Relative timeout to an absolute CLOCK_MONOTONIC deadline, saturated.
clock::time_point deadline_after(std::chrono::nanoseconds timeout) noexcept {
  if (timeout.count() < 0) return clock::time_point::max();
  const auto now = clock::now();
  if (timeout >= clock::time_point::max() - now) return clock::time_point::max();
  return now + timeout;
}

result<wake_reason> outcome(long rc) noexcept {
  if (rc >= 0) return wake_reason::woken;
  switch (errno) {
    case EAGAIN:
      return wake_reason::changed;
    case ETIMEDOUT:
      return wake_reason::timed_out;
    case EINTR:
      return wake_reason::interrupted;
    default:
      return error_code(errno, boost::system::system_category());
  }
}

// One word in turn, `fallback_slice` at a time, until a change, a wake, or the
// deadline. Starts with a look at every word: a change on one we are not
// sleeping on is seen here.
result<wake_reason> wait_in_turn(std::span<const watch> words, clock::time_point deadline) {
  const bool forever = deadline == clock::time_point::max();
  for (std::size_t turn = 0;; turn = (turn + 1) % words.size()) {
    for (const auto& w : words)
      if (w.word->load(std::memory_order_seq_cst) != w.expected) return wake_reason::changed;
    std::chrono::nanoseconds slice = fallback_slice;
    bool last = false;
    if (!forever) {
      const auto left = deadline - clock::now();
      if (left <= std::chrono::nanoseconds::zero()) return wake_reason::timed_out;
      if (left <= slice) {
        slice = left;
        last = true;
      }
    }
    auto r = wait(*words[turn].word, words[turn].expected, slice);
    if (!r) return r;
    if (*r != wake_reason::timed_out || last) return *r;
  }
}

}  // namespace

result<wake_reason> wait(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                         std::chrono::nanoseconds timeout) noexcept {
  // Nanoseconds in 64 bits last 292 years: every relative timeout fits a timespec.
  const timespec rel = to_timespec(timeout);
  return outcome(::syscall(SYS_futex, address_of(word), FUTEX_WAIT, expected,
                           timeout.count() < 0 ? nullptr : &rel, nullptr, 0));
}

result<wake_reason> wait_until(const std::atomic<std::uint32_t>& word, std::uint32_t expected,
                               clock::time_point deadline) noexcept {
  // libstdc++'s steady_clock is CLOCK_MONOTONIC, FUTEX_WAIT_BITSET's clock
  // without FUTEX_CLOCK_REALTIME.
  const timespec abs = to_timespec(deadline.time_since_epoch());
  return outcome(::syscall(SYS_futex, address_of(word), FUTEX_WAIT_BITSET, expected,
                           deadline == clock::time_point::max() ? nullptr : &abs, nullptr,
                           FUTEX_BITSET_MATCH_ANY));
}

int wake(std::atomic<std::uint32_t>& word, int count) noexcept {
  const long woken = ::syscall(SYS_futex, address_of(word), FUTEX_WAKE, count, nullptr, nullptr, 0);
  return woken < 0 ? 0 : static_cast<int>(woken);
}

result<wake_reason> wait_any(std::span<const watch> words,
                             std::chrono::nanoseconds timeout) noexcept {
  if (words.size() == 1) return wait(*words[0].word, words[0].expected, timeout);
  return wait_any_until(words, deadline_after(timeout));
}

result<wake_reason> wait_any_until(std::span<const watch> words,
                                   clock::time_point deadline) noexcept {
  if (words.empty() || words.size() > max_wait_any)
    return error_code(EINVAL, boost::system::system_category());
  if (words.size() == 1) return wait_until(*words[0].word, words[0].expected, deadline);
#ifdef SYS_futex_waitv
  if (!waitv_unusable.load(std::memory_order_relaxed)) {
    // Filled per entry: zeroing all 128 on every wait would show in a ping-pong.
    std::array<waitv_entry, max_wait_any> vec;  // NOLINT(cppcoreguidelines-pro-type-member-init)
    for (std::size_t i = 0; i < words.size(); ++i) {
      vec[i].val = words[i].expected;
      vec[i].uaddr = reinterpret_cast<std::uintptr_t>(words[i].word);
      vec[i].flags = futex_size_u32;
      vec[i].reserved = 0;
    }
    const timespec abs = to_timespec(deadline.time_since_epoch());
    const long rc =
        ::syscall(SYS_futex_waitv, vec.data(), static_cast<unsigned>(words.size()), 0,
                  deadline == clock::time_point::max() ? nullptr : &abs, CLOCK_MONOTONIC);
    if (rc >= 0 || errno == EAGAIN || errno == ETIMEDOUT || errno == EINTR) return outcome(rc);
    // ENOSYS (before 5.16), EPERM (seccomp), ...: never again.
    waitv_unusable.store(true, std::memory_order_relaxed);
  }
#endif
  return wait_in_turn(words, deadline);
}

bool waitv_usable() noexcept {
#ifdef SYS_futex_waitv
  return !waitv_unusable.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

void force_fallback(bool on) noexcept { waitv_unusable.store(on, std::memory_order_relaxed); }

}  // namespace uipc::futex
