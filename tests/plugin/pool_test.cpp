// Pools: alignment, reuse, growth in place, the old block kept on a failed
// reallocation, foreign and double frees, sub-pools and cleanups in order,
// the limit over sub-pools, memory flat across requests, the cache shared by
// threads — and the same through the C ABI of a context.
#include "uipc/plugin/pool.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <set>
#include <thread>

#include "plugin_support.hpp"

namespace uipc::plugin {
namespace {

void* must_allocate(pool& p, std::size_t n) {
  void* b = nullptr;
  EXPECT_EQ(p.allocate(n, &b), UIPC_PLUGIN_OK) << n;
  return b;
}

TEST(Pool, BlocksAreAlignedDistinctAndWritable) {
  pool_cache cache;
  pool p(cache);
  std::vector<std::pair<unsigned char*, std::size_t>> blocks;
  for (std::size_t n : {0, 1, 15, 16, 17, 511, 1024, 1025, 4000, 16384, 16385, 70000, 300000}) {
    auto* b = static_cast<unsigned char*>(must_allocate(p, n));
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b) % 16, 0u) << n;
    std::memset(b, static_cast<int>(n & 0xff), n);
    blocks.emplace_back(b, n);
  }
  for (auto& [b, n] : blocks)
    for (std::size_t i = 0; i < n; ++i) ASSERT_EQ(b[i], static_cast<unsigned char>(n & 0xff)) << n;
  std::set<unsigned char*> distinct;
  for (auto& [b, n] : blocks) distinct.insert(b);
  EXPECT_EQ(distinct.size(), blocks.size());
}

TEST(Pool, AFreedBlockIsReusedByItsSizeClass) {
  pool_cache cache;
  pool p(cache);
  void* a = must_allocate(p, 100);
  void* keep = must_allocate(p, 100);  // a is no longer the last carved
  ASSERT_EQ(p.free(a), UIPC_PLUGIN_OK);
  EXPECT_EQ(must_allocate(p, 112), a);  // same class (112)
  (void)keep;
}

TEST(Pool, ReallocationKeepsContentsGrowingAndShrinking) {
  pool_cache cache;
  pool p(cache);
  void* b = nullptr;
  ASSERT_EQ(p.reallocate(nullptr, 1, &b), UIPC_PLUGIN_OK);
  std::string expect;
  for (std::size_t size : {1, 100, 1000, 8000, 20000, 65536, 200000, 50, 300000}) {
    void* grown = nullptr;
    ASSERT_EQ(p.reallocate(b, size, &grown), UIPC_PLUGIN_OK) << size;
    const std::size_t kept = std::min(expect.size(), size);
    ASSERT_EQ(std::memcmp(grown, expect.data(), kept), 0) << size;
    expect.resize(size);
    for (std::size_t i = 0; i < size; ++i) expect[i] = static_cast<char>((i * 7 + size) & 0xff);
    std::memcpy(grown, expect.data(), size);
    b = grown;
  }
}

TEST(Pool, TheLastBlockGrowsInPlace) {
  pool_cache cache;
  pool p(cache);
  void* b = must_allocate(p, 16);
  void* grown = nullptr;
  ASSERT_EQ(p.reallocate(b, 4000, &grown), UIPC_PLUGIN_OK);
  EXPECT_EQ(grown, b);
}

TEST(Pool, AFailedReallocationLeavesTheOldBlockIntact) {
  pool_cache cache;
  pool p(cache, 4096);
  void* b = must_allocate(p, 1000);
  std::memset(b, 0x5a, 1000);
  void* other = must_allocate(p, 16);  // b can no longer grow in place
  (void)other;
  void* grown = reinterpret_cast<void*>(1);
  EXPECT_EQ(p.reallocate(b, 8000, &grown), UIPC_PLUGIN_E_MEMORY_LIMIT);
  EXPECT_EQ(grown, reinterpret_cast<void*>(1));  // untouched
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(static_cast<unsigned char*>(b)[i], 0x5a);
  EXPECT_EQ(p.free(b), UIPC_PLUGIN_OK);  // still ours, still live
}

