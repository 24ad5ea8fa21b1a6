// The private allocator of a shared region's offsets (caps arenas, the handle
// daemon's scratch area).
#include "uipc/core/range_allocator.hpp"

#include <gtest/gtest.h>

#include <random>
#include <set>

namespace uipc {
namespace {

TEST(RangeAllocator, AllocatesFreesAndCoalesces) {
  range_allocator a(64 * 10, 64);
  auto x = a.allocate(1);
  auto y = a.allocate(100);  // two blocks
  auto z = a.allocate(64);
  ASSERT_TRUE(x && y && z);
  EXPECT_EQ(*x, 0u);
  EXPECT_EQ(*y, 64u);
  EXPECT_EQ(*z, 192u);
  EXPECT_EQ(a.in_use(), 256u);
  EXPECT_EQ(a.blocks(), 3u);
  EXPECT_EQ(a.block_size(*y), 128u);
  EXPECT_FALSE(a.block_size(*y + 64)) << "inside a block, not its start";
  EXPECT_FALSE(a.allocate(64 * 7));
  EXPECT_TRUE(a.free(*y));
  EXPECT_FALSE(a.free(*y));     // twice
  EXPECT_FALSE(a.free(12345));  // never given
  EXPECT_TRUE(a.free(*x));
  auto w = a.allocate(192);  // the freed neighbours joined
  ASSERT_TRUE(w);
  EXPECT_EQ(*w, 0u);
  EXPECT_TRUE(a.free(*w));
  EXPECT_TRUE(a.free(*z));
  EXPECT_EQ(a.in_use(), 0u);
  EXPECT_EQ(a.free_ranges(), 1u) << "everything coalesced again";
  auto all = a.allocate(64 * 10);
  ASSERT_TRUE(all);
  EXPECT_FALSE(a.allocate(0));
}

TEST(RangeAllocator, RandomUseNeverOverlapsAndGivesEverythingBack) {
  range_allocator a(1 << 16, 64);
  std::mt19937 random(7);
  std::map<std::uint64_t, std::size_t> live;
  for (int i = 0; i < 20000; ++i) {
    if (live.empty() || random() % 2 == 0) {
      const std::size_t n = random() % 3000;
      if (auto off = a.allocate(n)) {
        auto next = live.lower_bound(*off);
        if (next != live.end()) {
          ASSERT_LE(*off + std::max<std::size_t>(n, 1), next->first);
        }
        if (next != live.begin()) {
          ASSERT_LE(std::prev(next)->first + std::prev(next)->second, *off);
        }
        ASSERT_LE(*off + n, a.size());
        live.emplace(*off, std::max<std::size_t>(n, 1));
      }
    } else {
      auto it = live.begin();
      std::advance(it, random() % live.size());
      ASSERT_TRUE(a.free(it->first));
      live.erase(it);
    }
  }
  for (const auto& [off, n] : live) ASSERT_TRUE(a.free(off));
  EXPECT_EQ(a.in_use(), 0u);
  EXPECT_EQ(a.free_ranges(), 1u);
  EXPECT_TRUE(a.allocate(a.size()));
}

TEST(RangeAllocator, TheSizeIsRoundedDownToTheAlignment) {
  range_allocator a(100, 16);
  EXPECT_EQ(a.size(), 96u);
  auto x = a.allocate(17);
  ASSERT_TRUE(x);
  EXPECT_EQ(*a.block_size(*x), 32u);
  EXPECT_FALSE(a.allocate(97));
  auto y = a.allocate(64);
  ASSERT_TRUE(y);
  EXPECT_EQ(*y, 32u);
  EXPECT_FALSE(a.allocate(1)) << "full";
}

}  // namespace
}  // namespace uipc
