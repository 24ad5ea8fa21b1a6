// Waits on the event loop: client::async_wait, async_wait_any and async_wait_all
// against a uipc-handled started by the client, completed on an io_context run
// by the test thread, which must never block.
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <array>
#include <atomic>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/use_future.hpp>
#include <filesystem>
#include <functional>
#include <future>
#include <optional>
#include <thread>
#include <vector>

#include "handles_support.hpp"
#include "segment.hpp"

namespace uipc::handles {
namespace {

using namespace std::chrono_literals;
using test::child_process;
using test::peer_args;
using test::private_location;
using steady = std::chrono::steady_clock;
namespace asio = boost::asio;

std::size_t thread_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

/// Whether the process's threads drop to `n` within a few seconds (a joined
/// thread may still be listed for a moment).
bool threads_drop_to(std::size_t n) {
  const auto until = steady::now() + 10s;
  while (thread_count() > n) {
    if (steady::now() > until) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

/// What one async wait completed with, and how often.
template <class T>
struct outcome {
  int calls = 0;
  error_code ec;
  T value{};
  steady::time_point at{};
  /// Runs on `io`'s thread (a plain callback would run on the client's waiter thread).
  auto handler(asio::io_context& io) {
    return asio::bind_executor(io, [this](error_code e, T v) {
      ++calls;
      ec = e;
      value = v;
      at = steady::now();
    });
  }
};

class AsyncWaitTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = client::connect(loc.options());
    ASSERT_TRUE(c) << c.error().message();
    client_.emplace(std::move(*c));
  }
  void TearDown() override {
    client_.reset();
    io.restart();
    io.run_for(100ms);  // whatever the client's end completed
    EXPECT_TRUE(loc.wait_until_clean()) << "a daemon, socket or segment was left";
  }

  client& c() { return *client_; }

  /// Runs the loop (on this thread) until `done` or the deadline; true if done.
  bool run_until(const std::function<bool()>& done, std::chrono::milliseconds deadline = 10s) {
    const auto until = steady::now() + deadline;
    while (!done()) {
      if (steady::now() > until) return false;
      io.restart();
      io.run_for(5ms);
    }
    return true;
  }

  /// The client still completes a wait on `e` (not signalled now) on the loop.
  void expect_serves_on(const event& e) {
    outcome<wait_status> got;
    c().async_wait(e, 10s, got.handler(io));
    ASSERT_FALSE(e.signal());
    ASSERT_TRUE(run_until([&] { return got.calls > 0; }));
    EXPECT_EQ(got.value, wait_status::signalled);
  }

  /// The semaphore's count as the daemon's list shows it.
  std::uint32_t value_of(const object& o) {
    auto all = c().list();
    for (const auto& e : *all)
      if (e.handle == o.handle()) return e.value;
    ADD_FAILURE() << "not listed";
    return 0;
  }

  private_location loc;
  asio::io_context io;
  std::optional<client> client_;
};

TEST_F(AsyncWaitTest, EventSignalledByAnotherThreadCompletesWhileTheLoopKeepsRunning) {
  auto e = c().create_event(event_reset::automatic);
  ASSERT_TRUE(e);
  outcome<wait_status> got;
  c().async_wait(*e, infinite, got.handler(io));
  // A timer on the same loop keeps firing while the wait pends: the loop's
  // thread (this one) is never blocked by it.
  int ticks = 0;
  bool ticking = true;
  bool last_tick_seen = false;
  asio::steady_timer timer(io);
  std::function<void()> tick = [&] {
    timer.expires_after(1ms);
    timer.async_wait([&](error_code ec) {
      // A tick already due when the timer is cancelled still comes, without an error.
      if (ec || !ticking) {
        last_tick_seen = true;
        return;
      }
      ++ticks;
      tick();
    });
  };
  tick();
  steady::time_point signalled_at;
  std::thread signaller([&] {
    std::this_thread::sleep_for(150ms);
    signalled_at = steady::now();
    ASSERT_FALSE(e->signal());
  });
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }));
  signaller.join();
  ticking = false;
  timer.cancel();
  ASSERT_TRUE(run_until([&] { return last_tick_seen; }));  // nothing of this test left queued
  EXPECT_GE(ticks, 20);
  EXPECT_EQ(got.calls, 1);
  EXPECT_FALSE(got.ec);
  EXPECT_EQ(got.value, wait_status::signalled);
  // Woken by the signal itself, not found by a later look (the thread counts
  // as a sleeper, so the signal's wake reaches it).
  EXPECT_LT(got.at - signalled_at, 500ms);
  EXPECT_EQ(*e->wait(0ns), wait_status::timed_out);  // the async wait took it
}

