// Shared by the exclusive-port tests: a block of free ports to use as the range.
#pragma once

#include <sys/random.h>

#include <fstream>

#include "dispatch_support.hpp"

namespace uipc::dispatch {

inline response_options exclusive_options(std::chrono::milliseconds timeout = {}) {
  return response_options{timeout, port_mode::exclusive};
}

/// The system's ephemeral port range, as the dispatcher's default.
inline std::pair<unsigned, unsigned> ephemeral_range() {
  std::ifstream in("/proc/sys/net/ipv4/ip_local_port_range");
  unsigned first = 32768, last = 60999;
  in >> first >> last;
  return {first, last};
}

/// `count` consecutive ports, free on 127.0.0.1 when found (each was bound and
/// released), below the system's ephemeral range so that no port 0 bind takes one.
class port_block {
 public:
  explicit port_block(unsigned count) : count_(count) {
    for (int attempt = 0; attempt < 200; ++attempt) {
      unsigned r = 0;
      if (::getrandom(&r, sizeof r, 0) != sizeof r) break;
      first_ = static_cast<std::uint16_t>(20000 + r % 10000);
      if (all_free()) return;
    }
    ADD_FAILURE() << "no block of " << count << " free ports";
  }
  std::uint16_t first() const { return first_; }
  std::uint16_t last() const { return static_cast<std::uint16_t>(first_ + count_ - 1); }

 private:
  bool all_free() const {
    boost::asio::io_context ctx;  // before the sockets: they go first
    std::vector<udp::socket> held;
    for (unsigned i = 0; i < count_; ++i) {
      udp::socket s(ctx);
      error_code ec;
      s.open(udp::v4(), ec);
      s.bind(udp::endpoint(boost::asio::ip::make_address("127.0.0.1"),
                           static_cast<std::uint16_t>(first_ + i)),
             ec);
      if (ec) return false;
      held.push_back(std::move(s));
    }
    return true;
  }
  unsigned count_;
  std::uint16_t first_ = 0;
};

}  // namespace uipc::dispatch
