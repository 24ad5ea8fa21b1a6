// A mutex whose owning thread exits while its process lives on: abandoned to the
// next owner (in this process or another), its sleeping waiter woken, recursion
// and releases respected, and no access to a mapping the client already gave up.
// Also the waiters' backstop for a thread that vanished without its destructors.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <future>
#include <optional>
#include <thread>

#include "handles_support.hpp"
#include "owned_mutexes.hpp"
#include "segment.hpp"

namespace uipc::handles {
namespace {

using namespace std::chrono_literals;
using test::child_process;
using test::in_process_daemon;
using test::peer_args;
using test::private_location;

// Runs `f` on a thread of its own and returns once that thread has ended
// (thread_local destructors included).
template <class F>
void on_thread_that_exits(F f) {
  std::thread t(std::move(f));
  t.join();
}

// A waiter's result, with a bound on how long the test waits for it.
std::optional<result<wait_status>> result_within(std::future<result<wait_status>>& f,
                                                 std::chrono::seconds bound) {
  if (f.wait_for(bound) != std::future_status::ready) return std::nullopt;
  return f.get();
}

class ThreadExitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Sleeps that never end on their own, so the waiters' own look at a vanished
    // owner (after a slice) cannot stand in for the exiting thread's abandonment.
    detail::set_sleep_slice(1h);
    daemon_.emplace(loc_.where, 8, 4096);
    ASSERT_TRUE(static_cast<bool>(*daemon_));
    auto c = client::connect(loc_.options());
    ASSERT_TRUE(c) << c.error().message();
    client_.emplace(std::move(*c));
    pins_before_ = detail::pinned_segments();
    auto m = client_->create_mutex(false, "m");
    ASSERT_TRUE(m);
    mutex_.emplace(std::move(*m));
  }
  void TearDown() override {
    detail::set_sleep_slice(1s);
    mutex_.reset();
    client_.reset();
    const auto until = std::chrono::steady_clock::now() + 5s;
    while ((*daemon_)->stats().clients != 0 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(1ms);
    const auto s = (*daemon_)->stats();
    EXPECT_EQ(s.clients, 0u);
    EXPECT_EQ(s.handles_in_use, 0u);
    daemon_->shutdown();
    // Only helper threads took mutexes, and all have ended: none left a pin.
    EXPECT_EQ(detail::pinned_segments(), pins_before_);
  }

  mutex& m() { return *mutex_; }

  // "m" opened through another client of the daemon: a mapping of its own.
  void open_through_another_client(std::optional<client>& c, std::optional<mutex>& opened) {
    auto connected = client::connect(loc_.options());
    ASSERT_TRUE(connected);
    c.emplace(std::move(*connected));
    auto m = c->open_mutex("m");
    ASSERT_TRUE(m);
    opened.emplace(std::move(*m));
  }

  // The status the next owner (a thread of its own, which releases) gets.
  wait_status next_owner_status() {
    wait_status status = wait_status::timed_out;
    on_thread_that_exits([&] {
      auto r = m().wait(20s);
      ASSERT_TRUE(r);
      status = *r;
      EXPECT_FALSE(m().release());
    });
    return status;
  }

  private_location loc_;
  std::optional<in_process_daemon> daemon_;
  std::optional<client> client_;
  std::optional<mutex> mutex_;
  std::size_t pins_before_ = 0;
};

TEST_F(ThreadExitTest, MutexOfAThreadThatExitsHoldingItIsAbandonedToTheNextOwner) {
  on_thread_that_exits([&] { EXPECT_EQ(*m().wait(1s), wait_status::signalled); });
  EXPECT_EQ(next_owner_status(), wait_status::abandoned);
  // Told once: the owner after that gets it as usual.
  EXPECT_EQ(next_owner_status(), wait_status::signalled);
}

TEST_F(ThreadExitTest, MutexCreatedOwnedByAThreadThatExitsIsAbandoned) {
  std::optional<mutex> owned;
  on_thread_that_exits([&] {
    auto made = client_->create_mutex(true, "born-owned");
    ASSERT_TRUE(made);
    owned.emplace(std::move(*made));
  });
  ASSERT_TRUE(owned);
  wait_status status = wait_status::timed_out;
  on_thread_that_exits([&] {
    auto r = owned->wait(20s);
    ASSERT_TRUE(r);
    status = *r;
    EXPECT_FALSE(owned->release());
  });
  EXPECT_EQ(status, wait_status::abandoned);
  owned.reset();
}

TEST_F(ThreadExitTest, RecursiveOwnershipIsAbandonedWholeAtThreadExit) {
  on_thread_that_exits([&] {
    for (int i = 0; i < 3; ++i) EXPECT_EQ(*m().wait(1s), wait_status::signalled);
    EXPECT_FALSE(m().release());  // still owned twice
  });
  EXPECT_EQ(next_owner_status(), wait_status::abandoned);  // releases once: free again
  EXPECT_EQ(next_owner_status(), wait_status::signalled);
}

TEST_F(ThreadExitTest, ThreadThatReleasedBeforeExitingLeavesTheMutexFree) {
  on_thread_that_exits([&] {
    EXPECT_EQ(*m().wait(1s), wait_status::signalled);
    EXPECT_EQ(*m().wait(1s), wait_status::signalled);
    EXPECT_FALSE(m().release());
    EXPECT_FALSE(m().release());
  });
  EXPECT_EQ(next_owner_status(), wait_status::signalled);
}

TEST_F(ThreadExitTest, FormerOwnersExitLeavesTheCurrentOwnerAlone) {
  std::promise<void> released;
  std::promise<void> exit_now;
  std::thread former([&] {
    EXPECT_EQ(*m().wait(1s), wait_status::signalled);
    EXPECT_FALSE(m().release());
    released.set_value();
    exit_now.get_future().wait();
  });
  released.get_future().wait();
  std::promise<void> taken;
  std::promise<void> former_gone;
  std::thread current([&] {
    EXPECT_EQ(*m().wait(1s), wait_status::signalled);
    taken.set_value();
    former_gone.get_future().wait();
    EXPECT_FALSE(m().release());  // still ours: not abandoned under us
  });
  taken.get_future().wait();
  exit_now.set_value();
  former.join();
  former_gone.set_value();
  current.join();
  EXPECT_EQ(next_owner_status(), wait_status::signalled);
}

TEST_F(ThreadExitTest, OwnershipTakenByWaitAllIsAbandonedToo) {
  auto e = client_->create_event(event_reset::manual, true);
  ASSERT_TRUE(e);
  on_thread_that_exits([&] {
    auto r = client_->wait_all({&*e, &m()}, 1s);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, wait_status::signalled);
  });
  EXPECT_EQ(next_owner_status(), wait_status::abandoned);
}

