// uipc-dns-responder: answers every DNS query from a small built-in zone (NXDOMAIN
// for names it does not know), through listeners on a uipc dispatcher.
#include <boost/asio/io_context.hpp>
#include <cstdio>
#include <cstring>
#include <list>
#include <string>

#include "dns_message.hpp"
#include "program_args.hpp"
#include "uipc/core/event_loop.hpp"
#include "uipc/dispatch/dispatcher.hpp"

namespace {

using namespace uipc;
using namespace uipc::dispatch;

void usage(std::FILE* out = stderr) {
  std::fprintf(out,
               "usage: uipc-dns-responder [--listen ADDR:PORT] [--threads N] [--no-send-socket]\n"
               "  answers DNS queries for *.uipc.test from a built-in zone, NXDOMAIN otherwise.\n"
               "  --listen   address and port (default 127.0.0.1:5300; port 0 picks one)\n"
               "  --threads  loop threads, and sockets on the port with SO_REUSEPORT (default 1)\n"
               "  --no-send-socket  answer through the receiving socket, not a separate\n"
               "             send socket (dispatcher_options::separate_send_sockets)\n"
               "Prints 'listening on ADDR:PORT' once ready; SIGINT/SIGTERM stop it.\n");
}

/// One listener's loop: receive a query, answer it in its own buffer, reply.
class answer_loop {
 public:
  explicit answer_loop(dispatch::listener l) : listener_(std::move(l)) {}
  void start() {
    listener_.async_receive([this](error_code ec, event ev) { on_event(ec, ev); });
  }
  /// Detaches the listener; a pending receive completes (operation_aborted)
  /// on the loop and still uses this object.
  void stop() noexcept { listener_.detach(); }

 private:
  void on_event(error_code ec, event& ev) {  // by reference: no move on the hot path
    if (ec == dispatch::errc::no_buffers) {
      std::fprintf(stderr, "uipc-dns-responder: receive buffers ran out, queries dropped\n");
    } else if (ec) {
      if (ev.kind() == event_kind::shutdown && ev.reason() != boost::asio::error::operation_aborted)
        std::fprintf(stderr, "uipc-dns-responder: dispatcher stopped: %s\n",
                     ev.reason().message().c_str());
      ev.release();
      listener_.detach();  // on this listener's own chain: no other handler uses it now
      return;
    } else {
      const std::span<std::byte> room(ev.data().data(), ev.capacity());
      const std::size_t length = dns::answer_in_place(room, ev.data().size());
      if (length != 0) (void)listener_.reply(std::move(ev), room.first(length));
    }
    ev.release();
    start();
  }

  dispatch::listener listener_;
};

}  // namespace

int main(int argc, char** argv) {
  std::string listen = "127.0.0.1:5300";
  unsigned long threads = 1;
  bool send_socket = true;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      usage(stdout);
      return 0;
    }
    if (arg == "--no-send-socket") {
      send_socket = false;
      continue;
    }
    if (i + 1 >= argc) {
      usage();
      return 2;
    }
    if (arg == "--listen") {
      listen = argv[++i];
    } else if (arg == "--threads") {
      auto n = dns::parse_count(argv[++i]);
      if (!n || *n == 0 || *n > 64) {
        usage();
        return 2;
      }
      threads = *n;
    } else {
      usage();
      return 2;
    }
  }
  auto local = dns::parse_endpoint(listen);
  if (!local) {
    std::fprintf(stderr, "uipc-dns-responder: bad --listen '%s'\n", listen.c_str());
    return 2;
  }
  event_loop loop(static_cast<unsigned>(threads), /*catch_signals=*/true);
  dispatcher_options options;
  options.sockets = static_cast<unsigned>(threads);
  options.buffers = 512 * static_cast<std::uint32_t>(threads);
  options.buffer_size = 1232;  // the usual EDNS UDP size: every query fits, answers stay small
  options.socket_buffer_bytes = 4 << 20;
  options.separate_send_sockets = send_socket;
  auto d = dispatcher::create(loop.context(), *local, options);
  if (!d) {
    std::fprintf(stderr, "uipc-dns-responder: %s: %s\n", listen.c_str(),
                 d.error().message().c_str());
    return 1;
  }
  std::list<answer_loop> loops;
  for (unsigned long i = 0; i < threads; ++i) {
    auto l = (*d)->add_listener();
    if (!l) {
      std::fprintf(stderr, "uipc-dns-responder: %s\n", l.error().message().c_str());
      return 1;
    }
    loops.emplace_back(std::move(*l)).start();
  }
  // Stopping (SIGINT, SIGTERM): shut the dispatcher down; each listener detaches
  // when it gets its shutdown event, and the loop runs dry.
  loop.on_stop([dispatcher = *d] { dispatcher->shutdown(); });
  const auto bound = (*d)->local_endpoint();
  std::printf("listening on %s:%u\n",
              bound.address().is_v6() ? ("[" + bound.address().to_string() + "]").c_str()
                                      : bound.address().to_string().c_str(),
              bound.port());
  std::fflush(stdout);
  loop.run();
  const auto st = (*d)->stats();
  std::fprintf(
      stderr, "uipc-dns-responder: received %llu sent %llu dropped: short %llu queue-full %llu\n",
      static_cast<unsigned long long>(st.received), static_cast<unsigned long long>(st.sent),
      static_cast<unsigned long long>(st.dropped_short),
      static_cast<unsigned long long>(st.dropped_queue_full));
  for (auto& l : loops) l.stop();  // detach the listeners before the loop goes
  d->reset();
  // Let the cancelled operations complete (their handlers use the answer
  // loops), so nothing outlives the loop; only then are the loops destroyed.
  loop.context().restart();
  loop.context().poll();
  loops.clear();
  return 0;
}
