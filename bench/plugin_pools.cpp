// bench_plugin, pools: one request's memory traffic — 300 allocations of
// 16–512 bytes (every 4th freed again where the allocator can free), then a
// buffer grown by reallocation from 1 byte to 1, 8 and 64 KiB, then the end of
// the request — through the host's pool (as a plug-in calls it, through the C
// ABI), against the same traffic with no allocator at all (the floor), APR
// pools, glibc malloc and a mimalloc heap per request. Each block is written
// whole, so every variant moves the same memory.
#include <benchmark/benchmark.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <random>

#include "uipc/plugin/host.hpp"

#ifdef UIPC_BENCH_APR
#include <apr_pools.h>
#endif
#ifdef UIPC_BENCH_MIMALLOC
#include <mimalloc.h>
#endif

namespace {

constexpr int allocations = 300;
constexpr std::array<std::size_t, 4> growth{1, 1024, 8192, 65536};

// The sizes of one request, the same for every variant and every iteration.
const std::array<std::size_t, allocations>& sizes() {
  static const auto table = [] {
    std::array<std::size_t, allocations> t{};
    std::mt19937 random(12345);
    std::uniform_int_distribution<std::size_t> d(16, 512);
    for (auto& s : t) s = d(random);
    return t;
  }();
  return table;
}

// A request with an allocator given as three functions.
template <class Alloc, class Realloc, class Free>
void one_request(Alloc&& alloc, Realloc&& grow, Free&& release_block) {
  const auto& s = sizes();
  for (int i = 0; i < allocations; ++i) {
    void* b = alloc(s[i]);
    std::memset(b, i, s[i]);
    benchmark::DoNotOptimize(b);
    if (i % 4 == 0) release_block(b);
  }
  void* buffer = nullptr;
  std::size_t had = 0;
  for (std::size_t n : growth) {
    buffer = grow(buffer, had, n);
    std::memset(static_cast<char*>(buffer) + had, 1, n - had);
    had = n;
  }
  benchmark::DoNotOptimize(buffer);
}

void BM_BumpFloor(benchmark::State& state) {
  // No allocator: a pointer bumped through a buffer; growing copies as a realloc would.
  static thread_local std::vector<char> arena(std::size_t{1} << 20);
  for (auto _ : state) {
    std::size_t top = 0;
    auto bump = [&](std::size_t n) {
      void* b = arena.data() + top;
      top += (n + 15) & ~std::size_t{15};
      return b;
    };
    one_request(
        bump,
        [&](void* old, std::size_t had, std::size_t n) {
          void* b = bump(n);
          if (had) std::memcpy(b, old, had);
          return b;
        },
        [](void*) {});
  }
}
BENCHMARK(BM_BumpFloor);
BENCHMARK(BM_BumpFloor)->Threads(2);

// Through the C++ facade of a context, as the host's own code (a server
// answering a request) uses it.
void BM_PoolRequest(benchmark::State& state) {
  static auto h = uipc::plugin::host::create().value();
  auto ctx = h->new_context().value();
  uipc::plugin::pool& p = ctx.memory();
  for (auto _ : state) {
    one_request(
        [&](std::size_t n) {
          void* b = nullptr;
          p.allocate(n, &b);
          return b;
        },
        [&](void* old, std::size_t, std::size_t n) {
          void* b = nullptr;
          p.reallocate(old, n, &b);
          return b;
        },
        [&](void* b) { p.free(b); });
    p.release();  // the request ends
  }
}
BENCHMARK(BM_PoolRequest);
BENCHMARK(BM_PoolRequest)->Threads(2);

// Through the C ABI, as a plug-in calls it.
void BM_PoolRequestAbi(benchmark::State& state) {
  static auto h = uipc::plugin::host::create().value();
  const auto& api = uipc::plugin::host::api();
  auto ctx = h->new_context().value();
  uipc_plugin_pool* p = api.context_pool(ctx.get());
  for (auto _ : state) {
    one_request(
        [&](std::size_t n) {
          void* b = nullptr;
          api.pool_alloc(p, n, &b);
          return b;
        },
        [&](void* old, std::size_t, std::size_t n) {
          void* b = nullptr;
          api.pool_realloc(p, old, n, &b);
          return b;
        },
        [&](void* b) { api.pool_free(p, b); });
    ctx.memory().release();  // the request ends
  }
}
BENCHMARK(BM_PoolRequestAbi);
BENCHMARK(BM_PoolRequestAbi)->Threads(2);

void BM_MallocRequest(benchmark::State& state) {
  std::vector<void*> live;
  live.reserve(allocations);
  for (auto _ : state) {
    one_request(
        [&](std::size_t n) {
          void* b = std::malloc(n);
          live.push_back(b);
          return b;
        },
        [&](void* old, std::size_t, std::size_t n) { return std::realloc(old, n); },
        [&](void* b) {
          live.pop_back();
          std::free(b);
        });
    // The end of the request: everything still live is freed, the buffer too.
    for (void* b : live) std::free(b);
    live.clear();
  }
}
BENCHMARK(BM_MallocRequest);
BENCHMARK(BM_MallocRequest)->Threads(2);

#ifdef UIPC_BENCH_APR
void BM_AprPoolRequest(benchmark::State& state) {
  // APR pools cannot free or reallocate: a grown buffer is a new block and a copy.
  static const bool initialised = apr_initialize() == APR_SUCCESS;
  apr_pool_t* p = nullptr;
  if (!initialised || apr_pool_create(&p, nullptr) != APR_SUCCESS) {
    state.SkipWithError("apr_pool_create failed");
    return;
  }
  for (auto _ : state) {
    one_request([&](std::size_t n) { return apr_palloc(p, n); },
                [&](void* old, std::size_t had, std::size_t n) {
                  void* b = apr_palloc(p, n);
                  if (had) std::memcpy(b, old, had);
                  return b;
                },
                [](void*) {});
    apr_pool_clear(p);
  }
  apr_pool_destroy(p);
}
BENCHMARK(BM_AprPoolRequest);
BENCHMARK(BM_AprPoolRequest)->Threads(2);
#endif

#ifdef UIPC_BENCH_MIMALLOC
void BM_MimallocRequest(benchmark::State& state) {
  // A heap per request, destroyed at its end: mimalloc's own per-request pool.
  for (auto _ : state) {
    mi_heap_t* heap = mi_heap_new();
    one_request(
        [&](std::size_t n) { return mi_heap_malloc(heap, n); },
        [&](void* old, std::size_t, std::size_t n) { return mi_heap_realloc(heap, old, n); },
        [](void* b) { mi_free(b); });
    mi_heap_destroy(heap);
  }
}
BENCHMARK(BM_MimallocRequest);
BENCHMARK(BM_MimallocRequest)->Threads(2);
#endif

}  // namespace