TEST(Pool, ARefusedAllocationLeavesThePoolAsItWas) {
  // The first chunk nearly full, the limit nearly reached: a block that needs
  // a new chunk is refused by the limit, and must not have switched chunks
  // first (which abandoned the room left, where the last block grows).
  pool_cache cache;
  pool p(cache, 64 << 10);
  for (int i = 0; i < 3; ++i) must_allocate(p, 16 << 10);
  void* last = must_allocate(p, 1000);  // carved last: grows in place
  const std::size_t reserved = p.bytes_reserved();
  const std::size_t in_use = p.bytes_in_use();
  const std::size_t held = cache.bytes_held();
  void* refused = nullptr;
  EXPECT_EQ(p.allocate(16 << 10, &refused), UIPC_PLUGIN_E_MEMORY_LIMIT);
  EXPECT_EQ(p.reallocate(last, 16 << 10, &refused), UIPC_PLUGIN_E_MEMORY_LIMIT);
  EXPECT_EQ(refused, nullptr);
  EXPECT_EQ(p.bytes_reserved(), reserved);
  EXPECT_EQ(p.bytes_in_use(), in_use);
  EXPECT_EQ(cache.bytes_held(), held);
  void* grown = nullptr;
  ASSERT_EQ(p.reallocate(last, 2000, &grown), UIPC_PLUGIN_OK);
  EXPECT_EQ(grown, last) << "the last block no longer grows in place";
  EXPECT_EQ(p.bytes_reserved(), reserved);
}

TEST(Pool, ForeignAndDoubleFreesAreRefusedAndChangeNothing) {
  pool_cache cache;
  pool a(cache), b(cache);
  void* x = must_allocate(a, 64);
  void* big = must_allocate(a, 100000);
  void* moved = nullptr;
  EXPECT_EQ(b.free(x), UIPC_PLUGIN_E_WRONG_CONTEXT);
  EXPECT_EQ(b.reallocate(x, 128, &moved), UIPC_PLUGIN_E_WRONG_CONTEXT);
  EXPECT_EQ(b.free(big), UIPC_PLUGIN_E_WRONG_CONTEXT);
  const std::size_t before = a.bytes_in_use();
  EXPECT_EQ(b.free(x), UIPC_PLUGIN_E_WRONG_CONTEXT);
  EXPECT_EQ(a.bytes_in_use(), before);
  void* y = must_allocate(a, 64);  // x is not the last carved any more
  EXPECT_EQ(a.free(x), UIPC_PLUGIN_OK);
  EXPECT_EQ(a.free(x), UIPC_PLUGIN_E_DOUBLE_FREE);
  EXPECT_EQ(a.reallocate(x, 10, &moved), UIPC_PLUGIN_E_DOUBLE_FREE);
  EXPECT_EQ(a.free(y), UIPC_PLUGIN_OK);
  EXPECT_EQ(a.free(y), UIPC_PLUGIN_E_DOUBLE_FREE);  // freed as the last carved block
  EXPECT_EQ(a.free(nullptr), UIPC_PLUGIN_E_INVALID_ARGUMENT);
}

TEST(Pool, TheLimitCountsSubPoolsAndFreesGiveBack) {
  pool_cache cache;
  pool root(cache, 10000);
  pool* sub = nullptr;
  ASSERT_EQ(root.create_sub(&sub), UIPC_PLUGIN_OK);
  void* a = must_allocate(*sub, 6000);
  void* b = nullptr;
  EXPECT_EQ(root.allocate(6000, &b), UIPC_PLUGIN_E_MEMORY_LIMIT);
  EXPECT_EQ(sub->allocate(6000, &b), UIPC_PLUGIN_E_MEMORY_LIMIT);
  ASSERT_EQ(sub->free(a), UIPC_PLUGIN_OK);
  EXPECT_EQ(root.allocate(6000, &b), UIPC_PLUGIN_OK);
  EXPECT_GE(root.peak(), 6000u);
  EXPECT_EQ(root.destroy_sub(sub), UIPC_PLUGIN_OK);
  EXPECT_EQ(root.destroy_sub(sub), UIPC_PLUGIN_E_INVALID_ARGUMENT);
}

TEST(Pool, ReleaseRunsSubPoolsThenCleanupsNewestFirst) {
  pool_cache cache;
  std::vector<std::string> order;
  auto record = [](void* data) {
    auto* entry = static_cast<std::pair<std::vector<std::string>*, std::string>*>(data);
    entry->first->push_back(entry->second);
  };
  std::pair<std::vector<std::string>*, std::string> r1{&order, "root 1"}, r2{&order, "root 2"},
      s1{&order, "sub 1"}, s2{&order, "sub 2"}, g{&order, "grandchild"};
  {
    pool root(cache);
    pool *sub1 = nullptr, *sub2 = nullptr, *grand = nullptr;
    root.add_cleanup(record, &r1);
    ASSERT_EQ(root.create_sub(&sub1), UIPC_PLUGIN_OK);
    ASSERT_EQ(root.create_sub(&sub2), UIPC_PLUGIN_OK);
    ASSERT_EQ(sub1->create_sub(&grand), UIPC_PLUGIN_OK);
    sub1->add_cleanup(record, &s1);
    sub2->add_cleanup(record, &s2);
    grand->add_cleanup(record, &g);
    root.add_cleanup(record, &r2);
    EXPECT_EQ(root.add_cleanup(nullptr, nullptr), UIPC_PLUGIN_E_INVALID_ARGUMENT);
  }
  EXPECT_EQ(order, (std::vector<std::string>{"sub 2", "grandchild", "sub 1", "root 2", "root 1"}));
}