// Any client may write a slot's sleeper count: one that zeroes it makes a
// signal skip the bump that wakes sleepers. A pending async wait is tried
// again at the waiter thread's next look all the same, as a synchronous
// sleeper is after its slice.
TEST_F(AsyncWaitTest, ASignalWhoseWakeAClientSuppressedStillCompletesTheWait) {
  auto e = c().create_event(event_reset::manual);
  ASSERT_TRUE(e);
  outcome<wait_status> got;
  c().async_wait(*e, infinite, got.handler(io));
  io.restart();
  io.run_for(50ms);  // armed: the thread sleeps on the slot's word
  ASSERT_EQ(got.calls, 0);
  // The slot, found from the scratch area that follows the table (capacity 1024).
  auto* table_end = reinterpret_cast<detail::slot*>(c().scratch_area().data());
  detail::slot& s = *(table_end - (client_options{}.daemon_capacity - e->handle().index));
  ASSERT_GT(s.waiters.load(), 0u) << "not the slot of the event";
  s.waiters.store(0);  // what a hostile client writes
  ASSERT_FALSE(e->signal());
  const auto signalled_at = steady::now();
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }, 5s)) << "the wait never completed";
  EXPECT_EQ(got.value, wait_status::signalled);
  EXPECT_LT(got.at - signalled_at, 3s);
}

// A mutex whose owning thread is gone without abandoning it (here: the
// slot's words written so, as a client may) completes a pending async wait
// abandoned at the waiter thread's next look.
TEST_F(AsyncWaitTest, AMutexOfAVanishedThreadCompletesAPendingWaitAbandoned) {
  auto m = c().create_mutex(false);
  ASSERT_TRUE(m);
  std::uint32_t gone_tid = 0;
  std::thread([&] { gone_tid = static_cast<std::uint32_t>(::gettid()); }).join();
  auto* table_end = reinterpret_cast<detail::slot*>(c().scratch_area().data());
  detail::slot& s = *(table_end - (client_options{}.daemon_capacity - m->handle().index));
  s.owner_pid.store(::getpid());
  s.recursion.store(1);
  s.state.store(gone_tid);  // owned by a thread that is gone
  outcome<wait_status> got;
  c().async_wait(*m, infinite, got.handler(io));
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }, 5s)) << "the wait never completed";
  EXPECT_EQ(got.value, wait_status::abandoned);
  EXPECT_FALSE(m->release());  // the loop thread owns it now
}

TEST_F(AsyncWaitTest, EventSignalledByAnotherProcessCompletesTheWait) {
  auto e = c().create_event(event_reset::automatic, false, "ev");
  ASSERT_TRUE(e);
  outcome<wait_status> got;
  c().async_wait(*e, 20s, got.handler(io));
  child_process peer(peer_args(loc, {"signal-event", "ev", "100"}));
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }));
  EXPECT_FALSE(got.ec);
  EXPECT_EQ(got.value, wait_status::signalled);
  EXPECT_EQ(peer.wait_exit(), 0);
  EXPECT_EQ(*e->wait(0ns), wait_status::timed_out);
}

