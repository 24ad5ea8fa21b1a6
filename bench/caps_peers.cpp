// bench_caps, continued: the peers a user would pick instead of caps, client and server in
// two processes, each built only when its Debian package is present (bench/caps.cmake).
//   BM_ZmqReqRep/64        — ZeroMQ REQ/REP over ipc://, request and reply of 64 bytes
//   BM_ZmqPushPull/64      — ZeroMQ PUSH/PULL over ipc://, 64-byte messages one way, at most
//                            64 in flight (the server hands back a credit every 16);
//                            items/s = messages/s, as BM_CapsPipelined/64
//   BM_ZmqPushPullEcho/64  — the same with every message echoed back on a second PUSH/PULL
//                            pair, 64 in flight: the very shape of BM_CapsPipelined/64
//   BM_SdBusPeerCall/64    — sd-bus peer-to-peer over a socketpair (anonymous auth): a method
//                            call with a 64-byte byte array, answered with the same bytes
//   BM_SdBusBrokerCall/64  — the same call through a private dbus-daemon the benchmark starts
//                            and stops; the server owns a well-known name
// Every server is a child process (fork); it is killed and reaped when its benchmark ends,
// and sockets and daemon live in a temporary directory removed with it.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#if UIPC_BENCH_ZMQ
#include <zmq.h>
#endif
#if UIPC_BENCH_SDBUS
#include <systemd/sd-bus.h>
#endif

namespace {

#if UIPC_BENCH_ZMQ || UIPC_BENCH_SDBUS

// A directory of the benchmark's own for its sockets; removed with everything in it.
class temp_dir {
 public:
  temp_dir() {
    path_ = (std::filesystem::temp_directory_path() / "uipc-bench-peers-XXXXXX").string();
    if (::mkdtemp(path_.data()) == nullptr) std::abort();
  }
  ~temp_dir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Waits (at most `timeout`) until `fd` is readable; false on timeout or error.
bool readable_within(int fd, std::chrono::milliseconds timeout) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(timeout.count())) == 1;
}

// Sends `sig` to `pid`, gives it two seconds to exit, then SIGKILL; always reaps it.
void stop_process(pid_t pid, int sig) {
  if (pid <= 0) return;
  ::kill(pid, sig);
  for (int i = 0; i < 2000; ++i) {
    if (::waitpid(pid, nullptr, WNOHANG) == pid) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
}

// A server in a child process: `serve(ready)` writes 'y' on `ready` once it listens, then
// serves until killed. The parent waits up to ten seconds for that 'y'.
class server_child {
 public:
  explicit server_child(const std::function<void(int ready)>& serve) {
    int ready[2];
    if (::pipe(ready) != 0) std::abort();
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive a benchmark that was interrupted
      ::close(ready[0]);
      serve(ready[1]);
      ::_exit(0);
    }
    ::close(ready[1]);
    char c = 0;
    ok_ = readable_within(ready[0], std::chrono::seconds(10)) && ::read(ready[0], &c, 1) == 1 &&
          c == 'y';
    ::close(ready[0]);
  }
  ~server_child() { stop_process(pid_, SIGKILL); }
  server_child(const server_child&) = delete;
  server_child& operator=(const server_child&) = delete;
  bool ok() const { return ok_; }

 private:
  pid_t pid_ = -1;
  bool ok_ = false;
};

void say_ready(int ready, bool ok) {
  (void)::write(ready, ok ? "y" : "n", 1);
  ::close(ready);
}

#endif

// ---- ZeroMQ ----------------------------------------------------------------------

#if UIPC_BENCH_ZMQ

constexpr int zmq_timeout_ms = 5000;  // no blocking call waits longer: a dead peer ends the run

// A context and its sockets, closed (without lingering) when it goes.
class zmq_session {
 public:
  zmq_session() : ctx_(::zmq_ctx_new()) {}
  ~zmq_session() {
    for (void* s : sockets_) ::zmq_close(s);
    ::zmq_ctx_term(ctx_);
  }
  zmq_session(const zmq_session&) = delete;
  zmq_session& operator=(const zmq_session&) = delete;

  // A socket of `type` bound to (bind) or connected to `endpoint`; nullptr on failure.
  void* open(int type, const std::string& endpoint, bool bind) {
    void* s = ::zmq_socket(ctx_, type);
    if (s == nullptr) return nullptr;
    sockets_.push_back(s);
    const int linger = 0, timeout = zmq_timeout_ms;
    ::zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    ::zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    ::zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout, sizeof timeout);
    const int rc = bind ? ::zmq_bind(s, endpoint.c_str()) : ::zmq_connect(s, endpoint.c_str());
    return rc == 0 ? s : nullptr;
  }

 private:
  void* ctx_;
  std::vector<void*> sockets_;
};

