// The event loop: threads, stop hooks, signals.
#include "uipc/core/event_loop.hpp"

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <csignal>
#include <future>
#include <mutex>
#include <set>
#include <thread>

#include "test_support.hpp"

namespace uipc {
namespace {

using namespace std::chrono_literals;

using test::run_within;

TEST(EventLoopTest, RunsOnTheRequestedNumberOfThreads) {
  event_loop loop(2);
  std::mutex m;
  std::set<std::thread::id> seen;
  std::atomic<int> left{200};
  for (int i = 0; i < 200; ++i) {
    boost::asio::post(loop.context(), [&] {
      {
        std::lock_guard lock(m);
        seen.insert(std::this_thread::get_id());
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
      if (--left == 0) loop.stop();
    });
  }
  ASSERT_TRUE(run_within(loop));
  EXPECT_EQ(left.load(), 0);
  EXPECT_EQ(seen.size(), 2u);
}

TEST(EventLoopTest, StopRunsHooksNewestFirstThenReturns) {
  event_loop loop;
  std::vector<int> order;
  loop.on_stop([&] { order.push_back(1); });
  loop.on_stop([&] { order.push_back(2); });
  boost::asio::post(loop.context(), [&] { loop.stop(); });
  ASSERT_TRUE(run_within(loop));
  EXPECT_EQ(order, (std::vector<int>{2, 1}));
}

TEST(EventLoopTest, CompletionsCausedByHooksRunBeforeReturn) {
  event_loop loop;
  boost::asio::steady_timer timer(loop.context(), std::chrono::hours(1));
  bool aborted = false;
  timer.async_wait(
      [&](boost::system::error_code ec) { aborted = ec == boost::asio::error::operation_aborted; });
  loop.on_stop([&] { timer.cancel(); });
  boost::asio::post(loop.context(), [&] { loop.stop(); });
  ASSERT_TRUE(run_within(loop));
  EXPECT_TRUE(aborted);
}

TEST(EventLoopTest, SigtermStopsTheLoopInOrder) {
  event_loop loop(1, /*catch_signals=*/true);
  bool hook_ran = false;
  loop.on_stop([&] { hook_ran = true; });
  boost::asio::post(loop.context(), [] { ::raise(SIGTERM); });
  ASSERT_TRUE(run_within(loop));
  EXPECT_TRUE(hook_ran);
  EXPECT_EQ(loop.stop_signal(), SIGTERM);
}

TEST(EventLoopTest, RunAgainAfterStop) {
  event_loop loop;
  int runs = 0;
  for (int i = 0; i < 2; ++i) {
    boost::asio::post(loop.context(), [&] {
      ++runs;
      loop.stop();
    });
    ASSERT_TRUE(run_within(loop));
  }
  EXPECT_EQ(runs, 2);
}

}  // namespace
}  // namespace uipc
