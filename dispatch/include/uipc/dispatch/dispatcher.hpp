// The UDP dispatcher: one socket (or a SO_REUSEPORT group) shared by responses and listeners.
#pragma once

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/associated_allocator.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/bind_allocator.hpp>
#include <boost/asio/ip/udp.hpp>
#include <boost/asio/recycling_allocator.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "uipc/core/buffer_pool.hpp"
#include "uipc/core/error.hpp"
#include "uipc/core/ref.hpp"
#include "uipc/dispatch/error.hpp"
#include "uipc/dispatch/framing.hpp"

namespace boost::asio {
class io_context;
}

namespace uipc::dispatch {

using udp = boost::asio::ip::udp;

class dispatcher;
namespace detail {
class engine;
class party;
}  // namespace detail

/// What an event tells its receiver.
enum class event_kind : std::uint8_t {
  message,     ///< a datagram: a reply (responses) or a query (listeners)
  timed_out,   ///< the response's timeout passed (the response stays attached)
  no_buffers,  ///< listeners only: the pool ran dry while queued queries held every buffer
  shutdown,    ///< the dispatcher stopped; reason() says why. Exactly one per attached party
  /// Exclusive ports only: the response's own socket reported an error (an ICMP
  /// port or host unreachable from its peer); reason() and the completion's code
  /// say which. The transaction is over: only a shutdown event may follow.
  socket_error,
};

/// One delivery to a response or listener; move-only. A message event lends its
/// receive buffer without a copy: data() is the datagram, writable in place.
/// Destroying the event (or release()) returns it: the buffer goes back to the
/// pool and the next queued event of the same response or listener can be
/// delivered. While a response or listener holds an event, later events queue
/// for it (bounded), in arrival order. Any thread may return an event.
class event {
 public:
  event() noexcept = default;
  // Inline: an event moves a few times between the receive and its handler.
  event(event&& other) noexcept
      : party_(std::exchange(other.party_, nullptr)),
        buffer_(std::move(other.buffer_)),
        size_(std::exchange(other.size_, 0)),
        peer_(other.peer_),
        reason_(other.reason_),
        id_(other.id_),
        socket_(other.socket_),
        kind_(other.kind_) {}
  event& operator=(event&& other) noexcept {
    if (this != &other) {
      release();
      party_ = std::exchange(other.party_, nullptr);
      buffer_ = std::move(other.buffer_);
      size_ = std::exchange(other.size_, 0);
      peer_ = other.peer_;
      reason_ = other.reason_;
      id_ = other.id_;
      socket_ = other.socket_;
      kind_ = other.kind_;
    }
    return *this;
  }
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  ~event() { release(); }

  /// False for the empty event that accompanies an error-only completion.
  explicit operator bool() const noexcept { return party_ != nullptr; }
  event_kind kind() const noexcept { return kind_; }
  /// The datagram (message events); empty otherwise.
  std::span<std::byte> data() const noexcept { return {buffer_.data(), size_}; }
  /// Bytes the lent buffer can hold: room for an answer built in place.
  std::size_t capacity() const noexcept { return buffer_.size(); }
  /// The sender of the datagram; for other kinds, the response's peer (or unspecified).
  const udp::endpoint& peer() const noexcept { return peer_; }
  /// The message ID of the datagram.
  std::uint16_t id() const noexcept { return id_; }
  /// For shutdown events: the socket error that stopped the dispatcher.
  error_code reason() const noexcept { return reason_; }
  /// Returns the event now (see the class comment); idempotent.
  void release() noexcept {
    if (party_ != nullptr) return_to_party();
  }

