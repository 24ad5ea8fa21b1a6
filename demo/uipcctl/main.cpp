// uipcctl: the command-line client of uipc's daemons. Dispatches to one
// subcommand per module; each is a separate file (see commands.hpp).
#include <array>
#include <cstdio>
#include <cstring>

#include "commands.hpp"

namespace {

constexpr std::array commands{
    uipcctl::command{"handles", "named events, mutexes and semaphores of the handle daemon",
                     uipcctl::run_handles},
    uipcctl::command{"caps", "capability rendezvous points: list, call, watch", uipcctl::run_caps},
    uipcctl::command{"plugins", "a plug-in host's plug-ins: list, stats, reload",
                     uipcctl::run_plugins},
    uipcctl::command{"services", "a plug-in host's services: list, call", uipcctl::run_services},
    uipcctl::command{"status", "uipcd: what serves where, reload errors", uipcctl::run_status},
    uipcctl::command{"stats", "uipcd: every module's figures (--watch refreshes them)",
                     uipcctl::run_stats},
    uipcctl::command{"clients", "uipcd: the clients of its caps points and handle daemon",
                     uipcctl::run_clients},
    uipcctl::command{"objects", "uipcd: the live objects of its handle daemon",
                     uipcctl::run_objects},
    uipcctl::command{"points", "uipcd: the live caps points it sees", uipcctl::run_points},
    uipcctl::command{"reload", "uipcd: the configuration and plug-ins, or one plug-in",
                     uipcctl::run_reload},
};

int usage() {
  std::fprintf(stderr, "usage: uipcctl <command> [args...]\n\ncommands:\n");
  for (const auto& c : commands) std::fprintf(stderr, "  %-10s %s\n", c.name, c.summary);
  return 64;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  for (const auto& c : commands) {
    if (std::strcmp(argv[1], c.name) == 0)
      return c.run(std::span<char* const>(argv + 2, argv + argc));
  }
  return usage();
}
