// `uipcctl plugins` and `uipcctl services`: a running plug-in host, through
// its control point (uipc/plugin/control.hpp).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include <boost/asio/io_context.hpp>

#include "commands.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/plugin/control.hpp"

namespace uipcctl {

namespace {

using clock = std::chrono::steady_clock;

constexpr int exit_ok = 0;
constexpr int exit_error = 3;
constexpr int exit_usage = 64;

int usage(const char* command) {
  std::fprintf(stderr,
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

// Prints TAB-separated rows as columns; the last column is not padded.
void print_table(std::string_view body) {
  std::vector<std::vector<std::string_view>> rows;
  std::vector<std::size_t> widths;
  while (!body.empty()) {
    const auto eol = body.find('\n');
    std::string_view line = body.substr(0, eol);
    body = eol == std::string_view::npos ? std::string_view() : body.substr(eol + 1);
    auto& row = rows.emplace_back();
    for (;;) {
      const auto tab = line.find('\t');
      row.push_back(line.substr(0, tab));
      if (widths.size() < row.size()) widths.push_back(0);
      widths[row.size() - 1] = std::max(widths[row.size() - 1], row.back().size());
      if (tab == std::string_view::npos) break;
      line = line.substr(tab + 1);
    }
  }
  for (const auto& row : rows) {
    std::string out;
    for (std::size_t i = 0; i < row.size(); ++i) {
      out += row[i];
      if (i + 1 < row.size()) out.append(widths[i] - row[i].size() + 2, ' ');
    }
    std::puts(out.c_str());
  }
}

struct target {
  uipc::caps::point_address address;
  std::chrono::milliseconds timeout{5000};
};

// Sends one control request. On success returns true and the body in `body`;
// on failure prints the reason and returns false.
bool ask(const char* command, const target& t, const std::string& request, std::string& body) {
  boost::asio::io_context io;
  uipc::caps::client_options options;
  options.handshake_timeout = t.timeout;
  auto c = uipc::caps::client::connect(io, t.address, options);
  // Why the host could not be asked; `what` names the step that failed.
  auto fail = [&](const char* what, uipc::error_code ec) {
    if (ec == uipc::condition::timed_out)
      std::fprintf(stderr, "uipcctl %s: the plug-in host at %s did not answer within %lld ms\n", command,
                   t.address.name.c_str(), static_cast<long long>(t.timeout.count()));
    else
      std::fprintf(stderr, "uipcctl %s: %s%s: %s\n", command, what, t.address.name.c_str(), ec.message().c_str());
    return false;
  };
  if (!c) return fail("no plug-in host at ", c.error());
  auto r = (*c)->call(request, clock::now() + t.timeout);
  if (!r) return fail("", r.error());
  const std::string reply = r->copy();
  if (reply.rfind("ok\n", 0) == 0) {
    body = reply.substr(3);
    return true;
  }
  std::string_view reason = reply;
  if (reason.rfind("error\t", 0) == 0) {
    reason.remove_prefix(6);
    if (!reason.empty() && reason.back() == '\n') reason.remove_suffix(1);
  } else {
    reason = "the host's answer is not the control protocol";
  }
  std::fprintf(stderr, "uipcctl %s: %.*s\n", command, static_cast<int>(reason.size()), reason.data());
  return false;
}

// Parses [--point NAME] [--dir DIR] [--timeout MS]; returns the index of the action, or -1.
long parse_target(std::span<char* const> args, target& t) {
  t.address.name = std::string(uipc::plugin::default_control_point);
  t.address.uid = ::geteuid();
  std::size_t i = 0;
  while (i + 1 < args.size() && std::string_view(args[i]).rfind("--", 0) == 0) {
    const std::string_view option = args[i], value = args[i + 1];
    if (option == "--point") {
      t.address.name = value;
    } else if (option == "--dir") {
      t.address.directory = value;
    } else if (option == "--timeout") {
      const auto ms = number<long>(value);
      if (!ms || *ms < 0) return -1;
      t.timeout = std::chrono::milliseconds(*ms);
    } else {
      return -1;
    }
    i += 2;
  }
  return i < args.size() ? static_cast<long>(i) : -1;
}

int table(const char* command, const target& t, const char* request) {
  std::string body;
  if (!ask(command, t, request, body)) return exit_error;
  print_table(body);
  return exit_ok;
}

}  // namespace

int run_plugins(std::span<char* const> args) {
  target t;
  const long i = parse_target(args, t);
  if (i < 0) return usage("plugins");
  const std::string_view action = args[i];
  const auto rest = args.subspan(i + 1);
  if (action == "list" && rest.empty()) return table("plugins", t, "plugins");
  if (action == "stats" && rest.empty()) return table("plugins", t, "stats");
  if (action == "reload" && rest.size() == 1) {
    std::string body;
    if (!ask("plugins", t, "reload\t" + std::string(rest[0]), body)) return exit_error;
    std::printf("reloaded %s\n", rest[0]);
    return exit_ok;
  }
  return usage("plugins");
}

int run_services(std::span<char* const> args) {
  target t;
  const long i = parse_target(args, t);
  if (i < 0) return usage("services");
  const std::string_view action = args[i];
  const auto rest = args.subspan(i + 1);
  if (action == "list" && rest.empty()) return table("services", t, "services");
  if (action == "call" && rest.size() == 2) {
    std::string body;
    if (!ask("services", t, "call\t" + std::string(rest[0]) + '\t' + rest[1], body)) return exit_error;
    std::fwrite(body.data(), 1, body.size(), stdout);
    std::fputc('\n', stdout);
    return exit_ok;
  }
  return usage("services");
}

}  // namespace uipcctl
