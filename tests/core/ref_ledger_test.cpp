// ref_ptr counting and the per-holder ledger.
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "uipc/core/error.hpp"
#include "uipc/core/ledger.hpp"
#include "uipc/core/ref.hpp"

namespace uipc {
namespace {

struct tracked : ref_counted<tracked> {
  explicit tracked(int* destroyed) : destroyed_(destroyed) {}
  ~tracked() { ++*destroyed_; }
  int* destroyed_;
};

TEST(RefTest, LastReferenceDestroysTheObjectOnce) {
  int destroyed = 0;
  {
    ref_ptr<tracked> a = make_ref<tracked>(&destroyed);
    ref_ptr<tracked> b = a;
    EXPECT_EQ(use_count(a), 2u);
    a.reset();
    EXPECT_EQ(destroyed, 0);
    EXPECT_EQ(use_count(b), 1u);
  }
  EXPECT_EQ(destroyed, 1);
}

TEST(RefTest, CopiesOnManyThreadsBalance) {
  int destroyed = 0;
  auto shared = make_ref<tracked>(&destroyed);
  std::vector<std::jthread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([shared] {
      for (int i = 0; i < 100000; ++i) {
        ref_ptr<tracked> copy = shared;
        (void)copy;
      }
    });
  }
  threads.clear();
  EXPECT_EQ(use_count(shared), 1u);
  shared.reset();
  EXPECT_EQ(destroyed, 1);
}

TEST(CoreErrorTest, CodesHaveMessagesAndPortableConditions) {
  EXPECT_EQ(make_error_code(errc::bad_frame).category().name(), std::string("uipc.core"));
  EXPECT_EQ(make_error_code(errc::bad_frame).message(), "frame is not a valid envelope");
  EXPECT_TRUE(make_error_code(errc::timed_out) == boost::system::errc::timed_out);
  EXPECT_TRUE(make_error_code(errc::peer_closed) == boost::system::errc::connection_reset);
  EXPECT_FALSE(make_error_code(errc::shutting_down) == boost::system::errc::operation_canceled);
}

TEST(LedgerTest, CountsPerHolderAndPerObject) {
  ledger<int, std::string> l;
  EXPECT_EQ(l.acquire(1, "a"), 1u);
  EXPECT_EQ(l.acquire(1, "a"), 2u);
  EXPECT_EQ(l.acquire(2, "a"), 1u);
  EXPECT_EQ(l.count(1, "a"), 2u);
  EXPECT_EQ(l.count(2, "a"), 1u);
  EXPECT_EQ(l.count(3, "a"), 0u);
  EXPECT_EQ(l.holders(), 2u);
}

TEST(LedgerTest, ReleaseWithoutAReferenceIsNotHeldAndChangesNothing) {
  ledger<int, std::string> l;
  l.acquire(1, "a");
  auto r = l.release(1, "b");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), make_error_code(errc::not_held));
  EXPECT_EQ(l.release(2, "a").error(), make_error_code(errc::not_held));
  EXPECT_EQ(l.count(1, "a"), 1u);
  EXPECT_EQ(*l.release(1, "a"), 0u);
  EXPECT_EQ(l.release(1, "a").error(), make_error_code(errc::not_held)) << "count already zero";
  EXPECT_EQ(l.holders(), 0u);
}

TEST(LedgerTest, ReleaseAllReturnsEverythingExactlyOnce) {
  ledger<int, std::string> l;
  l.acquire(1, "a");
  l.acquire(1, "a");
  l.acquire(1, "b");
  l.acquire(2, "a");
  auto all = l.release_all(1);
  ASSERT_EQ(all.size(), 2u);
  std::uint32_t total = 0;
  for (auto& [key, n] : all) total += n;
  EXPECT_EQ(total, 3u);
  EXPECT_TRUE(l.release_all(1).empty()) << "second release of the same holder";
  EXPECT_EQ(l.count(2, "a"), 1u) << "other holders untouched";
}

TEST(LedgerTest, RefKeysKeepObjectsAliveUntilTheLastHolderGoes) {
  int destroyed = 0;
  ledger<int, ref_ptr<tracked>, ref_hash> l;
  {
    auto obj = make_ref<tracked>(&destroyed);
    l.acquire(1, obj);
    l.acquire(2, obj);
  }
  EXPECT_EQ(destroyed, 0);
  l.release_all(1);
  EXPECT_EQ(destroyed, 0);
  l.release_all(2);
  EXPECT_EQ(destroyed, 1);
}

TEST(LedgerTest, ConcurrentHoldersNeverLoseACount) {
  ledger<int, int> l;
  std::vector<std::jthread> threads;
  for (int holder = 0; holder < 4; ++holder) {
    threads.emplace_back([&l, holder] {
      for (int i = 0; i < 10000; ++i) l.acquire(holder, i % 10);
      for (int i = 0; i < 5000; ++i) (void)l.release(holder, i % 10);
    });
  }
  threads.clear();
  for (int holder = 0; holder < 4; ++holder) {
    std::uint32_t total = 0;
    for (auto& [key, n] : l.release_all(holder)) total += n;
    EXPECT_EQ(total, 5000u);
  }
  EXPECT_EQ(l.holders(), 0u);
}

}  // namespace
}  // namespace uipc
