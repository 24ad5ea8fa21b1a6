// bench_handles: the handle daemon's hot paths against the floors and the peer a
// user would otherwise pick, in one run.
//  - BM_EventPingPong/<spin us>: two processes bouncing between two auto-reset
//    events (per round trip), against BM_FutexPingPong (raw futexes in shared
//    memory, always sleeping: the floor), BM_SpinPingPong/<spin us> (raw shared
//    memory, spin then futex: the floor when the waiter is already waiting) and
//    BM_PosixSemPingPong (named POSIX semaphores: the peer).
//  - BM_AsyncEventPingPong/<spin us>: BM_EventPingPong with this side waiting
//    through client::async_wait on an io_context.
//  - BM_CreateClose (create an event through the daemon, drop it) against
//    BM_RawUdsRoundTrip/64 (one 64-byte round trip on a Unix socket).
//  - BM_Mutex_Uncontended (take and release, one thread) against
//    BM_RobustPthreadMutex_Uncontended (process-shared, robust, in shared memory:
//    what a user would otherwise pick across processes) and
//    BM_StdMutex_Uncontended (in-process only: the floor).
//  - BM_Mutex_Contended: this process takes and releases while a peer process
//    does the same on the same mutex; per take of this process, with the
//    fraction of takes that came from the other process ("handoffs"). Against
//    BM_RobustPthreadMutex_Contended.
//  - BM_Semaphore_ReleaseWait (release 1, wait) against BM_PosixSem_PostWait.
//  - BM_WaitAll_Semaphores/<n> and BM_WaitAll_Mutexes/<n> (wait_all on n objects
//    that are all available, then give them back) against taking as many POSIX
//    semaphores or robust pthread mutexes one by one (BM_PosixSem_OneByOne/<n>,
//    BM_RobustPthreadMutex_OneByOne/<n>).
// The peer processes of the event and mutex benchmarks are this program again,
// run with --peer or --peer-mutex.
//
// Where the processes run decides the numbers on a small VM: across CPUs a
// futex wake costs tens of microseconds, on one CPU a context switch costs
// about one. UIPC_BENCH_PLACEMENT=split pins this process to CPU 0 and every
// peer (and the daemon) to CPU 1; =same pins all to CPU 0; unset leaves the
// scheduler free.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "placement.hpp"
#include "uipc/handles/client.hpp"

namespace {

using namespace uipc::handles;
using steady = std::chrono::steady_clock;

using uipc::bench::chosen_placement;
using uipc::bench::pin_to;
using uipc::bench::place_peer;
using uipc::bench::placement;

// Runs `f` (which may start a daemon: it inherits our affinity) placed as a peer.
template <class F>
auto as_peer(F f) {
  if (chosen_placement() != placement::split) return f();
  pin_to(1);
  auto r = f();
  pin_to(0);
  return r;
}

// ---- raw shared memory and futexes ---------------------------------------------------

struct alignas(64) flag {
  std::atomic<std::uint32_t> word{0};
  std::atomic<std::uint32_t> sleepers{0};
};

struct shared_pair {
  flag ping;
  flag pong;
  std::atomic<std::uint32_t> stop{0};
};

void futex_wait(std::atomic<std::uint32_t>& w, std::uint32_t expected) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&w), FUTEX_WAIT, expected, nullptr, nullptr,
            0);
}
void futex_wake(std::atomic<std::uint32_t>& w) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&w), FUTEX_WAKE, 1, nullptr, nullptr, 0);
}

// Takes the flag: spins up to `spin`, then sleeps on the futex.
void take(flag& f, std::chrono::nanoseconds spin) {
  if (spin.count() > 0) {
    const auto until = steady::now() + spin;
    for (unsigned i = 0;; ++i) {
      // Read first, write only when it can succeed: the same discipline as the
      // handle wait, so the floor is fair.
      std::uint32_t one = 1;
      if (f.word.load(std::memory_order_relaxed) == 1 && f.word.compare_exchange_strong(one, 0))
        return;
      __builtin_ia32_pause();
      if ((i & 63) == 0 && steady::now() >= until) break;
    }
  }
  f.sleepers.fetch_add(1);
  for (;;) {
    std::uint32_t one = 1;
    if (f.word.compare_exchange_strong(one, 0)) break;
    futex_wait(f.word, 0);
  }
  f.sleepers.fetch_sub(1);
}

