// The bounded buffer pool: try, wait, order, cancel, threads.
#include "uipc/core/buffer_pool.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "test_support.hpp"

namespace uipc {
namespace {

using test::run_until;

// A test's pool: create() must succeed (value() throws, failing the test, if not).
std::unique_ptr<buffer_pool> make_pool(boost::asio::io_context& ctx, std::size_t buffer_size,
                                       std::uint32_t count) {
  return buffer_pool::create(ctx.get_executor(), buffer_size, count).value();
}

TEST(BufferPoolTest, TryAcquireFailsWhenDryAndSucceedsAfterARelease) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 512, 2);
  auto a = pool->try_acquire();
  auto b = pool->try_acquire();
  ASSERT_TRUE(a);
  ASSERT_TRUE(b);
  EXPECT_NE(a.data(), b.data());
  EXPECT_EQ(a.size(), 512u);
  EXPECT_FALSE(pool->try_acquire());
  EXPECT_EQ(pool->acquire().error(), make_error_code(errc::pool_exhausted));
  EXPECT_EQ(pool->available(), 0u);
  a.reset();
  EXPECT_EQ(pool->available(), 1u);
  EXPECT_TRUE(pool->try_acquire());
}

TEST(BufferPoolTest, BuffersDoNotOverlap) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 100, 8);
  std::vector<pooled_buffer> all;
  for (int i = 0; i < 8; ++i) {
    all.push_back(pool->try_acquire());
    std::memset(all.back().data(), i, all.back().size());
  }
  for (int i = 0; i < 8; ++i) {
    for (std::size_t j = 0; j < 100; ++j) ASSERT_EQ(static_cast<int>(all[i].data()[j]), i);
  }
}

TEST(BufferPoolTest, WaitersAreServedInOrderWhenBuffersComeBack) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 64, 1);
  auto held = pool->try_acquire();
  std::vector<int> order;
  std::vector<pooled_buffer> got;
  for (int i = 0; i < 3; ++i) {
    pool->async_acquire([&, i](error_code ec, pooled_buffer b) {
      EXPECT_FALSE(ec);
      order.push_back(i);
      got.push_back(std::move(b));
    });
  }
  ctx.poll();
  EXPECT_TRUE(order.empty());
  EXPECT_EQ(pool->waiting(), 3u);
  held.reset();
  ASSERT_TRUE(run_until(ctx, [&] { return order.size() == 1; }));
  got.clear();
  ASSERT_TRUE(run_until(ctx, [&] { return order.size() == 2; }));
  got.clear();
  ASSERT_TRUE(run_until(ctx, [&] { return order.size() == 3; }));
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
  got.clear();
  EXPECT_EQ(pool->available(), 1u);
}

TEST(BufferPoolTest, CancelAbortsWaiters) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 64, 1);
  auto held = pool->try_acquire();
  error_code got;
  bool done = false;
  pool->async_acquire([&](error_code ec, pooled_buffer b) {
    got = ec;
    done = !b;
  });
  pool->cancel();
  ASSERT_TRUE(run_until(ctx, [&] { return done; }));
  EXPECT_EQ(got, boost::asio::error::operation_aborted);
  EXPECT_EQ(pool->waiting(), 0u);
}

TEST(BufferPoolTest, ManyThreadsNeverShareABuffer) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, sizeof(int), 4);
  std::atomic<int> failures{0};
  std::vector<std::jthread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50000; ++i) {
        auto b = pool->try_acquire();
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
  EXPECT_EQ(pool->available(), 4u);
}

