// The segment's repairs, driven directly (src/segment.hpp): a process that died
// at any instruction of an update — holding a slot's transaction lock, owning
// a mutex, halfway through taking one — leaves nothing blocked or inconsistent.
#include "segment.hpp"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <thread>

#include "session.hpp"
#include "slot_state.hpp"
#include "uipc/core/futex.hpp"
#include "uipc/core/wait_policy.hpp"

namespace uipc::handles::detail {
namespace {

using namespace std::chrono_literals;

// A pid that was alive a moment ago and is now gone (reaped).
std::int32_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ::waitpid(child, nullptr, 0);
  return child;
}

std::uint64_t locked_by(std::int32_t pid, std::uint32_t value) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(pid)) << 32) | value;
}

class SegmentTest : public ::testing::Test {
 protected:
  static constexpr std::uint32_t capacity = 4;
  void SetUp() override {
    bytes_ = segment_bytes(capacity, 256);
    memory_.reset(static_cast<std::byte*>(std::aligned_alloc(64, bytes_)));
    std::memset(memory_.get(), 0, bytes_);
    view_ = format_segment(memory_.get(), bytes_, capacity, 256, 1);
    publish_state(view_, daemon_state::running);
    auto attached = attach_segment(memory_.get(), bytes_, capacity, 256);
    ASSERT_TRUE(attached);
    EXPECT_EQ(attached->slots, view_.slots);
  }

  slot& make(std::uint32_t index, object_type type, std::uint32_t value = 0,
             std::uint32_t max = 0) {
    object_init init;
    init.type = type;
    init.value = value;
    init.max_count = max;
    publish_slot(view_, index, 1, init);
    types_[index] = type;
    return view_.at(index);
  }

  result<wait_result> wait_one(slot& s, object_type type, std::chrono::nanoseconds timeout) {
    const wait_target t{&s, type, 1};
    return wait(view_, std::span(&t, 1), false, timeout, 0ns);
  }

  struct free_deleter {
    void operator()(std::byte* p) const { std::free(p); }
  };
  // The kernel is asked whether `pid` is gone (a daemon without the process's pidfd).
  repair_result repair(std::int32_t pid) {
    return repair_dead_process(view_, pid, types_, /*exited=*/false);
  }

  std::array<object_type, capacity> types_{};  // the daemon's own record of each slot
  std::size_t bytes_ = 0;
  std::unique_ptr<std::byte, free_deleter> memory_;
  segment_view view_;
};

TEST_F(SegmentTest, ForeignLayoutIsRefused) {
  view_.header->slot_size = 7;
  EXPECT_FALSE(attach_segment(memory_.get(), bytes_, capacity, 256));
  EXPECT_FALSE(attach_segment(memory_.get(), 16, capacity, 256));
}

TEST_F(SegmentTest, LockOfADeadProcessIsUndoneByTheNextUser) {
  slot& e = make(1, object_type::auto_event);
  e.state.store(locked_by(dead_pid(), 0));  // died inside a transaction
  EXPECT_FALSE(signal_event(e));            // does not spin forever
  auto r = wait_one(e, object_type::auto_event, 1s);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::signalled);
}

TEST_F(SegmentTest, DaemonRepairUndoesTheDeadProcessesLock) {
  const auto pid = dead_pid();
  slot& s = make(1, object_type::semaphore, 2, 5);
  s.state.store(locked_by(pid, 2));
  EXPECT_EQ(repair(pid).abandoned, 0u);
  EXPECT_EQ(s.state.load(), 2u);  // unlocked, value as before the transaction
}