void give(flag& f, bool always_wake) {
  f.word.store(1);
  if (always_wake || f.sleepers.load() != 0) futex_wake(f.word);
}

// The always-sleeping floor: the waiter goes straight to the futex.
void take_sleeping(flag& f) {
  for (;;) {
    std::uint32_t one = 1;
    if (f.word.compare_exchange_strong(one, 0)) return;
    futex_wait(f.word, 0);
  }
}

template <class Take, class Give>
void raw_ping_pong(benchmark::State& state, Take take_fn, Give give_fn) {
  void* mem = ::mmap(nullptr, sizeof(shared_pair), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  auto* pair = new (mem) shared_pair;
  const pid_t child = ::fork();
  if (child == 0) {
    place_peer();
    for (;;) {
      take_fn(pair->ping);
      if (pair->stop.load()) ::_exit(0);
      give_fn(pair->pong);
    }
  }
  for (auto _ : state) {
    give_fn(pair->ping);
    take_fn(pair->pong);
  }
  pair->stop.store(1);
  give_fn(pair->ping);
  ::waitpid(child, nullptr, 0);
  ::munmap(mem, sizeof(shared_pair));
}

void BM_FutexPingPong(benchmark::State& state) {
  raw_ping_pong(
      state, [](flag& f) { take_sleeping(f); }, [](flag& f) { give(f, true); });
}
BENCHMARK(BM_FutexPingPong)->UseRealTime();

void BM_SpinPingPong(benchmark::State& state) {
  const std::chrono::microseconds spin(state.range(0));
  raw_ping_pong(
      state, [spin](flag& f) { take(f, spin); }, [](flag& f) { give(f, false); });
}
BENCHMARK(BM_SpinPingPong)->Arg(50)->UseRealTime();

void BM_PosixSemPingPong(benchmark::State& state) {
  const std::string ping_name = "/uipc-bench-ping-" + std::to_string(::getpid());
  const std::string pong_name = "/uipc-bench-pong-" + std::to_string(::getpid());
  sem_t* ping = ::sem_open(ping_name.c_str(), O_CREAT | O_EXCL, 0600, 0);
  sem_t* pong = ::sem_open(pong_name.c_str(), O_CREAT | O_EXCL, 0600, 0);
  ::sem_unlink(ping_name.c_str());
  ::sem_unlink(pong_name.c_str());
  void* mem = ::mmap(nullptr, sizeof(std::atomic<int>), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  auto* stop = new (mem) std::atomic<int>(0);
  const pid_t child = ::fork();
  if (child == 0) {
    place_peer();
    for (;;) {
      while (::sem_wait(ping) != 0) {
      }
      if (stop->load()) ::_exit(0);
      ::sem_post(pong);
    }
  }
  for (auto _ : state) {
    ::sem_post(ping);
    while (::sem_wait(pong) != 0) {
    }
  }
  stop->store(1);
  ::sem_post(ping);
  ::waitpid(child, nullptr, 0);
  ::sem_close(ping);
  ::sem_close(pong);
  ::munmap(mem, sizeof(std::atomic<int>));
}
BENCHMARK(BM_PosixSemPingPong)->UseRealTime();

// ---- through the handle daemon ---------------------------------------------------------

// A private directory for this run's daemon (the peer is told it with --peer).
std::string peer_directory;  // set in the peer: the parent's directory

std::string& bench_directory() {
  static std::string dir;
  if (!peer_directory.empty()) return peer_directory;
  if (dir.empty()) {
    std::string pattern = (std::filesystem::temp_directory_path() / "uipc-bench-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    dir = pattern;
  }
  return dir;
}

client_options bench_options(std::chrono::nanoseconds spin) {
  client_options o;
  o.where.directory = bench_directory();
  o.where.name = "bench";
  o.daemon_path = UIPC_BENCH_HANDLED_PATH;
  o.daemon_linger = std::chrono::milliseconds(0);
  o.spin = spin;
  return o;
}

// The stop flag lives in a scratch block of the daemon's segment: the peer
// checks it with one load per round, no system call.
std::atomic_ref<std::uint32_t> stop_flag(client& c, std::uint64_t offset) {
  return std::atomic_ref<std::uint32_t>(
      *reinterpret_cast<std::uint32_t*>(c.scratch_area().data() + offset));
}

// A peer: this program run with `args` (after /proc/self/exe), placed as a peer,
// its stdout on a pipe. Returns the pid once it said "ready", or -1.
pid_t start_peer(std::vector<std::string> args) {
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) std::abort();
  args.insert(args.begin(), "/proc/self/exe");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t child = ::fork();
  if (child == 0) {
    place_peer();
    ::dup2(out[1], 1);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  ::close(out[1]);
  char ready[6] = {};
  const bool started = ::read(out[0], ready, 6) == 6;
  ::close(out[0]);
  if (started) return child;
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  return -1;
}

void say_ready() {
  std::printf("ready\n");
  std::fflush(stdout);
}

// The peer: opens the two events, then bounces until the stop flag is set.
int run_peer(int argc, char** argv) {
  if (argc != 7) return 64;
  peer_directory = argv[6];
  const std::chrono::microseconds spin(std::atoi(argv[2]));
  auto c = client::connect(bench_options(spin));
  if (!c) return 1;
  auto ping = c->open_event(argv[3]);
  auto pong = c->open_event(argv[4]);
  if (!ping || !pong) return 2;
  auto stop = stop_flag(*c, std::strtoull(argv[5], nullptr, 10));
  say_ready();
  for (;;) {
    if (!ping->wait()) return 3;
    if (stop.load() != 0) return 0;
    if (pong->signal()) return 4;
  }
}

// Both ping-pong benchmarks: a client with two named auto-reset events and a
// peer process that waits on `ping` and signals `pong` (spinning state.range(0)
// microseconds) until the stop flag in a scratch block is set. Skips the
// benchmark and is empty when any step fails.
struct ping_pong {
  std::optional<client> c;
  std::optional<event> ping;
  std::optional<event> pong;
  std::optional<scratch_block> block;
  pid_t child = -1;

  ping_pong(benchmark::State& state, const std::string& prefix) {
    static int round = 0;
    const std::string ping_name = prefix + "ping-" + std::to_string(++round);
    const std::string pong_name = prefix + "pong-" + std::to_string(round);
    auto connected = as_peer(
        [&] { return client::connect(bench_options(std::chrono::microseconds(state.range(0)))); });
    if (!connected) {
      state.SkipWithError(("connect: " + connected.error().message()).c_str());
      return;
    }
    c.emplace(std::move(*connected));
    auto p = c->create_event(event_reset::automatic, false, ping_name);
    auto q = c->create_event(event_reset::automatic, false, pong_name);
    auto b = c->store_scratch(sizeof(std::uint32_t));
    if (!p || !q || !b) {
      state.SkipWithError("create");
      return;
    }
    ping.emplace(std::move(*p));
    pong.emplace(std::move(*q));
    block.emplace(std::move(*b));
    child = start_peer({"--peer", std::to_string(state.range(0)), ping_name, pong_name,
                        std::to_string(block->offset()), bench_directory()});
    if (child < 0) state.SkipWithError("peer did not start");
  }
  ~ping_pong() {
    if (child < 0) return;
    stop_flag(*c, block->offset()).store(1);
    ping->signal();
    ::waitpid(child, nullptr, 0);
  }
  ping_pong(const ping_pong&) = delete;
  ping_pong& operator=(const ping_pong&) = delete;
  explicit operator bool() const noexcept { return child >= 0; }
};

void BM_EventPingPong(benchmark::State& state) {
  ping_pong pp(state, "");
  if (!pp) return;
  for (auto _ : state) {
    pp.ping->signal();
    pp.pong->wait();
  }
}
BENCHMARK(BM_EventPingPong)->Arg(0)->Arg(50)->UseRealTime();

// BM_EventPingPong with this side on an event loop: each pong is awaited with
// client::async_wait on an io_context run by this thread (the peer waits as in
// BM_EventPingPong/<spin us>). The price of a loop: the waiter thread's wake and
// its hand-off to the loop come on top of the futex round trip.
void BM_AsyncEventPingPong(benchmark::State& state) {
  ping_pong pp(state, "async-");
  if (!pp) return;
  boost::asio::io_context io;
  bool done = false;
  uipc::error_code failure;
  for (auto _ : state) {
    pp.ping->signal();
    done = false;
    pp.c->async_wait(*pp.pong, infinite,
                     boost::asio::bind_executor(io, [&](uipc::error_code ec, wait_status) {
                       failure = ec;
                       done = true;
                     }));
    io.restart();
    while (!done) io.run_one();
    if (failure) {
      state.SkipWithError(("async_wait: " + failure.message()).c_str());
      break;
    }
  }
}
BENCHMARK(BM_AsyncEventPingPong)->Arg(0)->UseRealTime();

void BM_CreateClose(benchmark::State& state) {
  auto c = as_peer([] { return client::connect(bench_options(std::chrono::microseconds(50))); });
  if (!c) {
    state.SkipWithError(("connect: " + c.error().message()).c_str());
    return;
  }
  for (auto _ : state) {
    auto e = c->create_event(event_reset::automatic);
    benchmark::DoNotOptimize(e);
  }
}
BENCHMARK(BM_CreateClose)->UseRealTime();

void BM_RawUdsRoundTrip(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  int sv[2];
  ::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
  const pid_t child = ::fork();
  if (child == 0) {
    place_peer();
    ::close(sv[0]);
    std::string buf(size, '\0');
    for (;;) {
      std::size_t got = 0;
      while (got < size) {
        const ssize_t n = ::read(sv[1], buf.data() + got, size - got);
        if (n <= 0) ::_exit(0);
        got += static_cast<std::size_t>(n);
      }
      if (::write(sv[1], buf.data(), size) != static_cast<ssize_t>(size)) ::_exit(1);
    }
  }
  ::close(sv[1]);
  std::string buf(size, 'x');
  for (auto _ : state) {
    if (::write(sv[0], buf.data(), size) != static_cast<ssize_t>(size)) break;
    std::size_t got = 0;
    while (got < size) {
      const ssize_t n = ::read(sv[0], buf.data() + got, size - got);
      if (n <= 0) break;
      got += static_cast<std::size_t>(n);
    }
  }
  ::close(sv[0]);
  ::waitpid(child, nullptr, 0);
}
BENCHMARK(BM_RawUdsRoundTrip)->Arg(64)->UseRealTime();

// ---- mutexes, semaphores, wait-all ---------------------------------------------------

// A process-shared robust pthread mutex in shared memory, as a user would set one
// up between processes.
struct robust_mutex {
  pthread_mutex_t m;
  robust_mutex() {
    pthread_mutexattr_t a;
    ::pthread_mutexattr_init(&a);
    ::pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    ::pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    ::pthread_mutex_init(&m, &a);
    ::pthread_mutexattr_destroy(&a);
  }
  ~robust_mutex() { ::pthread_mutex_destroy(&m); }
  robust_mutex(const robust_mutex&) = delete;
  robust_mutex& operator=(const robust_mutex&) = delete;
  void lock() {
    if (::pthread_mutex_lock(&m) == EOWNERDEAD) ::pthread_mutex_consistent(&m);
  }
  void unlock() { ::pthread_mutex_unlock(&m); }
};

// Shared memory for `T`s built in place, unmapped (after destruction) at scope end.
template <class T>
class shared_objects {
 public:
  explicit shared_objects(std::size_t n) : n_(n) {
    void* mem =
        ::mmap(nullptr, sizeof(T) * n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) std::abort();
    objects_ = static_cast<T*>(mem);
    for (std::size_t i = 0; i < n; ++i) new (&objects_[i]) T;
  }
  ~shared_objects() {
    for (std::size_t i = 0; i < n_; ++i) objects_[i].~T();
    ::munmap(objects_, sizeof(T) * n_);
  }
  shared_objects(const shared_objects&) = delete;
  shared_objects& operator=(const shared_objects&) = delete;
  T& operator[](std::size_t i) { return objects_[i]; }

 private:
  std::size_t n_;
  T* objects_;
};

// An unnamed process-shared POSIX semaphore with count 1.
struct shared_sem {
  sem_t s;
  shared_sem() { ::sem_init(&s, 1, 1); }
  ~shared_sem() { ::sem_destroy(&s); }
  shared_sem(const shared_sem&) = delete;
  shared_sem& operator=(const shared_sem&) = delete;
};

// A connected client for the in-process benchmarks (its daemon placed as a peer).
std::optional<client> bench_client(benchmark::State& state) {
  auto c = as_peer([] { return client::connect(bench_options(std::chrono::microseconds(50))); });
  if (!c) {
    state.SkipWithError(("connect: " + c.error().message()).c_str());
    return std::nullopt;
  }
  return std::move(*c);
}

void BM_Mutex_Uncontended(benchmark::State& state) {
  auto c = bench_client(state);
  if (!c) return;
  auto m = c->create_mutex();
  if (!m) {
    state.SkipWithError("create");
    return;
  }
  for (auto _ : state) {
    benchmark::DoNotOptimize(m->wait());
    benchmark::DoNotOptimize(m->release());
  }
}
BENCHMARK(BM_Mutex_Uncontended);

void BM_RobustPthreadMutex_Uncontended(benchmark::State& state) {
  shared_objects<robust_mutex> m(1);
  for (auto _ : state) {
    m[0].lock();
    m[0].unlock();
  }
}
BENCHMARK(BM_RobustPthreadMutex_Uncontended);

void BM_StdMutex_Uncontended(benchmark::State& state) {
  std::mutex m;
  for (auto _ : state) {
    m.lock();
    m.unlock();
  }
}
BENCHMARK(BM_StdMutex_Uncontended);

// Both processes take the mutex, note who held it last, and release, over and
// over. A take by one process after the other's is a handoff.
struct contention_record {
  std::atomic<std::uint32_t> stop{0};
  std::atomic<std::uint32_t> last_holder{0};  // 1: the benchmark, 2: the peer
};

template <class Take, class Give>
void contended_loop(benchmark::State& state, contention_record& record, Take take, Give give) {
  std::int64_t handoffs = 0;
  for (auto _ : state) {
    take();
    if (record.last_holder.load(std::memory_order_relaxed) != 1) {
      record.last_holder.store(1, std::memory_order_relaxed);
      ++handoffs;
    }
    give();
  }
  state.counters["handoffs"] = benchmark::Counter(
      static_cast<double>(handoffs) / static_cast<double>(std::max<std::int64_t>(
                                          1, static_cast<std::int64_t>(state.iterations()))));
}

template <class Take, class Give>
void peer_contention_loop(contention_record& record, Take take, Give give) {
  while (record.stop.load(std::memory_order_relaxed) == 0) {
    take();
    record.last_holder.store(2, std::memory_order_relaxed);
    give();
  }
}

// The mutex peer: opens the mutex and contends for it until the stop flag is set.
int run_mutex_peer(int argc, char** argv) {
  if (argc != 5) return 64;
  peer_directory = argv[4];
  auto c = client::connect(bench_options(std::chrono::microseconds(50)));
  if (!c) return 1;
  auto m = c->open_mutex(argv[2]);
  if (!m) return 2;
  auto* record = reinterpret_cast<contention_record*>(c->scratch_area().data() +
                                                      std::strtoull(argv[3], nullptr, 10));
  say_ready();
  peer_contention_loop(
      *record, [&] { (void)m->wait(); }, [&] { (void)m->release(); });
  return 0;
}

void BM_Mutex_Contended(benchmark::State& state) {
  auto c = bench_client(state);
  if (!c) return;
  static int round = 0;
  const std::string name = "contended-" + std::to_string(++round);
  auto m = c->create_mutex(false, name);
  auto block = c->store_scratch(sizeof(contention_record));
  if (!m || !block) {
    state.SkipWithError("create");
    return;
  }
  auto* record = new (block->data().data()) contention_record;
  const pid_t child =
      start_peer({"--peer-mutex", name, std::to_string(block->offset()), bench_directory()});
  if (child < 0) {
    state.SkipWithError("peer did not start");
    return;
  }
  contended_loop(
      state, *record, [&] { (void)m->wait(); }, [&] { (void)m->release(); });
  record->stop.store(1);
  ::waitpid(child, nullptr, 0);
}
BENCHMARK(BM_Mutex_Contended)->UseRealTime();

void BM_RobustPthreadMutex_Contended(benchmark::State& state) {
  shared_objects<robust_mutex> m(1);
  shared_objects<contention_record> record(1);
  const pid_t child = ::fork();
  if (child == 0) {
    place_peer();
    peer_contention_loop(
        record[0], [&] { m[0].lock(); }, [&] { m[0].unlock(); });
    ::_exit(0);
  }
  contended_loop(
      state, record[0], [&] { m[0].lock(); }, [&] { m[0].unlock(); });
  record[0].stop.store(1);
  ::waitpid(child, nullptr, 0);
}
BENCHMARK(BM_RobustPthreadMutex_Contended)->UseRealTime();

void BM_Semaphore_ReleaseWait(benchmark::State& state) {
  auto c = bench_client(state);
  if (!c) return;
  auto s = c->create_semaphore(0, 1);
  if (!s) {
    state.SkipWithError("create");
    return;
  }
  for (auto _ : state) {
    benchmark::DoNotOptimize(s->release());
    benchmark::DoNotOptimize(s->wait());
  }
}
BENCHMARK(BM_Semaphore_ReleaseWait);

void BM_PosixSem_PostWait(benchmark::State& state) {
  shared_objects<shared_sem> s(1);
  ::sem_wait(&s[0].s);  // from 1 to 0, as the handle semaphore starts
  for (auto _ : state) {
    ::sem_post(&s[0].s);
    while (::sem_wait(&s[0].s) != 0) {
    }
  }
}
BENCHMARK(BM_PosixSem_PostWait);

void BM_WaitAll_Semaphores(benchmark::State& state) {
  auto c = bench_client(state);
  if (!c) return;
  const auto n = static_cast<std::size_t>(state.range(0));
  std::vector<semaphore> sems;
  std::vector<const object*> set;
  for (std::size_t i = 0; i < n; ++i) {
    auto s = c->create_semaphore(1, 1);
    if (!s) {
      state.SkipWithError("create");
      return;
    }
    sems.push_back(std::move(*s));
  }
  for (const auto& s : sems) set.push_back(&s);
  for (auto _ : state) {
    benchmark::DoNotOptimize(c->wait_all(set));
    for (const auto& s : sems) benchmark::DoNotOptimize(s.release());
  }
}
BENCHMARK(BM_WaitAll_Semaphores)->DenseRange(2, 4);

void BM_PosixSem_OneByOne(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  shared_objects<shared_sem> s(n);
  for (auto _ : state) {
    for (std::size_t i = 0; i < n; ++i) {
      while (::sem_wait(&s[i].s) != 0) {
      }
    }
    for (std::size_t i = 0; i < n; ++i) ::sem_post(&s[i].s);
  }
}
BENCHMARK(BM_PosixSem_OneByOne)->DenseRange(2, 4);

void BM_WaitAll_Mutexes(benchmark::State& state) {
  auto c = bench_client(state);
  if (!c) return;
  const auto n = static_cast<std::size_t>(state.range(0));
  std::vector<mutex> mutexes;
  std::vector<const object*> set;
  for (std::size_t i = 0; i < n; ++i) {
    auto m = c->create_mutex();
    if (!m) {
      state.SkipWithError("create");
      return;
    }
    mutexes.push_back(std::move(*m));
  }
  for (const auto& m : mutexes) set.push_back(&m);
  for (auto _ : state) {
    benchmark::DoNotOptimize(c->wait_all(set));
    for (const auto& m : mutexes) benchmark::DoNotOptimize(m.release());
  }
}
BENCHMARK(BM_WaitAll_Mutexes)->DenseRange(2, 4);

void BM_RobustPthreadMutex_OneByOne(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  shared_objects<robust_mutex> m(n);
  for (auto _ : state) {
    for (std::size_t i = 0; i < n; ++i) m[i].lock();
    for (std::size_t i = 0; i < n; ++i) m[i].unlock();
  }
}
BENCHMARK(BM_RobustPthreadMutex_OneByOne)->DenseRange(2, 4);

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && std::strcmp(argv[1], "--peer") == 0) return run_peer(argc, argv);
  if (argc >= 2 && std::strcmp(argv[1], "--peer-mutex") == 0) return run_mutex_peer(argc, argv);
  ::signal(SIGPIPE, SIG_IGN);
  uipc::bench::place_self();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::error_code ignored;
  std::filesystem::remove_all(bench_directory(), ignored);
  return 0;
}
