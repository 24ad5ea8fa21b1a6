// Fuzz target: the dispatcher's receive path and the DNS responder's answer,
// as anyone who can reach the port drives them. A real dispatcher is bound
// to 127.0.0.1; each input is a burst of datagrams from two client sockets,
// read with recvmmsg and classified (short, query, reply to a response,
// unmatched) exactly as in production. A listener answers queries the way
// uipc-dns-responder does (dns::answer_in_place, reply from the lent buffer)
// and sometimes keeps an event a while, so queues and the buffer pool fill.
//
// Input: [hold mask] then datagrams of [ctl][length u16 le][bytes].
//   ctl bits 0-1: 0 sends the bytes as they are; 1-3 makes the datagram a reply
//     to response 1-3 (its ID written in, the QR bit set).
//   ctl bit 2: sent from the second socket (not the responses' peer).
//   ctl bit 3: run the loop before the next datagram (otherwise they batch,
//     at most 16 unread: the kernel would drop more).
//   hold mask bit i: the listener keeps the i-th query it gets (at most 2 at a time).
//
// Checks: every datagram sent is received and classified as its bytes say
// (short, query, reply to its response, unmatched: counted against the
// dispatcher's counters and the events delivered); answers are
// DNS responses no longer than the buffer; once the parties detach, every
// pool buffer is back and no descriptor is left open.
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <memory>
#include <string>

#include "dns_message.hpp"
#include "fuzz_support.hpp"
#include "uipc/dispatch/dispatcher.hpp"

namespace {

using namespace uipc;
using namespace uipc::dispatch;
using clock_type = std::chrono::steady_clock;

constexpr std::size_t buffer_size = 512;

struct fixture {
  fixture() {
    dispatcher_options o;
    o.buffer_size = buffer_size;
    o.buffers = 16;
    o.max_receives = 8;
    o.max_queued_queries = 4;
    o.max_queued_per_response = 2;
    auto d = dispatcher::create(ctx, udp::endpoint(boost::asio::ip::address_v4::loopback(), 0), o);
    UIPC_FUZZ_CHECK(d.has_value());
    disp = std::move(*d);
    for (auto& c : clients) {
      c.open(udp::v4());
      c.bind(udp::endpoint(boost::asio::ip::address_v4::loopback(), 0));
      c.non_blocking(true);
    }
  }

  boost::asio::io_context ctx;
  ref_ptr<dispatcher> disp;
  std::array<udp::socket, 2> clients{udp::socket(ctx), udp::socket(ctx)};
  std::unique_ptr<fuzz::fd_census> census;
};

fixture& the_fixture() {
  static fixture f;
  return f;
}

// Reads the answers the listener sent; each must be a DNS response that fits a buffer.
void drain_answers(fixture& fx) {
  for (auto& c : fx.clients) {
    for (;;) {
      std::array<std::byte, 2048> buf;
      error_code ec;
      const std::size_t n = c.receive(boost::asio::buffer(buf), 0, ec);
      if (ec) break;
      UIPC_FUZZ_CHECK(n >= 12 && n <= buffer_size);
      UIPC_FUZZ_CHECK((std::to_integer<unsigned>(buf[2]) & 0x80) != 0);
    }
  }
}

}  // namespace