TEST_F(ThreadExitTest, WaiterAsleepOnTheMutexIsWokenByTheOwnersExit) {
  // Only the exiting owner's wake can end the wait before the test gives up on it.
  std::promise<void> owned;
  std::promise<void> exit_now;
  std::thread owner([&] {
    EXPECT_EQ(*m().wait(1s), wait_status::signalled);
    owned.set_value();
    exit_now.get_future().wait();
  });
  owned.get_future().wait();
  std::packaged_task<result<wait_status>()> wait_task([&] {
    auto r = m().wait(60s);
    if (r && *r != wait_status::timed_out) {
      EXPECT_FALSE(m().release());
    }
    return r;
  });
  auto got = wait_task.get_future();
  std::thread waiter(std::move(wait_task));
  std::this_thread::sleep_for(50ms);  // asleep on the futex by now (or not yet: either way)
  exit_now.set_value();
  owner.join();
  const auto r = result_within(got, 20s);
  waiter.join();
  ASSERT_TRUE(r) << "the waiter was not woken";
  ASSERT_TRUE(*r);
  EXPECT_EQ(**r, wait_status::abandoned);
}

TEST_F(ThreadExitTest, ClientGoneBeforeTheOwnerThreadExitsStillAbandonsIt) {
  // The owner thread took the mutex through a second client, which is closed
  // (its mapping unmapped) before the thread ends: the abandonment goes through
  // the thread's own pin of the segment.
  std::optional<client> second;
  std::optional<mutex> through_second;
  ASSERT_NO_FATAL_FAILURE(open_through_another_client(second, through_second));
  std::promise<void> owned;
  std::promise<void> exit_now;
  std::thread owner([&] {
    EXPECT_EQ(*through_second->wait(1s), wait_status::signalled);
    owned.set_value();
    exit_now.get_future().wait();
  });
  owned.get_future().wait();
  through_second.reset();
  second.reset();  // the client and its mapping go
  exit_now.set_value();
  owner.join();
  EXPECT_EQ(next_owner_status(), wait_status::abandoned);
}

