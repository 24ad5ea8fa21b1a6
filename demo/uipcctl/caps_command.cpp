// `uipcctl caps`: the live caps points, a call to one, and a watch of points
// coming and going.
#include <boost/asio/io_context.hpp>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "commands.hpp"
#include "paced.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/caps/point.hpp"

namespace uipcctl {

namespace {

using namespace uipc::caps;
using clock = std::chrono::steady_clock;

constexpr int exit_ok = 0;
constexpr int exit_error = 3;
constexpr int exit_usage = 64;

int usage(std::FILE* out = stderr) {
  std::fprintf(
      out,
      "usage: uipcctl caps [--dir DIR] ACTION\n"
      "actions:\n"
      "  list                          live points: name, owner uid and gid, who may connect,\n"
      "                                exclusive or shared, server pid, clients, generation\n"
      "  call NAME DATA [--uid UID] [--gid GID] [--timeout MS] [--count N [--rate R]]\n"
      "                                send DATA to the point NAME of user UID (default: you)\n"
      "                                and print the reply; with --count, N calls in a row\n"
      "                                (each reply's size checked), flat out or R per second,\n"
      "                                and their rate and latency (mean, p50, p99)\n"
      "  watch [--seconds N]           print points as they appear (+) and disappear (-)\n"
      "DIR: the rendezvous directory (default: $UIPC_SHARED_DIR, else /tmp/uipc-shared).\n"
      "Errors exit with 3.\n");
  return exit_usage;
}

int fail(const char* what, uipc::error_code ec) {
  std::fprintf(stderr, "uipcctl caps: %s: %s\n", what, ec.message().c_str());
  return exit_error;
}

const char* access_name(uipc::caps::access a) {
  switch (a) {
    case uipc::caps::access::group:
      return "group";
    case uipc::caps::access::world:
      return "world";
    case uipc::caps::access::user:
      break;
  }
  return "user";
}

void print_point(const char* prefix, const point_info& p) {
  std::printf("%s%-24s %6u %6u %-6s %-9s %7d %7llu %llu\n", prefix, p.name.c_str(),
              static_cast<unsigned>(p.uid), static_cast<unsigned>(p.gid), access_name(p.who),
              p.exclusive ? "exclusive" : "shared", static_cast<int>(p.pid),
              static_cast<unsigned long long>(p.clients),
              static_cast<unsigned long long>(p.generation));
}

void print_header(const char* prefix) {
  std::printf("%s%-24s %6s %6s %-6s %-9s %7s %7s %s\n", prefix, "NAME", "UID", "GID", "ACCESS",
              "MODE", "PID", "CLIENTS", "GENERATION");
}

int list(const std::string& dir) {
  auto points = list_points(dir);
  if (!points) return fail("list", points.error());
  print_header("");
  for (const auto& p : *points) print_point("", p);
  return exit_ok;
}

int call(const std::string& dir, std::span<char* const> args) {
  if (args.size() < 2) return usage();
  point_address a;
  a.name = args[0];
  a.uid = ::geteuid();
  a.directory = dir;
  const std::string data = args[1];
  auto timeout = std::chrono::milliseconds(5000);
  unsigned long count = 0;  // 0: one call, its reply printed
  unsigned long rate = 0;   // calls per second offered; 0: flat out
  for (std::size_t i = 2; i < args.size(); ++i) {
    const std::string_view arg = args[i];
    if (i + 1 >= args.size()) return usage();
    const std::string_view value = args[++i];
    if (arg == "--uid") {
      auto v = number<uid_t>(value);
      if (!v) return usage();
      a.uid = *v;
    } else if (arg == "--gid") {
      auto v = number<gid_t>(value);
      if (!v) return usage();
      a.gid = *v;
    } else if (arg == "--timeout") {
      auto v = number<long>(value);
      if (!v || *v < 0) return usage();
      timeout = std::chrono::milliseconds(*v);
    } else if (arg == "--count") {
      auto v = number<unsigned long>(value);
      if (!v || *v == 0) return usage();
      count = *v;
    } else if (arg == "--rate") {
      auto v = number<unsigned long>(value);
      if (!v || *v == 0) return usage();
      rate = *v;
    } else {
      return usage();
    }
  }
  if (rate != 0 && count == 0) return usage();
  boost::asio::io_context ctx;
  auto c = client::connect(ctx, a);
  if (!c) return fail(("connect to " + a.name).c_str(), c.error());
  if (count != 0) {  // a loop: every reply checked, the rate and latency printed
    paced_loop loop(static_cast<double>(rate));
    for (unsigned long i = 0; i < count; ++i) {
      const auto started = loop.start(i);
      // Each call has the whole timeout from when it is sent; its latency counts from its slot.
      auto r = (*c)->call(data, paced_loop::clock::now() + timeout);
      if (!r) return fail(("call " + std::to_string(i + 1)).c_str(), r.error());
      if (r->size() != data.size()) {
        std::fprintf(stderr, "uipcctl caps: call %lu: a reply of %zu bytes to %zu\n", i + 1,
                     r->size(), data.size());
        return exit_error;
      }
      loop.done(started);
    }
    loop.report("calls");
    return exit_ok;
  }
  auto r = (*c)->call(data, clock::now() + timeout);
  if (!r) return fail("call", r.error());
  const std::string reply = r->copy();
  std::fwrite(reply.data(), 1, reply.size(), stdout);
  std::fputc('\n', stdout);
  return exit_ok;
}

int watch(const std::string& dir, std::span<char* const> args) {
  auto until = clock::time_point::max();
  if (args.size() == 2 && std::string_view(args[0]) == "--seconds") {
    auto v = number<long>(args[1]);
    if (!v || *v < 0) return usage();
    until = clock::now() + std::chrono::seconds(*v);
  } else if (!args.empty()) {
    return usage();
  }
  auto w = point_watch::open(dir);
  if (!w) return fail("watch", w.error());
  print_header("  ");
  std::fflush(stdout);
  for (;;) {
    auto e = w->next(until);
    if (!e) return e.error() == uipc::errc::timed_out ? exit_ok : fail("watch", e.error());
    print_point(e->what == point_event::kind::appeared ? "+ " : "- ", e->point);
    std::fflush(stdout);
  }
}

}  // namespace

int run_caps(std::span<char* const> args) {
  std::string dir;
  std::size_t i = 0;
  if (args.size() >= 2 && std::string_view(args[0]) == "--dir") {
    dir = args[1];
    i = 2;
  }
  if (i >= args.size()) return usage();
  const std::string_view action = args[i];
  const auto rest = args.subspan(i + 1);
  if (action == "list" && rest.empty()) return list(dir);
  if (action == "call") return call(dir, rest);
  if (action == "watch") return watch(dir, rest);
  return usage();
}

void help_caps(std::FILE* out) { usage(out); }

}  // namespace uipcctl