TEST_F(AsyncWaitTest, WaitAnyReportsThePositionOfTheSignalledObjectAndTakesOnlyIt) {
  auto a = c().create_event(event_reset::automatic);
  auto b = c().create_semaphore(0, 4);
  auto d = c().create_event(event_reset::automatic);
  ASSERT_TRUE(a && b && d);
  const std::array<const object*, 3> set{&*a, &*b, &*d};
  outcome<wait_result> got;
  c().async_wait_any(set, 10s, got.handler(io));
  EXPECT_FALSE(run_until([&] { return got.calls > 0; }, 50ms));
  ASSERT_FALSE(d->signal());
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }));
  EXPECT_FALSE(got.ec);
  EXPECT_EQ(got.value.status, wait_status::signalled);
  EXPECT_EQ(got.value.index, 2u);
  EXPECT_EQ(*d->wait(0ns), wait_status::timed_out);
}

TEST_F(AsyncWaitTest, WaitAllTakesNothingUntilEveryObjectIsSignalled) {
  auto s = c().create_semaphore(0, 4);
  auto e = c().create_event(event_reset::automatic);
  ASSERT_TRUE(s && e);
  const std::array<const object*, 2> set{&*s, &*e};
  outcome<wait_result> got;
  c().async_wait_all(set, 10s, got.handler(io));
  ASSERT_TRUE(s->release(1));
  EXPECT_FALSE(run_until([&] { return got.calls > 0; }, 100ms));
  EXPECT_EQ(value_of(*s), 1u);  // woken by the release, took nothing
  ASSERT_FALSE(e->signal());
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }));
  EXPECT_FALSE(got.ec);
  EXPECT_EQ(got.value.status, wait_status::signalled);
  EXPECT_EQ(value_of(*s), 0u);
  EXPECT_EQ(*e->wait(0ns), wait_status::timed_out);
}

TEST_F(AsyncWaitTest, MutexOfAKilledOwnerCompletesAbandonedOwnedByTheLoopThread) {
  child_process owner(peer_args(loc, {"own-mutex", "m"}));
  ASSERT_TRUE(owner.read_line());  // "daemon <pid>"
  ASSERT_EQ(owner.read_line(), "owned");
  auto m = c().open_mutex("m");
  ASSERT_TRUE(m);
  int calls = 0;
  error_code ec;
  wait_status status{};
  error_code released = make_error_code(errc::not_owner);
  c().async_wait(*m, 20s, asio::bind_executor(io, [&](error_code e, wait_status st) {
    ++calls;
    ec = e;
    status = st;
    if (!e) released = m->release();  // the thread running the handler owns it
  }));
  EXPECT_FALSE(run_until([&] { return calls > 0; }, 50ms));
  owner.kill(SIGKILL);
  ASSERT_TRUE(run_until([&] { return calls > 0; }));
  EXPECT_FALSE(ec);
  EXPECT_EQ(status, wait_status::abandoned);
  EXPECT_FALSE(released);
  EXPECT_EQ(value_of(*m), 0u);
}

TEST_F(AsyncWaitTest, TimeoutCompletesTimedOutAndTakesNothing) {
  auto e = c().create_event(event_reset::automatic);
  ASSERT_TRUE(e);
  outcome<wait_status> got;
  const auto start = steady::now();
  c().async_wait(*e, 60ms, got.handler(io));
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }));
  EXPECT_FALSE(got.ec);
  EXPECT_EQ(got.value, wait_status::timed_out);
  EXPECT_GE(got.at - start, 60ms);
  EXPECT_LT(got.at - start, 2s);
  ASSERT_FALSE(e->signal());
  EXPECT_EQ(*e->wait(0ns), wait_status::signalled);  // nothing took the later signal
}

TEST_F(AsyncWaitTest, CancellationCompletesAbortedAndTakesNothing) {
  auto s = c().create_semaphore(0, 4);
  ASSERT_TRUE(s);
  asio::cancellation_signal cancel;
  outcome<wait_status> got;
  c().async_wait(*s, infinite, asio::bind_cancellation_slot(cancel.slot(), got.handler(io)));
  EXPECT_FALSE(run_until([&] { return got.calls > 0; }, 30ms));
  cancel.emit(asio::cancellation_type::terminal);
  ASSERT_TRUE(s->release(1));  // after the cancel: must stay for others
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }));
  EXPECT_EQ(got.calls, 1);
  EXPECT_EQ(got.ec, asio::error::operation_aborted);
  EXPECT_EQ(value_of(*s), 1u);
}