std::string ipc_endpoint(const temp_dir& dir, const char* name) {
  return "ipc://" + dir.path() + "/" + name;
}

void BM_ZmqReqRep(benchmark::State& state) {
  const auto size = static_cast<std::size_t>(state.range(0));
  temp_dir dir;
  const std::string endpoint = ipc_endpoint(dir, "reqrep");
  server_child server([&](int ready) {
    zmq_session zs;
    void* rep = zs.open(ZMQ_REP, endpoint, true);
    say_ready(ready, rep != nullptr);
    std::vector<char> buf(size);
    for (;;) {
      const int n = ::zmq_recv(rep, buf.data(), buf.size(), 0);
      if (n < 0 && zmq_errno() == EAGAIN) continue;  // the client is just quiet
      if (n < 0 || ::zmq_send(rep, buf.data(), static_cast<std::size_t>(n), 0) < 0) return;
    }
  });
  if (!server.ok()) return state.SkipWithError("zmq server did not start");
  zmq_session zs;
  void* req = zs.open(ZMQ_REQ, endpoint, false);
  if (req == nullptr) return state.SkipWithError("zmq connect");
  std::vector<char> msg(size, 'x'), reply(size);
  for (auto _ : state) {
    if (::zmq_send(req, msg.data(), size, 0) < 0 ||
        ::zmq_recv(req, reply.data(), size, 0) != static_cast<int>(size)) {
      return state.SkipWithError(::zmq_strerror(zmq_errno()));
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * size * 2));
}
BENCHMARK(BM_ZmqReqRep)->Arg(64)->UseRealTime();

// Pipelined messages client -> server over PUSH/PULL, at most `window` in flight. With
// `echo`, the server sends each message back and each one is a credit; without, the server
// sends a one-byte credit for every `batch` messages it has taken. Each iteration sends one
// message; items/s = messages/s.
void run_push_pull(benchmark::State& state, bool echo) {
  const auto size = static_cast<std::size_t>(state.range(0));
  constexpr std::size_t window = 64;
  const std::size_t batch = echo ? 1 : 16;
  temp_dir dir;
  const std::string to_server = ipc_endpoint(dir, "push"), to_client = ipc_endpoint(dir, "back");
  server_child server([&](int ready) {
    zmq_session zs;
    void* pull = zs.open(ZMQ_PULL, to_server, true);
    void* back = pull ? zs.open(ZMQ_PUSH, to_client, true) : nullptr;
    say_ready(ready, back != nullptr);
    std::vector<char> buf(size);
    for (std::size_t taken = 0;;) {
      const int n = ::zmq_recv(pull, buf.data(), buf.size(), 0);
      if (n < 0 && zmq_errno() == EAGAIN) continue;
      if (n < 0) return;
      if (++taken % batch != 0) continue;
      const std::size_t credit_size = echo ? static_cast<std::size_t>(n) : 1;
      if (::zmq_send(back, buf.data(), credit_size, 0) < 0) return;
    }
  });
  if (!server.ok()) return state.SkipWithError("zmq server did not start");
  zmq_session zs;
  void* push = zs.open(ZMQ_PUSH, to_server, false);
  void* back = push ? zs.open(ZMQ_PULL, to_client, false) : nullptr;
  if (back == nullptr) return state.SkipWithError("zmq connect");
  std::vector<char> msg(size, 'p'), credit(size);
  std::size_t sent = 0, credited = 0;
  auto take_credit = [&] {
    if (::zmq_recv(back, credit.data(), credit.size(), 0) < 0) return false;
    credited += batch;
    return true;
  };
  for (auto _ : state) {
    while (sent - credited >= window) {
      if (!take_credit()) return state.SkipWithError(::zmq_strerror(zmq_errno()));
    }
    if (::zmq_send(push, msg.data(), size, 0) < 0)
      return state.SkipWithError(::zmq_strerror(zmq_errno()));
    ++sent;
  }
  while (sent - credited >= batch && take_credit()) {
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()));
}

void BM_ZmqPushPull(benchmark::State& state) { run_push_pull(state, false); }
BENCHMARK(BM_ZmqPushPull)->Arg(64)->UseRealTime();