TEST_F(SegmentTest, MutexOfADeadOwnerIsAbandonedAndItsWaiterWoken) {
  const auto pid = dead_pid();
  slot& m = make(1, object_type::mutex);
  m.state.store(12345);  // owned by a thread of the dead process
  m.owner_pid.store(pid);
  m.recursion.store(3);
  std::optional<result<wait_result>> got;
  std::thread waiter([&] { got = wait_one(m, object_type::mutex, 10s); });
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(repair(pid).abandoned, 1u);
  waiter.join();
  ASSERT_TRUE(got && *got);
  EXPECT_EQ((*got)->status, wait_status::abandoned);
  EXPECT_EQ(m.recursion.load(), 1u);
  EXPECT_EQ(m.abandoned.load(), 0u);  // told once
}

TEST_F(SegmentTest, MutexTakeInterruptedBeforeCommitIsNotAbandoned) {
  // Died after locking a free mutex and writing owner_pid, before the commit:
  // the mutex was never its own, so it comes back free, not abandoned.
  const auto pid = dead_pid();
  slot& m = make(1, object_type::mutex);
  m.state.store(locked_by(pid, 0));
  m.owner_pid.store(pid);
  EXPECT_EQ(repair(pid).abandoned, 0u);
  auto r = wait_one(m, object_type::mutex, 0ns);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::signalled);
  EXPECT_FALSE(release_mutex(m));
}

TEST_F(SegmentTest, WaitAllOfADeadProcessLeavesNothingLocked) {
  // A wait-all that died with both slots locked: both are restored.
  const auto pid = dead_pid();
  slot& a = make(1, object_type::auto_event, 1);
  slot& b = make(2, object_type::semaphore, 1, 1);
  a.state.store(locked_by(pid, 1));
  b.state.store(locked_by(pid, 1));
  repair(pid).abandoned;
  const wait_target both[] = {{&a, object_type::auto_event, 1}, {&b, object_type::semaphore, 1}};
  auto r = wait(view_, both, true, 0ns, 0ns);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::signalled);
  EXPECT_EQ(a.state.load(), 0u);
  EXPECT_EQ(b.state.load(), 0u);
}

TEST_F(SegmentTest, RetiredSlotFailsItsWaiterAsStale) {
  slot& e = make(1, object_type::manual_event);
  std::optional<result<wait_result>> got;
  std::thread waiter([&] { got = wait_one(e, object_type::manual_event, 10s); });
  std::this_thread::sleep_for(20ms);
  retire_slot(view_, 1, 2);
  waiter.join();
  ASSERT_TRUE(got);
  EXPECT_EQ(got->error(), make_error_code(errc::stale_handle));
  EXPECT_EQ(checked_slot(view_, {1, 1}, object_type::none).error(),
            make_error_code(errc::stale_handle));
}

TEST_F(SegmentTest, DeadDaemonIsNoticedByASleepingWaiter) {
  slot& e = make(1, object_type::manual_event);
  // Killed without a word: the kernel marked the daemon's death word (as
  // death_flag_test shows it does).
  view_.header->death_word.store(death_mark);
  const auto start = std::chrono::steady_clock::now();
  auto r = wait_one(e, object_type::manual_event, 30s);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  EXPECT_EQ(r.error(), make_error_code(errc::daemon_lost));
  EXPECT_FALSE(view_.running());
}

TEST_F(SegmentTest, ADaemonWithoutADeathFlagIsAskedAboutThroughTheKernel) {
  // A daemon that could not arm its death word (no set_robust_list) leaves it
  // 0: a client then asks the kernel, as it did before there was a word.
  mapping m;
  m.view = view_;
  m.daemon_pid = dead_pid();
  ASSERT_EQ(view_.header->death_word.load(), 0u);
  EXPECT_TRUE(m.daemon_gone());
  EXPECT_TRUE(m.lost.load());
  EXPECT_FALSE(m.usable());

  mapping alive;
  alive.view = view_;
  alive.daemon_pid = ::getpid();
  EXPECT_FALSE(alive.daemon_gone());
  EXPECT_TRUE(alive.usable());

  // Armed, the word alone decides on the operations' path; sleepers ask the
  // kernel as well (a word written over would hide the death).
  view_.header->death_word.store(12345);
  mapping armed;
  armed.view = view_;
  armed.daemon_pid = dead_pid();
  EXPECT_FALSE(armed.daemon_gone());
  EXPECT_TRUE(armed.kernel_says_gone(false));
  view_.header->death_word.store(12345 | death_mark);
  EXPECT_TRUE(armed.daemon_gone());
  EXPECT_FALSE(armed.usable());
}

