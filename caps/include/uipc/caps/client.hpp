// The client side of caps: connects to a point by (name, uid, gid), checks
// the server's kernel credentials, and calls it with opaque bytes.
#pragma once

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/async_result.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "uipc/caps/error.hpp"
#include "uipc/caps/point.hpp"
#include "uipc/core/framed.hpp"

namespace boost::asio {
class io_context;
}

namespace uipc::caps {

namespace detail {
struct client_core;
}

/// How a client connects and waits.
struct client_options {
  /// How long connect() waits for a point that is not registered (or whose
  /// servers are all gone): it sleeps on directory notification and tries
  /// again when the point appears. Zero: fail at once with errc::not_registered.
  std::chrono::milliseconds wait_for_point{0};
  /// How long a server that accepted the connection may take to welcome the
  /// client (a stopped or wedged server fails connect() with a timed_out code).
  std::chrono::milliseconds handshake_timeout{std::chrono::seconds(5)};
  /// Whether a call beyond the server's limit of messages in flight waits for
  /// a slot (true) or fails with errc::no_buffers (false). Also for a full arena.
  bool wait_for_slot = true;
  /// Most time a blocking call spins for its reply before it sleeps on a futex;
  /// the actual spin adapts to whether spinning pays. Zero: never spin.
  std::chrono::nanoseconds max_spin{std::chrono::microseconds(50)};
};

/// A reply: a view of the server's bytes in the channel. Releasing it (the
/// destructor) sends DISPOSE, so the server may reuse the memory. The server
/// can write that memory at any moment: copy what you parse.
class reply {
 public:
  reply() = default;
  reply(reply&& other) noexcept;
  reply& operator=(reply&& other) noexcept;
  ~reply();
  std::span<const std::byte> view() const noexcept { return {data_, length_}; }
  std::size_t size() const noexcept { return length_; }
  std::string copy() const;
  /// Disposes now (also done by the destructor).
  void release() noexcept;

 private:
  friend struct detail::client_core;
  std::shared_ptr<detail::client_core> core_;
  std::uint64_t id_ = 0;
  const std::byte* data_ = nullptr;
  std::size_t length_ = 0;
};

/// A connection to one server of a point.
///
/// Threading: every member may be called from any thread at once; many calls
/// may be in flight. Lifetime: the io_context must outlive the client (it runs
/// async completions; blocking calls do not need it running). Destroying the
/// client disconnects: the server sees every message of it disposed. After
/// fork(), the child's copy answers errc::forked_copy.
class client {
 public:
  using clock = std::chrono::steady_clock;

  /// Connects to `address`. Errors: invalid_name, errc::not_registered (no
  /// live server; after options.wait_for_point), permission_denied (core or
  /// system: the point's access rule refuses us), wrong_server (core: the
  /// server runs as another uid — a squatter), errc::wrong_gid, foreign_owner
  /// (core: the uid's points directory belongs to someone else).
  static result<std::unique_ptr<client>> connect(boost::asio::io_context& ctx,
                                                 const point_address& address,
                                                 client_options options = {});
  ~client();
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  /// Sends `request` and waits for the reply until `deadline`; then the call
  /// is aborted and fails with errc::timed_out.
  result<reply> call(std::span<const std::byte> request,
                     clock::time_point deadline = clock::time_point::max());
  result<reply> call(std::string_view request,
                     clock::time_point deadline = clock::time_point::max()) {
    return call(std::as_bytes(std::span(request.data(), request.size())), deadline);
  }
  /// A call whose `size` request bytes `fill` writes in place in the channel.
  result<reply> call_in_place(std::size_t size,
                              const std::function<void(std::span<std::byte>)>& fill,
                              clock::time_point deadline = clock::time_point::max());

  /// Sends without waiting; the reply is taken with wait() (or given up with abort()).
  result<message_id> send(std::span<const std::byte> request);
  result<message_id> send_in_place(std::size_t size,
                                   const std::function<void(std::span<std::byte>)>& fill);
  /// The reply to `id`, waiting until `deadline` (then errc::timed_out; the
  /// message stays in flight: wait again or abort it).
  result<reply> wait(message_id id, clock::time_point deadline = clock::time_point::max());
  /// Withdraws `id`. The message then has one outcome: if its reply had not
  /// arrived, wait() (or the async call) fails with operation_aborted and a
  /// late reply is disposed unseen; if it had, abort returns false and the
  /// reply stands. errc::unknown_message for an id not in flight.
  result<bool> abort(message_id id);

  using call_handler = boost::asio::any_completion_handler<void(error_code, reply)>;
  /// call() on the event loop. Honours per-operation cancellation (the message
  /// is aborted: operation_aborted).
  template <class Token>
  auto async_call(std::span<const std::byte> request, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, reply)>(
        [this](auto handler, std::span<const std::byte> r) {
          start_call(r, call_handler(std::move(handler)));
        },
        token, request);
  }

  /// The server's kernel credentials (pid, uid, gid).
  const peer_credentials& server() const noexcept;
  /// The server's generation: differs after a restart.
  std::uint64_t generation() const noexcept;
  /// The point's group.
  gid_t point_gid() const noexcept;
  /// Messages awaiting their reply now.
  std::size_t in_flight() const;
  /// Why the connection ended (empty while it lives).
  error_code close_reason() const;

 private:
  explicit client(std::shared_ptr<detail::client_core> core);
  void start_call(std::span<const std::byte> request, call_handler handler);
  std::shared_ptr<detail::client_core> core_;
};

}  // namespace uipc::caps
