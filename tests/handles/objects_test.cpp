// Objects and waits in shared memory, through the client facade, against a daemon
// running in this process: events, mutexes, semaphores, wait-any and wait-all,
// names, stale handles, the scratch area, and a daemon that stops under a wait.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <atomic>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "handles_support.hpp"

namespace uipc::handles {
namespace {

using namespace std::chrono_literals;
using test::in_process_daemon;
using test::private_location;

class ObjectsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    daemon_.emplace(loc_.where, 8, 4096);
    ASSERT_TRUE(static_cast<bool>(*daemon_));
    auto c = client::connect(loc_.options());
    ASSERT_TRUE(c) << c.error().message();
    client_.emplace(std::move(*c));
  }
  void TearDown() override {
    client_.reset();
    // Every reference and block a test took is given back when its client goes.
    const auto until = std::chrono::steady_clock::now() + 5s;
    while ((*daemon_)->stats().clients != 0 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(1ms);
    const auto s = (*daemon_)->stats();
    EXPECT_EQ(s.clients, 0u);
    EXPECT_EQ(s.handles_in_use, 0u);
    EXPECT_EQ(s.scratch_in_use, 0u);
    daemon_->shutdown();
    EXPECT_FALSE(loc_.socket_exists());
  }

  client& c() { return *client_; }

  private_location loc_;
  std::optional<in_process_daemon> daemon_;
  std::optional<client> client_;
};

TEST_F(ObjectsTest, ManualEventWakesEveryWaiterAndStaysSignalled) {
  auto e = c().create_event(event_reset::manual);
  ASSERT_TRUE(e);
  std::atomic<int> woken{0};
  std::vector<std::thread> waiters;
  for (int i = 0; i < 3; ++i) {
    waiters.emplace_back([&] {
      auto r = e->wait(10s);
      if (r && *r == wait_status::signalled) ++woken;
    });
  }
  std::this_thread::sleep_for(20ms);
  EXPECT_EQ(woken.load(), 0);
  ASSERT_FALSE(e->signal());
  for (auto& t : waiters) t.join();
  EXPECT_EQ(woken.load(), 3);
  EXPECT_EQ(*e->wait(0ns), wait_status::signalled);  // still signalled
  ASSERT_FALSE(e->reset());
  EXPECT_EQ(*e->wait(0ns), wait_status::timed_out);
}

TEST_F(ObjectsTest, AutoEventReleasesExactlyOneWaiterPerSignal) {
  auto e = c().create_event(event_reset::automatic);
  ASSERT_TRUE(e);
  std::atomic<int> woken{0};
  std::vector<std::thread> waiters;
  for (int i = 0; i < 3; ++i) {
    waiters.emplace_back([&] {
      auto r = e->wait(3s);
      if (r && *r == wait_status::signalled) ++woken;
    });
  }
  std::this_thread::sleep_for(20ms);
  ASSERT_FALSE(e->signal());
  const auto until = std::chrono::steady_clock::now() + 2s;
  while (woken.load() < 1 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(woken.load(), 1);
  // A signal on an event that is still signalled changes nothing, so each
  // further signal waits until the last was taken.
  for (int expected = 2; expected <= 3; ++expected) {
    ASSERT_FALSE(e->signal());
    while (woken.load() < expected && std::chrono::steady_clock::now() < until + 3s) {
      std::this_thread::sleep_for(1ms);
    }
    EXPECT_EQ(woken.load(), expected);
  }
  for (auto& t : waiters) t.join();
  EXPECT_EQ(woken.load(), 3);
  EXPECT_EQ(*e->wait(0ns), wait_status::timed_out);  // every signal was consumed
}

TEST_F(ObjectsTest, WaitTimesOutAfterItsTimeoutAndNotBefore) {
  auto e = c().create_event(event_reset::automatic);
  ASSERT_TRUE(e);
  const auto start = std::chrono::steady_clock::now();
  auto r = e->wait(100ms);
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(r);
  EXPECT_EQ(*r, wait_status::timed_out);
  EXPECT_GE(took, 100ms);
  EXPECT_LT(took, 2s);
}

TEST_F(ObjectsTest, SemaphoreCountsUpToItsMaximum) {
  auto s = c().create_semaphore(1, 2);
  ASSERT_TRUE(s);
  EXPECT_EQ(*s->wait(0ns), wait_status::signalled);
  EXPECT_EQ(*s->wait(0ns), wait_status::timed_out);
  auto prev = s->release(2);
  ASSERT_TRUE(prev);
  EXPECT_EQ(*prev, 0u);
  EXPECT_EQ(s->release(1).error(), make_error_code(errc::semaphore_limit));
  EXPECT_EQ(*s->wait(0ns), wait_status::signalled);
  EXPECT_EQ(*s->wait(0ns), wait_status::signalled);
  EXPECT_EQ(*s->wait(0ns), wait_status::timed_out);
  EXPECT_EQ(c().create_semaphore(3, 2).error(), make_error_code(errc::invalid_argument));
}

TEST_F(ObjectsTest, MutexIsOwnedByOneThreadAndRecursive) {
  auto m = c().create_mutex();
  ASSERT_TRUE(m);
  EXPECT_EQ(*m->wait(0ns), wait_status::signalled);
  EXPECT_EQ(*m->wait(0ns), wait_status::signalled);  // recursion
  std::thread other([&] {
    EXPECT_EQ(*m->wait(0ns), wait_status::timed_out);
    EXPECT_EQ(m->release(), make_error_code(errc::not_owner));
  });
  other.join();
  ASSERT_FALSE(m->release());
  std::thread still_held([&] { EXPECT_EQ(*m->wait(0ns), wait_status::timed_out); });
  still_held.join();
  ASSERT_FALSE(m->release());
  EXPECT_EQ(m->release(), make_error_code(errc::not_owner));
  std::thread now_free([&] {
    EXPECT_EQ(*m->wait(0ns), wait_status::signalled);
    EXPECT_FALSE(m->release());
  });
  now_free.join();
}

TEST_F(ObjectsTest, MutexCreatedOwnedBelongsToTheCreator) {
  auto m = c().create_mutex(true, "owned-at-birth");
  ASSERT_TRUE(m);
  std::thread other([&] { EXPECT_EQ(*m->wait(0ns), wait_status::timed_out); });
  other.join();
  EXPECT_FALSE(m->release());
}

TEST_F(ObjectsTest, MutexExcludesAcrossThreads) {
  auto m = c().create_mutex();
  ASSERT_TRUE(m);
  int counter = 0;  // guarded by the handle mutex only: TSan would see a race otherwise
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 500; ++i) {
        ASSERT_EQ(*m->wait(10s), wait_status::signalled);
        ++counter;
        ASSERT_FALSE(m->release());
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(counter, 2000);
}

TEST_F(ObjectsTest, WaitAnyTakesTheLowestSignalledObject) {
  auto a = c().create_event(event_reset::automatic);
  auto b = c().create_event(event_reset::automatic);
  auto s = c().create_semaphore(0, 5);
  ASSERT_TRUE(a && b && s);
  ASSERT_FALSE(b->signal());
  ASSERT_TRUE(s->release(1));
  auto r = c().wait_any({&*a, &*b, &*s}, 0ns);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::signalled);
  EXPECT_EQ(r->index, 1u);
  r = c().wait_any({&*a, &*b, &*s}, 0ns);
  EXPECT_EQ(r->index, 2u);
  r = c().wait_any({&*a, &*b, &*s}, 20ms);
  EXPECT_EQ(r->status, wait_status::timed_out);
  std::thread signaller([&] {
    std::this_thread::sleep_for(20ms);
    EXPECT_FALSE(a->signal());
  });
  r = c().wait_any({&*a, &*b, &*s}, 5s);
  signaller.join();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::signalled);
  EXPECT_EQ(r->index, 0u);
}