TEST_F(SegmentTest, AClientWritingTheHeadersDaemonPidStopsNoWaiter) {
  // The header's pid is any client's to write; a sleeper asks the kernel
  // about the daemon it was told of in the hello.
  slot& e = make(1, object_type::manual_event);
  set_sleep_slice(20ms);
  view_.header->daemon_pid.store(dead_pid());
  auto r = wait_one(e, object_type::manual_event, 200ms);
  set_sleep_slice(1s);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->status, wait_status::timed_out);
  EXPECT_TRUE(view_.running());
}

TEST_F(SegmentTest, ASleeperAsksTheKernelWhenTheDeathWordSaysNothing) {
  slot& e = make(1, object_type::manual_event);
  set_sleep_slice(20ms);
  view_.daemon_pid = dead_pid();  // the daemon this client knows: killed, the word never marked
  const auto start = std::chrono::steady_clock::now();
  auto r = wait_one(e, object_type::manual_event, 30s);
  set_sleep_slice(1s);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  EXPECT_EQ(r.error(), make_error_code(errc::daemon_lost));
  EXPECT_FALSE(view_.running());
}

TEST_F(SegmentTest, AutoEventSignalReachesTheSingleWaiterBesideAWaitAll) {
  // The wait-all sleeps first (so a wake-one would pick it), needs a second
  // object that stays unsignalled, and so takes nothing: the wake must still
  // reach the single waiter at once, not at the end of its 1 s slice.
  slot& e = make(1, object_type::auto_event);
  slot& gate = make(2, object_type::manual_event);
  const wait_target both[] = {{&e, object_type::auto_event, 1},
                              {&gate, object_type::manual_event, 1}};
  std::optional<result<wait_result>> all_got;
  std::thread all_waiter([&] { all_got = wait(view_, both, true, 20s, 0ns); });
  std::this_thread::sleep_for(50ms);
  std::optional<result<wait_result>> one_got;
  std::chrono::steady_clock::time_point woke;
  std::thread one_waiter([&] {
    one_got = wait_one(e, object_type::auto_event, 20s);
    woke = std::chrono::steady_clock::now();
  });
  std::this_thread::sleep_for(50ms);
  const auto signalled_at = std::chrono::steady_clock::now();
  EXPECT_FALSE(signal_event(e));
  one_waiter.join();
  ASSERT_TRUE(one_got && *one_got);
  EXPECT_EQ((*one_got)->status, wait_status::signalled);
  EXPECT_LT(woke - signalled_at, 300ms);
  EXPECT_FALSE(signal_event(gate));
  EXPECT_FALSE(signal_event(e));
  all_waiter.join();
  ASSERT_TRUE(all_got && *all_got);
  EXPECT_EQ((*all_got)->status, wait_status::signalled);
}