// Waiters on one thread, releasers on others: every waiter gets a buffer, none
// is lost (run under ThreadSanitizer for the handoff's memory ordering).
TEST(BufferPoolTest, WaitersAndReleasersOnManyThreadsLoseNothing) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 64, 2);
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
    pool->async_acquire([&](error_code ec, pooled_buffer b) {
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
  ASSERT_TRUE(run_until(
      ctx, [&] { return served.load() >= rounds; }, std::chrono::seconds(30)));
  releaser.request_stop();
  releaser.join();
  pool->cancel();  // a waiter still queued completes aborted
  ctx.restart();
  ctx.run_for(std::chrono::milliseconds(20));
  held.clear();
  EXPECT_EQ(pool->in_use(), 0u);
}

// ---------------------------------------------------------------- bulk acquire and release

/// The distinct data pointers of the non-empty buffers in `buffers`.
std::set<std::byte*> data_of(std::span<const pooled_buffer> buffers) {
  std::set<std::byte*> out;
  for (const auto& b : buffers) {
    if (b) out.insert(b.data());
  }
  return out;
}

TEST(BufferPoolTest, BulkAcquireFillsAsManyAsAreFreeFromTheFront) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 100, 8);
  auto a = pool->try_acquire();
  auto b = pool->try_acquire();
  auto c = pool->try_acquire();
  ASSERT_TRUE(a && b && c);
  // Five free, ten asked for: the first five are filled, the rest stay empty.
  std::vector<pooled_buffer> bulk(10);
  EXPECT_EQ(pool->try_acquire(bulk), 5u);
  for (std::size_t i = 0; i < bulk.size(); ++i) EXPECT_EQ(static_cast<bool>(bulk[i]), i < 5) << i;
  EXPECT_EQ(pool->in_use(), 8u);
  EXPECT_EQ(pool->available(), 0u);
  // Eight distinct buffers that do not overlap.
  std::vector<pooled_buffer*> all = {&a, &b, &c};
  for (std::size_t i = 0; i < 5; ++i) all.push_back(&bulk[i]);
  std::set<std::byte*> distinct;
  for (std::size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(all[i]->size(), 100u);
    distinct.insert(all[i]->data());
    std::memset(all[i]->data(), static_cast<int>(i), all[i]->size());
  }
  EXPECT_EQ(distinct.size(), 8u);
  for (std::size_t i = 0; i < all.size(); ++i) {
    for (std::size_t j = 0; j < 100; ++j) ASSERT_EQ(static_cast<std::size_t>(all[i]->data()[j]), i);
  }
  // Dry: nothing taken, the elements stay empty.
  std::vector<pooled_buffer> more(4);
  EXPECT_EQ(pool->try_acquire(more), 0u);
  EXPECT_TRUE(data_of(more).empty());
  EXPECT_FALSE(pool->try_acquire());
  // An empty span takes nothing, even from a pool with buffers free.
  a.reset();
  EXPECT_EQ(pool->try_acquire(std::span<pooled_buffer>{}), 0u);
  EXPECT_EQ(pool->in_use(), 7u);
}

TEST(BufferPoolTest, BulkAcquireOnADryPoolReturnsZero) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 64, 2);
  std::vector<pooled_buffer> first(2);
  ASSERT_EQ(pool->try_acquire(first), 2u);
  std::vector<pooled_buffer> second(3);
  EXPECT_EQ(pool->try_acquire(second), 0u);
  EXPECT_TRUE(data_of(second).empty());
  EXPECT_EQ(pool->in_use(), 2u);
  // An empty pool (no buffers at all) is dry from the start.
  auto none = make_pool(ctx, 64, 0);
  EXPECT_EQ(none->try_acquire(second), 0u);
  EXPECT_EQ(none->in_use(), 0u);
}

// Bulk acquire takes up to 64 indices per step: more than that comes in several
// steps, still distinct, and stops at the pool's end.
TEST(BufferPoolTest, BulkAcquireLargerThanOneStepTakesEveryBufferOnce) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 16, 200);
  std::vector<pooled_buffer> first(150);
  EXPECT_EQ(pool->try_acquire(first), 150u);
  std::vector<pooled_buffer> second(100);
  EXPECT_EQ(pool->try_acquire(second), 50u);
  EXPECT_EQ(pool->in_use(), 200u);
  auto distinct = data_of(first);
  const auto rest = data_of(second);
  distinct.insert(rest.begin(), rest.end());
  EXPECT_EQ(distinct.size(), 200u);
  pool->release(first);
  pool->release(second);
  EXPECT_EQ(pool->in_use(), 0u);
  std::vector<pooled_buffer> all(201);
  EXPECT_EQ(pool->try_acquire(all), 200u);
  EXPECT_EQ(data_of(all).size(), 200u);
}