void BM_ZmqPushPullEcho(benchmark::State& state) { run_push_pull(state, true); }
BENCHMARK(BM_ZmqPushPullEcho)->Arg(64)->UseRealTime();

#endif

// ---- sd-bus ----------------------------------------------------------------------

#if UIPC_BENCH_SDBUS

constexpr const char* bus_name = "org.uipc.BenchEcho";
constexpr const char* object_path = "/org/uipc/BenchEcho";
constexpr const char* interface_name = "org.uipc.BenchEcho";
constexpr std::uint64_t call_timeout_us = 5'000'000;

// org.uipc.BenchEcho.Echo(ay) -> ay: answers with the bytes it got.
int on_echo(sd_bus_message* call, void*, sd_bus_error*) {
  const void* data = nullptr;
  std::size_t size = 0;
  int r = ::sd_bus_message_read_array(call, 'y', &data, &size);
  if (r < 0) return r;
  sd_bus_message* reply = nullptr;
  r = ::sd_bus_message_new_method_return(call, &reply);
  if (r >= 0) r = ::sd_bus_message_append_array(reply, 'y', data, size);
  if (r >= 0) r = ::sd_bus_send(nullptr, reply, nullptr);
  ::sd_bus_message_unref(reply);
  return r < 0 ? r : 1;
}

const sd_bus_vtable echo_vtable[] = {
    SD_BUS_VTABLE_START(0),
    SD_BUS_METHOD("Echo", "ay", "ay", on_echo, SD_BUS_VTABLE_UNPRIVILEGED),
    SD_BUS_VTABLE_END,
};

// Serves the echo object on `bus` (already started) until the connection ends.
void serve_echo(sd_bus* bus, int ready, bool own_name) {
  int r =
      ::sd_bus_add_object_vtable(bus, nullptr, object_path, interface_name, echo_vtable, nullptr);
  if (r >= 0 && own_name) r = ::sd_bus_request_name(bus, bus_name, 0);
  say_ready(ready, r >= 0);
  if (r < 0) return;
  for (;;) {
    r = ::sd_bus_process(bus, nullptr);
    if (r < 0) return;
    if (r > 0) continue;
    if (::sd_bus_wait(bus, UINT64_MAX) < 0) return;
  }
}

// The client's side: calls Echo with `size` bytes, checks the reply's size.
void run_echo_calls(benchmark::State& state, sd_bus* bus, const char* destination) {
  const auto size = static_cast<std::size_t>(state.range(0));
  std::vector<char> msg(size, 'x');
  for (auto _ : state) {
    sd_bus_message* call = nullptr;
    sd_bus_message* reply = nullptr;
    sd_bus_error error = SD_BUS_ERROR_NULL;
    int r = ::sd_bus_message_new_method_call(bus, &call, destination, object_path, interface_name,
                                             "Echo");
    if (r >= 0) r = ::sd_bus_message_append_array(call, 'y', msg.data(), size);
    if (r >= 0) r = ::sd_bus_call(bus, call, call_timeout_us, &error, &reply);
    const void* data = nullptr;
    std::size_t got = 0;
    if (r >= 0) r = ::sd_bus_message_read_array(reply, 'y', &data, &got);
    ::sd_bus_message_unref(call);
    ::sd_bus_message_unref(reply);
    if (r < 0 || got != size) {
      const std::string what = error.message ? error.message : std::strerror(-r);
      ::sd_bus_error_free(&error);
      return state.SkipWithError(("sd-bus call: " + what).c_str());
    }
    benchmark::DoNotOptimize(data);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * size * 2));
}

// A bus on an already connected socket; the server side authenticates anonymous clients.
sd_bus* open_peer_bus(int fd, bool server) {
  sd_bus* bus = nullptr;
  if (::sd_bus_new(&bus) < 0) return nullptr;
  int r = ::sd_bus_set_fd(bus, fd, fd);
  if (r >= 0 && server) {
    sd_id128_t id;
    r = ::sd_id128_randomize(&id);
    if (r >= 0) r = ::sd_bus_set_server(bus, 1, id);
  }
  if (r >= 0) r = ::sd_bus_set_anonymous(bus, 1);
  if (r >= 0) r = ::sd_bus_start(bus);
  if (r < 0) bus = ::sd_bus_flush_close_unref(bus);
  return bus;
}

