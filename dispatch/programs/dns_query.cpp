// uipc-dns-query: keeps M DNS queries in flight as responses on one dispatcher and
// reports completed, timed-out and mismatched counts and transactions per second.
#include <sys/resource.h>

#include <array>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "dns_message.hpp"
#include "program_args.hpp"
#include "uipc/core/event_loop.hpp"
#include "uipc/dispatch/dispatcher.hpp"

namespace {

using namespace uipc;
using namespace uipc::dispatch;

void usage(std::FILE* out = stderr) {
  std::fprintf(
      out,
      "usage: uipc-dns-query --server ADDR:PORT --names FILE [--count N] [--inflight M] [--timeout "
      "MS]\n"
      "                      [--random-ports | --shared-port] [--port-range FIRST-LAST]\n"
      "                      [--port-uses N] [--0x20]\n"
      "  FILE: one query per line, 'NAME [TYPE]' (TYPE: A, AAAA, TXT or a number; default A);\n"
      "        the lines are used in turn until N queries were sent (default: one round).\n"
      "  --random-ports: each query from its own socket on a random port (the default when\n"
      "        the server is not on loopback); --shared-port: all from one socket (the default\n"
      "        on loopback); --port-range: where random ports are drawn (default: the system's\n"
      "        ephemeral range); --port-uses: queries one random port carries, one after\n"
      "        another, within a second (default 16; 1: a fresh port for every query);\n"
      "        --0x20: random case in each query name, checked in the reply.\n"
      "Prints: completed C timed_out T mismatched X errors E nxdomain N elapsed_s S qps Q cpu_s "
      "U\n"
      "        ports shared|random unmatched_shared A unmatched_random B,\n"
      "and with --verbose one line per answer.\n"
      "Exit status: 0 every query was answered (NXDOMAIN is an answer); 1 the run failed: the\n"
      "dispatcher could not start or stopped, or a query could not be sent; 2 usage or an\n"
      "unreadable names file; 3 some queries timed out or got a reply that did not match\n"
      "them; 4 no query was answered.\n");
}

struct query_name {
  std::string name;
  std::uint16_t type;
};

class query_run {
 public:
  query_run(event_loop& loop, ref_ptr<dispatcher> d, udp::endpoint server,
            std::vector<query_name> names, unsigned long count, std::chrono::milliseconds timeout,
            bool verbose, bool mixed_case)
      : loop_(loop),
        d_(std::move(d)),
        server_(server),
        names_(std::move(names)),
        count_(count),
        timeout_(timeout),
        verbose_(verbose),
        mixed_case_(mixed_case) {}

  void start(unsigned long inflight) {
    slots_.resize(inflight);
    started_ = std::chrono::steady_clock::now();
    for (auto& s : slots_) next(s);
    if (finished()) loop_.stop();
  }

  void report(port_mode ports) const {
    const dispatcher_stats& st = final_stats_;
    const double seconds = std::chrono::duration<double>(ended_ - started_).count();
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    const double cpu = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                       static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    std::printf(
        "completed %lu timed_out %lu mismatched %lu errors %lu nxdomain %lu elapsed_s %.3f qps "
        "%.0f cpu_s %.3f ports %s unmatched_shared %llu unmatched_random %llu\n",
        completed_, timed_out_, mismatched_, errors_, nxdomain_, seconds,
        seconds > 0 ? static_cast<double>(completed_) / seconds : 0.0, cpu,
        ports == port_mode::exclusive ? "random" : "shared",
        static_cast<unsigned long long>(st.dropped_unmatched),
        static_cast<unsigned long long>(st.exclusive_dropped_unmatched));
  }
  /// The exit status --help lists.
  int exit_status() const {
    if (errors_ != 0) return exit_failed;
    if (completed_ == 0 && count_ != 0) return exit_no_answer;
    if (timed_out_ != 0 || mismatched_ != 0) return exit_partial;
    return exit_ok;
  }
  static constexpr int exit_ok = 0, exit_failed = 1, exit_partial = 3, exit_no_answer = 4;

