// uipcctl: the command-line client of uipc's daemons. Dispatches to one
// subcommand per module; each is a separate file (see commands.hpp).
#include <array>
#include <cstdio>
#include <cstring>

#include "commands.hpp"

namespace {

constexpr std::array commands{
    uipcctl::command{"handles", "named events, mutexes and semaphores of the handle daemon",
                     uipcctl::run_handles, uipcctl::help_handles},
    uipcctl::command{"caps", "capability rendezvous points: list, call, watch", uipcctl::run_caps,
                     uipcctl::help_caps},
    uipcctl::command{"plugins", "a plug-in host's plug-ins: list, stats, reload",
                     uipcctl::run_plugins, uipcctl::help_plugins},
    uipcctl::command{"services", "a plug-in host's services: list, call", uipcctl::run_services,
                     uipcctl::help_services},
    uipcctl::command{"status", "uipcd: what serves where, reload errors", uipcctl::run_status,
                     uipcctl::help_server},
    uipcctl::command{"stats", "uipcd: every module's figures (--watch refreshes them)",
                     uipcctl::run_stats, uipcctl::help_server},
    uipcctl::command{"clients", "uipcd: the clients of its caps points and handle daemon",
                     uipcctl::run_clients, uipcctl::help_server},
    uipcctl::command{"objects", "uipcd: the live objects of its handle daemon",
                     uipcctl::run_objects, uipcctl::help_server},
    uipcctl::command{"points", "uipcd: the live caps points it sees", uipcctl::run_points,
                     uipcctl::help_server},
    uipcctl::command{"reload", "uipcd: the configuration and plug-ins, or one plug-in",
                     uipcctl::run_reload, uipcctl::help_server},
};

int usage(std::FILE* out = stderr) {
  std::fprintf(
      out, "usage: uipcctl <command> [args...]\n       uipcctl [<command>] --help\n\ncommands:\n");
  for (const auto& c : commands) std::fprintf(out, "  %-10s %s\n", c.name, c.summary);
  return 64;
}

bool asks_for_help(const char* arg) {
  return std::strcmp(arg, "--help") == 0 || std::strcmp(arg, "-h") == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  if (asks_for_help(argv[1])) return usage(stdout), 0;
  for (const auto& c : commands) {
    if (std::strcmp(argv[1], c.name) != 0) continue;
    if (argc == 3 && asks_for_help(argv[2])) return c.help(stdout), 0;
    return c.run(std::span<char* const>(argv + 2, argv + argc));
  }
  return usage();
}
