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

void usage() {
  std::fprintf(
      stderr,
      "usage: uipc-dns-query --server ADDR:PORT --names FILE [--count N] [--inflight M] [--timeout "
      "MS]\n"
      "  FILE: one query per line, 'NAME [TYPE]' (TYPE: A, AAAA, TXT or a number; default A);\n"
      "        the lines are used in turn until N queries were sent (default: one round).\n"
      "Prints: completed C timed_out T mismatched X errors E nxdomain N elapsed_s S qps Q cpu_s "
      "U,\n"
      "and with --verbose one line per answer.\n");
}

struct query_name {
  std::string name;
  std::uint16_t type;
};

class query_run {
 public:
  query_run(event_loop& loop, ref_ptr<dispatcher> d, udp::endpoint server,
            std::vector<query_name> names, unsigned long count, std::chrono::milliseconds timeout,
            bool verbose)
      : loop_(loop),
        d_(std::move(d)),
        server_(server),
        names_(std::move(names)),
        count_(count),
        timeout_(timeout),
        verbose_(verbose) {}

  void start(unsigned long inflight) {
    slots_.resize(inflight);
    started_ = std::chrono::steady_clock::now();
    for (auto& s : slots_) next(s);
    if (finished()) loop_.stop();
  }

  void report() const {
    const double seconds = std::chrono::duration<double>(ended_ - started_).count();
    rusage ru{};
    ::getrusage(RUSAGE_SELF, &ru);
    const double cpu = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                       static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    std::printf(
        "completed %lu timed_out %lu mismatched %lu errors %lu nxdomain %lu elapsed_s %.3f qps "
        "%.0f cpu_s %.3f\n",
        completed_, timed_out_, mismatched_, errors_, nxdomain_, seconds,
        seconds > 0 ? static_cast<double>(completed_) / seconds : 0.0, cpu);
  }
  bool clean() const { return errors_ == 0; }

  /// Detaches every response and drops the dispatcher: its socket closes and
  /// the loop has nothing left to do. On the loop's thread.
  void stop() {
    if (ended_ == std::chrono::steady_clock::time_point{})
      ended_ = std::chrono::steady_clock::now();
    for (auto& s : slots_) s.r.detach();
    d_.reset();
  }

 private:
  struct slot {
    response r;
    std::size_t name_index = 0;
  };

  bool finished() const { return done_ == count_; }

  void next(slot& s) {
    s.r.detach();
    // After stop() (d_ reset), a completion that was already on its way must
    // not start another query.
    if (!d_ || issued_ == count_) return;
    const std::size_t index = issued_++ % names_.size();
    auto r = d_->add_response(server_, response_options{timeout_});
    if (!r) {
      ++errors_;
      complete_one();
      return;
    }
    std::array<std::byte, 300> query;
    const std::size_t length =
        dns::build_query(query, r->id(), names_[index].name, names_[index].type);
    if (length == 0 || !r->send(std::span(query).first(length))) {
      ++errors_;
      complete_one();
      return;
    }
    s.r = std::move(*r);
    s.name_index = index;
    s.r.async_receive([this, &s](error_code ec, event ev) { on_event(s, ec, std::move(ev)); });
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
    } else if (!dns::reply_matches(ev.data(), q.name, q.type)) {
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
  std::vector<slot> slots_;
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
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      usage();
      return 0;
    }
    if (arg == "--verbose") {
      verbose = true;
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
  const udp::endpoint local(peer->address().is_v6() ? udp::v6() : udp::v4(), 0);
  auto d = dispatcher::create(loop.context(), local, options);
  if (!d) {
    std::fprintf(stderr, "uipc-dns-query: %s\n", d.error().message().c_str());
    return 1;
  }
  const unsigned long total = count.value_or(names.size());
  std::optional<query_run> run;
  run.emplace(loop, *d, *peer, std::move(names), total, std::chrono::milliseconds(timeout_ms),
              verbose);
  d->reset();
  loop.on_stop([&] { run->stop(); });
  boost::asio::post(loop.context(), [&] { run->start(inflight); });
  loop.run();
  run->report();
  std::fflush(stdout);
  const bool clean = run->clean();
  run.reset();  // detaches every response; the last one closes the dispatcher
  // Let the cancelled socket operations complete, so nothing outlives the loop.
  loop.context().restart();
  loop.context().poll();
  return clean ? 0 : 1;
}
