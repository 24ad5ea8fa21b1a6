// bench_core: the core's hot paths, each next to what a user would use instead.
//   BM_FramedRoundTrip/64 vs BM_RawUdsRoundTrip/64  — a request and reply between two threads
//   BM_FrameEncode / BM_FrameDecode                 — the envelope codec alone
//   BM_BufferPool_AcquireRelease vs BM_Malloc_Free  — a receive buffer
//   BM_BufferPool_BatchAcquireRelease/32 vs BM_Malloc_FreeBatch/32
//                                                   — a recvmmsg batch's buffers, taken and given
//                                                   back together
//   BM_FramedPipelined vs BM_RawUdsPipelined        — 16 requests of 4 KiB in flight
//   BM_Ledger_AcquireRelease vs BM_MutexMap_...     — per-holder reference counts
//   BM_RefPtr_Copy vs BM_SharedPtr_Copy             — sharing an object
//   BM_PolicyWaitPingPong/<spin us> vs BM_FutexWaitPingPong
//                                                   — two threads handing a turn back and forth
#include <benchmark/benchmark.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

#include "placement.hpp"
#include "uipc/core/blocking_connection.hpp"
#include "uipc/core/buffer_pool.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/futex.hpp"
#include "uipc/core/ledger.hpp"
#include "uipc/core/ref.hpp"
#include "uipc/core/wait_policy.hpp"
#include "uipc/proto/envelope.pb.h"
#include "wire.hpp"

