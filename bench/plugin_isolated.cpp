// bench_plugin, isolation: a call to an isolated plug-in's bytes service
// through the host (BM_CallOutOfProcess) against the caps call it rides on,
// made directly to a runner of the same plug-in (BM_CallOutOfProcessCapsPeer).
#include <benchmark/benchmark.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <cstring>
#include <string>

#include "uipc/caps/client.hpp"
#include "uipc/plugin/host.hpp"

extern char** environ;

namespace {

using namespace uipc::plugin;

const std::string hello_plugin = std::string(UIPC_BENCH_PLUGIN_DIR) + "/hello.so";

void BM_CallOutOfProcess(benchmark::State& state) {
  auto h = host::create().value();
  isolation_options options;
  options.runner = UIPC_BENCH_RUNNER_PATH;
  if (!h->load_isolated(hello_plugin, options)) {
    state.SkipWithError("the isolated plug-in did not start");
    return;
  }
  std::string request(static_cast<std::size_t>(state.range(0)), 'x');
  auto ctx = h->new_context().value();
  for (auto _ : state) {
    auto r = ctx.call_bytes("hello", std::as_bytes(std::span(request.data(), request.size())));
    if (!r) {
      state.SkipWithError(r.error().message().c_str());
      break;
    }
    benchmark::DoNotOptimize(r->data());
    ctx.memory().release();  // one request's worth of memory per call, as a server would
  }
}
BENCHMARK(BM_CallOutOfProcess)->Arg(64)->UseRealTime();

// The same runner and plug-in, called with the runner's own protocol over caps.
void BM_CallOutOfProcessCapsPeer(benchmark::State& state) {
  const std::string point = "uipc.bench.runner." + std::to_string(::getpid());
  std::vector<std::string> args{UIPC_BENCH_RUNNER_PATH,     "--point",   point, "--parent",
                                std::to_string(::getpid()), hello_plugin};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (::posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) != 0) {
    state.SkipWithError("cannot start the runner");
    return;
  }
  boost::asio::io_context io;
  uipc::caps::client_options copts;
  copts.wait_for_point = std::chrono::seconds(5);
  auto client = uipc::caps::client::connect(
      io, uipc::caps::point_address{point, ::getuid(), std::nullopt, {}}, copts);
  if (!client) {
    state.SkipWithError(client.error().message().c_str());
  } else {
    const std::string name = "hello";
    std::string request(2 + name.size() + static_cast<std::size_t>(state.range(0)), 'x');
    request[0] = 2;  // call
    request[1] = static_cast<char>(name.size());
    std::memcpy(request.data() + 2, name.data(), name.size());
    for (auto _ : state) {
      auto r = (*client)->call(std::as_bytes(std::span(request.data(), request.size())));
      if (!r) {
        state.SkipWithError(r.error().message().c_str());
        break;
      }
      // What the host does with a reply: check the header, copy the bytes.
      std::string copy = r->copy();
      benchmark::DoNotOptimize(copy.data());
    }
    client->reset();
  }
  ::kill(pid, SIGTERM);
  ::waitpid(pid, nullptr, 0);
}
BENCHMARK(BM_CallOutOfProcessCapsPeer)->Arg(64)->UseRealTime();

}  // namespace
