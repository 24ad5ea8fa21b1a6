// uipc-echo: an echo server on the server kit and a client making typed calls over a
// Unix socket, printing round trips per second.
//
//   uipc-echo                 serve and ping in two processes for a few seconds (the demo)
//   uipc-echo serve [--socket PATH]
//   uipc-echo ping  [--socket PATH] [--seconds N] [--size BYTES] [--inflight N]
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "uipc/core/event_loop.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/runtime_dir.hpp"
#include "uipc/core/server.hpp"
#include "uipc/core/typed.hpp"
#include "uipc/proto/echo.pb.h"

namespace {

using namespace uipc;
using clock_type = std::chrono::steady_clock;

struct settings {
  std::string socket;
  int seconds = 3;
  std::size_t size = 64;
  int inflight = 1;
};

constexpr std::uint32_t echo_type = 1;

int serve(const settings& s, bool quiet = false) {
  event_loop loop(1, /*catch_signals=*/true);
  request_router router;
  router.on<proto::echo::Echo, proto::echo::Echo>(
      echo_type,
      [](request_context&, const proto::echo::Echo& in) { return result<proto::echo::Echo>(in); });
  auto srv = server::start(loop.context(), s.socket, router);
  if (!srv) {
    std::fprintf(stderr, "uipc-echo: cannot listen on %s: %s\n", s.socket.c_str(),
                 srv.error().message().c_str());
    return 1;
  }
  loop.on_stop([&] { (*srv)->stop(); });
  if (!quiet) std::printf("uipc-echo: serving on %s (Ctrl-C stops)\n", s.socket.c_str());
  std::fflush(stdout);
  loop.run();
  const server_stats st = (*srv)->stats();
  if (!quiet) {
    std::printf(
        "uipc-echo: stopped after %llu sessions, %llu requests, %llu errors, %llu refused\n",
        static_cast<unsigned long long>(st.sessions_total),
        static_cast<unsigned long long>(st.requests), static_cast<unsigned long long>(st.errors),
        static_cast<unsigned long long>(st.refusals));
  }
  return 0;
}

// Keeps `inflight` calls going and prints the rate once a second.
int ping(const settings& s) {
  boost::asio::io_context ctx(1);
  result<connection::pointer> c = make_error_code(errc::peer_closed);
  for (int attempt = 0; attempt < 100; ++attempt) {  // the server may still be starting
    c = connection::connect(ctx, s.socket);
    if (c) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (!c) {
    std::fprintf(stderr, "uipc-echo: cannot connect to %s: %s\n", s.socket.c_str(),
                 c.error().message().c_str());
    return 1;
  }
  auto conn = *c;
  std::printf("uipc-echo: connected to %s (server pid %d), %zu-byte frames, %d in flight\n",
              s.socket.c_str(), static_cast<int>(conn->peer().pid), s.size, s.inflight);
  proto::echo::Echo request;
  request.set_payload(std::string(s.size, 'e'));
  std::uint64_t done = 0;
  std::uint64_t in_second = 0;
  bool failed = false;
  const auto start = clock_type::now();
  auto next_report = start + std::chrono::seconds(1);
  const auto end = start + std::chrono::seconds(s.seconds);
  std::function<void()> issue = [&] {
    async_typed_call<proto::echo::Echo>(
        *conn, echo_type, request, [&](error_code ec, proto::echo::Echo reply) {
          if (ec || reply.payload() != request.payload()) {
            if (!failed) std::fprintf(stderr, "uipc-echo: call failed: %s\n", ec.message().c_str());
            failed = true;
            return;
          }
          ++done;
          ++in_second;
          if (clock_type::now() < end) issue();
        });
  };
  for (int i = 0; i < s.inflight; ++i) issue();
  while (!failed && clock_type::now() < end + std::chrono::milliseconds(200)) {
    ctx.run_one_for(std::chrono::milliseconds(50));
    if (clock_type::now() >= next_report) {
      std::printf("  %8llu round trips/s\n", static_cast<unsigned long long>(in_second));
      std::fflush(stdout);
      in_second = 0;
      next_report += std::chrono::seconds(1);
    }
  }
  const double secs = std::chrono::duration<double>(clock_type::now() - start).count();
  std::printf("uipc-echo: %llu round trips in %.2f s: %.0f round trips/s, %.1f us each\n",
              static_cast<unsigned long long>(done), secs, static_cast<double>(done) / secs,
              done ? secs * 1e6 / static_cast<double>(done) * s.inflight : 0.0);
  conn->close();
  ctx.run_for(std::chrono::milliseconds(10));
  return failed || done == 0 ? 1 : 0;
}

int demo(const settings& s) {
  const pid_t server = ::fork();
  if (server < 0) return 1;
  if (server == 0) ::_exit(serve(s, /*quiet=*/true));
  std::printf("uipc-echo: server pid %d on %s\n", static_cast<int>(server), s.socket.c_str());
  const int rc = ping(s);
  ::kill(server, SIGTERM);
  int status = 0;
  ::waitpid(server, &status, 0);
  const bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  std::printf("uipc-echo: server stopped %s\n", clean ? "cleanly" : "with an error");
  return rc != 0 || !clean ? 1 : 0;
}

int usage(std::FILE* out = stderr) {
  std::fprintf(out,
               "usage: uipc-echo [serve|ping|demo] [--socket PATH] [--seconds N] [--size BYTES] "
               "[--inflight N]\n"
               "Framed echo over a Unix socket, the smallest uipc server and client.\n"
               "  serve            answer every frame with its payload until SIGTERM\n"
               "  ping             call the server for N seconds and print calls per second\n"
               "  demo             both, the server in a child process (the default)\n"
               "  --socket PATH    the socket (default: the runtime directory's echo.sock)\n"
               "  --seconds N      how long ping calls (default: 3)\n"
               "  --size BYTES     payload of each call (default: 64; at most 1 MiB - 64)\n"
               "  --inflight N     calls in flight at once (default: 1)\n"
               "Exit status: 0 success; 1 a call or the server failed; 2 usage.\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = "demo";
  settings s;
  int i = 1;
  if (i < argc && argv[i][0] != '-') mode = argv[i++];
  for (; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") return usage(stdout), 0;
    if (i + 1 >= argc) return usage();
    const char* value = argv[++i];
    if (arg == "--socket")
      s.socket = value;
    else if (arg == "--seconds")
      s.seconds = std::atoi(value);
    else if (arg == "--size")
      s.size = static_cast<std::size_t>(std::atol(value));
    else if (arg == "--inflight")
      s.inflight = std::atoi(value);
    else
      return usage();
  }
  if (s.seconds <= 0 || s.inflight <= 0 || s.size > (1u << 20) - 64) return usage();
  if (s.socket.empty()) {
    auto dir = runtime_directory();
    if (!dir) {
      std::fprintf(stderr, "uipc-echo: no runtime directory: %s\n", dir.error().message().c_str());
      return 1;
    }
    s.socket = *dir + "/echo.sock";
  }
  if (mode == "serve") return serve(s);
  if (mode == "ping") return ping(s);
  if (mode == "demo") return demo(s);
  return usage();
}
