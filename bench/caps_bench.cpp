// bench_caps: a caps call between two processes, next to what it is meant to beat.
//   BM_CapsCall/64, /1048576        — request and reply of that size, written and read in place
//   BM_CapsCallCopied/1048576       — the same, each side copying in and out as a socket forces
//   BM_CapsCallNoSpin/64            — spinning off on both sides: futex and doorbell wake-ups only
//   BM_SpinPingPong                 — the floor: two processes handing a word back and forth in
//                                     shared memory, spinning then sleeping on a futex
//   BM_RawUdsRoundTrip/64, /1048576 — the same exchange over a Unix stream socket
//   BM_CapsPipelined/64             — 64-byte messages, 64 in flight (items/s = messages/s)
//   BM_CapsCallWithClients/64/N     — the call with N-1 more clients connected and idle
//   BM_CapsCallOneThread/64         — one thread plays both sides: the software path alone,
//                                     no cross-CPU transfer (CPU time per call)
// The server is a child process (fork); placement is the caller's: run under
// `taskset -c 0` for one CPU, `taskset -c 0,1` (or unpinned) for two.
#include <benchmark/benchmark.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "uipc/caps/client.hpp"
#include "uipc/caps/service.hpp"
#include "uipc/core/futex.hpp"
#include "uipc/core/wait_policy.hpp"

namespace {

using namespace uipc;
using clock_type = std::chrono::steady_clock;

// A rendezvous directory of the benchmark's own.
const std::string& bench_directory() {
  static const std::string dir = [] {
    std::string d = (std::filesystem::temp_directory_path() / "uipc-bench-caps-XXXXXX").string();
    if (::mkdtemp(d.data()) == nullptr) std::abort();
    ::chmod(d.c_str(), 01777);
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(bench_directory(), ignored);
    });
    return d;
  }();
  return dir;
}

enum class answer { copy_back, in_place_header, copy_out_and_in };

// A server process for the point `name`: replies with as many bytes as it got.
class server_process {
 public:
  server_process(const std::string& name, answer how, caps::service_options options) {
    (void)bench_directory();  // made here, so that parent and child share it
    int ready[2];
    if (::pipe(ready) != 0) std::abort();
    pid_ = ::fork();
    if (pid_ == 0) {
      ::close(ready[0]);
      serve(name, how, std::move(options), ready[1]);
      ::_exit(0);
    }
    ::close(ready[1]);
    char c = 0;
    ok_ = ::read(ready[0], &c, 1) == 1 && c == 'y';
    ::close(ready[0]);
  }
  ~server_process() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  bool ok() const { return ok_; }

 private:
  static void serve(const std::string& name, answer how, caps::service_options options, int ready) {
    boost::asio::io_context ctx;
    options.directory = bench_directory();
    auto svc = caps::service::register_point(ctx, name, options);
    (void)::write(ready, svc ? "y" : "n", 1);
    if (!svc) return;
    std::thread loop([&] { ctx.run(); });
    std::vector<std::byte> scratch;
    for (;;) {
      auto e = (*svc)->receive();
      if (!e) break;
      if (e->kind != caps::event_kind::request) continue;
      const auto in = e->view();
      switch (how) {
        case answer::copy_back:
          (void)(*svc)->reply(*e, in);
          break;
        case answer::in_place_header:
          (void)(*svc)->reply_in_place(*e, in.size(), [&](std::span<std::byte> out) {
            std::memcpy(out.data(), in.data(), std::min<std::size_t>(16, in.size()));
          });
          break;
        case answer::copy_out_and_in:
          scratch.assign(in.begin(), in.end());
          (void)(*svc)->reply(*e, scratch);
          break;
      }
    }
    ctx.stop();
    loop.join();
  }

  pid_t pid_ = -1;
  bool ok_ = false;
};

std::string unique_name(const char* what) {
  static int n = 0;
  return std::string(what) + "." + std::to_string(::getpid()) + "." + std::to_string(n++);
}

caps::point_address address_of(const std::string& name) {
  caps::point_address a;
  a.name = name;
  a.uid = ::geteuid();
  a.directory = bench_directory();
  return a;
}

