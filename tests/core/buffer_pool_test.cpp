// The bounded buffer pool: try, wait, order, cancel, threads.
#include "test_support.hpp"
#include "uipc/core/buffer_pool.hpp"

#include <boost/asio/io_context.hpp>

#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace uipc {
namespace {

using test::run_until;

TEST(BufferPoolTest, TryAcquireFailsWhenDryAndSucceedsAfterARelease) {
  boost::asio::io_context ctx;
  buffer_pool pool(ctx.get_executor(), 512, 2);
  auto a = pool.try_acquire();
  auto b = pool.try_acquire();
  ASSERT_TRUE(a);
  ASSERT_TRUE(b);
  EXPECT_NE(a.data(), b.data());
  EXPECT_EQ(a.size(), 512u);
  EXPECT_FALSE(pool.try_acquire());
  EXPECT_EQ(pool.acquire().error(), make_error_code(errc::pool_exhausted));
  EXPECT_EQ(pool.available(), 0u);
  a.reset();
  EXPECT_EQ(pool.available(), 1u);
  EXPECT_TRUE(pool.try_acquire());
}

TEST(BufferPoolTest, BuffersDoNotOverlap) {
  boost::asio::io_context ctx;
  buffer_pool pool(ctx.get_executor(), 100, 8);
  std::vector<pooled_buffer> all;
  for (int i = 0; i < 8; ++i) {
    all.push_back(pool.try_acquire());
    std::memset(all.back().data(), i, all.back().size());
  }
  for (int i = 0; i < 8; ++i) {
    for (std::size_t j = 0; j < 100; ++j) ASSERT_EQ(static_cast<int>(all[i].data()[j]), i);
  }
}

TEST(BufferPoolTest, WaitersAreServedInOrderWhenBuffersComeBack) {
  boost::asio::io_context ctx;
  buffer_pool pool(ctx.get_executor(), 64, 1);
  auto held = pool.try_acquire();
  std::vector<int> order;
  std::vector<pooled_buffer> got;
  for (int i = 0; i < 3; ++i) {
    pool.async_acquire([&, i](error_code ec, pooled_buffer b) {
      EXPECT_FALSE(ec);
      order.push_back(i);
      got.push_back(std::move(b));
    });
  }
  ctx.poll();
  EXPECT_TRUE(order.empty());
  EXPECT_EQ(pool.waiting(), 3u);
  held.reset();
  ASSERT_TRUE(run_until(ctx, [&] { return order.size() == 1; }));
  got.clear();
  ASSERT_TRUE(run_until(ctx, [&] { return order.size() == 2; }));
  got.clear();
  ASSERT_TRUE(run_until(ctx, [&] { return order.size() == 3; }));
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
  got.clear();
  EXPECT_EQ(pool.available(), 1u);
}

TEST(BufferPoolTest, CancelAbortsWaiters) {
  boost::asio::io_context ctx;
  buffer_pool pool(ctx.get_executor(), 64, 1);
  auto held = pool.try_acquire();
  error_code got;
  bool done = false;
  pool.async_acquire([&](error_code ec, pooled_buffer b) {
    got = ec;
    done = !b;
  });
  pool.cancel();
  ASSERT_TRUE(run_until(ctx, [&] { return done; }));
  EXPECT_EQ(got, boost::asio::error::operation_aborted);
  EXPECT_EQ(pool.waiting(), 0u);
}

TEST(BufferPoolTest, ManyThreadsNeverShareABuffer) {
  boost::asio::io_context ctx;
  buffer_pool pool(ctx.get_executor(), sizeof(int), 4);
  std::atomic<int> failures{0};
  std::vector<std::jthread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50000; ++i) {
        auto b = pool.try_acquire();
        if (!b) continue;
        std::memcpy(b.data(), &t, sizeof t);
        std::this_thread::yield();  // give another thread the chance to get the same buffer
        int back = -1;
        std::memcpy(&back, b.data(), sizeof back);
        if (back != t) ++failures;
      }
    });
  }
  threads.clear();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(pool.available(), 4u);
}

// Waiters on one thread, releasers on others: every waiter gets a buffer, none
// is lost (run under ThreadSanitizer for the handoff's memory ordering).
TEST(BufferPoolTest, WaitersAndReleasersOnManyThreadsLoseNothing) {
  boost::asio::io_context ctx;
  buffer_pool pool(ctx.get_executor(), 64, 2);
  constexpr int rounds = 2000;
  std::atomic<int> served{0};
  std::mutex held_mutex;
  std::vector<pooled_buffer> held;
  std::jthread releaser([&](std::stop_token stop) {
    while (!stop.stop_requested()) {
      std::vector<pooled_buffer> to_release;
      {
        std::lock_guard lock(held_mutex);
        to_release.swap(held);
      }
      to_release.clear();
      std::this_thread::yield();
    }
  });
  std::function<void()> next = [&] {
    pool.async_acquire([&](error_code ec, pooled_buffer b) {
      if (ec) return;  // cancelled at the end
      {
        std::lock_guard lock(held_mutex);
        held.push_back(std::move(b));
      }
      if (++served < rounds) next();
    });
  };
  next();
  next();
  next();  // one more waiter than buffers
  ASSERT_TRUE(run_until(ctx, [&] { return served.load() >= rounds; }, std::chrono::seconds(30)));
  releaser.request_stop();
  releaser.join();
  pool.cancel();  // a waiter still queued completes aborted
  ctx.restart();
  ctx.run_for(std::chrono::milliseconds(20));
  held.clear();
  EXPECT_EQ(pool.in_use(), 0u);
}

}  // namespace
}  // namespace uipc