namespace {

using namespace uipc;

// Both round-trip benchmarks: the server is a second thread, the client the
// benchmark thread; each iteration is one request of `size` bytes and its reply.

// Reads exactly `size` bytes; false when the peer went away.
bool read_exact(int fd, char* data, std::size_t size) {
  std::size_t got = 0;
  while (got < size) {
    const ssize_t n = ::read(fd, data + got, size - got);
    if (n <= 0) return false;
    got += static_cast<std::size_t>(n);
  }
  return true;
}

// The raw peer: a thread echoing `size`-byte messages on `fd` until it closes.
std::jthread raw_echo_server(int fd, std::size_t size) {
  return std::jthread([fd, size] {
    bench::place_peer();
    std::string buf(size, '\0');
    while (read_exact(fd, buf.data(), size)) {
      if (::write(fd, buf.data(), size) != static_cast<ssize_t>(size)) return;
    }
  });
}

void BM_RawUdsRoundTrip(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
    return state.SkipWithError("socketpair");
  std::jthread server = raw_echo_server(fds[1], size);
  std::string msg(size, 'x');
  std::string reply(size, '\0');
  for (auto _ : state) {
    if (::write(fds[0], msg.data(), size) != static_cast<ssize_t>(size))
      return state.SkipWithError("write");
    if (!read_exact(fds[0], reply.data(), size)) return state.SkipWithError("read");
  }
  ::shutdown(fds[0], SHUT_RDWR);
  server.join();
  ::close(fds[0]);
  ::close(fds[1]);
}
BENCHMARK(BM_RawUdsRoundTrip)->Arg(64)->UseRealTime();

void echo(const connection::pointer& c) {
  c->async_receive([c](error_code ec, frame f) {
    if (ec) return;
    (void)c->send(make_reply(f, f.type, std::move(f.payload)));
    echo(c);
  });
}

// The framed peer: an echo server on its own thread and loop, and a client
// connection on a loop the benchmark thread runs. Closing the client ends both.
struct framed_echo_pair {
  framed_echo_pair() {
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return;
    auto server = connection::adopt(server_ctx, unique_fd(fds[1]));
    auto c = connection::adopt(client_ctx, unique_fd(fds[0]));
    if (!server || !c) return;
    echo(*server);
    server_thread = std::jthread([this] {
      bench::place_peer();
      server_ctx.run();
    });
    client = *c;
  }
  ~framed_echo_pair() {
    if (client) client->close();
    client_ctx.run();
  }
  boost::asio::io_context server_ctx{1};
  boost::asio::io_context client_ctx{1};
  std::jthread server_thread;
  connection::pointer client;
};

void BM_FramedRoundTrip(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  framed_echo_pair pair;
  if (!pair.client) return state.SkipWithError("socketpair");
  auto& client_ctx = pair.client_ctx;
  auto& client = pair.client;
  const std::string payload(size, 'x');
  for (auto _ : state) {
    frame request;
    request.payload = payload;
    bool done = false;
    client->async_call(std::move(request), [&](error_code ec, frame reply) {
      if (ec || reply.payload.size() != size) state.SkipWithError("bad reply");
      done = true;
    });
    while (!done) client_ctx.run_one();
  }
}
BENCHMARK(BM_FramedRoundTrip)->Arg(64)->UseRealTime();

// The same echo server, called by a blocking_connection: the client a
// command-line tool or a synchronous library call would use.
void BM_BlockingRoundTrip(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
    return state.SkipWithError("socketpair");
  boost::asio::io_context server_ctx{1};
  auto server = connection::adopt(server_ctx, unique_fd(fds[1]));
  auto client = blocking_connection::adopt(unique_fd(fds[0]));
  if (!server || !client) return state.SkipWithError("adopt");
  echo(*server);
  server->reset();
  std::jthread server_thread([&] {
    bench::place_peer();
    server_ctx.run();
  });
  const std::string payload(size, 'x');
  for (auto _ : state) {
    frame request;
    request.payload = payload;
    auto reply = client->call(std::move(request),
                              std::chrono::steady_clock::now() + std::chrono::seconds(5));
    if (!reply || reply->payload.size() != size) return state.SkipWithError("bad reply");
  }
  client->close();  // the server's receive ends, and with it its loop
}
BENCHMARK(BM_BlockingRoundTrip)->Arg(64)->UseRealTime();

// Throughput: `depth` requests of `size` bytes kept in flight, per request.
void BM_RawUdsPipelined(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  const auto depth = static_cast<int>(state.range(1));
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
    return state.SkipWithError("socketpair");
  std::jthread server = raw_echo_server(fds[1], size);
  const std::string msg(size, 'x');
  std::string reply(size, '\0');
  auto read_one = [&] { return read_exact(fds[0], reply.data(), size); };
  for (int i = 0; i < depth; ++i) (void)::write(fds[0], msg.data(), size);
  for (auto _ : state) {
    if (!read_one()) return state.SkipWithError("read");
    if (::write(fds[0], msg.data(), size) != static_cast<ssize_t>(size))
      return state.SkipWithError("write");
  }
  for (int i = 0; i < depth; ++i) (void)read_one();
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * size * 2));
  ::shutdown(fds[0], SHUT_RDWR);
  server.join();
  ::close(fds[0]);
  ::close(fds[1]);
}
BENCHMARK(BM_RawUdsPipelined)->Args({4096, 16})->UseRealTime();

void BM_FramedPipelined(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  const auto depth = static_cast<int>(state.range(1));
  framed_echo_pair pair;
  if (!pair.client) return state.SkipWithError("socketpair");
  auto& client_ctx = pair.client_ctx;
  auto& client = pair.client;
  const std::string payload(size, 'x');
  std::int64_t completed = 0;
  bool failed = false;
  std::function<void()> issue = [&] {
    frame request;
    request.payload = payload;
    client->async_call(std::move(request), [&](error_code ec, frame reply) {
      if (ec || reply.payload.size() != size) {
        failed = true;
        return;
      }
      ++completed;
      issue();
    });
  };
  for (int i = 0; i < depth; ++i) issue();
  // One iteration per reply, as the raw peer reads one per iteration: a
  // run_one() that reads several replies in one receive banks the extra ones
  // for the iterations after it (counting run_one() calls instead would time
  // a whole batch of replies as one request).
  std::int64_t taken = 0;
  for (auto _ : state) {
    while (completed == taken && !failed) client_ctx.run_one();
    if (failed) {
      state.SkipWithError("bad reply");
      break;  // to the drain below, while `issue` is alive
    }
    ++taken;
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * size * 2));
  // Drain while `issue` is alive: a reply already received still calls it.
  client->close();
  client_ctx.run();
}
BENCHMARK(BM_FramedPipelined)->Args({4096, 16})->UseRealTime();