TEST_F(AsyncWaitTest, CancelledAsyncWaitDoesNotSwallowTheWakeOfASyncWaiter) {
  // The waiter thread counts as a multi-object sleeper: the wake-one of an
  // auto-reset signal then wakes every sleeper, so a synchronous waiter is not
  // left asleep when the async wait, woken instead of it, was cancelled.
  auto e = c().create_event(event_reset::automatic);
  ASSERT_TRUE(e);
  asio::cancellation_signal cancel;
  outcome<wait_status> got;
  c().async_wait(*e, infinite, asio::bind_cancellation_slot(cancel.slot(), got.handler(io)));
  std::optional<result<wait_status>> sync;
  steady::time_point sync_at;
  std::thread waiter([&] {
    sync = e->wait(10s);
    sync_at = steady::now();
  });
  std::this_thread::sleep_for(100ms);
  cancel.emit(asio::cancellation_type::terminal);
  const auto signalled_at = steady::now();
  ASSERT_FALSE(e->signal());
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }));
  waiter.join();
  ASSERT_TRUE(sync && *sync);
  EXPECT_EQ(**sync, wait_status::signalled);
  EXPECT_LT(sync_at - signalled_at, 500ms);
  EXPECT_EQ(got.ec, asio::error::operation_aborted);
}

TEST_F(AsyncWaitTest, HundredPendingWaitsAreServedByOneThread) {
  std::vector<event> events;
  for (int i = 0; i < 100; ++i) {
    auto e = c().create_event(event_reset::manual);
    ASSERT_TRUE(e);
    events.push_back(std::move(*e));
  }
  // ThreadSanitizer starts a thread of its own with the first thread created.
  std::thread([] {}).join();
  const std::size_t before = thread_count();
  std::vector<outcome<wait_status>> got(events.size());
  for (std::size_t i = 0; i < events.size(); ++i)
    c().async_wait(events[i], 20s, got[i].handler(io));
  EXPECT_LE(thread_count(), before + 1);
  for (auto& e : events) ASSERT_FALSE(e.signal());
  ASSERT_TRUE(run_until([&] {
    return std::all_of(got.begin(), got.end(), [](const auto& g) { return g.calls > 0; });
  }));
  EXPECT_LE(thread_count(), before + 1);
  for (const auto& g : got) {
    EXPECT_EQ(g.calls, 1);
    EXPECT_FALSE(g.ec);
    EXPECT_EQ(g.value, wait_status::signalled);
  }
}

TEST_F(AsyncWaitTest, MoreWatchedObjectsThanTheBoundAreRefused) {
  std::vector<event> events;
  for (std::size_t i = 0; i <= max_async_wait_objects; ++i) {
    auto e = c().create_event(event_reset::manual);
    ASSERT_TRUE(e);
    events.push_back(std::move(*e));
  }
  std::vector<outcome<wait_status>> got(events.size());
  for (std::size_t i = 0; i < events.size(); ++i)
    c().async_wait(events[i], 20s, got[i].handler(io));
  ASSERT_TRUE(run_until([&] { return got.back().calls > 0; }));
  EXPECT_EQ(got.back().ec, make_error_code(errc::invalid_argument));
  // A second wait on an object already watched costs no word.
  outcome<wait_status> again;
  c().async_wait(events.front(), 20s, again.handler(io));
  ASSERT_FALSE(events.front().signal());
  ASSERT_TRUE(run_until([&] { return again.calls > 0 && got.front().calls > 0; }));
  EXPECT_FALSE(again.ec);
  EXPECT_EQ(got.front().value, wait_status::signalled);
  client_.reset();  // the rest complete aborted, before `got` goes
  ASSERT_TRUE(run_until([&] {
    return std::all_of(got.begin(), got.end(), [](const auto& g) { return g.calls > 0; });
  }));
}