TEST_F(ObjectsTest, WaitAllTakesNothingUntilEveryObjectIsSignalled) {
  auto a = c().create_event(event_reset::automatic);
  auto b = c().create_event(event_reset::automatic);
  auto s = c().create_semaphore(1, 1);
  ASSERT_TRUE(a && b && s);
  ASSERT_FALSE(a->signal());
  auto r = c().wait_all({&*a, &*b, &*s}, 20ms);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::timed_out);
  // Nothing was consumed: a and s are still available to a single wait.
  EXPECT_EQ(*a->wait(0ns), wait_status::signalled);
  EXPECT_EQ(*s->wait(0ns), wait_status::signalled);
  ASSERT_FALSE(a->signal());
  ASSERT_TRUE(s->release(1));

  std::thread signaller([&] {
    std::this_thread::sleep_for(20ms);
    EXPECT_FALSE(b->signal());
  });
  r = c().wait_all({&*a, &*b, &*s}, 5s);
  signaller.join();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, wait_status::signalled);
  // All three were taken at once.
  EXPECT_EQ(*a->wait(0ns), wait_status::timed_out);
  EXPECT_EQ(*b->wait(0ns), wait_status::timed_out);
  EXPECT_EQ(*s->wait(0ns), wait_status::timed_out);
}

