// Threading models: cooperative plug-ins have one thread inside at a time and
// let another in at yield points; preemptive ones run concurrently; the host
// bridges the two (A -> B -> A does not deadlock); a busy cooperative plug-in
// costs a caller its deadline, not its thread; a context used by two threads
// is refused; calls racing unregistration end or fail cleanly.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <barrier>
#include <future>
#include <thread>

#include "plugin_support.hpp"
#include "test_support.hpp"

namespace uipc::plugin {
namespace {

using test::fake_plugin;
using test::logged_host;
using namespace std::chrono_literals;

class Threading : public ::testing::Test {
 protected:
  void TearDown() override { test::forget_fake_plugins(); }
};

// Counts threads inside a service at once; the most it saw.
struct occupancy {
  std::atomic<int> inside{0}, most{0};
  void enter() {
    int now = ++inside;
    int seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {
    }
  }
  void leave() { --inside; }
};

// How many threads were inside the plug-in at once when four called it. A
// call waits inside for company, up to `patience`: a preemptive plug-in must
// let a second thread in however slowly threads start (TSan, a loaded
// machine), a cooperative one never may.
int most_inside(std::uint32_t flags, std::chrono::microseconds patience) {
  fake_plugin p;
  p.name = "counted";
  p.flags = flags;
  occupancy o;
  std::atomic<bool> wait_for_company{false};
  p.init = [&](uipc_plugin_context* c) {
    return p.serve(c, "work", [&](auto*, void*) {
      o.enter();
      auto until = std::chrono::steady_clock::now() + (wait_for_company ? patience : 200us);
      while (o.most.load() < 2 && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(50us);
      o.leave();
      return 0u;
    });
  };
  logged_host h;
  EXPECT_TRUE(h.h->load(p.entry()));
  auto ref = h.h->resolve("work").value();
  {
    // One thread first, long enough for a cooperative baton to bias to it:
    // the others must then revoke the bias to get in.
    auto ctx = h.h->new_context().value();
    for (int i = 0; i < 40; ++i) EXPECT_TRUE(ctx.call(ref, nullptr));
  }
  wait_for_company = true;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      auto ctx = h.h->new_context().value();
      for (int i = 0; i < 10; ++i) EXPECT_TRUE(ctx.call(ref, nullptr));
    });
  for (auto& t : threads) t.join();
  return o.most.load();
}

TEST_F(Threading, ACooperativePluginNeverHasTwoThreadsInside) {
  EXPECT_EQ(most_inside(0, 500us), 1);
}

TEST_F(Threading, APreemptivePluginRunsConcurrently) {
  EXPECT_GT(most_inside(UIPC_PLUGIN_PREEMPTIVE, 10s), 1);
}

TEST_F(Threading, WaitingInACallbackLetsAnotherThreadIntoACooperativePlugin) {
  fake_plugin p;
  p.name = "waiter";
  int fd = ::eventfd(0, EFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  std::atomic<bool> waiting{false};
  p.init = [&](uipc_plugin_context* c) {
    p.serve(c, "wait", [&](uipc_plugin_context* cc, void*) {
      waiting = true;
      short revents = 0;
      p.api->wait_fd(cc, fd, POLLIN, 10000, &revents);  // a yield point
      return static_cast<std::uint64_t>(revents);
    });
    return p.serve(c, "wake", [&](auto*, void*) {
      std::uint64_t one = 1;
      return static_cast<std::uint64_t>(::write(fd, &one, sizeof one));
    });
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(p.entry()));
  auto waiter = std::async(std::launch::async,
                           [&] { return h.h->new_context().value().call("wait", nullptr); });
  ASSERT_TRUE(uipc::test::eventually([&] { return waiting.load(); }, 10s))
      << "the waiter never got inside";
  // The plug-in is cooperative and one thread is inside it, waiting: we get in.
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call("wake", nullptr).value(), 8u);
  ASSERT_EQ(waiter.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(waiter.get().value(), static_cast<std::uint64_t>(POLLIN));
  ::close(fd);
}

TEST_F(Threading, ACallBackIntoTheCallerOnTheSameThreadDoesNotDeadlock) {
  fake_plugin a, b;
  a.name = "a";
  b.name = "b";
  a.init = [&](uipc_plugin_context* c) {
    a.serve(c, "a leaf", [](auto*, void*) { return 7u; });
    return a.serve(c, "a calls b", [&](uipc_plugin_context* cc, void*) {
      std::uint64_t r = 0;
      int s = a.api->call_service(cc, "b calls a", nullptr, &r);
      return s == UIPC_PLUGIN_OK ? r : 1000u + s;
    });
  };
  b.init = [&](uipc_plugin_context* c) {
    return b.serve(c, "b calls a", [&](uipc_plugin_context* cc, void*) {
      std::uint64_t r = 0;
      int s = b.api->call_service(cc, "a leaf", nullptr, &r);
      return s == UIPC_PLUGIN_OK ? r + 1 : 1000u + s;
    });
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(a.entry()));
  ASSERT_TRUE(h.h->load(b.entry()));
  auto done = std::async(std::launch::async,
                         [&] { return h.h->new_context().value().call("a calls b", nullptr); });
  ASSERT_EQ(done.wait_for(10s), std::future_status::ready) << "A -> B -> A deadlocked";
  EXPECT_EQ(done.get().value(), 8u);
}

TEST_F(Threading, ACallBackIntoTheCallerFromAnotherThreadDoesNotDeadlock) {
  // A (cooperative) calls B (preemptive), which asks another thread to call
  // A and waits for the answer: A must let that thread in.
  fake_plugin a, b;
  a.name = "a";
  b.name = "b";
  b.flags = UIPC_PLUGIN_PREEMPTIVE;
  a.init = [&](uipc_plugin_context* c) {
    a.serve(c, "a leaf", [](auto*, void*) { return 5u; });
    return a.serve(c, "a calls b", [&](uipc_plugin_context* cc, void*) {
      std::uint64_t r = 0;
      int s = a.api->call_service(cc, "b via thread", nullptr, &r);
      return s == UIPC_PLUGIN_OK ? r : 1000u + s;
    });
  };
  logged_host h;
  b.init = [&](uipc_plugin_context* c) {
    return b.serve(c, "b via thread", [&](uipc_plugin_context*, void*) {
      auto other = std::async(std::launch::async,
                              [&] { return h.h->new_context().value().call("a leaf", nullptr); });
      auto r = other.get();
      return r ? *r * 10 : 2000u;
    });
  };
  ASSERT_TRUE(h.h->load(a.entry()));
  ASSERT_TRUE(h.h->load(b.entry()));
  auto done = std::async(std::launch::async,
                         [&] { return h.h->new_context().value().call("a calls b", nullptr); });
  ASSERT_EQ(done.wait_for(10s), std::future_status::ready) << "A -> B -> (thread) -> A deadlocked";
  EXPECT_EQ(done.get().value(), 50u);
}

TEST_F(Threading, ABusyCooperativePluginCostsACallerItsDeadlineOnly) {
  fake_plugin p;
  p.name = "stuck";
  std::atomic<bool> inside{false}, release{false};
  p.init = [&](uipc_plugin_context* c) {
    p.serve(c, "hog", [&](auto*, void*) {
      inside = true;
      // Blocks without a yield point (for at most 20 s, so a failed test ends).
      uipc::test::eventually([&] { return release.load(); }, 20s);
      return 0u;
    });
    return p.serve(c, "quick", [](auto*, void*) { return 1u; });
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(p.entry()));
  auto hog = std::async(std::launch::async,
                        [&] { return h.h->new_context().value().call("hog", nullptr); });
  ASSERT_TRUE(uipc::test::eventually([&] { return inside.load(); }, 10s))
      << "the hog never got inside";
  auto ctx = h.h->new_context().value();
  ctx.set_deadline(std::chrono::steady_clock::now() + 50ms);
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(ctx.call("quick", nullptr).error(), errc::timed_out);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  release = true;
  ASSERT_TRUE(hog.get());
  ctx.set_deadline(std::chrono::steady_clock::now() + 5s);
  EXPECT_EQ(ctx.call("quick", nullptr).value(), 1u);
}

// Cooperative A gives its baton back (blocking_begin) and, in that window,
// calls B, whose own blocking_begin/blocking_end must neither end A's window
// nor take B's baton for A. After A's blocking_end, A is exclusive again: a
// second thread calling A waits, and gives up at its deadline.
void stays_exclusive_after_a_call_in_a_blocking_window(std::uint32_t b_flags) {
  fake_plugin a, b;
  a.name = "a";
  b.name = "b";
  b.flags = b_flags;
  std::atomic<bool> after_end{false}, release{false};
  b.init = [&](uipc_plugin_context* c) {
    return b.serve(c, "b waits", [&](uipc_plugin_context* cc, void*) {
      const int begun = b.api->blocking_begin(cc);
      const int ended = b.api->blocking_end(cc);
      return static_cast<std::uint64_t>(begun | ended);
    });
  };
  a.init = [&](uipc_plugin_context* c) {
    a.serve(c, "a quick", [](auto*, void*) { return 1u; });
    return a.serve(c, "a window", [&](uipc_plugin_context* cc, void*) {
      a.api->blocking_begin(cc);
      std::uint64_t r = 0;
      const int s = a.api->call_service(cc, "b waits", nullptr, &r);
      a.api->blocking_end(cc);
      after_end = true;
      uipc::test::eventually([&] { return release.load(); }, 20s);  // inside A, exclusive
      return s == UIPC_PLUGIN_OK ? r : 1000u + s;
    });
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(a.entry()));
  ASSERT_TRUE(h.h->load(b.entry()));
  auto first = std::async(std::launch::async,
                          [&] { return h.h->new_context().value().call("a window", nullptr); });
  ASSERT_TRUE(uipc::test::eventually([&] { return after_end.load(); }, 10s))
      << "the first call never got past its blocking window";
  auto ctx = h.h->new_context().value();
  ctx.set_deadline(std::chrono::steady_clock::now() + 100ms);
  auto second = ctx.call("a quick", nullptr);
  release = true;
  EXPECT_FALSE(second) << "a second thread got into A while the first is inside";
  if (!second) {
    EXPECT_EQ(second.error(), errc::timed_out);
  }
  ASSERT_EQ(first.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(first.get().value(), 0u);
  // Both batons are free again.
  ctx.set_deadline(std::chrono::steady_clock::now() + 5s);
  EXPECT_EQ(ctx.call("a quick", nullptr).value(), 1u);
  EXPECT_EQ(ctx.call("b waits", nullptr).value(), 0u);
}

TEST_F(Threading, ACooperativePluginStaysExclusiveAfterCallingAPreemptiveOneInABlockingWindow) {
  stays_exclusive_after_a_call_in_a_blocking_window(UIPC_PLUGIN_PREEMPTIVE);
}

TEST_F(Threading, ACooperativePluginStaysExclusiveAfterCallingACooperativeOneInABlockingWindow) {
  stays_exclusive_after_a_call_in_a_blocking_window(0);
}

TEST_F(Threading, AContextUsedByTwoThreadsAtOnceIsRefused) {
  fake_plugin p;
  p.name = "sharer";
  p.flags = UIPC_PLUGIN_PREEMPTIVE;
  int from_other_thread = -1;
  p.init = [&](uipc_plugin_context* c) {
    p.serve(c, "leaf", [](auto*, void*) { return 0u; });
    return p.serve(c, "share", [&](uipc_plugin_context* cc, void*) {
      std::thread([&] {
        void* block = nullptr;
        int alloc = p.api->pool_alloc(p.api->context_pool(cc), 16, &block);
        int call = p.api->call_service(cc, "leaf", nullptr, nullptr);
        from_other_thread = alloc == call ? alloc : -2;
      }).join();
      return 0u;
    });
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(p.entry()));
  auto ctx = h.h->new_context().value();
  ASSERT_TRUE(ctx.call("share", nullptr));
  EXPECT_EQ(from_other_thread, UIPC_PLUGIN_E_CONTEXT_BUSY);
  // Handing a context over between calls is fine.
  std::thread([&] { EXPECT_TRUE(ctx.call("leaf", nullptr)); }).join();
}

TEST_F(Threading, CallsRacingUnregistrationEndOrFailCleanly) {
  fake_plugin p;
  p.name = "flicker";
  p.flags = UIPC_PLUGIN_PREEMPTIVE;
  std::atomic<bool> stop{false};
  std::atomic<int> toggles{0};
  p.init = [&](uipc_plugin_context* c) {
    p.serve(c, "target", [](auto*, void* arg) { return *static_cast<std::uint64_t*>(arg) + 1; });
    // Unregisters and registers "target" again, repeatedly, on the plug-in's own thread.
    return p.serve(c, "toggle", [&](uipc_plugin_context* cc, void*) {
      int a = p.api->register_service(cc, "target", nullptr, nullptr, 0);
      int b = p.api->register_service(cc, "target", test::run_body, &p.bodies.front(), 0);
      ++toggles;
      return static_cast<std::uint64_t>(a | b);
    });
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(p.entry()));
  auto ref = h.h->resolve("target").value();
  std::atomic<int> ok{0}, not_found{0}, other{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 2; ++t)
    callers.emplace_back([&] {
      auto ctx = h.h->new_context().value();
      while (!stop) {
        std::uint64_t arg = 41;
        auto r = ctx.call(ref, &arg);
        if (r && *r == 42)
          ++ok;
        else if (!r && r.error() == errc::service_not_found)
          ++not_found;
        else
          ++other;
      }
    });
  // Each caller's first calls succeed: "target" is there before the toggles.
  auto ok_passes = [&](int mark) {
    const auto give_up = std::chrono::steady_clock::now() + 20s;
    while (ok.load() <= mark && std::chrono::steady_clock::now() < give_up)
      std::this_thread::sleep_for(1ms);
    return ok.load() > mark;
  };
  EXPECT_TRUE(ok_passes(0));
  // At least 2000 toggles, and on until the callers have raced 1000 calls
  // against them (a loaded machine may start them late), within 20 s. While
  // toggling, "target" is mostly away (an unregistration waits out a
  // membarrier): what counts is that no call sees anything but 42 or
  // service_not_found.
  int i = 0;
  {
    auto ctx = h.h->new_context().value();
    const int before = ok.load() + not_found.load();
    const auto give_up = std::chrono::steady_clock::now() + 20s;
    for (; i < 2000 || (ok.load() + not_found.load() - before < 1000 &&
                        std::chrono::steady_clock::now() < give_up);
         ++i)
      ASSERT_EQ(ctx.call("toggle", nullptr).value(), 0u);
    EXPECT_GE(ok.load() + not_found.load() - before, 1000);
  }
  EXPECT_TRUE(ok_passes(ok.load())) << "registered again after the last toggle";
  stop = true;
  for (auto& t : callers) t.join();
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(toggles.load(), i);
  ASSERT_FALSE(h.h->quiesce(5s));  // every retired entry was freed (ASan checks the rest)
}

}  // namespace
}  // namespace uipc::plugin