void BM_FrameEncode(benchmark::State& state) {
  const std::string payload(static_cast<std::size_t>(state.range(0)), 'x');
  for (auto _ : state) {
    frame f;
    f.kind = frame_kind::request;
    f.correlation_id = 12345;
    f.type = 3;
    f.payload = payload;
    auto bytes = detail::encode_frame(f, 1 << 20);
    benchmark::DoNotOptimize(bytes);
  }
}
BENCHMARK(BM_FrameEncode)->Arg(64)->Arg(4096);

void BM_FrameDecode(benchmark::State& state) {
  frame f;
  f.kind = frame_kind::request;
  f.correlation_id = 12345;
  f.type = 3;
  f.payload = std::string(static_cast<std::size_t>(state.range(0)), 'x');
  const std::string bytes = *detail::encode_frame(f, 1 << 20);
  proto::Envelope scratch;
  std::deque<unique_fd> no_fds;
  for (auto _ : state) {
    auto decoded = detail::decode_frame(scratch, bytes.data() + 4, bytes.size() - 4, no_fds, 16);
    benchmark::DoNotOptimize(decoded);
  }
}
BENCHMARK(BM_FrameDecode)->Arg(64)->Arg(4096);

void BM_BufferPool_AcquireRelease(benchmark::State& state) {
  boost::asio::io_context ctx;
  auto pool =
      buffer_pool::create(ctx.get_executor(), static_cast<std::size_t>(state.range(0)), 64).value();
  for (auto _ : state) {
    auto b = pool->try_acquire();
    benchmark::DoNotOptimize(b.data());
  }
}
BENCHMARK(BM_BufferPool_AcquireRelease)->Arg(2048)->Arg(65536);

void BM_Malloc_Free(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  for (auto _ : state) {
    void* p = std::malloc(size);  // NOLINT(cppcoreguidelines-no-malloc): the peer being measured
    benchmark::DoNotOptimize(p);
    std::free(p);  // NOLINT(cppcoreguidelines-no-malloc)
  }
}
BENCHMARK(BM_Malloc_Free)->Arg(2048)->Arg(65536);

// A receive batch: 32 buffers taken together and given back together (one
// atomic operation each way), per buffer.
void BM_BufferPool_BatchAcquireRelease(benchmark::State& state) {
  boost::asio::io_context ctx;
  const auto n = static_cast<std::size_t>(state.range(0));
  auto pool = buffer_pool::create(ctx.get_executor(), 2048, 64).value();
  std::vector<pooled_buffer> batch(n);
  for (auto _ : state) {
    const std::size_t got = pool->try_acquire(std::span(batch));
    benchmark::DoNotOptimize(batch[got - 1].data());
    pool->release(std::span(batch).first(got));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(n));
}
BENCHMARK(BM_BufferPool_BatchAcquireRelease)->Arg(32);

void BM_Malloc_FreeBatch(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  std::vector<void*> batch(n);
  for (auto _ : state) {
    for (auto& p : batch) p = std::malloc(2048);  // NOLINT(cppcoreguidelines-no-malloc): the peer
    benchmark::DoNotOptimize(batch.back());
    for (auto* p : batch) std::free(p);  // NOLINT(cppcoreguidelines-no-malloc)
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(n));
}
BENCHMARK(BM_Malloc_FreeBatch)->Arg(32);

// The handle daemon's bookkeeping per open and close: one holder, a few objects.
void BM_Ledger_AcquireRelease(benchmark::State& state) {
  ledger<std::uint64_t, std::uint32_t> l;
  for (std::uint32_t k = 0; k < 64; ++k) l.acquire(1, k);
  std::uint32_t key = 0;
  for (auto _ : state) {
    l.acquire(1, key);
    benchmark::DoNotOptimize(l.release(1, key));
    key = (key + 1) % 64;
  }
}
BENCHMARK(BM_Ledger_AcquireRelease);