namespace {

void run_one(const std::uint8_t* data, std::size_t size) {
  fixture& fx = the_fixture();
  fuzz::input in(data, size);
  const std::uint8_t hold_mask = in.byte();
  const udp::endpoint target = fx.disp->local_endpoint();
  const udp::endpoint peer = fx.clients[0].local_endpoint();

  // The listener: answers like uipc-dns-responder, or holds the event.
  auto attached = fx.disp->add_listener();
  UIPC_FUZZ_CHECK(attached.has_value());
  dispatch::listener l = std::move(*attached);
  std::deque<event> held;
  unsigned queries = 0;  // query events the listener got
  unsigned replies = 0;  // reply events the responses got
  std::function<void(error_code, event)> on_query = [&](error_code ec, event ev) {
    if (ec && !ev) return;  // detached
    if (!ec && ev.kind() == event_kind::message) {
      UIPC_FUZZ_CHECK(ev.data().size() >= 12 && ev.data().size() <= ev.capacity());
      if ((hold_mask >> (queries++ % 8) & 1) != 0) {
        held.push_back(std::move(ev));
        if (held.size() > 2) held.pop_front();  // returns the oldest
      } else {
        const std::span<std::byte> room(ev.data().data(), ev.capacity());
        const std::size_t length = dns::answer_in_place(room, ev.data().size());
        UIPC_FUZZ_CHECK(length <= ev.capacity());
        if (length != 0) (void)l.reply(std::move(ev), room.first(length));
      }
    }
    ev.release();
    l.async_receive(on_query);
  };
  l.async_receive(on_query);

  // Three responses to the first client, each draining its replies.
  std::array<response, 3> responses;
  std::function<void(error_code, event)> on_reply[3];
  for (std::size_t i = 0; i < responses.size(); ++i) {
    auto r = fx.disp->add_response(peer);
    UIPC_FUZZ_CHECK(r.has_value());
    responses[i] = std::move(*r);
    on_reply[i] = [&, i](error_code ec, event ev) {
      if (ec && !ev) return;
      if (!ec) {
        UIPC_FUZZ_CHECK(ev.kind() == event_kind::message);
        UIPC_FUZZ_CHECK(ev.id() == responses[i].id());
        UIPC_FUZZ_CHECK(ev.peer() == peer);
        ++replies;
      }
      ev.release();
      responses[i].async_receive(on_reply[i]);
    };
    responses[i].async_receive(on_reply[i]);
  }

  const dispatcher_stats before = fx.disp->stats();
  const std::uint64_t received_before = before.received;
  // What each datagram must become, from its bytes alone (the DNS framing:
  // 12-byte header, ID in bytes 0-1, QR in 0x80 of byte 2).
  std::uint64_t want_short = 0, want_queries = 0, want_matched = 0, want_unmatched = 0;
  std::uint64_t sent = 0;
  // Every datagram sent is read: held events go back as the listener takes
  // more, so the pool never stays dry. Called every 16 datagrams too: the
  // kernel drops datagrams past the socket's receive buffer (a burst of a few
  // hundred small ones overflows it), and those are no one's to account for.
  auto await_received = [&] {
    const auto until = clock_type::now() + std::chrono::seconds(5);
    while (fx.disp->stats().received - received_before < sent) {
      if (clock_type::now() >= until) {
        const auto st = fx.disp->stats();
        std::fprintf(
            stderr,
            "sent %llu, received %llu, buffers in use %u, queued %zu, receiving sockets %u\n",
            static_cast<unsigned long long>(sent),
            static_cast<unsigned long long>(st.received - received_before), st.buffers_in_use,
            st.queued_queries, st.receiving_sockets);
        // The kernel's own count of datagrams it dropped for a full receive buffer.
        char port[8];
        std::snprintf(port, sizeof port, ":%04X", static_cast<unsigned>(target.port()));
        std::ifstream udp("/proc/net/udp");
        for (std::string line; std::getline(udp, line);) {
          if (line.find(port) != std::string::npos) std::fprintf(stderr, "%s\n", line.c_str());
        }
        UIPC_FUZZ_CHECK(!"datagrams sent were never received");
      }
      if (fx.ctx.stopped()) fx.ctx.restart();
      fx.ctx.poll();
      drain_answers(fx);
      if (!held.empty()) held.pop_front();
    }
  };
  while (!in.empty()) {
    const std::uint8_t ctl = in.byte();
    const auto bytes = in.bytes(in.u16());
    std::array<std::byte, 2048> datagram{};
    const std::size_t length = std::min(bytes.size(), datagram.size());
    if (length != 0) std::memcpy(datagram.data(), bytes.data(), length);
    if (const unsigned to = ctl & 3; to != 0 && length >= 3) {
      dns_framing().write_id(datagram, responses[to - 1].id());
      datagram[2] |= std::byte{0x80};
    }
    error_code ec;
    fx.clients[(ctl >> 2) & 1].send_to(boost::asio::buffer(datagram.data(), length), target, 0, ec);
    if (!ec) {
      ++sent;
      const bool from_peer = ((ctl >> 2) & 1) == 0;
      const auto id = static_cast<std::uint16_t>(length >= 2 ? dns_framing().read_id(datagram) : 0);
      if (length < 12 || length > buffer_size) {
        ++want_short;
      } else if ((std::to_integer<unsigned>(datagram[2]) & 0x80) == 0) {
        ++want_queries;
      } else if (from_peer && std::any_of(responses.begin(), responses.end(),
                                          [&](const response& r) { return r.id() == id; })) {
        ++want_matched;
      } else {
        ++want_unmatched;
      }
    }
    if ((ctl & 8) != 0) {
      fx.ctx.poll();
      drain_answers(fx);
    }
    if (sent % 16 == 0) await_received();
  }

  await_received();
  const auto until = clock_type::now() + std::chrono::seconds(5);
  // The queues drain as held events go back; then every datagram is
  // accounted for: dropped short, dropped unmatched, or delivered (or dropped
  // at a full queue) as a query or as a reply to its response.
  while (fx.disp->stats().queued_queries != 0 || !held.empty()) {
    UIPC_FUZZ_CHECK(clock_type::now() < until);
    if (fx.ctx.stopped()) fx.ctx.restart();
    fx.ctx.poll();
    drain_answers(fx);
    if (!held.empty()) held.pop_front();
  }
  if (fx.ctx.stopped()) fx.ctx.restart();
  fx.ctx.poll();
  {
    const dispatcher_stats now = fx.disp->stats();
    const std::uint64_t full = now.dropped_queue_full - before.dropped_queue_full;
    if (now.dropped_short - before.dropped_short != want_short ||
        now.dropped_unmatched - before.dropped_unmatched != want_unmatched ||
        queries + replies + full != want_queries + want_matched ||
        now.dropped_no_listener != before.dropped_no_listener) {
      std::fprintf(
          stderr,
          "short %llu (want %llu), unmatched %llu (want %llu), queries %u + replies %u + queue "
          "full %llu "
          "(want %llu + %llu)\n",
          static_cast<unsigned long long>(now.dropped_short - before.dropped_short),
          static_cast<unsigned long long>(want_short),
          static_cast<unsigned long long>(now.dropped_unmatched - before.dropped_unmatched),
          static_cast<unsigned long long>(want_unmatched), queries, replies,
          static_cast<unsigned long long>(full), static_cast<unsigned long long>(want_queries),
          static_cast<unsigned long long>(want_matched));
      UIPC_FUZZ_CHECK(!"a datagram was classified against its bytes");
    }
    UIPC_FUZZ_CHECK(queries <= want_queries && replies <= want_matched);
  }
  l.detach();
  for (auto& r : responses) r.detach();
  // Answers still being sent hold their buffers until they are out; a query
  // handed over just before the detach may still reach on_query (and be held).
  const auto settle = clock_type::now() + std::chrono::seconds(5);
  do {
    held.clear();
    if (fx.ctx.stopped()) fx.ctx.restart();
    fx.ctx.poll();
    drain_answers(fx);
  } while ((!held.empty() || fx.disp->stats().buffers_in_use != 0) && clock_type::now() < settle);
  const auto st = fx.disp->stats();
  UIPC_FUZZ_CHECK(!st.shutting_down);
  UIPC_FUZZ_CHECK(st.listeners == 0 && st.responses == 0 && st.queued_queries == 0);
  if (st.buffers_in_use != 0)
    std::fprintf(stderr, "%u buffers in use after every party left\n", st.buffers_in_use);
  UIPC_FUZZ_CHECK(st.buffers_in_use == 0);
  fuzz::check_no_descriptor_changed(fx.census);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return uipc::fuzz::run_counted(the_fixture(), run_one, data, size);
}