TEST_F(AsyncWaitTest, ClientDestroyedWithWaitsPendingCompletesEachOnceAborted) {
  std::vector<event> events;
  for (int i = 0; i < 5; ++i) {
    auto e = c().create_event(event_reset::manual);
    ASSERT_TRUE(e);
    events.push_back(std::move(*e));
  }
  std::vector<outcome<wait_status>> got(events.size());
  for (std::size_t i = 0; i < events.size(); ++i)
    c().async_wait(events[i], infinite, got[i].handler(io));
  EXPECT_FALSE(run_until([&] { return got[0].calls > 0; }, 30ms));
  const std::size_t with_waiter = thread_count();
  client_.reset();                                // objects outlive their client
  EXPECT_TRUE(threads_drop_to(with_waiter - 1));  // its waiter thread has ended
  ASSERT_TRUE(run_until([&] {
    return std::all_of(got.begin(), got.end(), [](const auto& g) { return g.calls > 0; });
  }));
  io.restart();
  io.run_for(50ms);
  for (const auto& g : got) {
    EXPECT_EQ(g.calls, 1);
    EXPECT_EQ(g.ec, asio::error::operation_aborted);
  }
}

TEST_F(AsyncWaitTest, ObjectClosedUnderAPendingWaitCompletesStale) {
  auto e = c().create_event(event_reset::manual);
  ASSERT_TRUE(e);
  outcome<wait_status> got;
  c().async_wait(*e, 20s, got.handler(io));
  EXPECT_FALSE(run_until([&] { return got.calls > 0; }, 30ms));
  ASSERT_FALSE(e->close());  // the last reference: the slot is retired
  ASSERT_TRUE(run_until([&] { return got.calls > 0; }));
  EXPECT_EQ(got.ec, make_error_code(errc::stale_handle));
}

TEST_F(AsyncWaitTest, DaemonKilledWhileWaitsPendCompletesThemWithDaemonLost) {
  auto e = c().create_event(event_reset::manual);
  auto s = c().create_semaphore(0, 1);
  ASSERT_TRUE(e && s);
  outcome<wait_status> one;
  outcome<wait_result> all;
  c().async_wait(*e, infinite, one.handler(io));
  const std::array<const object*, 2> set{&*e, &*s};
  c().async_wait_all(set, infinite, all.handler(io));
  EXPECT_FALSE(run_until([&] { return one.calls > 0; }, 30ms));
  ASSERT_EQ(::kill(c().daemon_pid(), SIGKILL), 0);
  ASSERT_TRUE(run_until([&] { return one.calls > 0 && all.calls > 0; }, 10s));
  EXPECT_EQ(one.ec, make_error_code(errc::daemon_lost));
  EXPECT_EQ(all.ec, make_error_code(errc::daemon_lost));
  // The kill left its socket: the next client's start reclaims it.
  client_.reset();
  auto again = client::connect(loc.options());
  ASSERT_TRUE(again) << again.error().message();
}

// A coroutine function, not a capturing lambda: its parameters live in its frame.
asio::awaitable<void> wait_any_in_coroutine(client* c, std::array<const object*, 1> set,
                                            std::optional<wait_result>* out) {
  *out = co_await c->async_wait_any(set, 10s, asio::use_awaitable);
}

TEST_F(AsyncWaitTest, UseFutureAndUseAwaitableTokensComplete) {
  auto e = c().create_event(event_reset::automatic);
  ASSERT_TRUE(e);
  // use_future: no executor of its own, completed on the client's waiter thread.
  auto f = c().async_wait(*e, 10s, asio::use_future);
  ASSERT_FALSE(e->signal());
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(f.get(), wait_status::signalled);

  std::optional<wait_result> in_coroutine;
  const std::array<const object*, 1> set{&*e};
  asio::co_spawn(io, wait_any_in_coroutine(&c(), set, &in_coroutine), asio::detached);
  EXPECT_FALSE(run_until([&] { return in_coroutine.has_value(); }, 30ms));
  ASSERT_FALSE(e->signal());
  ASSERT_TRUE(run_until([&] { return in_coroutine.has_value(); }));
  EXPECT_EQ(in_coroutine->status, wait_status::signalled);
}