void run_calls(benchmark::State& state, answer how, bool spin, std::size_t extra_clients = 0) {
  const auto size = static_cast<std::size_t>(state.range(0));
  caps::service_options so;
  if (!spin) so.max_spin = std::chrono::nanoseconds(0);
  if (extra_clients > 0 || size <= 4096) {
    so.request_arena = 64 << 10;  // small channels, so that a thousand fit anywhere
    so.reply_arena = 64 << 10;
  }
  const std::string name = unique_name("bench");
  server_process server(name, how, so);
  if (!server.ok()) return state.SkipWithError("server did not start");
  boost::asio::io_context ctx;
  caps::client_options co;
  if (!spin) co.max_spin = std::chrono::nanoseconds(0);
  std::vector<std::unique_ptr<caps::client>> idle;
  for (std::size_t i = 0; i < extra_clients; ++i) {
    auto c = caps::client::connect(ctx, address_of(name), co);
    if (!c) return state.SkipWithError(("idle client: " + c.error().message()).c_str());
    idle.push_back(std::move(*c));
  }
  auto c = caps::client::connect(ctx, address_of(name), co);
  if (!c) return state.SkipWithError(c.error().message().c_str());
  std::vector<std::byte> source(size, std::byte{'x'}), sink(size);
  for (auto _ : state) {
    auto r = how == answer::copy_out_and_in
                 ? (*c)->call(source)
                 : (*c)->call_in_place(size, [&](std::span<std::byte> out) {
                     std::memcpy(out.data(), source.data(), std::min<std::size_t>(16, size));
                   });
    if (!r) return state.SkipWithError(r.error().message().c_str());
    if (how == answer::copy_out_and_in) {
      std::memcpy(sink.data(), r->view().data(), r->size());
    } else {
      benchmark::DoNotOptimize(r->view()[0]);
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * size * 2));
}

void BM_CapsCall(benchmark::State& state) {
  run_calls(state, state.range(0) <= 4096 ? answer::copy_back : answer::in_place_header, true);
}
BENCHMARK(BM_CapsCall)->Arg(64)->Arg(1 << 20)->UseRealTime();

void BM_CapsCallCopied(benchmark::State& state) { run_calls(state, answer::copy_out_and_in, true); }
BENCHMARK(BM_CapsCallCopied)->Arg(1 << 20)->UseRealTime();

void BM_CapsCallNoSpin(benchmark::State& state) { run_calls(state, answer::copy_back, false); }
BENCHMARK(BM_CapsCallNoSpin)->Arg(64)->UseRealTime();

void BM_CapsCallWithClients(benchmark::State& state) {
  rlimit lim{};
  ::getrlimit(RLIMIT_NOFILE, &lim);
  lim.rlim_cur = lim.rlim_max;
  ::setrlimit(RLIMIT_NOFILE, &lim);  // five descriptors a client, on each side
  run_calls(state, answer::copy_back, true, static_cast<std::size_t>(state.range(1)) - 1);
}
BENCHMARK(BM_CapsCallWithClients)->Args({64, 1})->Args({64, 100})->Args({64, 1000})->UseRealTime();

void BM_CapsPipelined(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  constexpr std::size_t window = 64;
  caps::service_options so;
  so.request_arena = 256 << 10;
  so.reply_arena = 256 << 10;
  const std::string name = unique_name("pipe");
  server_process server(name, answer::copy_back, so);
  if (!server.ok()) return state.SkipWithError("server did not start");
  boost::asio::io_context ctx;
  auto c = caps::client::connect(ctx, address_of(name));
  if (!c) return state.SkipWithError(c.error().message().c_str());
  std::vector<std::byte> msg(size, std::byte{'p'});
  std::vector<caps::message_id> ring(window);
  std::size_t sent = 0, done = 0;
  for (auto _ : state) {
    // Keep `window` in flight: each iteration takes one reply and sends one more.
    while (sent - done < window) {
      auto id = (*c)->send(msg);
      if (!id) return state.SkipWithError(id.error().message().c_str());
      ring[sent++ % window] = *id;
    }
    auto r = (*c)->wait(ring[done++ % window]);
    if (!r) return state.SkipWithError(r.error().message().c_str());
  }
  while (done < sent) (void)(*c)->wait(ring[done++ % window]);
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}
BENCHMARK(BM_CapsPipelined)->Arg(64)->UseRealTime();