TEST_F(SegmentTest, MutexReleaseReachesTheSingleWaiterBesideAWaitAll) {
  slot& m = make(1, object_type::mutex);
  slot& gate = make(2, object_type::manual_event);
  auto taken = wait_one(m, object_type::mutex, 0ns);
  ASSERT_TRUE(taken && taken->status == wait_status::signalled);
  const wait_target both[] = {{&m, object_type::mutex, 1}, {&gate, object_type::manual_event, 1}};
  std::optional<result<wait_result>> all_got;
  std::thread all_waiter([&] {
    all_got = wait(view_, both, true, 20s, 0ns);
    if (all_got && *all_got) (void)release_mutex(m);
  });
  std::this_thread::sleep_for(50ms);
  std::optional<result<wait_result>> one_got;
  std::chrono::steady_clock::time_point woke;
  std::thread one_waiter([&] {
    one_got = wait_one(m, object_type::mutex, 20s);
    woke = std::chrono::steady_clock::now();
    if (one_got && *one_got) (void)release_mutex(m);
  });
  std::this_thread::sleep_for(50ms);
  const auto released_at = std::chrono::steady_clock::now();
  EXPECT_FALSE(release_mutex(m));
  one_waiter.join();
  ASSERT_TRUE(one_got && *one_got);
  EXPECT_LT(woke - released_at, 300ms);
  EXPECT_FALSE(signal_event(gate));
  all_waiter.join();
  ASSERT_TRUE(all_got && *all_got);
}

TEST_F(SegmentTest, HugeTimeoutIsForeverNotAnOverflowIntoThePast) {
  slot& e = make(1, object_type::auto_event);
  std::thread signaller([&] {
    std::this_thread::sleep_for(50ms);
    (void)signal_event(e);
  });
  auto r = wait_one(e, object_type::auto_event, std::chrono::nanoseconds::max());
  signaller.join();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::signalled);
}

TEST_F(SegmentTest, RepairNeverWaitsForALockALiveProcessHolds) {
  const auto dead = dead_pid();
  slot& m = make(1, object_type::mutex);
  m.owner_pid.store(dead);
  // Owned by the dead process's thread 777, and locked by a live process
  // (stopped, say, or scribbling): the repair must not wait for it.
  const std::int32_t live = ::getppid();
  m.state.store(locked_by(live, 777));
  auto pass = std::async(std::launch::async, [&] { return repair(dead); });
  if (pass.wait_for(5s) != std::future_status::ready) {
    m.state.store(777);  // let it finish, then fail
    pass.wait();
    FAIL() << "the repair waited for a live process's lock";
  }
  const auto first = pass.get();
  EXPECT_TRUE(first.incomplete);
  EXPECT_EQ(first.abandoned, 0u);
  EXPECT_EQ(m.state.load(), locked_by(live, 777));  // not touched
  m.state.store(777);                               // the live process unlocks
  const auto second = repair(dead);
  EXPECT_FALSE(second.incomplete);
  EXPECT_EQ(second.abandoned, 1u);
}

TEST_F(SegmentTest, ALockThatNeverGoesOnAnotherObjectLeavesNoRepairPending) {
  // A live process holds (or a client wrote) locks on an event and on a mutex
  // of another owner: nothing of the dead process is there, so its repair is
  // complete, and the words are not touched.
  const auto dead = dead_pid();
  const std::int32_t live = ::getppid();
  slot& e = make(1, object_type::auto_event);
  e.state.store(locked_by(live, 1));
  slot& m = make(2, object_type::mutex);
  m.owner_pid.store(live);
  m.state.store(locked_by(live, 777));
  const auto r = repair(dead);
  EXPECT_FALSE(r.incomplete);
  EXPECT_EQ(r.abandoned, 0u);
  EXPECT_EQ(e.state.load(), locked_by(live, 1));
  EXPECT_EQ(m.state.load(), locked_by(live, 777));
}

TEST_F(SegmentTest, RepairNeverUndoesALockOfTheDaemonsOwnProcess) {
  // The daemon runs in a process with clients of its own (uipcd embeds it):
  // a thread of this process is taking the mutex, its lock held, while the
  // daemon repairs another client that died. Undone, the taker's commit would
  // make a second owner beside whoever took the mutex after the undo.
  const auto dead = dead_pid();
  slot& m = make(1, object_type::mutex);
  m.state.store(locked_by(::getpid(), 0));
  const auto r = repair(dead);
  EXPECT_FALSE(r.incomplete);  // nothing of the dead process is there
  EXPECT_EQ(m.state.load(), locked_by(::getpid(), 0));
}

