// The exclusive ports' private types: the socket, its slot in the epoll set,
// the port draw, and a caller waiting for a port.
#pragma once

#include <array>
#include <boost/asio/any_completion_handler.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "uipc/dispatch/dispatcher.hpp"

namespace uipc::dispatch::detail {

class party;

/// An exclusive port (port_mode::exclusive): a socket bound to a random port
/// and connected to one response's peer. Shared by its response and the reads
/// in progress on the loop (which may outlive the response). Not an asio
/// socket: it waits in the engine's own epoll set (see exclusive_io.cpp).
struct exclusive_socket {
  exclusive_socket() = default;
  exclusive_socket(const exclusive_socket&) = delete;
  exclusive_socket& operator=(const exclusive_socket&) = delete;
  ~exclusive_socket();
  std::mutex io_mutex;  // every call on the descriptor, and closing it
  int fd = -1;          // under io_mutex
  bool closed = false;  // under io_mutex
  // One reader at a time, so that replies stay in order: a read running,
  // posted, or waiting for a pool buffer owns the socket's reads until it
  // finds the socket drained; a readiness notice meanwhile only sets
  // read_again, and the owner reads once more before it lets go
  // (edge-triggered, the notice's datagram brings no later edge). Under io_mutex.
  bool reading = false;
  bool read_again = false;
  std::uint16_t port = 0;
  udp::endpoint peer;
  std::uint32_t slot = 0;        // in the engine's epoll slots (under its slots mutex)
  std::uint32_t generation = 0;  // of that slot, in the epoll event's data
  bool registered = false;       // under the slots mutex
  // A transaction on it now: counted in the engine's active sockets, whose
  // number decides whether the epoll set is waited on. Under the slots mutex.
  bool active = false;
  party* owner = nullptr;  // under the engine's mutex; null once the response detached
  // Reuse (dispatcher_options::port_uses, port_lifetime), under the engine's mutex.
  std::chrono::steady_clock::time_point opened;
  std::uint32_t uses = 0;     // transactions carried so far
  std::uint16_t last_id = 0;  // the last one's ID: the next one draws another
  bool spoiled = false;       // an error came while it was kept: never reused
};

/// An entry of the engine's epoll set of exclusive sockets: an event names its
/// socket by (slot, generation), so an event of a socket closed since finds nothing.
struct exclusive_slot {
  std::shared_ptr<exclusive_socket> socket;
  std::uint32_t generation = 0;
};

/// Draws exclusive ports: uniform over [first, last] from a CSPRNG, never one
/// of the `recent` last released. Not thread-safe (the engine's port_mutex_).
class port_draw {
 public:
  port_draw(std::uint16_t first, std::uint16_t last, std::uint32_t recent);
  std::uint16_t first() const noexcept { return first_; }
  std::uint32_t size() const noexcept { return std::uint32_t{last_} - first_ + 1; }
  bool recent(std::uint16_t port) const noexcept { return recent_set_[port]; }
  /// A uniformly drawn port; it may be recent (the caller draws again).
  std::uint16_t draw();
  /// A port was released: it is not drawn again for the next `recent` releases.
  void released(std::uint16_t port);

 private:
  std::uint16_t first_, last_;
  std::uint32_t limit_;
  std::vector<bool> recent_set_;       // by port
  std::vector<std::uint16_t> recent_;  // a ring of the last limit_ released
  std::size_t next_ = 0;
  std::array<std::uint32_t, 256> random_{};
  std::size_t random_left_ = 0;
};

/// The system's ephemeral port range, or 32768-60999 when it cannot be read.
std::pair<std::uint16_t, std::uint16_t> system_port_range();

/// An async_add_response waiting for an exclusive socket.
struct port_waiter {
  ref_ptr<dispatcher> owner;
  udp::endpoint peer;
  response_options options;
  boost::asio::any_completion_handler<void(error_code, response)> handler;
};

}  // namespace uipc::dispatch::detail