TEST_F(ThreadExitTest, AnotherSegmentMappedWhereTheOwnersWasDoesNotConfuseItsRecord) {
  // The owner takes "m" through a second client, whose mapping then goes; a
  // client of another daemon maps its segment (same size: most often at the
  // same address), and the owner takes and releases a mutex there, in the
  // same slot: the release must forget that mutex only, never the old one
  // (records name a mutex by its segment's epoch and index, not by where a
  // mapping shows it).
  std::optional<client> second;
  std::optional<mutex> through_second;
  ASSERT_NO_FATAL_FAILURE(open_through_another_client(second, through_second));
  const std::byte* first_mapping = second->scratch_area().data();
  std::promise<void> owned;
  std::promise<void> other_ready;
  std::optional<mutex> other_mutex;
  std::thread owner([&] {
    EXPECT_EQ(*through_second->wait(1s), wait_status::signalled);
    owned.set_value();
    other_ready.get_future().wait();
    EXPECT_EQ(*other_mutex->wait(1s), wait_status::signalled);
    EXPECT_FALSE(other_mutex->release());
  });  // exits owning "m" alone
  owned.get_future().wait();
  // The other daemon maps its segment first, so that the client's mapping is
  // the one to land where the second client's was.
  private_location other_loc;
  in_process_daemon other_daemon(other_loc.where, 8, 4096);
  ASSERT_TRUE(static_cast<bool>(other_daemon));
  through_second.reset();
  second.reset();  // its mapping goes
  auto other = client::connect(other_loc.options());
  ASSERT_TRUE(other);
  auto made = other->create_mutex(false, "m");
  ASSERT_TRUE(made);
  EXPECT_EQ(made->handle().index, m().handle().index);
  other_mutex.emplace(std::move(*made));
  if (other->scratch_area().data() != first_mapping)
    std::fprintf(stderr, "note: the other segment was mapped elsewhere this time\n");
  other_ready.set_value();
  owner.join();
  EXPECT_EQ(next_owner_status(), wait_status::abandoned);
  other_mutex.reset();
  other = make_error_code(errc::daemon_lost);
}

// A thread that uses the segments of two daemons, one after the other: a
// client and a mutex of each.
class TwoDaemonsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(static_cast<bool>(daemon_));
    ASSERT_TRUE(static_cast<bool>(next_daemon_));
    connect_with_mutex(loc_, c_, m_);
    connect_with_mutex(next_loc_, next_, next_m_);
  }

  static void connect_with_mutex(const private_location& loc, std::optional<client>& c,
                                 std::optional<mutex>& m) {
    auto connected = client::connect(loc.options());
    ASSERT_TRUE(connected);
    c.emplace(std::move(*connected));
    auto created = c->create_mutex();
    ASSERT_TRUE(created);
    m.emplace(std::move(*created));
  }

  // The first daemon's client goes (the process's last session there), then
  // the daemon stops.
  void stop_first() {
    m_.reset();
    c_.reset();
    const auto until = std::chrono::steady_clock::now() + 5s;
    while ((*daemon_).stats().clients != 0 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(1ms);
    daemon_.shutdown();
  }

  private_location loc_;
  private_location next_loc_;
  const std::size_t pins_before_ = detail::pinned_segments();
  in_process_daemon daemon_{loc_.where, 8, 4096};
  in_process_daemon next_daemon_{next_loc_.where, 8, 4096};
  std::optional<client> c_;
  std::optional<mutex> m_;
  std::optional<client> next_;
  std::optional<mutex> next_m_;
};

TEST_F(TwoDaemonsTest, ALiveThreadLetsGoOfAStoppedSegmentWhereItLostAMutex) {
  // The thread owns a mutex it never releases: its process's last session
  // ends (the daemon abandons the mutex) and the daemon stops. The thread lives
  // on and uses another daemon's segment: its record forgets the lost mutex
  // and lets go of the stopped segment's pin instead of keeping it till exit.
  std::promise<void> owned;
  std::promise<void> go_on;
  std::promise<std::size_t> pins_then;
  std::promise<void> exit_now;
  std::thread owner([&] {
    EXPECT_EQ(*m_->wait(1s), wait_status::signalled);
    owned.set_value();
    go_on.get_future().wait();
    EXPECT_EQ(*next_m_->wait(1s), wait_status::signalled);
    EXPECT_FALSE(next_m_->release());
    pins_then.set_value(detail::pinned_segments());
    exit_now.get_future().wait();
  });
  owned.get_future().wait();
  stop_first();  // the daemon abandons the mutex, then stops
  go_on.set_value();
  // The new segment's pin only (it holds nothing there now, but it is the
  // segment it just used).
  EXPECT_EQ(pins_then.get_future().get(), pins_before_ + 1);
  exit_now.set_value();
  owner.join();
  EXPECT_EQ(detail::pinned_segments(), pins_before_);
}