TEST_F(SegmentTest, RepairOfALiveProcessWhoseLastSessionEndedLeavesItsLocks) {
  // A live process's last session ended (dropped for a protocol error, say)
  // while one of its threads holds a slot's lock: that lock is a transaction
  // in progress, not a corpse's. The repair comes back for it later.
  const std::int32_t live = ::getppid();
  slot& m = make(1, object_type::mutex);
  m.state.store(locked_by(live, 0));
  m.owner_pid.store(live);
  slot& e = make(2, object_type::auto_event);
  e.state.store(locked_by(live, 1));
  const auto r = repair(live);
  EXPECT_TRUE(r.incomplete);
  EXPECT_EQ(m.state.load(), locked_by(live, 0));
  EXPECT_EQ(e.state.load(), locked_by(live, 1));
}

// A live process's lock word that stays (any client may write one): a timed
// wait ends at its deadline with nothing taken, and a wait-all unlocks what it
// had locked. `unstick` lets a wait that hung finish before the test fails.
template <class F>
auto within_5s(F f, const std::function<void()>& unstick) -> std::optional<decltype(f())> {
  auto pass = std::async(std::launch::async, std::move(f));
  if (pass.wait_for(5s) == std::future_status::ready) return pass.get();
  unstick();
  pass.wait();
  return std::nullopt;
}

TEST_F(SegmentTest, ALockWordThatStaysEndsATimedWaitAtItsDeadline) {
  const std::int32_t live = ::getppid();
  for (const object_type type :
       {object_type::semaphore, object_type::auto_event, object_type::mutex}) {
    SCOPED_TRACE(static_cast<int>(type));
    const std::uint32_t value = type == object_type::mutex ? 0 : 1;
    slot& s = make(1, type, value, 5);
    s.state.store(locked_by(live, value));
    const auto tried =
        within_5s([&] { return take_now(view_, s, type); }, [&] { s.state.store(value); });
    ASSERT_TRUE(tried) << "a try outlasted 5 s";
    EXPECT_EQ(*tried, take_outcome::busy);
    for (const auto timeout : {0ns, std::chrono::nanoseconds(50ms)}) {
      const auto start = std::chrono::steady_clock::now();
      auto r = within_5s([&] { return wait_one(s, type, timeout); }, [&] { s.state.store(value); });
      ASSERT_TRUE(r) << "a wait of " << timeout.count() << " ns outlasted 5 s";
      ASSERT_TRUE(*r) << r->error().message();
      EXPECT_EQ((*r)->status, wait_status::timed_out);
      EXPECT_GE(std::chrono::steady_clock::now() - start, timeout);
    }
    EXPECT_EQ(s.state.load(), locked_by(live, value));  // a live process's: not touched
    s.state.store(value);                               // it unlocks: the unit is there
    auto r = wait_one(s, type, 0ns);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, wait_status::signalled);
    if (type == object_type::mutex) {
      EXPECT_FALSE(release_mutex(s));
    }
  }
}

TEST_F(SegmentTest, AWaitAllBlockedByALockWordUnlocksWhatItLocked) {
  const std::int32_t live = ::getppid();
  slot& a = make(1, object_type::manual_event, 1);
  slot& b = make(2, object_type::semaphore, 2, 5);
  slot& c = make(3, object_type::auto_event, 1);
  c.state.store(locked_by(live, 1));
  const wait_target all[] = {{&a, object_type::manual_event, 1},
                             {&b, object_type::semaphore, 1},
                             {&c, object_type::auto_event, 1}};
  for (const auto timeout : {0ns, std::chrono::nanoseconds(50ms)}) {
    auto r =
        within_5s([&] { return wait(view_, all, true, timeout, 0ns); }, [&] { c.state.store(1); });
    ASSERT_TRUE(r) << "a wait-all of " << timeout.count() << " ns outlasted 5 s";
    ASSERT_TRUE(*r) << r->error().message();
    EXPECT_EQ((*r)->status, wait_status::timed_out);
    EXPECT_EQ(a.state.load(), 1u);  // unlocked, nothing taken
    EXPECT_EQ(b.state.load(), 2u);
    EXPECT_EQ(c.state.load(), locked_by(live, 1));
  }
  c.state.store(1);
  auto r = wait(view_, all, true, 0ns, 0ns);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::signalled);
  EXPECT_EQ(b.state.load(), 1u);
  EXPECT_EQ(c.state.load(), 0u);
}