 private:
  friend class detail::engine;
  void return_to_party() noexcept;
  detail::party* party_ = nullptr;  // a counted reference on the receiving party
  pooled_buffer buffer_;
  std::size_t size_ = 0;
  udp::endpoint peer_;
  error_code reason_;
  std::uint16_t id_ = 0;
  std::uint8_t socket_ = 0;
  event_kind kind_ = event_kind::message;
};

/// Signature of every receive completion: (error, event). ec is empty with a
/// message event; errc::timed_out, errc::no_buffers or errc::shutting_down with
/// an event of that kind; operation_aborted (cancel or detach), errc::detached or
/// errc::shutting_down (after the shutdown event was delivered) with an empty one.
using receive_signature = void(error_code, event);
/// Signature of every send completion.
using send_signature = void(error_code);

namespace detail {
/// Handlers without an allocator of their own get asio's recycling allocator:
/// the type-erased handler is allocated once per operation, on the hot path.
template <class Handler>
auto recycled(Handler&& handler) {
  using allocator = boost::asio::associated_allocator_t<std::decay_t<Handler>>;
  if constexpr (std::is_same_v<allocator, std::allocator<void>>) {
    return boost::asio::bind_allocator(boost::asio::recycling_allocator<void>(),
                                       std::forward<Handler>(handler));
  } else {
    return std::decay_t<Handler>(std::forward<Handler>(handler));
  }
}
using receive_handler = boost::asio::any_completion_handler<receive_signature>;
using send_handler = boost::asio::any_completion_handler<send_signature>;
void add_ref(party* p) noexcept;
void release(party* p) noexcept;

/// A counted reference on a party, taken when an operation is initiated: with a
/// deferred token (asio::deferred, ...) the initiation may run after the handle
/// detached, and must still find the party alive (it then completes with
/// errc::detached). start_* releases it.
class party_ref {
 public:
  explicit party_ref(party* p) noexcept : p_(p) {
    if (p_ != nullptr) add_ref(p_);
  }
  party_ref(const party_ref& other) noexcept : party_ref(other.p_) {}
  party_ref(party_ref&& other) noexcept : p_(std::exchange(other.p_, nullptr)) {}
  party_ref& operator=(const party_ref&) = delete;
  party_ref& operator=(party_ref&&) = delete;
  ~party_ref() {
    if (p_ != nullptr) release(p_);
  }
  party* get() const noexcept { return p_; }

 private:
  party* p_;
};

/// A token that is itself the handler (a callback): async_initiate runs the
/// initiation at once, inside the call, while the handle's own reference keeps
/// the party alive; no reference is taken for it. Other tokens (deferred,
/// use_awaitable, ...) may run it later, and take one (party_ref).
template <class Token>
inline constexpr bool initiates_at_once =
    boost::asio::completion_handler_for<std::decay_t<Token>, receive_signature>;

/// The handler has no executor of its own (a plain callback, possibly with an
/// allocator): it may run directly on a loop thread, without asking its
/// type-erased executor on each completion.
struct no_own_executor {};
template <class Handler>
inline constexpr bool uses_loop_executor =
    std::is_same_v<boost::asio::associated_executor_t<std::decay_t<Handler>, no_own_executor>,
                   no_own_executor>;

void start_receive(party_ref p, receive_handler handler, bool loop_executor);
/// The same for a token that initiates at once: `p` is kept alive by the caller's handle.
void start_receive(party* p, receive_handler handler, bool loop_executor);
void start_send(party_ref p, const udp::endpoint* to, std::span<const std::byte> message,
                send_handler handler);

template <class Token>
auto async_receive(party* p, Token&& token) {
  if constexpr (initiates_at_once<Token>) {
    return boost::asio::async_initiate<Token, receive_signature>(
        [p](auto handler) {
          constexpr bool loop = uses_loop_executor<decltype(handler)>;
          start_receive(p, receive_handler(recycled(std::move(handler))), loop);
        },
        token);
  } else {
    return boost::asio::async_initiate<Token, receive_signature>(
        [ref = party_ref(p)](auto handler) mutable {
          constexpr bool loop = uses_loop_executor<decltype(handler)>;
          start_receive(std::move(ref), receive_handler(recycled(std::move(handler))), loop);
        },
        token);
  }
}
}  // namespace detail

/// Where a response's query leaves from and its reply must arrive.
enum class port_mode : std::uint8_t {
  /// The dispatcher's socket, shared by every response: a reply is matched by
  /// (16-bit ID, peer address, peer port). Cheapest; an off-path forger needs
  /// only the ID (odds M/65536 per datagram with M responses to that peer live).
  shared,
  /// A socket of its own, bound to a port drawn from a CSPRNG out of the
  /// dispatcher's port range and connected to the peer: the kernel drops
  /// datagrams from any other address or port, and a forger must guess the
  /// port as well as the ID (odds M/(65536 * range size) per datagram with M
  /// exclusive responses live). Opening a port costs a socket, bind, connect
  /// and close; a port whose transaction ended well is kept for the next
  /// response to the same peer, one transaction at a time, a bounded number of
  /// times (dispatcher_options::port_uses, port_lifetime). One descriptor per port.
  exclusive,
};

/// Per-response settings.
struct response_options {
  /// 0: none. Otherwise a timed_out event is delivered once this passes.
  std::chrono::milliseconds timeout{0};
  /// Unset: the dispatcher's default (dispatcher_options::ports).
  std::optional<port_mode> ports{};
};

/// An outgoing transaction: a message ID, unique among the live responses to
/// its peer, and the queue of replies that match (ID, peer address, peer port).
/// Move-only; destroying it (or detach()) frees the ID, drops queued replies,
/// aborts a pending receive and releases its reference on the dispatcher.
///
/// Threading: one handle is used by one thread at a time; completions run on
/// the handler's associated executor (the loop's by default).
class response {
 public:
  response() noexcept = default;
  response(response&& other) noexcept : party_(std::exchange(other.party_, nullptr)) {}
  response& operator=(response&& other) noexcept;
  response(const response&) = delete;
  response& operator=(const response&) = delete;
  ~response() { detach(); }

