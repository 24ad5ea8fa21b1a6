// The segment's repairs, driven directly (src/segment.hpp): a process that died
// at any instruction of an update — holding a slot's transaction lock, owning
// a mutex, halfway through taking one — leaves nothing blocked or inconsistent.
#include "segment.hpp"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <thread>

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
    auto attached = attach_segment(memory_.get(), bytes_);
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
    return view_.at(index);
  }

  result<wait_result> wait_one(slot& s, object_type type, std::chrono::nanoseconds timeout) {
    const wait_target t{&s, type, 1};
    return wait(view_, std::span(&t, 1), false, timeout, 0ns);
  }

  struct free_deleter {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::size_t bytes_ = 0;
  std::unique_ptr<std::byte, free_deleter> memory_;
  segment_view view_;
};

TEST_F(SegmentTest, ForeignLayoutIsRefused) {
  view_.header->slot_size = 7;
  EXPECT_FALSE(attach_segment(memory_.get(), bytes_));
  EXPECT_FALSE(attach_segment(memory_.get(), 16));
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
  EXPECT_EQ(repair_dead_process(view_, pid), 0u);
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
  EXPECT_EQ(repair_dead_process(view_, pid), 1u);
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
  EXPECT_EQ(repair_dead_process(view_, pid), 0u);
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
  repair_dead_process(view_, pid);
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
  view_.header->daemon_pid.store(dead_pid());  // killed without a word
  const auto start = std::chrono::steady_clock::now();
  auto r = wait_one(e, object_type::manual_event, 30s);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  EXPECT_EQ(r.error(), make_error_code(errc::daemon_lost));
  EXPECT_FALSE(view_.running());
}

}  // namespace
}  // namespace uipc::handles::detail