// A wait-all that meets a lock word that stays does not hold its other slots
// locked meanwhile: a waiter on one of them is served.
TEST_F(SegmentTest, AWaitAllBlockedByALockWordHoldsNoOtherSlotMeanwhile) {
  const std::int32_t live = ::getppid();
  slot& a = make(1, object_type::manual_event, 1);
  slot& c = make(2, object_type::auto_event, 1);
  c.state.store(locked_by(live, 1));
  const wait_target all[] = {{&a, object_type::manual_event, 1}, {&c, object_type::auto_event, 1}};
  auto blocked = std::async(std::launch::async, [&] { return wait(view_, all, true, 2s, 0ns); });
  std::this_thread::sleep_for(50ms);
  auto r = within_5s([&] { return wait_one(a, object_type::manual_event, 100ms); },
                     [&] { c.state.store(1); });
  ASSERT_TRUE(r);
  ASSERT_TRUE(*r) << r->error().message();
  EXPECT_EQ((*r)->status, wait_status::signalled);
  c.state.store(1);  // the lock goes: the wait-all takes both
  auto both = blocked.get();
  ASSERT_TRUE(both) << both.error().message();
  EXPECT_EQ(both->status, wait_status::signalled);
  EXPECT_EQ(c.state.load(), 0u);
}

// A wait-any looks past a target whose lock word stays, and takes another.
TEST_F(SegmentTest, AWaitAnyTakesAnotherTargetBesideALockWordThatStays) {
  const std::int32_t live = ::getppid();
  slot& locked = make(1, object_type::auto_event, 0);
  slot& ready = make(2, object_type::manual_event, 1);
  locked.state.store(locked_by(live, 0));
  const wait_target any[] = {{&locked, object_type::auto_event, 1},
                             {&ready, object_type::manual_event, 1}};
  auto r =
      within_5s([&] { return wait(view_, any, false, -1ns, 0ns); }, [&] { locked.state.store(1); });
  ASSERT_TRUE(r) << "a wait for ever did not look past the locked target";
  ASSERT_TRUE(*r) << r->error().message();
  EXPECT_EQ((*r)->index, 1u);
  locked.state.store(0);
}

// Signal, reset and release give up on a lock word that stays, with a clear
// error, instead of waiting for ever (on a loop thread, say).
TEST_F(SegmentTest, OperationsWithoutATimeoutGiveUpOnALockWordThatStays) {
  const std::int32_t live = ::getppid();
  slot& e = make(1, object_type::auto_event, 0);
  slot& s = make(2, object_type::semaphore, 1, 5);
  e.state.store(locked_by(live, 0));
  s.state.store(locked_by(live, 1));
  const auto unstick = [&] {
    e.state.store(0);
    s.state.store(1);
  };
  auto signalled = within_5s([&] { return signal_event(e); }, unstick);
  ASSERT_TRUE(signalled) << "signal waited for ever";
  EXPECT_EQ(*signalled, make_error_code(errc::object_locked));
  auto reset = within_5s([&] { return reset_event(e); }, unstick);
  ASSERT_TRUE(reset);
  EXPECT_EQ(*reset, make_error_code(errc::object_locked));
  auto released = within_5s(
      [&] {
        std::uint32_t previous = 0;
        return release_semaphore(s, 1, previous);
      },
      unstick);
  ASSERT_TRUE(released);
  EXPECT_EQ(*released, errc::object_locked);
  EXPECT_EQ(e.state.load(), locked_by(live, 0));  // nothing changed
  EXPECT_EQ(s.state.load(), locked_by(live, 1));
}