  /// Detaches every response and drops the dispatcher: its socket closes and
  /// the loop has nothing left to do. On the loop's thread.
  void stop() {
    if (ended_ == std::chrono::steady_clock::time_point{})
      ended_ = std::chrono::steady_clock::now();
    for (auto& s : slots_) s.r.detach();
    if (d_) final_stats_ = d_->stats();
    d_.reset();
  }

 private:
  struct slot {
    response r;
    std::size_t name_index = 0;
    std::string sent_name;  // with --0x20: the name in the case it was sent
  };

  bool finished() const { return done_ == count_; }

  void next(slot& s) {
    s.r.detach();
    // After stop() (d_ reset), a completion that was already on its way must
    // not start another query.
    // A query that cannot go out counts as an error and the slot takes the
    // next one, so a run whose every send fails still ends.
    for (;;) {
      if (!d_ || issued_ == count_) return;
      const std::size_t index = issued_++ % names_.size();
      response_options options;
      options.timeout = timeout_;
      auto r = d_->add_response(server_, options);
      if (!r) {
        ++errors_;
        complete_one();
        continue;
      }
      std::array<std::byte, 300> query;
      if (mixed_case_) s.sent_name = dns::random_case(names_[index].name);
      const std::string& name = mixed_case_ ? s.sent_name : names_[index].name;
      const std::size_t length = dns::build_query(query, r->id(), name, names_[index].type);
      if (length == 0 || !r->send(std::span(query).first(length))) {
        ++errors_;
        complete_one();
        continue;
      }
      s.r = std::move(*r);
      s.name_index = index;
      s.r.async_receive([this, &s](error_code ec, event ev) { on_event(s, ec, std::move(ev)); });
      return;
    }
  }

  void on_event(slot& s, error_code ec, event ev) {
    const query_name& q = names_[s.name_index];
    if (ec == dispatch::errc::timed_out) {
      ++timed_out_;
    } else if (ec) {
      if (ec == boost::asio::error::operation_aborted) return;
      ++errors_;
      if (ev.kind() == event_kind::shutdown) {
        std::fprintf(stderr, "uipc-dns-query: dispatcher stopped: %s\n",
                     ev.reason().message().c_str());
        ev.release();
        loop_.stop();
        return;
      }
    } else if (!dns::reply_matches(ev.data(), mixed_case_ ? s.sent_name : q.name, q.type,
                                   mixed_case_)) {
      ++mismatched_;
    } else {
      ++completed_;
      if (dns::rcode(ev.data()) == dns::rcode_nxdomain) ++nxdomain_;
      if (verbose_) {
        std::printf("answer %s rcode %u answers %u\n", q.name.c_str(), dns::rcode(ev.data()),
                    dns::answer_count(ev.data()));
      }
    }
    ev.release();
    complete_one();
    next(s);
  }

  void complete_one() {
    if (++done_ == count_) {
      ended_ = std::chrono::steady_clock::now();
      loop_.stop();
    }
  }