TEST_F(AsyncWaitTest, AWaitPendingWhenItsContextGoesIsDroppedUnrunAndTakesNothing) {
  auto e = c().create_event(event_reset::automatic);
  ASSERT_TRUE(e);
  std::weak_ptr<int> alive;
  bool ran = false;
  {
    asio::io_context other;
    auto marker = std::make_shared<int>(1);
    alive = marker;
    c().async_wait(
        *e, infinite,
        asio::bind_executor(other, [marker, &ran](error_code, wait_status) { ran = true; }));
    other.run_for(20ms);  // armed on the waiter thread; nothing signals
    EXPECT_FALSE(ran);
  }
  EXPECT_FALSE(ran);
  EXPECT_TRUE(alive.expired()) << "the handler outlived its context";
  // The waiter thread no longer watches it: a signal now would otherwise hand it
  // to the destroyed context's executor.
  ASSERT_FALSE(e->signal());
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(*e->wait(0ns), wait_status::signalled) << "the dropped wait took the signal";
  expect_serves_on(*e);  // the client and its thread
}

TEST_F(AsyncWaitTest, WaitsHandedOverWhileTheirContextGoesAreDroppedAllTheSame) {
  // A signal makes every wait due while the context is being destroyed: the
  // waiter thread is handing them to the executor as the registry drops them.
  auto e = c().create_event(event_reset::manual);
  ASSERT_TRUE(e);
  for (int round = 0; round < 30; ++round) {
    ASSERT_FALSE(e->reset());
    std::vector<std::weak_ptr<int>> alive;
    {
      asio::io_context other;
      for (int i = 0; i < 16; ++i) {
        auto marker = std::make_shared<int>(i);
        alive.push_back(marker);
        c().async_wait(*e, infinite,
                       asio::bind_executor(other, [marker](error_code, wait_status) {}));
      }
      other.run_for(2ms);
      std::thread signaller([&] { ASSERT_FALSE(e->signal()); });
      std::this_thread::sleep_for(std::chrono::microseconds(50 * (round % 8)));
      signaller.join();
    }  // never run after the signal: every handler goes unrun
    for (const auto& a : alive) EXPECT_TRUE(a.expired()) << "round " << round;
  }
  ASSERT_FALSE(e->reset());
  expect_serves_on(*e);
}

TEST_F(AsyncWaitTest, AHandlerThatOwnsItsClientIsDestroyedWithTheContext) {
  // Destroyed inside the context's shutdown, with the client: its waiter
  // thread is joined from there.
  auto mine = client::connect(loc.options());
  ASSERT_TRUE(mine) << mine.error().message();
  auto owned = std::make_shared<client>(std::move(*mine));
  auto e = owned->create_event(event_reset::manual);
  ASSERT_TRUE(e);
  std::weak_ptr<client> alive = owned;
  {
    asio::io_context other;
    owned->async_wait(*e, infinite,
                      asio::bind_executor(other, [owned](error_code, wait_status) {}));
    owned.reset();
    other.run_for(20ms);
    EXPECT_FALSE(alive.expired());
  }
  EXPECT_TRUE(alive.expired()) << "the client outlived the context of the wait that owned it";
}

asio::awaitable<void> wait_owning(client c, event e, std::shared_ptr<int> marker) {
  co_await c.async_wait(e, infinite, asio::use_awaitable);
  (void)marker;
}