TEST_F(SegmentTest, RepairUsesTheDaemonsCapacityAndTypesNotTheSegments) {
  const auto dead = dead_pid();
  slot& m = make(1, object_type::mutex);
  m.state.store(4242);
  m.owner_pid.store(dead);
  // Scribbled by some process of the user: a huge capacity, a wrong type.
  view_.header->capacity = 1u << 30;
  m.type.store(static_cast<std::uint32_t>(object_type::none));
  EXPECT_EQ(repair(dead).abandoned, 1u);  // still abandoned, and no walk off the table
  EXPECT_EQ(view_.capacity(), capacity);
  publish_state(view_, daemon_state::running);  // loops over the view's own capacity too
  // A client attaching with the daemon's numbers refuses the scribbled header.
  EXPECT_FALSE(attach_segment(memory_.get(), bytes_, capacity, 256));
  view_.header->capacity = capacity;
  EXPECT_TRUE(attach_segment(memory_.get(), bytes_, capacity, 256));
  EXPECT_FALSE(attach_segment(memory_.get(), bytes_, capacity + 1, 256));  // bigger than the map
}

TEST_F(SegmentTest, MultiObjectWaitsWorkWithoutFutexWaitv) {
  futex::force_fallback(true);
  slot& a = make(1, object_type::auto_event);
  slot& b = make(2, object_type::auto_event);
  const wait_target both[] = {{&a, object_type::auto_event, 1}, {&b, object_type::auto_event, 1}};
  std::thread signaller([&] {
    std::this_thread::sleep_for(50ms);
    (void)signal_event(b);
  });
  const auto start = std::chrono::steady_clock::now();
  auto r = wait(view_, both, false, 10s, 0ns);
  const auto took = std::chrono::steady_clock::now() - start;
  signaller.join();
  // And a timed-out one sleeps rather than spins: its CPU time stays small.
  timespec cpu0{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu0);
  auto none = wait(view_, both, false, 200ms, 0ns);
  timespec cpu1{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu1);
  futex::force_fallback(false);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::signalled);
  EXPECT_EQ(r->index, 1u);
  EXPECT_LT(took, 1s);
  ASSERT_TRUE(none);
  EXPECT_EQ(none->status, wait_status::timed_out);
  const double cpu_ms = (cpu1.tv_sec - cpu0.tv_sec) * 1e3 + (cpu1.tv_nsec - cpu0.tv_nsec) / 1e6;
  EXPECT_LT(cpu_ms, 100.0);
}

// The waits learn through the core's policy: a spin that ends asleep halves the
// waiting thread's budget, one that is answered while spinning doubles it.
TEST_F(SegmentTest, WaitsTeachTheThreadsSpinBudget) {
  slot& e = make(1, object_type::auto_event);
  std::thread waiter([&] {
    wait_policy& policy = wait_policy::this_thread();
    auto r = wait_one(e, object_type::auto_event, 0ns);  // no wait: nothing learnt
    EXPECT_EQ(policy.budget(), -1ns);
    const wait_target t{&e, object_type::auto_event, 1};
    r = wait(view_, std::span(&t, 1), false, 100ms, 2ms);  // spins 2 ms, then sleeps
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, wait_status::timed_out);
    EXPECT_EQ(policy.budget(), 1ms);
    (void)signal_event(e);
    // Signalled before the wait: taken at the first look, no spin, nothing learnt.
    r = wait(view_, std::span(&t, 1), false, 100ms, 2ms);
    ASSERT_TRUE(r);
    EXPECT_EQ(policy.budget(), 1ms);
  });
  waiter.join();
}

}  // namespace
}  // namespace uipc::handles::detail