  explicit operator bool() const noexcept { return party_ != nullptr; }
  /// The message ID to write into the query (framing::write_id).
  std::uint16_t id() const noexcept;
  /// The peer the query goes to and the reply must come from.
  const udp::endpoint& peer() const noexcept;
  /// How its query goes out and its reply comes back (see port_mode).
  port_mode ports() const noexcept;
  /// The local port the query leaves from and the reply must reach: the
  /// response's own (exclusive) or the dispatcher's (shared); 0 when empty.
  std::uint16_t local_port() const noexcept;

  /// Waits for the next event: a reply, the timeout, or the shutdown event.
  /// One receive at a time (a second one completes with already_started). On
  /// an empty handle it completes at once, inline, with errc::detached.
  template <class Token>
  auto async_receive(Token&& token) {
    return detail::async_receive(party_, std::forward<Token>(token));
  }

  /// Sends `message` to the peer without copying it: it must stay valid until
  /// the completion. Sends are batched (sendmmsg) on the shared socket; on an
  /// exclusive port the datagram goes out at once and the completion is posted.
  template <class Token>
  auto async_send(std::span<const std::byte> message, Token&& token) {
    return boost::asio::async_initiate<Token, send_signature>(
        [p = detail::party_ref(party_), message](auto handler) mutable {
          detail::start_send(std::move(p), nullptr, message,
                             detail::send_handler(detail::recycled(std::move(handler))));
        },
        token);
  }

  /// Sends a copy of `message` (into a pool buffer) to the peer, with no
  /// completion. Errors: shutting_down, detached, message_too_large, core
  /// pool_exhausted. A later socket error shuts the dispatcher down.
  /// On an exclusive port the datagram is sent now, from `message`, on the
  /// response's own socket; the system's error (a full socket buffer, an
  /// earlier ICMP error) is returned and touches nothing else.
  result<void> send(std::span<const std::byte> message);

  /// Aborts a pending async_receive (operation_aborted) and stops the timeout.
  /// The response stays attached: replies keep queueing for it.
  void cancel() noexcept;

  /// Detaches now (see the class comment). Idempotent.
  void detach() noexcept;