// One request's memory traffic, as the benchmark makes it.
void request(pool& p, std::mt19937& random) {
  std::uniform_int_distribution<std::size_t> size(16, 512);
  for (int i = 0; i < 300; ++i) {
    void* b = must_allocate(p, size(random));
    if (i % 4 == 0) {
      ASSERT_EQ(p.free(b), UIPC_PLUGIN_OK);
    }
  }
  void* buffer = nullptr;
  for (std::size_t n : {1, 1024, 8192, 65536})
    ASSERT_EQ(p.reallocate(buffer, n, &buffer), UIPC_PLUGIN_OK);
  p.release();
}

TEST(Pool, MemoryStaysFlatAcrossRequests) {
  pool_cache cache;
  pool p(cache);
  std::mt19937 random(7);
  for (int i = 0; i < 100; ++i) request(p, random);
  const std::size_t held = cache.bytes_held();
  for (int i = 0; i < 10000; ++i) request(p, random);
  EXPECT_EQ(cache.bytes_held(), held);  // not a byte more from the system
  EXPECT_LE(held, std::size_t{8} * pool_cache::chunk_size);
  EXPECT_EQ(p.bytes_in_use(), 0u);
  EXPECT_EQ(p.bytes_reserved(), pool_cache::chunk_size) << "one chunk kept for the next request";
  const std::size_t cached = cache.bytes_cached();
  p.trim();
  EXPECT_EQ(p.bytes_reserved(), 0u);
  EXPECT_EQ(cache.bytes_cached(), cached + pool_cache::chunk_size);
}

TEST(Pool, TheCacheServesThreadsAtOnce) {
  pool_cache cache(std::size_t{1} << 20);  // small: chunks also go back to the system
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&cache, t] {
      pool p(cache);
      std::mt19937 random(t);
      for (int i = 0; i < 500; ++i) request(p, random);
    });
  for (auto& t : threads) t.join();
  EXPECT_LE(cache.bytes_cached(), std::size_t{1} << 20);
  EXPECT_EQ(cache.bytes_held(), cache.bytes_cached());  // every pool gave everything back
}

TEST(Pool, ThroughAContextsCAbi) {
  test::logged_host h;
  auto ctx = h.h->new_context().value();
  const auto& api = host::api();
  uipc_plugin_pool* root = api.context_pool(ctx.get());
  void* b = nullptr;
  ASSERT_EQ(api.pool_alloc(root, 100, &b), UIPC_PLUGIN_OK);
  ASSERT_EQ(api.pool_realloc(root, b, 5000, &b), UIPC_PLUGIN_OK);
  uipc_plugin_pool* sub = nullptr;
  ASSERT_EQ(api.pool_create_sub(root, &sub), UIPC_PLUGIN_OK);
  void* s = nullptr;
  ASSERT_EQ(api.pool_alloc(sub, 10, &s), UIPC_PLUGIN_OK);
  EXPECT_EQ(api.pool_free(root, s), UIPC_PLUGIN_E_WRONG_CONTEXT);
  auto other = h.h->new_context().value();
  EXPECT_EQ(api.pool_free(api.context_pool(other.get()), b), UIPC_PLUGIN_E_WRONG_CONTEXT);
  EXPECT_EQ(api.pool_destroy_sub(root), UIPC_PLUGIN_E_INVALID_ARGUMENT);  // the context's own pool
  EXPECT_EQ(api.pool_destroy_sub(sub), UIPC_PLUGIN_OK);
  EXPECT_EQ(api.pool_free(root, b), UIPC_PLUGIN_OK);
  EXPECT_EQ(api.pool_free(root, b), UIPC_PLUGIN_E_DOUBLE_FREE);
}

TEST(Pool, TheRequestLimitOfTheHostApplies) {
  host_options options;
  options.request_memory_limit = 64 << 10;
  test::logged_host h(options);
  auto ctx = h.h->new_context().value();
  void* b = nullptr;
  EXPECT_EQ(ctx.memory().allocate(100 << 10, &b), UIPC_PLUGIN_E_MEMORY_LIMIT);
  EXPECT_EQ(ctx.memory().allocate(10 << 10, &b), UIPC_PLUGIN_OK);
}

}  // namespace
}  // namespace uipc::plugin