TEST(BufferPoolTest, BulkReleaseGivesEveryBufferBackAndLeavesTheSpanEmpty) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 64, 6);
  auto other = make_pool(ctx, 64, 2);
  std::vector<pooled_buffer> taken(6);
  ASSERT_EQ(pool->try_acquire(taken), 6u);
  const auto before = data_of(taken);
  // Mixed: this pool's buffers (not in the order they were taken), empty
  // elements and another pool's buffers.
  std::vector<pooled_buffer> mixed;
  mixed.push_back(std::move(taken[3]));
  mixed.emplace_back();
  mixed.push_back(other->try_acquire());
  mixed.push_back(std::move(taken[0]));
  mixed.push_back(std::move(taken[2]));
  mixed.emplace_back();
  mixed.push_back(other->try_acquire());
  mixed.push_back(std::move(taken[1]));
  EXPECT_EQ(other->in_use(), 2u);
  pool->release(mixed);
  for (const auto& b : mixed) {
    EXPECT_FALSE(b);
    EXPECT_EQ(b.data(), nullptr);
    EXPECT_EQ(b.size(), 0u);
  }
  EXPECT_EQ(pool->in_use(), 2u);   // taken[4] and taken[5] are still out
  EXPECT_EQ(other->in_use(), 0u);  // the other pool's went back to it
  pool->release(taken);            // moved-from elements are skipped
  EXPECT_EQ(pool->in_use(), 0u);
  EXPECT_TRUE(data_of(taken).empty());
  // Every buffer is free again, once: a bulk acquire of the capacity gets them all.
  std::vector<pooled_buffer> again(7);
  EXPECT_EQ(pool->try_acquire(again), 6u);
  EXPECT_EQ(data_of(again), before);
  EXPECT_FALSE(pool->try_acquire());
  // Releasing only empty elements, or nothing, changes nothing.
  std::vector<pooled_buffer> empties(3);
  pool->release(empties);
  pool->release(std::span<pooled_buffer>{});
  EXPECT_EQ(pool->in_use(), 6u);
  // Single acquire after a bulk release walks the released chain: six distinct buffers.
  pool->release(again);
  std::set<std::byte*> singles;
  std::vector<pooled_buffer> held;
  for (int i = 0; i < 7; ++i) {  // bounded: a broken free list may loop
    auto b = pool->try_acquire();
    if (!b) break;
    singles.insert(b.data());
    held.push_back(std::move(b));
  }
  EXPECT_EQ(held.size(), 6u);
  EXPECT_EQ(singles, before);
}

TEST(BufferPoolTest, BulkReleaseServesWaitersInOrder) {
  boost::asio::io_context ctx;
  auto pool = make_pool(ctx, 64, 3);
  std::vector<pooled_buffer> taken(3);
  ASSERT_EQ(pool->try_acquire(taken), 3u);
  std::vector<int> order;
  std::vector<pooled_buffer> got;
  for (int i = 0; i < 4; ++i) {
    pool->async_acquire([&, i](error_code ec, pooled_buffer b) {
      EXPECT_FALSE(ec);
      EXPECT_TRUE(b);
      order.push_back(i);
      got.push_back(std::move(b));
    });
  }
  ctx.poll();
  EXPECT_TRUE(order.empty());
  EXPECT_EQ(pool->waiting(), 4u);
  // Three back at once: the first three waiters, in order; the fourth still waits.
  pool->release(taken);
  ASSERT_TRUE(run_until(ctx, [&] { return order.size() == 3; }));
  ctx.poll();
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(pool->waiting(), 1u);
  EXPECT_EQ(pool->in_use(), 3u);
  // One more back in bulk (with an empty element beside it): the fourth is served.
  std::vector<pooled_buffer> one;
  one.emplace_back();
  one.push_back(std::move(got[1]));
  pool->release(one);
  ASSERT_TRUE(run_until(ctx, [&] { return order.size() == 4; }));
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(pool->waiting(), 0u);
  pool->release(got);
  EXPECT_EQ(pool->in_use(), 0u);
}

