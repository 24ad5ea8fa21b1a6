// The core's futex wrappers (threads and processes ping-ponging through shared
// words, wait_any, timeouts, the fallback without futex_waitv) and the adaptive
// wait policy's learning rules.
#include "uipc/core/futex.hpp"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <new>
#include <thread>

#include "uipc/core/wait_policy.hpp"

namespace uipc {
namespace {

using namespace std::chrono_literals;
using futex::wake_reason;
using steady = std::chrono::steady_clock;

// Takes the turn `mine` of a word two parties hand back and forth: sleeps until
// the word says it is ours. False when a sleep of 5 s passed without it (a wake
// that never came: the test fails rather than hangs).
bool await_turn(std::atomic<std::uint32_t>& word, std::uint32_t mine) {
  for (;;) {
    const std::uint32_t now = word.load();
    if (now == mine) return true;
    auto r = futex::wait(word, now, 5s);
    if (!r || *r == wake_reason::timed_out) return false;
  }
}

void hand_over(std::atomic<std::uint32_t>& word, std::uint32_t theirs) {
  word.store(theirs);
  futex::wake(word, 1);
}

double thread_cpu_ms() {
  timespec t{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

// Restores wait_any's use of futex_waitv however a fallback test ends.
struct fallback_forced {
  fallback_forced() { futex::force_fallback(true); }
  ~fallback_forced() { futex::force_fallback(false); }
  fallback_forced(const fallback_forced&) = delete;
  fallback_forced& operator=(const fallback_forced&) = delete;
};

TEST(FutexTest, TwoThreadsPingPongThroughAWord) {
  std::atomic<std::uint32_t> word{0};
  constexpr int rounds = 2000;
  std::thread peer([&] {
    for (int i = 0; i < rounds; ++i) {
      if (!await_turn(word, 1)) return;
      hand_over(word, 0);
    }
  });
  int done = 0;
  for (; done < rounds; ++done) {
    hand_over(word, 1);
    if (!await_turn(word, 0)) break;
  }
  peer.join();
  EXPECT_EQ(done, rounds);
}

// Waiter and waker in different processes: a private futex would never wake the
// other side (keyed by address space), so this fails if FUTEX_PRIVATE_FLAG crept in.
TEST(FutexTest, TwoProcessesPingPongThroughASharedWord) {
  void* mem = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  auto* word = new (mem) std::atomic<std::uint32_t>{0};
  constexpr int rounds = 1000;
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    for (int i = 0; i < rounds; ++i) {
      // The child waits with no spin at all: every turn is a futex sleep unless
      // the parent was quicker.
      if (!await_turn(*word, 1)) ::_exit(1);
      hand_over(*word, 0);
    }
    ::_exit(0);
  }
  int done = 0;
  for (; done < rounds; ++done) {
    hand_over(*word, 1);
    if (!await_turn(*word, 0)) break;
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  ::munmap(mem, 4096);
  EXPECT_EQ(done, rounds);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

TEST(FutexTest, AWordThatChangedIsNotSleptOn) {
  std::atomic<std::uint32_t> word{7};
  EXPECT_EQ(futex::wait(word, 6, 10s).value(), wake_reason::changed);
  EXPECT_EQ(futex::wait_until(word, 6, steady::now() + 10s).value(), wake_reason::changed);
  std::atomic<std::uint32_t> other{1};
  const futex::watch both[] = {{&word, 7}, {&other, 0}};
  EXPECT_EQ(futex::wait_any(both, 10s).value(), wake_reason::changed);
}

TEST(FutexTest, TimeoutsReturnInTime) {
  std::atomic<std::uint32_t> word{0};
  std::atomic<std::uint32_t> other{0};
  const futex::watch both[] = {{&word, 0}, {&other, 0}};
  auto timed = [](auto&& call) {
    const auto start = steady::now();
    auto r = call();
    const auto took = steady::now() - start;
    EXPECT_TRUE(r && *r == wake_reason::timed_out);
    EXPECT_GE(took, 50ms);
    EXPECT_LT(took, 2s);
  };
  timed([&] { return futex::wait(word, 0, 50ms); });
  timed([&] { return futex::wait_until(word, 0, steady::now() + 50ms); });
  timed([&] { return futex::wait_any(both, 50ms); });
  timed([&] { return futex::wait_any_until(both, steady::now() + 50ms); });
  // A deadline in the past, and a zero timeout, return at once.
  EXPECT_EQ(futex::wait_until(word, 0, steady::now() - 1s).value(), wake_reason::timed_out);
  EXPECT_EQ(futex::wait(word, 0, 0ns).value(), wake_reason::timed_out);
}

TEST(FutexTest, NegativeOrHugeTimeoutWaitsUntilWoken) {
  std::atomic<std::uint32_t> word{0};
  std::atomic<std::uint32_t> other{0};
  for (auto timeout : {std::chrono::nanoseconds(-1), std::chrono::nanoseconds::max()}) {
    word.store(0);
    std::thread waker([&] {
      std::this_thread::sleep_for(30ms);
      hand_over(word, 1);
    });
    auto r = futex::wait(word, 0, timeout);
    waker.join();
    ASSERT_TRUE(r);
    EXPECT_NE(*r, wake_reason::timed_out);
    EXPECT_EQ(word.load(), 1u);
    word.store(0);
    const futex::watch both[] = {{&other, 0}, {&word, 0}};
    std::thread waker2([&] {
      std::this_thread::sleep_for(30ms);
      hand_over(word, 1);
    });
    auto any = futex::wait_any(both, timeout);
    waker2.join();
    ASSERT_TRUE(any);
    EXPECT_NE(*any, wake_reason::timed_out);
  }
}

// The claim of futex_waitv: a sleep on several words ends on a wake of any one.
void expect_wait_any_wakes_on_each_word() {
  std::array<std::atomic<std::uint32_t>, 3> words{};
  for (std::size_t which = 0; which < words.size(); ++which) {
    for (auto& w : words) w.store(0);
    const futex::watch all[] = {{&words[0], 0}, {&words[1], 0}, {&words[2], 0}};
    std::thread waker([&] {
      std::this_thread::sleep_for(30ms);
      hand_over(words[which], 1);
    });
    const auto start = steady::now();
    auto r = futex::wait_any(all, 10s);
    const auto took = steady::now() - start;
    waker.join();
    ASSERT_TRUE(r);
    EXPECT_NE(*r, wake_reason::timed_out) << "word " << which;
    EXPECT_LT(took, 1s) << "word " << which;
  }
}

TEST(FutexTest, WaitAnyWakesOnAnyOfSeveralWords) { expect_wait_any_wakes_on_each_word(); }

TEST(FutexTest, FallbackWakesOnAnyWordAndSleepsMeanwhile) {
  const fallback_forced forced;
  EXPECT_FALSE(futex::waitv_usable());
  expect_wait_any_wakes_on_each_word();
  // A change on a word the fallback is not sleeping on is seen within a slice.
  std::atomic<std::uint32_t> a{0};
  std::atomic<std::uint32_t> b{0};
  const futex::watch both[] = {{&a, 0}, {&b, 0}};
  std::thread changer([&] {
    std::this_thread::sleep_for(30ms);
    b.store(1);  // no wake at all
  });
  const auto start = steady::now();
  auto r = futex::wait_any(both, 10s);
  const auto took = steady::now() - start;
  changer.join();
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, wake_reason::changed);
  EXPECT_LT(took, 1s);
  // A timed-out fallback wait keeps its deadline and sleeps rather than spins.
  b.store(0);
  const double cpu0 = thread_cpu_ms();
  const auto start2 = steady::now();
  auto none = futex::wait_any(both, 200ms);
  const auto took2 = steady::now() - start2;
  const double cpu_ms = thread_cpu_ms() - cpu0;
  ASSERT_TRUE(none);
  EXPECT_EQ(*none, wake_reason::timed_out);
  EXPECT_GE(took2, 200ms);
  EXPECT_LT(took2, 2s);
  EXPECT_LT(cpu_ms, 100.0);
}

TEST(FutexTest, FallbackCanBeLifted) {
  futex::force_fallback(true);
  EXPECT_FALSE(futex::waitv_usable());
  futex::force_fallback(false);
#ifdef SYS_futex_waitv
  // Usable again until a call fails (then wait_any switches by itself).
  EXPECT_TRUE(futex::waitv_usable());
#endif
  expect_wait_any_wakes_on_each_word();
}

TEST(FutexTest, WaitAnyRefusesNoWordsOrTooMany) {
  auto none = futex::wait_any({}, 1ms);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().value(), EINVAL);
  std::atomic<std::uint32_t> word{0};
  std::array<futex::watch, futex::max_wait_any + 1> many{};
  for (auto& w : many) w = {&word, 0};
  const auto start = steady::now();
  auto r = futex::wait_any(many, 10s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().value(), EINVAL);
  EXPECT_LT(steady::now() - start, 1s);  // refused, not slept
}

TEST(FutexTest, WakeCountsTheSleepersItWoke) {
  std::atomic<std::uint32_t> word{0};
  EXPECT_EQ(futex::wake(word, INT_MAX), 0);
  std::atomic<int> asleep{0};
  std::thread sleeper([&] {
    asleep.store(1);
    while (word.load() == 0) (void)futex::wait(word, 0, 5s);
  });
  while (asleep.load() == 0) std::this_thread::yield();
  int woken = 0;
  for (int i = 0; i < 500 && woken == 0; ++i) {
    std::this_thread::sleep_for(2ms);
    word.store(1);
    woken = futex::wake(word, INT_MAX);
    if (woken == 0) word.store(0);
  }
  word.store(1);
  futex::wake(word, INT_MAX);
  sleeper.join();
  EXPECT_EQ(woken, 1);
}

// ---- wait_policy --------------------------------------------------------------

TEST(WaitPolicyTest, BudgetStartsAtTheLimitAndHalvesWhenASpinEndsAsleep) {
  wait_policy p;
  EXPECT_EQ(p.spin_budget(50us), 50us);
  p.spin_ended(50us, false);
  EXPECT_EQ(p.spin_budget(50us), 25us);
  p.spin_ended(50us, false);
  EXPECT_EQ(p.spin_budget(50us), 12500ns);
}

TEST(WaitPolicyTest, BudgetDoublesOnSuccessUpToTheLimit) {
  wait_policy p;
  (void)p.spin_budget(50us);
  for (int i = 0; i < 4; ++i) p.spin_ended(50us, false);  // 3.125 us
  EXPECT_EQ(p.spin_budget(50us), 3125ns);
  p.spin_ended(50us, true);
  EXPECT_EQ(p.spin_budget(50us), 6250ns);
  for (int i = 0; i < 10; ++i) p.spin_ended(50us, true);
  EXPECT_EQ(p.spin_budget(50us), 50us);
  // A smaller limit caps a budget learnt under a larger one.
  EXPECT_EQ(p.spin_budget(10us), 10us);
  EXPECT_EQ(p.spin_budget(0ns), 0ns);
  EXPECT_EQ(p.spin_budget(-1ns), 0ns);
}

TEST(WaitPolicyTest, BudgetThatFallsBelowTheSmallestSpinProbesEvery256thWait) {
  wait_policy p;
  (void)p.spin_budget(50us);
  while (p.budget() > 0ns) p.spin_ended(50us, false);
  int probes = 0;
  std::chrono::nanoseconds probe{0};
  for (std::uint32_t i = 0; i < 3 * wait_policy::probe_every; ++i) {
    const auto b = p.spin_budget(50us);
    if (b > 0ns) {
      ++probes;
      probe = b;
      p.spin_ended(50us, false);  // the probe did not pay: stays at zero
    }
  }
  EXPECT_EQ(probes, 3);
  EXPECT_EQ(probe, wait_policy::probe_spin);
  // A probe that pays brings the spin back, at twice the smallest spin.
  for (std::uint32_t i = 0; i < wait_policy::probe_every; ++i) {
    if (p.spin_budget(50us) > 0ns) {
      p.spin_ended(50us, true);
      break;
    }
  }
  EXPECT_EQ(p.spin_budget(50us), 2 * wait_policy::smallest_spin);
  // The probe never exceeds the caller's limit.
  wait_policy q;
  (void)q.spin_budget(1us);
  q.spin_ended(1us, false);
  q.spin_ended(1us, false);
  std::chrono::nanoseconds biggest{0};
  for (std::uint32_t i = 0; i < wait_policy::probe_every; ++i)
    biggest = std::max(biggest, q.spin_budget(1us));
  EXPECT_EQ(biggest, 1us);
}

TEST(WaitPolicyTest, YieldsThatDoNotPayAreSkippedExponentiallyUpTo256) {
  wait_policy p;
  EXPECT_TRUE(p.yield_due());
  std::uint32_t expected_skip = 1;
  for (int failure = 0; failure < 12; ++failure) {
    p.yield_ended(false);
    std::uint32_t skipped = 0;
    while (!p.yield_due()) ++skipped;
    EXPECT_EQ(skipped, expected_skip) << "after failure " << failure;
    expected_skip = std::min<std::uint32_t>(expected_skip * 2, wait_policy::max_yield_skip);
  }
  // One that pays: every wait yields again, and the next failure skips one.
  p.yield_ended(true);
  EXPECT_TRUE(p.yield_due());
  EXPECT_TRUE(p.yield_due());
  p.yield_ended(false);
  EXPECT_FALSE(p.yield_due());
  EXPECT_TRUE(p.yield_due());
}

TEST(WaitPolicyTest, SpinThenYieldStopsAsSoonAsReadyAndDoublesTheBudget) {
  // Milliseconds, not microseconds: a thread preempted on a loaded machine
  // (or slowed by a sanitizer) must still reach the third check in budget.
  wait_policy p;
  const auto budget = p.spin_budget(50ms);
  p.spin_ended(50ms, false);
  p.spin_ended(50ms, false);  // 12.5 ms
  const auto b = p.spin_budget(50ms);
  int calls = 0;
  const auto start = steady::now();
  EXPECT_TRUE(
      p.spin_then_yield(50ms, b, start, steady::time_point::max(), [&] { return ++calls == 3; }));
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(p.budget(), 2 * b);
  EXPECT_EQ(budget, 50ms);
}

TEST(WaitPolicyTest, SpinThenYieldSpinsItsBudgetThenYieldsOnceAndHalves) {
  wait_policy p;
  const auto b = p.spin_budget(2ms);
  int calls = 0;
  const auto start = steady::now();
  EXPECT_FALSE(p.spin_then_yield(2ms, b, start, steady::time_point::max(), [&] {
    ++calls;
    return false;
  }));
  const auto took = steady::now() - start;
  EXPECT_GE(took, 2ms);
  EXPECT_LT(took, 500ms);
  EXPECT_EQ(p.budget(), 1ms);
  EXPECT_GT(calls, 1);
  EXPECT_EQ(p.yields_to_skip(), 1u);  // the yield did not pay either
  // So the next wait neither spins (budget 0 here) nor yields: ready() is not called.
  calls = 0;
  EXPECT_FALSE(p.spin_then_yield(2ms, 0ns, {}, steady::time_point::max(), [&] {
    ++calls;
    return false;
  }));
  EXPECT_EQ(calls, 0);
}

TEST(WaitPolicyTest, LookEveryNthPauseWhileSpinningButAlwaysAfterTheYield) {
  wait_policy p;
  const auto b = p.spin_budget(50ms);
  int calls = 0;
  EXPECT_TRUE(p.spin_then_yield(
      50ms, b, steady::now(), steady::time_point::max(),
      [&] {
        ++calls;
        return true;
      },
      16));
  EXPECT_EQ(calls, 1) << "the first look comes after 16 pauses, and succeeds";
  // No spin: the look after the yield is never skipped, whatever the cadence.
  wait_policy q;
  calls = 0;
  EXPECT_TRUE(q.spin_then_yield(
      50ms, 0ns, {}, steady::time_point::max(),
      [&] {
        ++calls;
        return true;
      },
      16));
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(q.yields_to_skip(), 0u) << "the yield paid: nothing to skip";
}

TEST(WaitPolicyTest, SpinCutShortByTheDeadlineTeachesNothing) {
  wait_policy p;
  const auto b = p.spin_budget(50ms);
  const auto start = steady::now();
  EXPECT_FALSE(p.spin_then_yield(50ms, b, start, start + 1ms, [] { return false; }));
  EXPECT_LT(steady::now() - start, 40ms);
  EXPECT_EQ(p.budget(), 50ms);
}

TEST(WaitPolicyTest, EachThreadLearnsOnItsOwn) {
  wait_policy& mine = wait_policy::this_thread();
  EXPECT_EQ(&mine, &wait_policy::this_thread());
  (void)mine.spin_budget(50us);
  mine.spin_ended(50us, false);
  const wait_policy* theirs = nullptr;
  std::chrono::nanoseconds their_budget{};
  std::thread other([&] {
    theirs = &wait_policy::this_thread();
    their_budget = wait_policy::this_thread().spin_budget(50us);
  });
  other.join();
  EXPECT_NE(theirs, &mine);
  EXPECT_EQ(their_budget, 50us);
  EXPECT_EQ(mine.spin_budget(50us), 25us);
}

}  // namespace
}  // namespace uipc