 private:
  friend class detail::engine;
  explicit response(detail::party* p) noexcept : party_(p) {}
  detail::party* party_ = nullptr;  // one counted reference
};

/// A listener for incoming queries (the seed's "request"). Queries go to an
/// attached listener that waits in async_receive and holds no event; otherwise
/// they wait in the dispatcher's query queue (bounded, shared by all listeners,
/// first come first served). With no listener attached, queries are dropped.
/// Move-only; destroying it detaches it.
class listener {
 public:
  listener() noexcept = default;
  listener(listener&& other) noexcept : party_(std::exchange(other.party_, nullptr)) {}
  listener& operator=(listener&& other) noexcept;
  listener(const listener&) = delete;
  listener& operator=(const listener&) = delete;
  ~listener() { detach(); }

  explicit operator bool() const noexcept { return party_ != nullptr; }

  /// Waits for the next query (or a no_buffers or shutdown event).
  template <class Token>
  auto async_receive(Token&& token) {
    return detail::async_receive(party_, std::forward<Token>(token));
  }

  /// Answers a query to its sender and returns the event. `answer` may be the
  /// event's own buffer (built in place: no copy) or any bytes that fit in
  /// ev.capacity() (copied into it). No completion; the buffer goes back to the
  /// pool once sent. Errors: detached, shutting_down, message_too_large (the
  /// event is returned all the same).
  result<void> reply(event&& ev, std::span<const std::byte> answer);

  /// Sends `message` to `to` without copying it; it must stay valid until the completion.
  template <class Token>
  auto async_send_to(std::span<const std::byte> message, const udp::endpoint& to, Token&& token) {
    return boost::asio::async_initiate<Token, send_signature>(
        [p = detail::party_ref(party_), message, to](auto handler) mutable {
          detail::start_send(std::move(p), &to, message,
                             detail::send_handler(detail::recycled(std::move(handler))));
        },
        token);
  }

  /// Aborts a pending async_receive (operation_aborted). Stays attached.
  void cancel() noexcept;

  /// Detaches now. When it was the last listener, queued queries are dropped.
  void detach() noexcept;

 private:
  friend class detail::engine;
  explicit listener(detail::party* p) noexcept : party_(p) {}
  detail::party* party_ = nullptr;  // one counted reference
};

/// Dispatcher settings.
struct dispatcher_options {
  framing frame = dns_framing();
  std::size_t buffer_size = 4096;   ///< bytes per receive buffer (largest datagram kept whole)
  std::uint32_t buffers = 1024;     ///< receive buffers in the pool
  std::uint32_t max_receives = 32;  ///< receives in flight per socket (one recvmmsg batch)
  std::size_t max_queued_queries =
      256;  ///< the shared query queue (0: only straight to an idle listener)
  std::size_t max_queued_per_response = 16;
  unsigned sockets = 1;         ///< > 1: that many sockets on one port with SO_REUSEPORT
  int socket_buffer_bytes = 0;  ///< SO_RCVBUF and SO_SNDBUF; 0 keeps the system's
  /// Sends through a second socket per receiving socket, bound to the same port
  /// and kept out of the event loop's epoll set. A socket in an epoll set pays a
  /// wake-up of its wait queue for every datagram it sends (the kernel's
  /// write-space callback, even with no one waiting to write); on loopback at
  /// full load that is about 7 % of a DNS responder's CPU. The sockets share
  /// the port through SO_REUSEPORT, and a socket filter (SO_ATTACH_REUSEPORT_CBPF)
  /// gives every incoming datagram to a receiving socket (by message ID when
  /// there are several): the send sockets never receive, and a socket another
  /// process of the same user binds to the port later gets nothing. When the
  /// system refuses any of it, create() fails with the system's error. A send
  /// socket whose buffer is full hands its datagrams to its receiving socket,
  /// which waits.
  bool separate_send_sockets = false;