TEST_F(ObjectsTest, WaitAllNeverConsumesPartiallyUnderContention) {
  // A wait-all on {a, b} races single waits on a: whenever the single waiter gets
  // a, the wait-all must not have taken b.
  auto a = c().create_semaphore(0, 1000);
  auto b = c().create_semaphore(0, 1000);
  ASSERT_TRUE(a && b);
  std::atomic<bool> done{false};
  std::atomic<int> all_taken{0};
  std::atomic<int> single_taken{0};
  std::thread all([&] {
    while (!done) {
      auto r = c().wait_all({&*a, &*b}, 1ms);
      if (r && r->status == wait_status::signalled) ++all_taken;
    }
  });
  std::thread single([&] {
    while (!done) {
      auto r = a->wait(1ms);
      if (r && *r == wait_status::signalled) ++single_taken;
    }
  });
  for (int i = 0; i < 300; ++i) {
    ASSERT_TRUE(a->release(1));
    ASSERT_TRUE(b->release(1));
    std::this_thread::sleep_for(50us);
  }
  std::this_thread::sleep_for(50ms);
  done = true;
  all.join();
  single.join();
  // Every unit of a went to exactly one taker; b lost one unit per wait-all only.
  int left_a = 0;
  int left_b = 0;
  while (*a->wait(0ns) == wait_status::signalled) ++left_a;
  while (*b->wait(0ns) == wait_status::signalled) ++left_b;
  EXPECT_EQ(all_taken + single_taken + left_a, 300);
  EXPECT_EQ(all_taken + left_b, 300);
}

TEST_F(ObjectsTest, WaitSetsAreChecked) {
  auto a = c().create_event(event_reset::manual);
  ASSERT_TRUE(a);
  EXPECT_EQ(c().wait_all({&*a, &*a}, 0ns).error(), make_error_code(errc::invalid_argument));
  EXPECT_EQ(c().wait_any(std::span<const object* const>{}, 0ns).error(),
            make_error_code(errc::invalid_argument));
  event empty;
  EXPECT_EQ(c().wait_any({&empty}, 0ns).error(), make_error_code(errc::invalid_handle));
  EXPECT_EQ(empty.wait(0ns).error(), make_error_code(errc::invalid_handle));
}

TEST_F(ObjectsTest, NamesAreSharedAndTyped) {
  auto e = c().create_event(event_reset::manual, false, "shared-name");
  ASSERT_TRUE(e);
  EXPECT_FALSE(e->existed());
  auto again = c().create_event(event_reset::manual, false, "shared-name");
  ASSERT_TRUE(again);
  EXPECT_TRUE(again->existed());
  EXPECT_EQ(again->handle(), e->handle());
  ASSERT_FALSE(again->signal());
  EXPECT_EQ(*e->wait(0ns), wait_status::signalled);

  EXPECT_EQ(c().create_mutex(false, "shared-name").error(), make_error_code(errc::name_in_use));
  EXPECT_EQ(c().open_mutex("shared-name").error(), make_error_code(errc::wrong_type));
  EXPECT_EQ(c().open_event("no-such-name").error(), make_error_code(errc::name_not_found));
  EXPECT_EQ(c().create_event(event_reset::manual, false, std::string(64, 'x')).error(),
            make_error_code(errc::name_too_long));
  EXPECT_TRUE(c().create_event(event_reset::manual, false, std::string(63, 'x')));

  auto list = c().list();
  ASSERT_TRUE(list);
  ASSERT_EQ(list->size(), 1u);  // the 63-byte one is gone again
  EXPECT_EQ((*list)[0].name, "shared-name");
  EXPECT_EQ((*list)[0].refcount, 2u);
  EXPECT_EQ((*list)[0].value, 1u);
}

