// bench_plugin: the plug-in host. Here, calls: a service call through the host (resolved, by name,
// into a preemptive and a cooperative plug-in) against calling the same
// function directly through a pointer, as a plug-in holding it would.
#include <benchmark/benchmark.h>

#include "uipc/plugin/host.hpp"

namespace {

using namespace uipc::plugin;

std::uint64_t add_one(uipc_plugin_context*, void*, void* arg) {
  auto* value = static_cast<std::uint64_t*>(arg);
  return *value + 1;
}

const uipc_plugin_host_api* bench_api;

template <std::uint32_t Flags>
const uipc_plugin_info* entry(std::uint32_t, std::uint32_t) {
  static const uipc_plugin_info info{sizeof(uipc_plugin_info),
                                     UIPC_PLUGIN_ABI_MAJOR,
                                     UIPC_PLUGIN_ABI_MINOR,
                                     Flags ? "preemptive" : "cooperative",
                                     Flags,
                                     0,
                                     [](uipc_plugin_context* ctx, const uipc_plugin_host_api* api) {
                                       bench_api = api;
                                       return api->register_service(
                                           ctx, Flags ? "add one" : "add one slowly", add_one,
                                           nullptr, 0);
                                     },
                                     nullptr,
                                     nullptr};
  return &info;
}

struct calls_fixture {
  std::unique_ptr<host> h = host::create().value();
  calls_fixture() {
    (void)h->load(entry<UIPC_PLUGIN_PREEMPTIVE>).value();
    (void)h->load(entry<0>).value();
  }
};

calls_fixture& fixture() {
  static calls_fixture f;
  return f;
}

void BM_DirectCall(benchmark::State& state) {
  uipc_plugin_service_fn fn = add_one;
  benchmark::DoNotOptimize(fn);
  auto ctx = fixture().h->new_context().value();
  std::uint64_t value = 0;
  for (auto _ : state) {
    value = fn(ctx.get(), nullptr, &value);
    benchmark::DoNotOptimize(value);
  }
}
BENCHMARK(BM_DirectCall);

void call_resolved(benchmark::State& state, const char* name) {
  auto& f = fixture();
  auto ctx = f.h->new_context().value();
  auto ref = f.h->resolve(name).value();
  const auto* api = &host::api();
  std::uint64_t value = 0;
  for (auto _ : state) {
    if (api->call_resolved(ctx.get(), ref.get(), &value, &value) != UIPC_PLUGIN_OK)
      state.SkipWithError("call failed");
    benchmark::DoNotOptimize(value);
  }
}

void BM_CallPreemptive(benchmark::State& state) { call_resolved(state, "add one"); }
BENCHMARK(BM_CallPreemptive);

void BM_CallCooperative(benchmark::State& state) { call_resolved(state, "add one slowly"); }
BENCHMARK(BM_CallCooperative);

void BM_CallPreemptiveCxx(benchmark::State& state) {
  auto& f = fixture();
  auto ctx = f.h->new_context().value();
  auto ref = f.h->resolve("add one").value();
  std::uint64_t value = 0;
  for (auto _ : state) {
    value = ctx.call(ref, &value).value();
    benchmark::DoNotOptimize(value);
  }
}
BENCHMARK(BM_CallPreemptiveCxx);

void BM_CallByName(benchmark::State& state) {
  auto& f = fixture();
  auto ctx = f.h->new_context().value();
  const auto* api = &host::api();
  std::uint64_t value = 0;
  for (auto _ : state) {
    if (api->call_service(ctx.get(), "add one", &value, &value) != UIPC_PLUGIN_OK)
      state.SkipWithError("call failed");
    benchmark::DoNotOptimize(value);
  }
}
BENCHMARK(BM_CallByName);

}  // namespace
BENCHMARK_MAIN();