  /// The mode of a response whose response_options::ports is unset.
  port_mode ports = port_mode::shared;
  /// Exclusive ports open at once, at most (each is a descriptor). When all
  /// are taken, add_response fails with no_free_port and async_add_response
  /// waits for one. 0: exclusive responses are refused (bad_options).
  std::uint32_t exclusive_sockets = 256;
  /// Exclusive ports are drawn from [first_port, last_port]; both 0: the
  /// system's ephemeral range (/proc/sys/net/ipv4/ip_local_port_range, or
  /// 32768-60999 when unreadable). A port that is busy is drawn again.
  std::uint16_t first_port = 0;
  std::uint16_t last_port = 0;
  /// The last this-many ports released are not drawn again (a late reply to
  /// one finds no socket rather than the next transaction's). Must be smaller
  /// than the range; with the system's range it is capped at half of it.
  std::uint32_t recent_ports = 1024;
  /// Transactions one exclusive port carries, one after another, before it
  /// closes. A port is kept for the next response to the same peer only when
  /// its transaction ended well: its reply came, no socket error, and no
  /// async_add_response waits for a port. One that timed out, failed or was
  /// detached before its reply closes at once (a late reply may still come).
  /// Each transaction on a kept port has a fresh random ID, never its
  /// predecessor's. 1: a fresh port for every response. 0 is refused.
  std::uint32_t port_uses = 16;
  /// No transaction starts on a port opened longer ago than this (0: ports
  /// are never kept). Kept ports that wait longer close when the dispatcher
  /// next adds an exclusive response, when a response times out, and at shutdown.
  std::chrono::milliseconds port_lifetime{1000};
};

/// Counters since creation, and the current state, each read on its own: while
/// buffers come back, one may show as free and still, for a moment, as lent.
struct dispatcher_stats {
  std::uint64_t received = 0;             ///< datagrams read from the socket(s)
  std::uint64_t sent = 0;                 ///< datagrams sent
  std::uint64_t dropped_short = 0;        ///< shorter than the framing's header
  std::uint64_t dropped_no_listener = 0;  ///< queries while no listener was attached
  std::uint64_t dropped_unmatched =
      0;  ///< shared socket: replies to an ID not in use, or from another address/port
  std::uint64_t dropped_queue_full = 0;  ///< a query or reply queue at its limit
  std::uint64_t no_buffer_events = 0;    ///< no_buffers events given to listeners
  std::uint64_t timeouts = 0;            ///< responses that timed out
  std::uint64_t send_errors = 0;         ///< datagrams the kernel refused
  std::uint64_t dropped_no_memory = 0;   ///< datagrams dropped because a queue could not grow
  std::uint32_t buffers_in_use = 0;      ///< pool buffers not free
  std::uint32_t buffers_lent = 0;        ///< buffers held by the application or waiting to be sent
  std::size_t queued_queries = 0;
  std::size_t responses = 0;       ///< attached responses
  std::size_t listeners = 0;       ///< attached listeners
  unsigned receiving_sockets = 0;  ///< sockets with a receive running or armed
  bool receiving_stopped = false;  ///< stop_receiving() was called
  unsigned send_sockets = 0;       ///< separate send sockets (see dispatcher_options)
  bool shutting_down = false;
  // Exclusive ports. Datagrams from any source but the peer never reach these
  // sockets (the kernel drops them: they show in the system's UDP NoPorts
  // count), so what is counted here came from the peer's address and port.
  std::uint64_t exclusive_received = 0;  ///< datagrams read from exclusive sockets
  /// Read on an exclusive socket but not its reply (another ID, a query, too
  /// short, or after the response detached): forged or stale replies.
  std::uint64_t exclusive_dropped_unmatched = 0;
  std::uint64_t exclusive_port_redraws = 0;   ///< ports drawn again because they were busy
  std::uint64_t exclusive_socket_errors = 0;  ///< responses failed by their socket's error
  std::uint64_t exclusive_no_port = 0;        ///< adds refused or made to wait: no port free
  std::uint64_t exclusive_reused = 0;         ///< responses given a kept port
  std::size_t exclusive_open = 0;             ///< exclusive sockets open now (kept ones too)
  std::size_t exclusive_kept = 0;             ///< of those, kept for the next response
  std::size_t port_waiters = 0;               ///< async_add_response calls waiting for a port
};

/// The dispatcher. Refcounted: the creator's ref_ptr and every attached response
/// and listener (and every event they hold) keep it alive; the last reference
/// frees every queued event and buffer and closes the socket(s).
///
/// Threading: every member may be called from any thread; the loop may run on
/// several threads. User handlers are never called with an internal lock held;
/// a completion never runs inside the call that started it.
///
/// Failure: a receive or send error that is not a cancellation starts the
/// failsafe shutdown: receiving stops, each attached response and listener gets
/// one shutdown event (after its queued events), adds fail with shutting_down.
class dispatcher : public ref_counted<dispatcher> {
 public:
  /// Binds `local` (IPv4 or IPv6; port 0 picks one). Errors: bad_options, or the
  /// system's socket/bind error.
  static result<ref_ptr<dispatcher>> create(boost::asio::io_context& context,
                                            const udp::endpoint& local,
                                            const dispatcher_options& options = {});
  ~dispatcher();
  dispatcher(const dispatcher&) = delete;
  dispatcher& operator=(const dispatcher&) = delete;