TEST_F(ObjectsTest, ClosedHandleIsStaleEvenWhenItsSlotIsReused) {
  auto first = c().create_event(event_reset::manual);
  ASSERT_TRUE(first);
  const handle_id old = first->handle();
  ASSERT_FALSE(first->close());
  EXPECT_FALSE(*first);
  EXPECT_EQ(c().open(old).error(), make_error_code(errc::stale_handle));
  // Fill the table so the old slot is certainly reused.
  std::vector<event> all;
  for (;;) {
    auto e = c().create_event(event_reset::manual);
    if (!e) {
      EXPECT_EQ(e.error(), make_error_code(errc::table_full));
      break;
    }
    all.push_back(std::move(*e));
  }
  EXPECT_EQ(all.size(), 7u);  // capacity 8, slot 0 never used
  bool reused = false;
  for (auto& e : all) reused |= e.handle().index == old.index;
  EXPECT_TRUE(reused);
  EXPECT_EQ(c().open(old).error(), make_error_code(errc::stale_handle));
  EXPECT_EQ(c().open(handle_id{999, 1}).error(), make_error_code(errc::invalid_handle));
  EXPECT_EQ(c().open(handle_id{0, 1}).error(), make_error_code(errc::invalid_handle));
}

TEST_F(ObjectsTest, OpenByHandleCountsAReference) {
  auto e = c().create_event(event_reset::manual);
  ASSERT_TRUE(e);
  auto o = c().open(e->handle());
  ASSERT_TRUE(o);
  EXPECT_EQ(o->type(), object_type::manual_event);
  auto typed = client::as_event(std::move(*o));
  ASSERT_TRUE(typed);
  ASSERT_FALSE(e->close());
  ASSERT_FALSE(typed->signal());  // still alive: typed holds a reference
  EXPECT_EQ(c().stats()->handles_in_use, 1u);
  ASSERT_FALSE(typed->close());
  EXPECT_EQ(c().stats()->handles_in_use, 0u);
}

TEST_F(ObjectsTest, ScratchBlocksAreZeroedAndFreed) {
  auto a = c().store_scratch(100);
  ASSERT_TRUE(a);
  EXPECT_GE(a->data().size(), 100u);
  for (auto b : a->data()) ASSERT_EQ(b, std::byte{0});
  std::memset(a->data().data(), 0x5a, a->data().size());
  // Visible through the whole area at its offset.
  EXPECT_EQ(c().scratch_area()[a->offset()], std::byte{0x5a});
  auto big = c().store_scratch(8192);
  EXPECT_EQ(big.error(), make_error_code(errc::scratch_exhausted));
  EXPECT_EQ(c().stats()->scratch_blocks, 1u);
  const auto offset = a->offset();
  ASSERT_FALSE(a->free());
  // Freed memory is zeroed and reusable.
  auto again = c().store_scratch(100);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->offset(), offset);
  for (auto b : again->data()) ASSERT_EQ(b, std::byte{0});
  auto rest = c().store_scratch(4096 - again->data().size());
  ASSERT_TRUE(rest);
}

TEST_F(ObjectsTest, DaemonStopFailsWaitsWithDaemonLost) {
  auto e = c().create_event(event_reset::manual);
  ASSERT_TRUE(e);
  std::optional<result<wait_status>> got;
  std::thread waiter([&] { got = e->wait(30s); });
  std::this_thread::sleep_for(30ms);
  const auto start = std::chrono::steady_clock::now();
  daemon_->shutdown();
  waiter.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  ASSERT_TRUE(got);
  ASSERT_FALSE(*got);
  EXPECT_EQ(got->error(), make_error_code(errc::daemon_lost));
  EXPECT_EQ(e->signal(), make_error_code(errc::daemon_lost));
  EXPECT_EQ(c().stats().error(), make_error_code(errc::daemon_lost));
  EXPECT_FALSE(c().connected());
  client_.reset();
  e->close();
  // The daemon is gone: restart a fresh one so TearDown's checks have something to ask.
  daemon_.emplace(loc_.where, 8, 4096);
}

