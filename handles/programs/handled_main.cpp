// uipc-handled: the standalone handle daemon. Serves one location until its last
// client has been gone for --linger-ms, or until SIGTERM/SIGINT; removes its
// segment and socket either way.
#include <signal.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "uipc/core/event_loop.hpp"
#include "uipc/handles/daemon.hpp"

namespace {

void usage() {
  std::fprintf(
      stderr,
      "usage: uipc-handled [--directory DIR] [--name NAME] [--capacity N] [--scratch BYTES]\n"
      "                    [--linger-ms MS] [--no-idle-exit]\n");
}

template <class Int>
bool parse_number(std::string_view text, Int& out) {
  auto r = std::from_chars(text.data(), text.data() + text.size(), out);
  return r.ec == std::errc{} && r.ptr == text.data() + text.size();
}

}  // namespace

int main(int argc, char** argv) {
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
      if (!parse_number(argv[++i], options.capacity)) return usage(), 2;
    } else if (arg == "--scratch" && has_value) {
      if (!parse_number(argv[++i], options.scratch_size)) return usage(), 2;
    } else if (arg == "--linger-ms" && has_value) {
      if (!parse_number(argv[++i], linger_ms) || linger_ms < 0) return usage(), 2;
    } else if (arg == "--no-idle-exit") {
      idle_exit = false;
    } else {
      usage();
      return 2;
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
  loop.on_stop([&daemon] { (*daemon)->stop(); });
  loop.run();
  (*daemon)->stop();
  return 0;
}
