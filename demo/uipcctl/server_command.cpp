// `uipcctl status`, `stats`, `clients`, `objects`, `points`, `reload`: a running uipcd, through
// its control point (demo/uipcd/control.cpp has the protocol).
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <string_view>
#include <thread>

#include "commands.hpp"
#include "control_client.hpp"

namespace uipcctl {

namespace {

constexpr int exit_ok = 0;
constexpr int exit_error = 3;
constexpr int exit_usage = 64;
constexpr std::string_view default_point = "uipc.control";

int usage(std::FILE* out = stderr) {
  std::fprintf(
      out,
      "usage: uipcctl status|clients|objects|points [--point NAME] [--dir DIR] [--timeout MS]\n"
      "       uipcctl stats [--watch [SECONDS]] [--count N] [--point NAME] [--dir DIR] [--timeout "
      "MS]\n"
      "       uipcctl reload [NAME] [--point NAME] [--dir DIR] [--timeout MS]\n"
      "  status    what uipcd serves where, its state, reload errors, plug-ins that failed\n"
      "  stats     every module's figures: counters, queue depths, pool use, latency\n"
      "            percentiles; --watch refreshes them every SECONDS (default 1) with rates\n"
      "            per second, until interrupted or --count refreshes\n"
      "  clients   the clients of uipcd's caps points and of its handle daemon\n"
      "            (pid, uid, gid)\n"
      "  objects   the live objects of uipcd's handle daemon (handle, type,\n"
      "            references, value, name)\n"
      "  points    every live caps point of the rendezvous directory\n"
      "  reload    the configuration file and the plug-ins that changed, as SIGHUP does;\n"
      "            with NAME, plug-in NAME from its file\n"
      "NAME of --point: uipcd's control point (default: %s, of your user).\n"
      "DIR: the rendezvous directory (default: $UIPC_SHARED_DIR, else /tmp/uipc-shared).\n"
      "MS: how long to wait for the answer (default: 5000). Errors exit with 3.\n",
      std::string(default_point).c_str());
  return exit_usage;
}

// The target options (anywhere in `args`) into `t`, the rest into `rest`.
bool split_args(std::span<char* const> args, control_target& t,
                std::vector<std::string_view>& rest) {
  t.server = "uipcd";
  return split_target(args, t, default_point, rest);
}

// "1234" ns as a readable duration.
std::string duration(std::string_view ns_text) {
  const auto ns = number<unsigned long long>(ns_text);
  if (!ns) return std::string(ns_text);
  char out[32];
  if (*ns < 10'000)
    std::snprintf(out, sizeof out, "%llu ns", *ns);
  else if (*ns < 10'000'000)
    std::snprintf(out, sizeof out, "%.1f us", static_cast<double>(*ns) / 1e3);
  else
    std::snprintf(out, sizeof out, "%.1f ms", static_cast<double>(*ns) / 1e6);
  return out;
}

// The stats rows (MODULE, NAME, LABEL, KIND, VALUE) as a table; with `previous`
// and `seconds`, a column of rates per second for counters.
std::string stats_view(std::string_view body, std::map<std::string, unsigned long long>* previous,
                       double seconds) {
  std::string table = previous ? "MODULE\tFIGURE\tVALUE\tPER SECOND\n" : "MODULE\tFIGURE\tVALUE\n";
  bool header = true;
  while (!body.empty()) {
    const auto eol = body.find('\n');
    const std::string_view line = body.substr(0, eol);
    body = eol == std::string_view::npos ? std::string_view() : body.substr(eol + 1);
    if (header) {
      header = false;
      continue;
    }
    std::string_view f[5];
    std::string_view rest = line;
    for (auto& field : f) {
      const auto tab = rest.find('\t');
      field = rest.substr(0, tab);
      rest = tab == std::string_view::npos ? std::string_view() : rest.substr(tab + 1);
    }
    std::string name(f[1]);
    const bool is_duration = name.size() > 3 && name.ends_with("_ns");
    if (is_duration) name.resize(name.size() - 3);
    if (f[2] != "-") name += " " + std::string(f[2]);
    table +=
        std::string(f[0]) + '\t' + name + '\t' + (is_duration ? duration(f[4]) : std::string(f[4]));
    if (previous) {
      const std::string key = std::string(f[0]) + '\t' + name;
      const auto value = number<unsigned long long>(f[4]);
      std::string rate;
      if (value && f[3] == "counter") {
        auto it = previous->find(key);
        if (it != previous->end() && seconds > 0 && *value >= it->second) {
          char text[32];
          std::snprintf(text, sizeof text, "%.0f",
                        static_cast<double>(*value - it->second) / seconds);
          rate = text;
        }
        (*previous)[key] = *value;
      }
      table += '\t' + rate;
    }
    table += '\n';
  }
  return table;
}

int stats(std::span<char* const> args) {
  control_target t;
  std::vector<std::string_view> rest;
  if (!split_args(args, t, rest)) return usage();
  double interval = 0;
  long count = -1;
  for (std::size_t i = 0; i < rest.size(); ++i) {
    if (rest[i] == "--watch") {
      interval = 1;
      if (i + 1 < rest.size() && !rest[i + 1].starts_with("--")) {
        const auto s = number<unsigned>(rest[++i]);
        if (!s || *s == 0) return usage();
        interval = *s;
      }
    } else if (rest[i] == "--count" && i + 1 < rest.size()) {
      const auto n = number<long>(rest[++i]);
      if (!n || *n <= 0) return usage();
      count = *n;
    } else {
      return usage();
    }
  }
  std::string body;
  if (interval == 0) {
    if (!ask("stats", t, "stats", body)) return exit_error;
    print_table(stats_view(body, nullptr, 0));
    return exit_ok;
  }
  std::map<std::string, unsigned long long> previous;
  auto last = std::chrono::steady_clock::now();
  for (long shown = 0; count < 0 || shown < count; ++shown) {
    if (shown > 0) std::this_thread::sleep_for(std::chrono::duration<double>(interval));
    if (!ask("stats", t, "stats", body)) return exit_error;
    const auto now = std::chrono::steady_clock::now();
    const double seconds = std::chrono::duration<double>(now - last).count();
    last = now;
    if (::isatty(1)) std::fputs("\x1b[H\x1b[2J", stdout);  // a terminal: redraw in place
    std::printf("uipcd at %s, every %.0f s (Ctrl-C stops)\n", t.address.name.c_str(), interval);
    print_table(stats_view(body, &previous, shown == 0 ? 0 : seconds));
    std::fflush(stdout);
  }
  return exit_ok;
}

// A request whose answer is a table (or nothing), with no options of its own.
int simple(const char* command, std::span<char* const> args, const std::string& request_verb) {
  control_target t;
  std::vector<std::string_view> rest;
  if (!split_args(args, t, rest)) return usage();
  std::string request = request_verb;
  if (request_verb == "reload") {
    if (rest.size() > 1) return usage();
    if (rest.size() == 1) request += "\t" + std::string(rest[0]);
  } else if (!rest.empty()) {
    return usage();
  }
  std::string body;
  if (!ask(command, t, request, body)) return exit_error;
  if (request_verb == "reload")
    std::printf("reloaded %s\n",
                rest.empty() ? "the configuration and the plug-ins" : std::string(rest[0]).c_str());
  else
    print_table(body);
  return exit_ok;
}

}  // namespace

int run_status(std::span<char* const> args) { return simple("status", args, "status"); }
int run_stats(std::span<char* const> args) { return stats(args); }
int run_clients(std::span<char* const> args) { return simple("clients", args, "clients"); }
int run_objects(std::span<char* const> args) { return simple("objects", args, "handles"); }
int run_points(std::span<char* const> args) { return simple("points", args, "points"); }
int run_reload(std::span<char* const> args) { return simple("reload", args, "reload"); }

void help_server(std::FILE* out) { usage(out); }

}  // namespace uipcctl
