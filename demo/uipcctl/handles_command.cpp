// `uipcctl handles`: list, inspect, create, signal, reset, release, wait on and
// close the handle daemon's objects.
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "paced.hpp"
#include "uipc/core/daemon_start.hpp"
#include "uipc/handles/client.hpp"

namespace uipcctl {

namespace {

using namespace uipc::handles;

constexpr int exit_ok = 0;
constexpr int exit_abandoned = 1;
constexpr int exit_timed_out = 2;
constexpr int exit_error = 3;
constexpr int exit_usage = 64;

int usage(std::FILE* out = stderr) {
  std::fprintf(
      out,
      "usage: uipcctl handles [--dir DIR] [--name NAME] [--daemon PATH] [--no-start] [--linger MS] "
      "ACTION\n"
      "actions:\n"
      "  list                          every object: handle, type, references, value, name\n"
      "  stats                         the daemon's table, scratch and client counts\n"
      "  clients                       every connected client: pid, uid, what it holds\n"
      "  create TYPE [NAME] [--signalled] [--owned] [--initial N] [--max N] [--hold MS]\n"
      "                                TYPE: manual-event, auto-event, mutex, semaphore;\n"
      "                                without --hold the object dies when uipcctl exits\n"
      "                                unless another process holds it\n"
      "  signal TARGET                 set an event\n"
      "  reset TARGET                  clear an event\n"
      "  release TARGET [COUNT]        add COUNT (1) to a semaphore\n"
      "  wait TARGET [--timeout MS] [--hold MS]\n"
      "                                exit 0 signalled, 1 abandoned, 2 timed out; a mutex\n"
      "                                won is held for --hold MS, then released\n"
      "  close HANDLE                  drop a reference (only its holder can: else not_held)\n"
      "  churn [--seconds N] [--rate R]\n"
      "                                a load for N (3) seconds, flat out or R cycles per\n"
      "                                second: named events created, signalled, waited for\n"
      "                                and closed, mutexes created, released and closed;\n"
      "                                prints cycles per second and a cycle's latency\n"
      "TARGET is a name or a handle INDEX:GENERATION. Errors exit with 3.\n"
      "The daemon program: --daemon PATH, else $UIPC_HANDLED_PATH, else uipc-handled beside\n"
      "uipcctl, in the install prefix's bin directory, then on $PATH.\n");
  return exit_usage;
}

int fail(const char* what, uipc::error_code ec) {
  std::fprintf(stderr, "uipcctl handles: %s: %s\n", what, ec.message().c_str());
  return exit_error;
}

uipc::result<object> open_target(client& c, const std::string& target) {
  if (target.find(':') != std::string::npos) {
    auto h = parse_handle_id(target);
    if (!h) return h.error();
    return c.open(*h);
  }
  return c.open(target);
}

int list(client& c) {
  auto entries = c.list();
  if (!entries) return fail("list", entries.error());
  std::printf("%-12s %-13s %5s %10s  %s\n", "HANDLE", "TYPE", "REFS", "VALUE", "NAME");
  for (const auto& e : *entries) {
    std::printf("%-12s %-13s %5u %10u  %s\n", to_string(e.handle).c_str(), to_string(e.type),
                e.refcount, e.value, e.name.c_str());
  }
  return exit_ok;
}

int clients(client& c) {
  auto all = c.clients();
  if (!all) return fail("clients", all.error());
  std::printf("%-8s %8s %6s %8s %8s\n", "SESSION", "PID", "UID", "HANDLES", "SCRATCH");
  for (const auto& e : *all) {
    std::printf("%-8llu %8d %6u %8u %8u\n", static_cast<unsigned long long>(e.session), e.pid,
                e.uid, e.handles, e.scratch_blocks);
  }
  return exit_ok;
}

int stats(client& c) {
  auto s = c.stats();
  if (!s) return fail("stats", s.error());
  std::printf("daemon pid         %d\n", s->daemon_pid);
  std::printf("handles            %u in use of %u\n", s->handles_in_use, s->capacity - 1);
  std::printf("clients            %u\n", s->clients);
  std::printf("scratch            %llu of %llu bytes in %u blocks\n",
              static_cast<unsigned long long>(s->scratch_in_use),
              static_cast<unsigned long long>(s->scratch_size), s->scratch_blocks);
  std::printf("requests           %llu (%llu refused)\n",
              static_cast<unsigned long long>(s->requests),
              static_cast<unsigned long long>(s->errors));
  std::printf("mutexes abandoned  %llu\n", static_cast<unsigned long long>(s->mutexes_abandoned));
  return exit_ok;
}

int create(client& c, std::span<char* const> args) {
  if (args.empty()) return usage();
  const std::string_view type = args[0];
  std::string name;
  bool signalled = false;
  bool owned = false;
  std::uint32_t initial = 0;
  std::uint32_t maximum = 1;
  std::optional<long long> hold_ms;
  for (std::size_t i = 1; i < args.size(); ++i) {
    const std::string_view a = args[i];
    const bool has_value = i + 1 < args.size();
    if (a == "--signalled") {
      signalled = true;
    } else if (a == "--owned") {
      owned = true;
    } else if (a == "--initial" && has_value) {
      auto n = number<std::uint32_t>(args[++i]);
      if (!n) return usage();
      initial = *n;
    } else if (a == "--max" && has_value) {
      auto n = number<std::uint32_t>(args[++i]);
      if (!n) return usage();
      maximum = *n;
    } else if (a == "--hold" && has_value) {
      hold_ms = number<long long>(args[++i]);
      if (!hold_ms) return usage();
    } else if (!a.empty() && a[0] != '-' && name.empty()) {
      name = a;
    } else {
      return usage();
    }
  }
  uipc::result<object> made = uipc::error_code{};
  if (type == "manual-event" || type == "auto-event") {
    auto e = c.create_event(type == "manual-event" ? event_reset::manual : event_reset::automatic,
                            signalled, name);
    made = e ? uipc::result<object>(std::move(*e)) : uipc::result<object>(e.error());
  } else if (type == "mutex") {
    auto m = c.create_mutex(owned, name);
    made = m ? uipc::result<object>(std::move(*m)) : uipc::result<object>(m.error());
  } else if (type == "semaphore") {
    auto s = c.create_semaphore(initial, maximum, name);
    made = s ? uipc::result<object>(std::move(*s)) : uipc::result<object>(s.error());
  } else {
    return usage();
  }
  if (!made) return fail("create", made.error());
  std::printf("%s %s %s %s\n", made->existed() ? "opened" : "created",
              to_string(made->handle()).c_str(), to_string(made->type()), name.c_str());
  std::fflush(stdout);
  if (hold_ms) std::this_thread::sleep_for(std::chrono::milliseconds(*hold_ms));
  if (auto ec = made->close()) return fail("close", ec);
  return exit_ok;
}

int wait(client& c, std::span<char* const> args) {
  if (args.empty()) return usage();
  std::chrono::nanoseconds timeout = infinite;
  std::optional<long long> hold_ms;
  for (std::size_t i = 1; i < args.size(); ++i) {
    if (std::strcmp(args[i], "--timeout") == 0 && i + 1 < args.size()) {
      auto ms = number<long long>(args[++i]);
      if (!ms) return usage();
      // Saturated: ms beyond what nanoseconds hold would wrap to a short wait.
      constexpr long long max_ms = std::chrono::nanoseconds::max().count() / 1'000'000;
      timeout = *ms > max_ms ? std::chrono::nanoseconds::max()
                             : std::chrono::nanoseconds(std::chrono::milliseconds(*ms));
    } else if (std::strcmp(args[i], "--hold") == 0 && i + 1 < args.size()) {
      hold_ms = number<long long>(args[++i]);
      if (!hold_ms) return usage();
    } else {
      return usage();
    }
  }
  auto o = open_target(c, args[0]);
  if (!o) return fail("open", o.error());
  auto r = o->wait(timeout);
  if (!r) return fail("wait", r.error());
  int code = exit_error;
  switch (*r) {
    case wait_status::signalled:
      std::printf("signalled\n");
      code = exit_ok;
      break;
    case wait_status::abandoned:
      std::printf("abandoned\n");
      code = exit_abandoned;
      break;
    case wait_status::timed_out:
      std::printf("timed out\n");
      return exit_timed_out;
  }
  std::fflush(stdout);
  // A mutex won is owned: held for --hold, then released, so that leaving
  // does not abandon it.
  if (o->type() == object_type::mutex) {
    if (hold_ms) std::this_thread::sleep_for(std::chrono::milliseconds(*hold_ms));
    auto m = client::as_mutex(std::move(*o));
    if (!m) return fail("release", m.error());
    if (auto ec = m->release()) return fail("release", ec);
  }
  return code;
}

int signal_or_reset(client& c, std::span<char* const> args, bool set) {
  if (args.size() != 1) return usage();
  auto o = open_target(c, args[0]);
  if (!o) return fail("open", o.error());
  auto e = client::as_event(std::move(*o));
  if (!e) return fail(set ? "signal" : "reset", e.error());
  if (auto ec = set ? e->signal() : e->reset()) return fail(set ? "signal" : "reset", ec);
  return exit_ok;
}

int release(client& c, std::span<char* const> args) {
  if (args.empty() || args.size() > 2) return usage();
  std::uint32_t count = 1;
  if (args.size() == 2) {
    auto n = number<std::uint32_t>(args[1]);
    if (!n) return usage();
    count = *n;
  }
  auto o = open_target(c, args[0]);
  if (!o) return fail("open", o.error());
  auto s = client::as_semaphore(std::move(*o));
  if (!s) return fail("release", s.error());
  auto previous = s->release(count);
  if (!previous) return fail("release", previous.error());
  std::printf("%u -> %u\n", *previous, *previous + count);
  return exit_ok;
}

int close(client& c, std::span<char* const> args) {
  if (args.size() != 1) return usage();
  auto h = parse_handle_id(args[0]);
  if (!h) return fail("close", h.error());
  if (auto ec = c.close(*h)) return fail("close", ec);
  return exit_ok;
}

// Creates, uses and closes objects in a loop for `seconds`: a load on the
// daemon (each cycle: a named event created, signalled, waited for and closed;
// a mutex created, taken, released and closed).
int churn(client& c, std::span<char* const> args) {
  long long seconds = 3;
  unsigned long rate = 0;  // cycles per second offered; 0: flat out
  for (std::size_t i = 0; i < args.size(); i += 2) {
    if (i + 1 >= args.size()) return usage();
    if (std::strcmp(args[i], "--seconds") == 0) {
      auto n = number<long long>(args[i + 1]);
      if (!n || *n <= 0) return usage();
      seconds = *n;
    } else if (std::strcmp(args[i], "--rate") == 0) {
      auto n = number<unsigned long>(args[i + 1]);
      if (!n || *n == 0) return usage();
      rate = *n;
    } else {
      return usage();
    }
  }
  const std::string prefix = "churn." + std::to_string(::getpid()) + ".";
  paced_loop loop(static_cast<double>(rate));
  // The slots before the end (seconds * rate of them at a fixed rate), and no
  // later than the end when the daemon cannot keep up.
  const auto end = loop.began() + std::chrono::seconds(seconds);
  unsigned long long cycles = 0;
  for (;;) {
    const auto started = loop.start(cycles);
    if (started >= end || paced_loop::clock::now() >= end) break;
    auto e = c.create_event(event_reset::automatic, false, prefix + std::to_string(cycles % 16));
    if (!e) return fail("create", e.error());
    if (auto ec = e->signal()) return fail("signal", ec);
    auto w = e->wait(std::chrono::nanoseconds(0));
    if (!w) return fail("wait", w.error());
    if (*w != wait_status::signalled) {
      std::fprintf(stderr,
                   "uipcctl handles: churn: an event just signalled did not satisfy a wait\n");
      return exit_error;
    }
    if (auto ec = e->close()) return fail("close", ec);
    auto m = c.create_mutex(true);
    if (!m) return fail("create", m.error());
    if (auto ec = m->release()) return fail("release", ec);
    if (auto ec = m->close()) return fail("close", ec);
    loop.done(started);
    ++cycles;
  }
  loop.report("cycles");
  return exit_ok;
}

}  // namespace

int run_handles(std::span<char* const> args) {
  client_options options;
  std::size_t i = 0;
  for (; i < args.size(); ++i) {
    const std::string_view a = args[i];
    const bool has_value = i + 1 < args.size();
    if (a == "--dir" && has_value) {
      options.where.directory = args[++i];
    } else if (a == "--name" && has_value) {
      options.where.name = args[++i];
    } else if (a == "--daemon" && has_value) {
      options.daemon_path = args[++i];
    } else if (a == "--linger" && has_value) {
      auto ms = number<long long>(args[++i]);
      if (!ms) return usage();
      options.daemon_linger = std::chrono::milliseconds(*ms);
    } else if (a == "--no-start") {
      options.autostart = false;
    } else {
      break;
    }
  }
  if (i >= args.size()) return usage();
  const std::string_view action = args[i];
  const auto rest = args.subspan(i + 1);
  constexpr std::string_view actions[] = {"list",  "stats",   "clients", "create", "signal",
                                          "reset", "release", "wait",    "close",  "churn"};
  if (std::find(std::begin(actions), std::end(actions), action) == std::end(actions))
    return usage();
  // The search client::connect would make, done here first so that a failure
  // can say which program was tried, or where it was looked for. The path found
  // is what connect then starts; none found still lets connect reach a daemon
  // that already serves.
  uipc::start_report search;
  if (auto found = uipc::find_program(daemon_program(options.daemon_path), &search)) {
    options.daemon_path = *found;
  }
  auto c = client::connect(options);
  if (!c) {
    const uipc::error_code ec = c.error();
    const bool starting = ec == uipc::errc::program_not_found ||
                          ec == uipc::errc::program_not_executable ||
                          ec == errc::daemon_failed_to_start || ec == errc::daemon_start_timeout;
    if (!starting) return fail("connect", ec);
    std::fprintf(stderr, "uipcctl handles: connect: cannot start the handle daemon: %s (%s)\n",
                 ec.message().c_str(), search.describe().c_str());
    return exit_error;
  }
  if (action == "list") return list(*c);
  if (action == "clients") return clients(*c);
  if (action == "stats") return stats(*c);
  if (action == "create") return create(*c, rest);
  if (action == "signal") return signal_or_reset(*c, rest, true);
  if (action == "reset") return signal_or_reset(*c, rest, false);
  if (action == "release") return release(*c, rest);
  if (action == "wait") return wait(*c, rest);
  if (action == "close") return close(*c, rest);
  if (action == "churn") return churn(*c, rest);
  return usage();
}

void help_handles(std::FILE* out) { usage(out); }

}  // namespace uipcctl
