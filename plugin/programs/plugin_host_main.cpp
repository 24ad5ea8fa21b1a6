// uipc-plugin-host: a plug-in host as a program. Loads plug-ins (shared
// objects, or every *.so of a directory), some of them isolated in processes
// of their own, and serves the control protocol (uipc/plugin/control.hpp) on
// a caps point, so `uipcctl plugins` and `uipcctl services` reach it.
#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "uipc/core/server.hpp"
#include "uipc/plugin/control.hpp"
#include "uipc/plugin/host.hpp"

namespace {

namespace fs = std::filesystem;

constexpr int exit_ok = 0;
constexpr int exit_no_point = 2;
constexpr int exit_usage = 64;

int usage(int status) {
  std::fprintf(
      status ? stderr : stdout,
      "usage: uipc-plugin-host [--point NAME] [--dir DIR] [--isolate PLUGIN.so]... [PLUGIN.so | "
      "DIR]...\n"
      "Loads the plug-ins named (a directory: every *.so in it, in name order) into one\n"
      "host, each --isolate one into a process of its own (uipc-plugin-runner), and serves\n"
      "until SIGTERM or SIGINT. A plug-in that does not load is reported and skipped.\n"
      "  --point NAME   the control point (default: %s), reachable by this user:\n"
      "                 uipcctl plugins list|stats|reload NAME, uipcctl services list|call\n"
      "  --dir DIR      the caps rendezvous directory (default: $UIPC_SHARED_DIR, else\n"
      "                 /tmp/uipc-shared)\n"
      "Prints \"serving\" and the point's name on stdout once the point answers.\n"
      "Exit status: 0 stopped by SIGTERM or SIGINT; 2 the control point could not be\n"
      "registered; 64 usage.\n",
      std::string(uipc::plugin::default_control_point).c_str());
  return status;
}

// The shared objects to load for one argument: itself, or a directory's *.so.
std::vector<fs::path> expand(const fs::path& arg) {
  std::error_code ec;
  if (!fs::is_directory(arg, ec)) return {arg};
  std::vector<fs::path> out;
  for (const auto& entry : fs::directory_iterator(arg, ec))
    if (entry.path().extension() == ".so") out.push_back(entry.path());
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  // Every client holds descriptors here: the soft limit of 1024 is not ours to keep.
  (void)uipc::raise_descriptor_limit();
  uipc::plugin::control_options control_options;
  std::vector<std::pair<fs::path, bool>> plugins;  // path, isolated
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--point" && i + 1 < argc)
      control_options.point = argv[++i];
    else if (arg == "--dir" && i + 1 < argc)
      control_options.directory = argv[++i];
    else if (arg == "--isolate" && i + 1 < argc)
      plugins.emplace_back(argv[++i], true);
    else if (arg == "--help" || arg == "-h")
      return usage(exit_ok);
    else if (!arg.empty() && arg[0] != '-')
      for (auto& p : expand(arg)) plugins.emplace_back(std::move(p), false);
    else
      return usage(exit_usage);
  }

  auto h = uipc::plugin::host::create();
  if (!h) {
    std::fprintf(stderr, "uipc-plugin-host: %s\n", h.error().message().c_str());
    return exit_no_point;
  }
  uipc::plugin::isolation_options isolation;
  isolation.directory = control_options.directory;
  std::size_t loaded = 0;
  for (const auto& [path, isolated] : plugins) {
    auto name = isolated ? (*h)->load_isolated(path, isolation) : (*h)->load(path);
    if (name) {
      ++loaded;
      std::fprintf(stderr, "uipc-plugin-host: loaded %s from %s%s\n", name->c_str(), path.c_str(),
                   isolated ? " (isolated)" : "");
    } else {
      std::fprintf(stderr, "uipc-plugin-host: %s: %s (skipped)\n", path.c_str(),
                   name.error().message().c_str());
    }
  }

  boost::asio::io_context io;
  auto control = uipc::plugin::control::start(io, **h, control_options);
  if (!control) {
    std::fprintf(stderr, "uipc-plugin-host: cannot register %s: %s\n",
                 control_options.point.c_str(), control.error().message().c_str());
    return exit_no_point;
  }
  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](boost::system::error_code, int) {
    (*control)->stop();  // a request in progress ends first
    io.stop();
  });
  std::printf("serving %zu of %zu plug-ins on %s\n", loaded, plugins.size(),
              control_options.point.c_str());
  std::fflush(stdout);
  io.run();
  return exit_ok;  // the host's destructor shuts every plug-in down
}