  /// Attaches a response to `peer` with a fresh, unpredictable ID unique among
  /// the live responses to that peer (shared port), or any random ID on a fresh
  /// exclusive port (see port_mode). Errors: shutting_down, no_free_id;
  /// exclusive: bad_options (exclusive_sockets is 0), no_free_port (all
  /// exclusive_sockets taken, or every port of the range busy), the system's
  /// socket, bind or connect error.
  result<response> add_response(const udp::endpoint& peer, const response_options& options = {});

  /// As add_response, but when every exclusive socket is taken it waits for
  /// one to be released (in call order) instead of failing. Completes with
  /// void(error_code, response), never inside this call; a shutdown completes
  /// the waiters with shutting_down. A waiter keeps the dispatcher alive.
  template <class Token>
  auto async_add_response(const udp::endpoint& peer, const response_options& options,
                          Token&& token) {
    return boost::asio::async_initiate<Token, add_signature>(
        [d = ref_ptr<dispatcher>(this), peer, options](auto handler) {
          d->start_add_response(peer, options, add_handler(std::move(handler)));
        },
        token);
  }

  /// Attaches a listener; it takes a waiting query at its first receive.
  /// Errors: shutting_down.
  result<listener> add_listener();

  /// The bound address and port.
  udp::endpoint local_endpoint() const;
  /// The sockets' descriptors, for socket options and diagnostics; still owned by the dispatcher.
  std::vector<int> native_handles() const;
  const framing& frame() const noexcept;
  dispatcher_stats stats() const;

  /// Stops reading the shared socket(s), for good: datagrams that arrive from
  /// now on stay in the kernel's buffers (and go with the sockets). Returns once
  /// no read of them runs or can start and every datagram read so far is
  /// counted in stats().received and classified (queued, delivered or
  /// dropped): a server that drains before it stops knows exactly what it has
  /// to answer. Parties stay attached, queued queries stay queued, sends and
  /// exclusive ports go on. Call it from any thread, a handler included.
  /// Idempotent.
  void stop_receiving();

  /// Starts the same shutdown as a socket error, with reason operation_aborted:
  /// receiving stops, each attached party gets its one shutdown event, adds
  /// fail. For an orderly stop (e.g. from an event_loop stop hook): once every
  /// party has detached, the dispatcher leaves no work on the loop. Idempotent.
  void shutdown();

 private:
  using add_signature = void(error_code, response);
  using add_handler = boost::asio::any_completion_handler<add_signature>;
  friend class detail::engine;
  void start_add_response(const udp::endpoint& peer, const response_options& options,
                          add_handler handler);
  explicit dispatcher(std::shared_ptr<detail::engine> engine) noexcept;
  std::shared_ptr<detail::engine> engine_;
};

}  // namespace uipc::dispatch