void BM_SdBusPeerCall(benchmark::State& state) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0)
    return state.SkipWithError("socketpair");
  server_child server([&](int ready) {
    ::close(fds[0]);
    sd_bus* bus = open_peer_bus(fds[1], true);
    if (bus == nullptr) return say_ready(ready, false);
    serve_echo(bus, ready, false);
    ::sd_bus_flush_close_unref(bus);
  });
  ::close(fds[1]);
  if (!server.ok()) {
    ::close(fds[0]);
    return state.SkipWithError("sd-bus peer server did not start");
  }
  sd_bus* bus = open_peer_bus(fds[0], false);  // the bus owns fds[0] from here on
  if (bus == nullptr) return state.SkipWithError("sd-bus peer client");
  run_echo_calls(state, bus, nullptr);
  ::sd_bus_flush_close_unref(bus);
}
BENCHMARK(BM_SdBusPeerCall)->Arg(64)->UseRealTime();

#ifdef UIPC_BENCH_DBUS_DAEMON

// A private dbus-daemon listening on <dir>/bus only, stopped (SIGTERM) with this object.
class private_bus_daemon {
 public:
  explicit private_bus_daemon(const temp_dir& dir) {
    int printed[2];
    if (::pipe(printed) != 0) std::abort();
    const std::string listen = "--address=unix:path=" + dir.path() + "/bus";
    const std::string print = "--print-address=" + std::to_string(printed[1]);
    log_ = dir.path() + "/dbus-daemon.log";
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      ::close(printed[0]);
      // Its complaints (as root in a container: "Failed to set fd limit") go to a log,
      // which the benchmark reports only when the daemon did not start.
      const int log = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      if (log >= 0) ::dup2(log, STDERR_FILENO);
      ::execl(UIPC_BENCH_DBUS_DAEMON, "dbus-daemon", "--session", "--nofork", "--nopidfile",
              listen.c_str(), print.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    ::close(printed[1]);
    // The daemon prints its address, a line, once it listens.
    char buf[512];
    std::size_t got = 0;
    while (got < sizeof buf - 1 && readable_within(printed[0], std::chrono::seconds(10))) {
      const ssize_t n = ::read(printed[0], buf + got, sizeof buf - 1 - got);
      if (n <= 0) break;
      got += static_cast<std::size_t>(n);
      if (buf[got - 1] == '\n') {
        address_.assign(buf, got - 1);
        break;
      }
    }
    ::close(printed[0]);
  }
  ~private_bus_daemon() { stop_process(pid_, SIGTERM); }
  private_bus_daemon(const private_bus_daemon&) = delete;
  private_bus_daemon& operator=(const private_bus_daemon&) = delete;
  // The address the daemon printed; empty when it did not start.
  const std::string& address() const { return address_; }
  // What the daemon wrote on its standard error (its first lines).
  std::string log() const {
    std::string text(1024, '\0');
    const int fd = ::open(log_.c_str(), O_RDONLY | O_CLOEXEC);
    const ssize_t n = fd >= 0 ? ::read(fd, text.data(), text.size()) : 0;
    if (fd >= 0) ::close(fd);
    text.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
    return text;
  }

 private:
  pid_t pid_ = -1;
  std::string log_;
  std::string address_;
};

// A client connection to the bus at `address` (Hello included).
sd_bus* open_broker_bus(const std::string& address) {
  sd_bus* bus = nullptr;
  if (::sd_bus_new(&bus) < 0) return nullptr;
  int r = ::sd_bus_set_address(bus, address.c_str());
  if (r >= 0) r = ::sd_bus_set_bus_client(bus, 1);
  if (r >= 0) r = ::sd_bus_start(bus);
  if (r < 0) bus = ::sd_bus_flush_close_unref(bus);
  return bus;
}

void BM_SdBusBrokerCall(benchmark::State& state) {
  temp_dir dir;
  private_bus_daemon daemon(dir);
  if (daemon.address().empty())
    return state.SkipWithError(("dbus-daemon did not start: " + daemon.log()).c_str());
  server_child server([&](int ready) {
    sd_bus* bus = open_broker_bus(daemon.address());
    if (bus == nullptr) return say_ready(ready, false);
    serve_echo(bus, ready, true);
    ::sd_bus_flush_close_unref(bus);
  });
  if (!server.ok()) return state.SkipWithError("sd-bus server did not take its name");
  sd_bus* bus = open_broker_bus(daemon.address());
  if (bus == nullptr) return state.SkipWithError("sd-bus client could not connect to the daemon");
  run_echo_calls(state, bus, bus_name);
  ::sd_bus_flush_close_unref(bus);
}
BENCHMARK(BM_SdBusBrokerCall)->Arg(64)->UseRealTime();

#endif
#endif

}  // namespace
