// Shared by the dispatcher's multi-threaded tests: an echoing listener and a
// client that keeps transactions in flight.
#pragma once

#include <atomic>
#include <boost/asio/error.hpp>
#include <boost/asio/ip/address.hpp>
#include <chrono>
#include <vector>

#include "uipc/dispatch/dispatcher.hpp"

namespace uipc::dispatch::test_threads {

namespace asio = boost::asio;

inline const udp::endpoint loopback_any(asio::ip::make_address("127.0.0.1"), 0);

/// Answers every query by flipping its QR bit, in place.
class echo_listener {
 public:
  explicit echo_listener(listener l) : l_(std::move(l)) {}
  void start() {
    l_.async_receive([this](error_code ec, event ev) {
      if (ec) return;  // detached or shut down: `this` may be gone, touch nothing
      auto data = ev.data();
      data[2] |= std::byte{0x80};
      answered_.fetch_add(1, std::memory_order_relaxed);
      (void)l_.reply(std::move(ev), data);
      start();
    });
  }
  void detach() { l_.detach(); }
  std::uint64_t answered() const { return answered_.load(std::memory_order_relaxed); }

 private:
  listener l_;
  std::atomic<std::uint64_t> answered_{0};
};

/// Keeps `inflight` transactions going from one dispatcher until `total` finished.
class client {
 public:
  client(ref_ptr<dispatcher> d, udp::endpoint server, int inflight, int total,
         port_mode ports = port_mode::shared)
      : d_(std::move(d)),
        server_(server),
        ports_(ports),
        slots_(static_cast<std::size_t>(inflight)),
        left_(total) {}

  void start() {
    for (auto& s : slots_) next(s);
  }
  int completed() const { return completed_.load(); }
  int failed() const { return failed_.load(); }
  void stop() {
    for (auto& s : slots_) s.r.detach();
    d_.reset();
  }

 private:
  struct slot {
    response r;
  };

  void next(slot& s) {
    s.r.detach();
    if (left_.fetch_sub(1) <= 0) return;
    auto r = d_->add_response(server_, response_options{std::chrono::seconds(5), ports_});
    if (!r) {
      failed_.fetch_add(1);
      return;
    }
    std::vector<std::byte> q(12, std::byte{0});
    d_->frame().write_id(q, r->id());
    if (!r->send(q)) failed_.fetch_add(1);
    s.r = std::move(*r);
    s.r.async_receive([this, &s](error_code ec, event ev) {
      if (ec == asio::error::operation_aborted) return;
      const bool ok = !ec && ev.id() == s.r.id();
      ev.release();
      next(s);
      // Counted last: once every transaction is counted, no handler touches a slot.
      (ok ? completed_ : failed_).fetch_add(1);
    });
  }

  ref_ptr<dispatcher> d_;
  udp::endpoint server_;
  port_mode ports_;
  std::vector<slot> slots_;
  std::atomic<int> left_;
  std::atomic<int> completed_{0};
  std::atomic<int> failed_{0};
};

}  // namespace uipc::dispatch::test_threads