  event_loop& loop_;
  ref_ptr<dispatcher> d_;
  udp::endpoint server_;
  std::vector<query_name> names_;
  unsigned long count_;
  std::chrono::milliseconds timeout_;
  bool verbose_;
  bool mixed_case_;
  std::vector<slot> slots_;
  dispatcher_stats final_stats_;
  unsigned long issued_ = 0, done_ = 0;
  unsigned long completed_ = 0, timed_out_ = 0, mismatched_ = 0, errors_ = 0, nxdomain_ = 0;
  std::chrono::steady_clock::time_point started_, ended_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string server;
  std::string names_file;
  std::optional<unsigned long> count;
  unsigned long inflight = 1;
  unsigned long timeout_ms = 2000;
  bool verbose = false;
  bool mixed_case = false;
  std::optional<bool> random_ports;
  std::uint16_t first_port = 0, last_port = 0;
  std::uint32_t port_uses = 0;  // 0: the dispatcher's default
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      usage(stdout);
      return 0;
    }
    if (arg == "--verbose") {
      verbose = true;
      continue;
    }
    if (arg == "--random-ports" || arg == "--shared-port") {
      random_ports = arg == "--random-ports";
      continue;
    }
    if (arg == "--0x20") {
      mixed_case = true;
      continue;
    }
    if (i + 1 >= argc) {
      usage();
      return 2;
    }
    const std::string_view value = argv[++i];
    std::optional<unsigned long> n;
    if (arg == "--server") {
      server = value;
    } else if (arg == "--names") {
      names_file = value;
    } else if (arg == "--count" && (n = dns::parse_count(value))) {
      count = *n;
    } else if (arg == "--inflight" && (n = dns::parse_count(value)) && *n > 0 && *n <= 65536) {
      inflight = *n;
    } else if (arg == "--timeout" && (n = dns::parse_count(value)) && *n > 0) {
      timeout_ms = *n;
    } else if (arg == "--port-uses" && (n = dns::parse_count(value)) && *n > 0 && *n <= 1000000) {
      port_uses = static_cast<std::uint32_t>(*n);
    } else if (arg == "--port-range") {
      const auto dash = value.find('-');
      const auto a = dns::parse_count(value.substr(0, dash));
      const auto b =
          dash == std::string_view::npos ? std::nullopt : dns::parse_count(value.substr(dash + 1));
      if (!a || !b || *a == 0 || *a > *b || *b > 65535) {
        std::fprintf(stderr, "uipc-dns-query: --port-range wants FIRST-LAST within 1-65535\n");
        return 2;
      }
      first_port = static_cast<std::uint16_t>(*a);
      last_port = static_cast<std::uint16_t>(*b);
    } else {
      usage();
      return 2;
    }
  }
  auto peer = dns::parse_endpoint(server);
  if (!peer || names_file.empty()) {
    usage();
    return 2;
  }
  std::vector<query_name> names;
  std::ifstream in(names_file);
  if (!in) {
    std::fprintf(stderr, "uipc-dns-query: cannot read %s\n", names_file.c_str());
    return 2;
  }
  for (std::string line; std::getline(in, line);) {
    std::istringstream fields(line);
    std::string name, type = "A";
    if (!(fields >> name) || name.front() == '#') continue;
    fields >> type;
    auto t = dns::parse_type(type);
    if (!t) {
      std::fprintf(stderr, "uipc-dns-query: unknown type '%s'\n", type.c_str());
      return 2;
    }
    names.push_back({name, *t});
  }
  if (names.empty()) {
    std::fprintf(stderr, "uipc-dns-query: no names in %s\n", names_file.c_str());
    return 2;
  }
  event_loop loop(1, /*catch_signals=*/true);
  dispatcher_options options;
  options.buffer_size = 1232;
  options.buffers = static_cast<std::uint32_t>(std::max<unsigned long>(256, inflight * 2 + 64));
  options.max_queued_per_response = 2;
  options.socket_buffer_bytes = 4 << 20;
  options.separate_send_sockets = true;  // no epoll callback per query sent
  // Random ports unless told otherwise, except towards loopback: a forger there
  // is already on the host.
  const bool use_random_ports = random_ports.value_or(!peer->address().is_loopback());
  options.ports = use_random_ports ? port_mode::exclusive : port_mode::shared;
  options.exclusive_sockets = static_cast<std::uint32_t>(inflight);  // one per query in flight
  if (port_uses != 0) options.port_uses = port_uses;
  options.first_port = first_port;
  options.last_port = last_port;
  if (first_port != 0)
    options.recent_ports = std::min<std::uint32_t>(1024, (last_port - first_port + 1u) / 2);
  const udp::endpoint local(peer->address().is_v6() ? udp::v6() : udp::v4(), 0);
  auto d = dispatcher::create(loop.context(), local, options);
  if (!d) {
    std::fprintf(stderr, "uipc-dns-query: %s\n", d.error().message().c_str());
    return 1;
  }
  const unsigned long total = count.value_or(names.size());
  std::optional<query_run> run;
  run.emplace(loop, *d, *peer, std::move(names), total, std::chrono::milliseconds(timeout_ms),
              verbose, mixed_case);
  d->reset();
  loop.on_stop([&] { run->stop(); });
  boost::asio::post(loop.context(), [&] { run->start(inflight); });
  loop.run();
  run->report(options.ports);
  std::fflush(stdout);
  const int status = run->exit_status();
  run.reset();  // detaches every response; the last one closes the dispatcher
  // Let the cancelled socket operations complete, so nothing outlives the loop.
  loop.context().restart();
  loop.context().poll();
  return status;
}
