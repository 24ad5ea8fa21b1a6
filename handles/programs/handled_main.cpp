// uipc-handled: the standalone handle daemon. Serves one location until its last
// client has been gone for --linger-ms, or until SIGTERM/SIGINT; removes its
// segment and socket either way (a socket passed by the service manager stays,
// for the manager to start the next daemon at the next client).
#include <signal.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "uipc/core/event_loop.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/server.hpp"
#include "uipc/handles/daemon.hpp"

namespace {

int usage(std::FILE* out = stderr) {
  std::fprintf(
      out,
      "usage: uipc-handled [--directory DIR] [--name NAME] [--capacity N] [--scratch BYTES]\n"
      "                    [--linger-ms MS] [--no-idle-exit]\n"
      "Serves named events, mutexes and semaphores (the handle daemon) on the socket\n"
      "DIR/uipc-NAME.sock. Clients start it on demand; it leaves when its last client has\n"
      "been gone for the linger time, or at SIGTERM or SIGINT.\n"
      "  --directory DIR  where the socket lives (default: $XDG_RUNTIME_DIR, else\n"
      "                   /tmp/uipc-UID)\n"
      "  --name NAME      the instance (default: handles; letters, digits, '_', '-')\n"
      "  --capacity N     slots in the handle table (default: 1024; N - 1 objects fit)\n"
      "  --scratch BYTES  the scratch area clients borrow from (default: 262144)\n"
      "  --linger-ms MS   how long to stay once the last client left (default: 1000)\n"
      "  --no-idle-exit   serve until a signal, with or without clients\n"
      "Under socket activation (a unit's uipc-handled.socket) the socket is the service\n"
      "manager's, passed with LISTEN_FDS, and left in place when the daemon leaves.\n"
      "Exit status: 0 stopped or idle; 1 could not start (another daemon serves the\n"
      "socket, a bad directory); 2 usage.\n");
  return 2;
}

template <class Int>
bool parse_number(std::string_view text, Int& out) {
  auto r = std::from_chars(text.data(), text.data() + text.size(), out);
  return r.ec == std::errc{} && r.ptr == text.data() + text.size();
}

}  // namespace

int main(int argc, char** argv) {
  // Every client holds descriptors here: the soft limit of 1024 is not ours to keep.
  (void)uipc::raise_descriptor_limit();
  uipc::handles::daemon_options options;
  bool idle_exit = true;
  long long linger_ms = 1000;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--directory" && has_value) {
      options.where.directory = argv[++i];
    } else if (arg == "--name" && has_value) {
      options.where.name = argv[++i];
    } else if (arg == "--capacity" && has_value) {
      if (!parse_number(argv[++i], options.capacity)) return usage();
    } else if (arg == "--scratch" && has_value) {
      if (!parse_number(argv[++i], options.scratch_size)) return usage();
    } else if (arg == "--linger-ms" && has_value) {
      if (!parse_number(argv[++i], linger_ms) || linger_ms < 0) return usage();
    } else if (arg == "--no-idle-exit") {
      idle_exit = false;
    } else if (arg == "--help" || arg == "-h") {
      usage(stdout);
      return 0;
    } else {
      return usage();
    }
  }
  ::signal(SIGPIPE, SIG_IGN);
  options.linger = std::chrono::milliseconds(linger_ms);

  uipc::event_loop loop(1, /*catch_signals=*/true);
  if (idle_exit) options.on_idle = [&loop] { loop.stop(); };
  auto daemon = uipc::handles::handle_daemon::start(loop.context(), std::move(options));
  if (!daemon) {
    std::fprintf(stderr, "uipc-handled: cannot start: %s\n", daemon.error().message().c_str());
    return 1;
  }
  for (const auto& path : uipc::untaken_passed_sockets()) {
    std::fprintf(stderr,
                 "uipc-handled: the service manager passed a socket for '%s', but this daemon "
                 "serves %s\n",
                 path.c_str(), (*daemon)->where().socket_path.c_str());
  }
  loop.on_stop([&daemon] { (*daemon)->stop(); });
  loop.run();
  (*daemon)->stop();
  return 0;
}