TEST_F(TwoDaemonsTest, ALiveThreadLetsGoOfAStoppedSegmentItReleasedEverythingIn) {
  // The thread used a mutex of one daemon, then keeps using one of another;
  // the first daemon stops. Its segment's pin goes at the thread's next
  // release, not at its exit, even though that release finds its mutex in
  // the fast path.
  std::promise<std::size_t> pins_both;
  std::promise<void> stopped;
  std::promise<std::size_t> pins_after;
  std::promise<void> exit_now;
  std::thread user([&] {
    EXPECT_EQ(*m_->wait(1s), wait_status::signalled);
    EXPECT_FALSE(m_->release());
    EXPECT_EQ(*next_m_->wait(1s), wait_status::signalled);
    EXPECT_FALSE(next_m_->release());
    pins_both.set_value(detail::pinned_segments());
    stopped.get_future().wait();
    EXPECT_EQ(*next_m_->wait(1s), wait_status::signalled);
    EXPECT_FALSE(next_m_->release());
    pins_after.set_value(detail::pinned_segments());
    exit_now.get_future().wait();
  });
  EXPECT_EQ(pins_both.get_future().get(), pins_before_ + 2);
  stop_first();
  stopped.set_value();
  EXPECT_EQ(pins_after.get_future().get(), pins_before_ + 1);
  exit_now.set_value();
  user.join();
  EXPECT_EQ(detail::pinned_segments(), pins_before_);
}

TEST(ThreadExitAfterDaemonTest, OwnerThreadExitingAfterItsClientAndDaemonTouchesNothingUnmapped) {
  private_location loc;
  const auto pins_before = detail::pinned_segments();
  in_process_daemon daemon(loc.where, 8, 4096);
  ASSERT_TRUE(static_cast<bool>(daemon));
  std::optional<client> c;
  {
    auto connected = client::connect(loc.options());
    ASSERT_TRUE(connected);
    c.emplace(std::move(*connected));
  }
  std::optional<mutex> m;
  {
    auto created = c->create_mutex();
    ASSERT_TRUE(created);
    m.emplace(std::move(*created));
  }
  std::promise<void> owned;
  std::promise<void> exit_now;
  std::thread owner([&] {
    EXPECT_EQ(*m->wait(1s), wait_status::signalled);
    owned.set_value();
    exit_now.get_future().wait();
  });
  owned.get_future().wait();
  daemon.shutdown();  // the daemon unmaps the segment
  m.reset();
  c.reset();  // and so does the client
  exit_now.set_value();
  owner.join();  // abandons in a segment only its pin still maps, then drops the pin
  EXPECT_EQ(detail::pinned_segments(), pins_before);
  EXPECT_TRUE(loc.wait_until_clean());
}

TEST(ThreadExitProcessTest, AnotherProcessGetsTheMutexAsAbandoned) {
  private_location loc;
  {
    child_process owner(peer_args(loc, {"thread-own-mutex", "m"}));
    ASSERT_TRUE(owner.read_line());  // "daemon <pid>"
    ASSERT_EQ(owner.read_line(), "thread-exited");
    // Shorter than a sleep slice, so the waiter's own look at a vanished owner
    // never comes into it: the exiting thread abandoned the mutex.
    child_process next(peer_args(loc, {"wait-mutex", "m", "500"}));
    EXPECT_EQ(next.wait_exit(), 1);  // abandoned, while its owner's process lives on
    owner.close_stdin();
    EXPECT_EQ(owner.wait_exit(), 0);
  }
  EXPECT_TRUE(loc.wait_until_clean());
}

// ---- segment level: the backstop and the wake ----------------------------------------