// What one would write by hand: a map of counts under a mutex.
void BM_MutexMap_AcquireRelease(benchmark::State& state) {
  std::mutex m;
  std::unordered_map<std::uint32_t, std::uint32_t> counts;
  for (std::uint32_t k = 0; k < 64; ++k) counts[k] = 1;
  std::uint32_t key = 0;
  for (auto _ : state) {
    {
      std::lock_guard lock(m);
      ++counts[key];
    }
    {
      std::lock_guard lock(m);
      benchmark::DoNotOptimize(--counts[key]);
    }
    key = (key + 1) % 64;
  }
}
BENCHMARK(BM_MutexMap_AcquireRelease);

struct counted : ref_counted<counted> {
  int value = 0;
};

void BM_RefPtr_Copy(benchmark::State& state) {
  auto original = make_ref<counted>();
  for (auto _ : state) {
    ref_ptr<counted> copy = original;
    benchmark::DoNotOptimize(copy.get());
  }
}
BENCHMARK(BM_RefPtr_Copy);

void BM_SharedPtr_Copy(benchmark::State& state) {
  auto original = std::make_shared<int>(0);
  for (auto _ : state) {
    std::shared_ptr<int> copy = original;
    benchmark::DoNotOptimize(copy.get());
  }
}
BENCHMARK(BM_SharedPtr_Copy);

// ---- waiting on a shared word ----------------------------------------------------
// Two threads hand a turn back and forth through a futex word, per round trip.
// The floor waits straight on the futex (and always wakes); the policy-driven
// wait spins and yields as this thread's uipc::wait_policy learns to, and
// wakes only a registered sleeper, as the handles' objects do.

struct alignas(64) turn_flag {
  std::atomic<std::uint32_t> word{0};
  std::atomic<std::uint32_t> sleepers{0};
};

bool try_take_turn(turn_flag& f) {
  std::uint32_t one = 1;
  return f.word.load(std::memory_order_relaxed) == 1 && f.word.compare_exchange_strong(one, 0);
}

void futex_take(turn_flag& f) {
  while (!try_take_turn(f)) (void)futex::wait(f.word, 0, std::chrono::nanoseconds(-1));
}
void futex_give(turn_flag& f) {
  f.word.store(1);
  futex::wake(f.word, 1);
}

void policy_take(turn_flag& f, std::chrono::nanoseconds spin) {
  if (try_take_turn(f)) return;
  auto& policy = wait_policy::this_thread();
  const auto budget = policy.spin_budget(spin);
  const auto start = budget.count() > 0 ? std::chrono::steady_clock::now()
                                        : std::chrono::steady_clock::time_point{};
  if (policy.spin_then_yield(spin, budget, start, std::chrono::steady_clock::time_point::max(),
                             [&] { return try_take_turn(f); }))
    return;
  f.sleepers.fetch_add(1);
  while (!try_take_turn(f)) (void)futex::wait(f.word, 0, std::chrono::nanoseconds(-1));
  f.sleepers.fetch_sub(1);
}
void policy_give(turn_flag& f) {
  f.word.store(1);
  if (f.sleepers.load() != 0) futex::wake(f.word, 1);
}

template <class Take, class Give>
void turn_ping_pong(benchmark::State& state, Take take, Give give) {
  turn_flag ping;
  turn_flag pong;
  std::atomic<bool> stop{false};
  std::thread peer([&] {
    bench::place_peer();
    for (;;) {
      take(ping);
      if (stop.load()) return;
      give(pong);
    }
  });
  for (auto _ : state) {
    give(ping);
    take(pong);
  }
  stop.store(true);
  give(ping);
  peer.join();
}

void BM_FutexWaitPingPong(benchmark::State& state) {
  turn_ping_pong(state, futex_take, futex_give);
}
BENCHMARK(BM_FutexWaitPingPong)->UseRealTime()->MinTime(0.2);

void BM_PolicyWaitPingPong(benchmark::State& state) {
  const std::chrono::microseconds spin(state.range(0));
  turn_ping_pong(
      state, [spin](turn_flag& f) { policy_take(f, spin); }, policy_give);
}
BENCHMARK(BM_PolicyWaitPingPong)->Arg(0)->Arg(50)->UseRealTime()->MinTime(0.2);

}  // namespace

int main(int argc, char** argv) {
  uipc::bench::place_self();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