TEST_F(ObjectsTest, WaitSpinsThenSleepsAcrossThreads) {
  // Ping-pong between two threads on two auto events, long enough that both the
  // spin path and the futex path are taken.
  auto ping = c().create_event(event_reset::automatic);
  auto pong = c().create_event(event_reset::automatic);
  ASSERT_TRUE(ping && pong);
  constexpr int rounds = 2000;
  std::thread other([&] {
    for (int i = 0; i < rounds; ++i) {
      ASSERT_EQ(*ping->wait(10s), wait_status::signalled);
      if (i % 500 == 0) std::this_thread::sleep_for(2ms);  // beyond the spin: a futex sleep
      ASSERT_FALSE(pong->signal());
    }
  });
  for (int i = 0; i < rounds; ++i) {
    ASSERT_FALSE(ping->signal());
    ASSERT_EQ(*pong->wait(10s), wait_status::signalled);
  }
  other.join();
}

TEST(ObjectsListTest, ATableOfLongNamesIsListedWholeInPages) {
  // 1000 names of 63 bytes: ~90 KiB of entries, over the daemon's 64 KiB frames.
  private_location loc;
  in_process_daemon daemon(loc.where, 1024, 4096);
  ASSERT_TRUE(static_cast<bool>(daemon));
  {
    auto o = loc.options();
    o.call_timeout = 10s;
    auto c = client::connect(o);
    ASSERT_TRUE(c) << c.error().message();
    std::vector<event> events;
    for (int i = 0; i < 1000; ++i) {
      std::string name = std::to_string(i);
      name.resize(max_name_length, 'x');
      auto e = c->create_event(event_reset::manual, false, name);
      ASSERT_TRUE(e) << e.error().message();
      events.push_back(std::move(*e));
    }
    auto entries = c->list();
    ASSERT_TRUE(entries) << entries.error().message();
    ASSERT_EQ(entries->size(), 1000u);
    std::set<std::string> names;
    for (const auto& e : *entries) names.insert(e.name);
    EXPECT_EQ(names.size(), 1000u);
    EXPECT_TRUE(c->stats());  // the connection is fine afterwards
  }
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (daemon->stats().clients != 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  EXPECT_EQ(daemon->stats().handles_in_use, 0u);
  daemon.shutdown();
}

TEST(DaemonAcceptTest, OutOfDescriptorsBacksOffInsteadOfSpinning) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  // The sanitizer runtimes open descriptors of their own (UBSan's vptr check
  // probes memory through a pipe): at the limit they report errors that are
  // not there. The plain build runs this test, and its CPU measure is only
  // meaningful there anyway.
  GTEST_SKIP() << "needs spare descriptors that sanitizer runtimes take";
#endif
  private_location loc;
  in_process_daemon daemon(loc.where, 8, 4096);
  ASSERT_TRUE(static_cast<bool>(daemon));
  const std::string path = loc.resolved().socket_path;
  int peer = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(peer, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  // No descriptor left for the daemon's accept (this process's lowest free one
  // is the limit); the connection waits in the backlog.
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  const int lowest_free = ::dup(0);
  ASSERT_GE(lowest_free, 0);
  ::close(lowest_free);
  rlimit tight = saved;
  tight.rlim_cur = static_cast<rlim_t>(lowest_free);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &tight), 0);
  const int connected = ::connect(peer, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  rusage before{};
  ::getrusage(RUSAGE_SELF, &before);
  std::this_thread::sleep_for(300ms);
  rusage after{};
  ::getrusage(RUSAGE_SELF, &after);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);
  ASSERT_EQ(connected, 0);
  auto cpu_ms = [](const rusage& r) {
    return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e3 +
           (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e3;
  };
  EXPECT_LT(cpu_ms(after) - cpu_ms(before), 100.0) << "the daemon spun on its accept error";
  // Descriptors back: the waiting connection is taken in after the pause.
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (daemon->stats().clients == 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(5ms);
  EXPECT_EQ(daemon->stats().clients, 1u);
  ::close(peer);
  daemon.shutdown();
}

}  // namespace
}  // namespace uipc::handles