TEST_F(AsyncWaitTest, ACoroutineThatOwnsTheClientItWaitsThroughGoesWithTheContext) {
  std::weak_ptr<int> alive;
  std::size_t with_waiter = 0;
  {
    asio::io_context other;
    auto mine = client::connect(loc.options());
    ASSERT_TRUE(mine) << mine.error().message();
    auto e = mine->create_event(event_reset::manual);
    ASSERT_TRUE(e);
    auto marker = std::make_shared<int>(1);
    alive = marker;
    const std::size_t before = thread_count();
    asio::co_spawn(other, wait_owning(std::move(*mine), std::move(*e), std::move(marker)),
                   asio::detached);
    // Until the wait is pending: the client's waiter thread runs.
    const auto until = steady::now() + 10s;
    while (thread_count() == before && steady::now() < until) other.run_for(5ms);
    other.run_for(20ms);
    EXPECT_FALSE(alive.expired()) << "the coroutine ended: nothing was tested";
    with_waiter = thread_count();
    ASSERT_GT(with_waiter, before) << "the wait never started";
  }
  EXPECT_TRUE(alive.expired()) << "the coroutine (and the client) outlived its context";
  EXPECT_TRUE(threads_drop_to(with_waiter - 1)) << "the client's waiter thread is still there";
}

TEST_F(AsyncWaitTest, PlainCallbacksAndFuturesStartNoThreadButTheClientsWaiter) {
  // They complete on the waiter thread (Asio's system executor): nothing goes
  // with a context, and Asio's system context (a pool of threads) is not made.
  auto e = c().create_event(event_reset::manual);
  ASSERT_TRUE(e);
  outcome<wait_status> first;  // starts the waiter thread
  c().async_wait(*e, 0ns, first.handler(io));
  ASSERT_TRUE(run_until([&] { return first.calls > 0; }));
  const std::size_t with_waiter = thread_count();
  std::promise<error_code> done;
  auto callback = done.get_future();
  c().async_wait(*e, 10s, [&done](error_code ec, wait_status) { done.set_value(ec); });
  auto future = c().async_wait(*e, 10s, asio::use_future);
  ASSERT_FALSE(e->signal());
  ASSERT_EQ(callback.wait_for(10s), std::future_status::ready);
  ASSERT_EQ(future.wait_for(10s), std::future_status::ready);
  EXPECT_FALSE(callback.get());
  EXPECT_EQ(future.get(), wait_status::signalled);
  EXPECT_LE(thread_count(), with_waiter) << "a thread pool was made for them";
}

TEST_F(AsyncWaitTest, MutexWithoutAHandlerExecutorIsRefusedAndNotTaken) {
  // A plain callback (Asio's system executor; use_future alike) runs on the
  // client's waiter thread, where a mutex could be taken but never released.
  // (A promise of our own, not use_future's exception: libstdc++'s
  // exception_ptr refcount is invisible to ThreadSanitizer.)
  auto m = c().create_mutex();
  ASSERT_TRUE(m);
  std::promise<error_code> done;
  auto f = done.get_future();
  c().async_wait(*m, 10s, [&done](error_code ec, wait_status) { done.set_value(ec); });
  ASSERT_EQ(f.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(f.get(), make_error_code(errc::invalid_argument));
  EXPECT_EQ(value_of(*m), 0u);  // nobody owns it
}

TEST_F(AsyncWaitTest, BadSetsCompleteWithAClearErrorAndTouchNothing) {
  auto e = c().create_event(event_reset::manual);
  ASSERT_TRUE(e);
  outcome<wait_result> empty_set, duplicates, empty_object;
  c().async_wait_all({}, 1s, empty_set.handler(io));
  const std::array<const object*, 2> twice{&*e, &*e};
  c().async_wait_all(twice, 1s, duplicates.handler(io));
  object nothing;
  const std::array<const object*, 1> hollow{&nothing};
  c().async_wait_any(hollow, 1s, empty_object.handler(io));
  EXPECT_EQ(empty_set.calls, 0);  // never inside the initiating call
  ASSERT_TRUE(run_until(
      [&] { return empty_set.calls > 0 && duplicates.calls > 0 && empty_object.calls > 0; }));
  EXPECT_EQ(empty_set.ec, make_error_code(errc::invalid_argument));
  EXPECT_EQ(duplicates.ec, make_error_code(errc::invalid_argument));
  EXPECT_EQ(empty_object.ec, make_error_code(errc::invalid_handle));
}

}  // namespace
}  // namespace uipc::handles