class ThreadExitSegmentTest : public ::testing::Test {
 protected:
  static constexpr std::uint32_t capacity = 2;
  void SetUp() override {
    bytes_ = detail::segment_bytes(capacity, 64);
    // Shared, as the daemon's memfd is: a thread's record pins it (mremap).
    memory_ = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(memory_, MAP_FAILED);
    // An epoch of its own: pins are found by epoch.
    static std::atomic<std::uint64_t> epoch{0x7e57'0000'0000'0000ULL};
    view_ = detail::format_segment(memory_, bytes_, capacity, 64, ++epoch);
    pins_before_ = detail::pinned_segments();
    view_.header->daemon_pid.store(::getpid());
    detail::publish_state(view_, detail::daemon_state::running);
    detail::object_init init;
    init.type = object_type::mutex;
    detail::publish_slot(view_, 1, 1, init);
  }
  void TearDown() override {
    detail::set_sleep_slice(1s);
    ::munmap(memory_, bytes_);
  }

  detail::slot& mutex_slot() { return view_.at(1); }
  result<wait_result> take(std::chrono::nanoseconds timeout) {
    const detail::wait_target t{&mutex_slot(), object_type::mutex, 1};
    return detail::wait(view_, std::span(&t, 1), false, timeout, 0ns);
  }

  std::size_t bytes_ = 0;
  std::size_t pins_before_ = 0;
  void* memory_ = nullptr;
  detail::segment_view view_;
};

TEST_F(ThreadExitSegmentTest, ExitingOwnerAbandonsAndBumpsTheFutexWord) {
  // A sleeper registered as wait() registers before it sleeps: the word it
  // sleeps on must move (with nobody registered, nothing needs waking).
  mutex_slot().waiters.fetch_add(1);
  const auto seq_before = mutex_slot().seq.load();
  on_thread_that_exits([&] {
    auto r = take(0ns);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, wait_status::signalled);
    EXPECT_EQ(detail::pinned_segments(), pins_before_ + 1);
  });
  EXPECT_EQ(detail::slot_value(mutex_slot()), 0u);
  EXPECT_EQ(mutex_slot().abandoned.load(), 1u);
  EXPECT_EQ(mutex_slot().recursion.load(), 0u);
  EXPECT_NE(mutex_slot().seq.load(), seq_before);  // sleepers are woken
  mutex_slot().waiters.fetch_sub(1);
  EXPECT_EQ(detail::pinned_segments(), pins_before_);
}

TEST_F(ThreadExitSegmentTest, ExitingOwnerWakesASleepingWaiterAtOnce) {
  // A real sleeper this time: a lost wake would leave it asleep for its whole
  // slice (30 s here), past the deadline below.
  detail::set_sleep_slice(30s);
  std::promise<void> owned;
  std::promise<void> exit_now;
  std::thread owner([&] {
    auto r = take(0ns);
    EXPECT_TRUE(r && r->status == wait_status::signalled);
    owned.set_value();
    exit_now.get_future().wait();
  });  // ends owning it: its record abandons it
  owned.get_future().wait();
  std::optional<result<wait_result>> got;
  std::thread waiter([&] {
    got = take(20s);
    if (got && *got) {
      EXPECT_FALSE(detail::release_mutex(mutex_slot()));
    }
  });
  // Asleep: registered on the word (no spin: take() waits with a zero budget).
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (mutex_slot().waiters.load() == 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  ASSERT_EQ(mutex_slot().waiters.load(), 1u);
  const auto start = std::chrono::steady_clock::now();
  exit_now.set_value();
  owner.join();
  waiter.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "woken, not timed out of its slice";
  ASSERT_TRUE(got && *got);
  EXPECT_EQ((*got)->status, wait_status::abandoned);
}

TEST_F(ThreadExitSegmentTest, MutexOfAThreadThatVanishedIsAbandonedToASleepingWaiter) {
  // The owner ended without a word (as a thread killed by a raw SYS_exit would):
  // its tid is in the word, its record never saw the mutex.
  std::uint32_t gone_tid = 0;
  on_thread_that_exits([&] { gone_tid = static_cast<std::uint32_t>(::gettid()); });
  mutex_slot().owner_pid.store(::getpid());
  mutex_slot().recursion.store(1);
  mutex_slot().state.store(gone_tid);
  detail::set_sleep_slice(10ms);
  std::optional<result<wait_result>> got;
  on_thread_that_exits([&] {
    got = take(20s);
    if (*got) {
      EXPECT_FALSE(detail::release_mutex(mutex_slot()));
    }
  });
  ASSERT_TRUE(got && *got);
  EXPECT_EQ((*got)->status, wait_status::abandoned);
}

TEST_F(ThreadExitSegmentTest, MutexOfALiveThreadIsNotTakenFromIt) {
  std::promise<std::uint32_t> tid;
  std::promise<void> exit_now;
  std::thread owner([&] {
    auto r = take(0ns);
    tid.set_value(r && r->status == wait_status::signalled ? detail::self().tid : 0);
    exit_now.get_future().wait();
    EXPECT_FALSE(detail::release_mutex(mutex_slot()));
  });
  EXPECT_NE(tid.get_future().get(), 0u);
  detail::set_sleep_slice(10ms);  // several looks at the owner while we wait
  std::optional<result<wait_result>> got;
  on_thread_that_exits([&] { got = take(300ms); });
  exit_now.set_value();
  owner.join();
  ASSERT_TRUE(got && *got);
  EXPECT_EQ((*got)->status, wait_status::timed_out);
  EXPECT_EQ(mutex_slot().abandoned.load(), 0u);  // released, never abandoned
}

}  // namespace
}  // namespace uipc::handles