// Four threads mix bulk and single acquire and release on a small pool: a
// buffer is never held by two at once (each writes its id into what it holds
// and checks it is still there), and the free list ends whole. Run under
// ThreadSanitizer too.
TEST(BufferPoolTest, BulkAndSingleAcquireAndReleaseOnManyThreadsNeverShareABuffer) {
  boost::asio::io_context ctx;
  constexpr std::uint32_t capacity = 8;
  auto pool = make_pool(ctx, sizeof(int), capacity);
  std::atomic<int> failures{0};
  std::atomic<int> overfilled{0};
  {
    std::vector<std::jthread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        std::array<pooled_buffer, 5> held;
        for (int i = 0; i < 20000; ++i) {
          const auto want = static_cast<std::size_t>(1 + (i + t) % 5);
          std::size_t got = 0;
          if (i % 3 == 0) {
            // One at a time.
            for (; got < want; ++got) {
              held[got] = pool->try_acquire();
              if (!held[got]) break;
            }
          } else {
            got = pool->try_acquire(std::span(held).first(want));
          }
          if (got > want) ++overfilled;
          for (std::size_t k = 0; k < got; ++k) std::memcpy(held[k].data(), &t, sizeof t);
          std::this_thread::yield();  // give another thread the chance to get the same buffer
          for (std::size_t k = 0; k < got; ++k) {
            int back = -1;
            std::memcpy(&back, held[k].data(), sizeof back);
            if (back != t) ++failures;
          }
          if (i % 2 == 0) {
            pool->release(held);
          } else {
            for (auto& b : held) b.reset();
          }
        }
      });
    }
  }
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(overfilled.load(), 0);
  EXPECT_EQ(pool->in_use(), 0u);
  // The free list is whole: every buffer once, no more.
  std::vector<pooled_buffer> all(capacity + 1);
  EXPECT_EQ(pool->try_acquire(all), capacity);
  EXPECT_EQ(data_of(all).size(), capacity);
}

TEST(BufferPoolTest, CreateRefusesBadArgumentsWithAnErrorNotAnException) {
  boost::asio::io_context ctx;
  constexpr std::size_t huge = std::numeric_limits<std::size_t>::max();
  const std::vector<std::pair<std::size_t, std::uint32_t>> bad = {
      {0, 4},                                 // buffers of no bytes
      {huge, 1},                              // one buffer, rounded up past SIZE_MAX
      {huge / 2, 4},                          // the slab overflows
      {huge / 0xffffffffu + 1, 0xffffffffu},  // the most buffers, each a little too large
  };
  for (const auto& [size, count] : bad) {
    result<std::unique_ptr<buffer_pool>> r = make_error_code(errc::remote_error);
    EXPECT_NO_THROW(r = buffer_pool::create(ctx.get_executor(), size, count))
        << size << " x " << count;
    ASSERT_FALSE(r) << size << " x " << count;
    EXPECT_EQ(r.error(), boost::system::errc::invalid_argument) << size << " x " << count;
  }
  // Zero buffers is a valid pool, dry from the start.
  auto none = buffer_pool::create(ctx.get_executor(), 64, 0);
  ASSERT_TRUE(none);
  EXPECT_EQ((*none)->capacity(), 0u);
  EXPECT_FALSE((*none)->try_acquire());
}

// A waiter the context never completed goes with the context, as Asio's own
// operations do, even one that owns the pool it waits on.
boost::asio::awaitable<void> acquire_owning(std::unique_ptr<buffer_pool> pool,
                                            std::shared_ptr<int> marker) {
  co_await pool->async_acquire(boost::asio::as_tuple(boost::asio::use_awaitable));
  (void)marker;
}

TEST(BufferPoolLifetimeTest, AWaiterThatOwnsItsPoolGoesWithTheContext) {
  std::weak_ptr<int> alive;
  {
    boost::asio::io_context ctx;
    auto marker = std::make_shared<int>(1);
    alive = marker;
    boost::asio::co_spawn(ctx, acquire_owning(make_pool(ctx, 64, 0), std::move(marker)),
                          boost::asio::detached);
    ctx.poll();  // the wait starts: a pool of no buffers is always dry
    EXPECT_FALSE(alive.expired());
  }
  EXPECT_TRUE(alive.expired()) << "the coroutine (and the pool it owns) outlived its context";
}

}  // namespace
}  // namespace uipc