// The software path of a 64-byte call, with no cross-CPU transfer: one thread
// plays both sides (send, receive, reply, wait, dispose) on one channel.
void BM_CapsCallOneThread(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  boost::asio::io_context ctx;
  caps::service_options so;
  so.directory = bench_directory();
  so.request_arena = 64 << 10;
  so.reply_arena = 64 << 10;
  const std::string name = unique_name("one");
  auto svc = caps::service::register_point(ctx, name, so);
  if (!svc) return state.SkipWithError(svc.error().message().c_str());
  auto work = boost::asio::make_work_guard(ctx);
  std::jthread loop([&] { ctx.run(); });
  struct stopper {
    boost::asio::io_context& ctx;
    ~stopper() { ctx.stop(); }
  } stop_loop{ctx};  // before the thread's join
  auto c = caps::client::connect(ctx, address_of(name));
  if (!c) return state.SkipWithError(c.error().message().c_str());
  std::vector<std::byte> msg(size, std::byte{'o'});
  const auto deadline = clock_type::now() + std::chrono::minutes(1);  // no clock read per call
  const auto next = [&](caps::event_kind kind) -> std::optional<caps::event> {
    for (;;) {
      auto e = (*svc)->receive(deadline);
      if (!e) return std::nullopt;
      if (e->kind == kind) return std::move(*e);
    }
  };
  for (auto _ : state) {
    auto id = (*c)->send(msg);
    if (!id) return state.SkipWithError(id.error().message().c_str());
    auto e = next(caps::event_kind::request);
    if (!e) return state.SkipWithError("no request");
    (void)(*svc)->reply(*e, e->view());
    auto r = (*c)->wait(*id);
    if (!r) return state.SkipWithError(r.error().message().c_str());
    benchmark::DoNotOptimize(r->view()[0]);
    r = caps::reply{};
    if (!next(caps::event_kind::dispose)) return state.SkipWithError("dispose");
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}
BENCHMARK(BM_CapsCallOneThread)->Arg(64);

// ---- the floor and the socket ----------------------------------------------------

struct ping_pong_page {
  alignas(64) std::atomic<std::uint32_t> turn;  // odd: the server's, even: the client's
  alignas(64) std::atomic<std::uint32_t> sleepers;
  std::atomic<std::uint32_t> stop;
};

// Waits for `turn` to leave `seen`: spin (adaptively, as the channel does), then futex.
void await_turn(ping_pong_page& p, std::uint32_t seen) {
  auto& policy = wait_policy::this_thread();
  const auto limit = std::chrono::nanoseconds(std::chrono::microseconds(50));
  const auto budget = policy.spin_budget(limit);
  const auto start = budget.count() > 0 ? clock_type::now() : clock_type::time_point{};
  auto ready = [&] { return p.turn.load(std::memory_order_acquire) != seen; };
  if (policy.spin_then_yield(limit, budget, start, clock_type::time_point::max(), ready)) return;
  p.sleepers.fetch_add(1, std::memory_order_seq_cst);
  while (!ready()) (void)futex::wait(p.turn, seen, std::chrono::milliseconds(100));
  p.sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

void pass_turn(ping_pong_page& p, std::uint32_t next) {
  p.turn.store(next, std::memory_order_seq_cst);
  if (p.sleepers.load(std::memory_order_seq_cst) != 0) futex::wake(p.turn, INT_MAX);
}

void BM_SpinPingPong(benchmark::State& state) {
  void* mem = ::mmap(nullptr, sizeof(ping_pong_page), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) return state.SkipWithError("mmap");
  auto* p = new (mem) ping_pong_page{};
  const pid_t child = ::fork();
  if (child == 0) {
    for (std::uint32_t seen = 0;;) {
      await_turn(*p, seen);
      const std::uint32_t t = p->turn.load();
      if (p->stop.load()) ::_exit(0);
      pass_turn(*p, t + 1);
      seen = t + 1;
    }
  }
  std::uint32_t t = 0;
  for (auto _ : state) {
    pass_turn(*p, ++t);  // odd: the server's turn
    await_turn(*p, t);
    ++t;
  }
  p->stop.store(1);
  pass_turn(*p, t + 1);
  ::waitpid(child, nullptr, 0);
  ::munmap(mem, sizeof(ping_pong_page));
}
BENCHMARK(BM_SpinPingPong)->UseRealTime();

bool read_exact(int fd, char* data, std::size_t size) {
  for (std::size_t got = 0; got < size;) {
    const ssize_t n = ::read(fd, data + got, size - got);
    if (n <= 0) return false;
    got += static_cast<std::size_t>(n);
  }
  return true;
}

bool write_all(int fd, const char* data, std::size_t size) {
  for (std::size_t put = 0; put < size;) {
    const ssize_t n = ::write(fd, data + put, size - put);
    if (n <= 0) return false;
    put += static_cast<std::size_t>(n);
  }
  return true;
}

void BM_RawUdsRoundTrip(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
    return state.SkipWithError("socketpair");
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(fds[0]);
    std::string buf(size, '\0');
    while (read_exact(fds[1], buf.data(), size) && write_all(fds[1], buf.data(), size)) {
    }
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string msg(size, 'x'), reply(size, '\0');
  for (auto _ : state) {
    if (!write_all(fds[0], msg.data(), size) || !read_exact(fds[0], reply.data(), size)) {
      return state.SkipWithError("socket");
    }
  }
  ::close(fds[0]);
  ::waitpid(child, nullptr, 0);
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * size * 2));
}
BENCHMARK(BM_RawUdsRoundTrip)->Arg(64)->Arg(1 << 20)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
