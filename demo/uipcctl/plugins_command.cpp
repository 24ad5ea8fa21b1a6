// `uipcctl plugins` and `uipcctl services`: a running plug-in host, through
// its control point (uipc/plugin/control.hpp).
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "commands.hpp"
#include "control_client.hpp"
#include "uipc/plugin/control.hpp"

namespace uipcctl {

namespace {

constexpr int exit_ok = 0;
constexpr int exit_error = 3;
constexpr int exit_usage = 64;

int usage(const char* command, std::FILE* out = stderr) {
  std::fprintf(
      out,
      "usage: uipcctl %s [--point NAME] [--dir DIR] [--timeout MS] ACTION\n"
      "actions of uipcctl plugins:\n"
      "  list                the plug-ins: name, state, generation (reloads), threading model,\n"
      "                      in-process or isolated, ABI, services, crashes, file, last error\n"
      "  stats               the host's counters\n"
      "  reload NAME         replaces plug-in NAME with the file it was loaded from; calls in\n"
      "                      flight finish in the old build\n"
      "actions of uipcctl services:\n"
      "  list                the registered services: name, plug-in, kind (bytes or pointer)\n"
      "  call NAME DATA      calls bytes service NAME with DATA and prints the reply\n"
      "NAME of --point: the host's control point (default: %s, of your user).\n"
      "DIR: the rendezvous directory (default: $UIPC_SHARED_DIR, else /tmp/uipc-shared).\n"
      "MS: how long to wait for the answer (default: 5000). Errors exit with 3.\n",
      command, std::string(uipc::plugin::default_control_point).c_str());
  return exit_usage;
}

int table(const char* command, const control_target& t, const char* request) {
  std::string body;
  if (!ask(command, t, request, body)) return exit_error;
  print_table(body);
  return exit_ok;
}

}  // namespace

int run_plugins(std::span<char* const> args) {
  control_target t;
  std::vector<std::string_view> words;
  if (!split_target(args, t, uipc::plugin::default_control_point, words) || words.empty())
    return usage("plugins");
  const std::string_view action = words[0];
  if (action == "list" && words.size() == 1) return table("plugins", t, "plugins");
  if (action == "stats" && words.size() == 1) return table("plugins", t, "stats");
  if (action == "reload" && words.size() == 2) {
    std::string body;
    if (!ask("plugins", t, "reload\t" + std::string(words[1]), body)) return exit_error;
    std::printf("reloaded %.*s\n", static_cast<int>(words[1].size()), words[1].data());
    return exit_ok;
  }
  return usage("plugins");
}

int run_services(std::span<char* const> args) {
  control_target t;
  std::vector<std::string_view> words;
  if (!split_target(args, t, uipc::plugin::default_control_point, words) || words.empty())
    return usage("services");
  const std::string_view action = words[0];
  if (action == "list" && words.size() == 1) return table("services", t, "services");
  if (action == "call" && words.size() == 3) {
    std::string body;
    if (!ask("services", t, "call\t" + std::string(words[1]) + '\t' + std::string(words[2]), body))
      return exit_error;
    std::fwrite(body.data(), 1, body.size(), stdout);
    std::fputc('\n', stdout);
    return exit_ok;
  }
  return usage("services");
}

void help_plugins(std::FILE* out) { usage("plugins", out); }
void help_services(std::FILE* out) { usage("services", out); }

}  // namespace uipcctl
