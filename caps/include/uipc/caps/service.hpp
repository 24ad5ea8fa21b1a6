// The server side of caps: registers a point and serves REQUEST / REPLY /
// DISPOSE with each client's kernel credentials. Payloads travel through a
// shared-memory channel per client and are not copied until read.
#pragma once

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/async_result.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "uipc/caps/error.hpp"
#include "uipc/caps/point.hpp"
#include "uipc/core/server.hpp"

namespace boost::asio {
class io_context;
}

namespace uipc::caps {

namespace detail {
struct server_channel;
}

/// How a service registers and serves.
struct service_options {
  access who = access::user;
  /// Exclusive: a second live server of the name is refused (errc::name_taken).
  /// Not exclusive: servers of one name share its clients, each new client
  /// going to one of them; an exclusive one is then refused.
  bool exclusive = true;
  /// The point's group (one the server is in); empty: the server's effective gid.
  std::optional<gid_t> gid;
  /// Where points live; empty: the shared rendezvous directory.
  std::string directory;
  /// Messages a client may have awaiting a reply (1 to 128).
  std::uint32_t max_in_flight = 128;
  /// Payload arenas of each client's channel (virtual: pages are used as written).
  std::size_t request_arena = std::size_t{4} << 20;
  std::size_t reply_arena = std::size_t{4} << 20;
  /// Most time receive() spins on active channels before it sleeps; the
  /// actual spin adapts to whether spinning pays (wait_policy). Zero: never spin.
  std::chrono::nanoseconds max_spin{std::chrono::microseconds(50)};
  /// Most clients: connected ones, and ended ones whose events the
  /// application has not received yet (their channels live until then). One
  /// more is refused with errc::no_buffers. A client that ended without a
  /// message before its connected event was received is not reported at all.
  std::size_t max_clients = 16384;
};

/// What receive() gives: a request, or news of a client or a message.
enum class event_kind : std::uint8_t {
  request,       ///< a message to answer with reply() or reject()
  dispose,       ///< the client is done with the reply to `id` (or went away: the message ends)
  withdrawn,     ///< the client aborted `id`; answer it (the answer is not sent) to free its slot
  connected,     ///< a client connected
  disconnected,  ///< a client went away; dispose events for its messages came before
};

/// One event. For a request, the payload is a view of the client's channel:
/// valid until the request is answered. The client can write that memory at
/// any moment; copy() what you parse or check.
class event {
 public:
  event() = default;
  event_kind kind = event_kind::connected;
  client_id client = 0;
  message_id id = 0;

  /// The client's kernel credentials (pid, uid, gid, groups), from connect time.
  const peer_identity& sender() const noexcept;
  /// The request's bytes in place.
  std::span<const std::byte> view() const noexcept;
  std::size_t size() const noexcept { return length_; }
  /// The request's bytes, copied.
  std::string copy() const;

 private:
  friend struct detail::server_channel;
  friend class service;
  std::shared_ptr<detail::server_channel> channel_;
  const std::byte* data_ = nullptr;
  std::size_t length_ = 0;
};

/// Counters of a service.
struct service_stats {
  std::uint64_t clients = 0;
  std::uint64_t clients_total = 0;
  std::uint64_t requests = 0;
  std::uint64_t replies = 0;
  std::uint64_t disposals = 0;
  std::uint64_t withdrawals = 0;
  std::uint64_t protocol_violations = 0;  ///< clients dropped for breaking the channel protocol
  std::uint64_t refusals = 0;             ///< connections refused by the access rule
  std::uint64_t doorbells = 0;            ///< sleeps ended by a client's doorbell
};

/// A registered point and its clients.
///
/// Threading: receive() and async_receive() may be called from any thread;
/// receivers take turns. reply(), reject() and the rest may be called from any
/// thread at once. No lock of the service is held while user code runs.
///
/// Lifetime: stop() (or the destructor) unregisters the point, ends every
/// client (their pending calls fail with errc::disconnected) and fails
/// waiting receives with errc::stopped. The io_context must outlive it and be
/// run by someone: the control line of each client is served there.
class service {
 public:
  using clock = std::chrono::steady_clock;

  /// Registers `name` with the rules of `options`. Errors: invalid_name (core),
  /// errc::name_taken, foreign_owner / unsafe_directory (core) for a points
  /// directory someone else made, system errors.
  static result<std::unique_ptr<service>> register_point(boost::asio::io_context& ctx,
                                                         std::string_view name,
                                                         service_options options = {});
  ~service();
  service(const service&) = delete;
  service& operator=(const service&) = delete;

  /// The next event, waiting until `deadline` (errc::timed_out then).
  result<event> receive(clock::time_point deadline = clock::time_point::max());
  /// Like receive(), but a request is copied into `buffer` (event::view() then
  /// shows the copy). A request larger than `buffer` stays queued: the result
  /// is errc::buffer_too_small and `size` tells how large it is.
  result<event> receive_into(std::span<std::byte> buffer, std::size_t& size,
                             clock::time_point deadline = clock::time_point::max());
  /// The next event without waiting; errc::timed_out (core) when there is none.
  result<event> try_receive();

  using receive_handler = boost::asio::any_completion_handler<void(error_code, event)>;
  /// receive() on the event loop: completes with the next event.
  template <class Token>
  auto async_receive(Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, event)>(
        [this](auto handler) { start_receive(receive_handler(std::move(handler))); }, token);
  }

  /// Answers request `id` of `client` with `bytes`. Errors: errc::unknown_message
  /// (no such request awaits a reply), errc::withdrawn (the client aborted it:
  /// nothing is sent, the slot is freed), errc::disconnected, errc::message_too_large,
  /// errc::no_buffers (the client holds replies filling its arena).
  error_code reply(client_id client, message_id id, std::span<const std::byte> bytes);
  error_code reply(client_id client, message_id id, std::string_view bytes) {
    return reply(client, id, std::as_bytes(std::span(bytes.data(), bytes.size())));
  }
  /// Answers with `size` bytes written in place by `fill` (called with no lock held).
  error_code reply_in_place(client_id client, message_id id, std::size_t size,
                            const std::function<void(std::span<std::byte>)>& fill);
  /// Answers with an error instead of a reply (the client's call fails with `ec`
  /// when it is a caps code, errc::unknown_message's kin otherwise).
  error_code reject(client_id client, message_id id, errc ec);

  /// The same answers given the request event this service received: no
  /// lookup of the client (the event holds its channel), so a little faster.
  /// An event of another kind, or of another service, is errc::unknown_message.
  error_code reply(const event& request, std::span<const std::byte> bytes);
  error_code reply(const event& request, std::string_view bytes) {
    return reply(request, std::as_bytes(std::span(bytes.data(), bytes.size())));
  }
  error_code reply_in_place(const event& request, std::size_t size,
                            const std::function<void(std::span<std::byte>)>& fill);
  error_code reject(const event& request, errc ec);

  /// Ends a client's connection (its calls fail with errc::disconnected).
  void disconnect(client_id client);
  /// Unregisters and ends everything; see the class comment. Idempotent.
  void stop();

  /// Changes at every registration (nanoseconds of the wall clock at start).
  std::uint64_t generation() const noexcept;
  const std::string& socket_path() const noexcept;
  const std::string& name() const noexcept;
  service_stats stats() const;

  struct impl;

 private:
  explicit service(std::shared_ptr<impl> p);
  void start_receive(receive_handler handler);
  std::shared_ptr<impl> impl_;
};

}  // namespace uipc::caps
