// Framed stream transport: length-prefixed envelopes over Unix-domain stream sockets,
// with request/reply correlation, peer credentials and file-descriptor passing.
#pragma once

#include <sys/types.h>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/async_result.hpp>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "uipc/core/error.hpp"
#include "uipc/core/unique_fd.hpp"

namespace boost::asio {
class io_context;
}

namespace uipc {

namespace detail {
struct connection_access;
}
struct outgoing_frame;

/// Who is on the other end, as the kernel says (SO_PEERCRED) when the connection
/// was made: it cannot be forged by the peer.
struct peer_credentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

/// An error as it travels to the peer: category name, value, readable message.
struct wire_error {
  std::string category;
  int value = 0;
  std::string message;
};

enum class frame_kind : std::uint8_t {
  request,  ///< expects a reply with the same correlation id
  reply,    ///< answers a request
  notice,   ///< one-way
};

/// One message on a connection: the decoded envelope plus the descriptors that
/// travelled with it.
struct frame {
  frame_kind kind = frame_kind::notice;
  std::uint64_t correlation_id = 0;  ///< set by async_call; copy it into the reply
  std::uint32_t type = 0;            ///< what the payload is, numbered by each module
  std::string payload;               ///< usually a serialized protobuf message of the module
  std::optional<wire_error> error;   ///< a reply that reports a failure
  std::vector<unique_fd> fds;        ///< passed with SCM_RIGHTS
};

/// A reply to `request` carrying `payload`.
frame make_reply(const frame& request, std::uint32_t type, std::string payload);
/// A reply to `request` reporting `ec`.
frame make_error_reply(const frame& request, error_code ec);
/// The wire form of `ec`.
wire_error to_wire_error(error_code ec);

/// Limits and timeouts of one connection.
struct connection_options {
  /// Largest envelope accepted or sent, in bytes (the 4-byte prefix not counted).
  std::size_t max_frame_size = 1 << 20;
  /// Most descriptors in one frame.
  std::size_t max_fds_per_frame = 16;
  /// False when the peer never passes descriptors: a frame from it that
  /// announces some fails (errc::too_many_fds), and the event-driven
  /// connection reads without a control buffer, one system call less per
  /// wake-up. What we send is not affected.
  bool peer_sends_fds = true;
  /// Received requests and notices waiting for async_receive; at this many the
  /// connection stops reading, so a peer that sends faster than it is served
  /// is slowed down by its own socket buffer instead of growing our memory.
  /// (Replies then wait too: a side that makes calls keeps a receive pending.)
  std::size_t max_queued_frames = 256;
  /// Reply bytes waiting to be written; above this the connection also stops
  /// reading, so a peer that sends requests and never reads the replies is
  /// throttled. Our own requests and notices do not count (two peers streaming
  /// at each other must not both stop reading).
  std::size_t max_queued_send_bytes = 4 << 20;
  /// A peer that has not sent one whole frame this long after connecting is
  /// dropped with errc::timed_out (zero: wait forever).
  std::chrono::milliseconds first_frame_timeout{0};
  /// A frame begun must be finished within this (zero: no limit).
  std::chrono::milliseconds partial_frame_timeout{0};
  /// Categories whose codes a reply's error is decoded into; core's is always known.
  std::vector<const boost::system::error_category*> error_categories;
};

/// Statistics of one connection.
struct connection_stats {
  std::uint64_t frames_sent = 0;
  std::uint64_t frames_received = 0;
  std::uint64_t replies_dropped = 0;  ///< replies to no call in flight (late or bogus)
  std::size_t queued_frames = 0;      ///< received, waiting for async_receive
  std::size_t queued_send_bytes = 0;  ///< accepted by async_send, not yet written
  std::size_t calls_in_flight = 0;
};

/// A framed connection over a Unix-domain stream socket. Many frames may be in
/// flight both ways; async_call matches replies to requests by correlation id.
///
/// Threading: every member may be called from any thread; the connection's
/// state lives on its own strand. Completion handlers run on their associated
/// executor (by default the connection's strand), never inside the initiating
/// call, and count as outstanding work on it while pending. A frame read off
/// the socket goes to a handler that runs on the strand directly, in the same
/// turn of the loop (no second trip through the scheduler); what such handlers
/// send is written together once the frames that one receive brought are all
/// handed over (the first of them at once), in order as always. async_call and
/// async_receive honour per-operation cancellation (bind_cancellation_slot,
/// awaitable operator||): the operation completes with operation_aborted and
/// the connection stays open.
///
/// Lifetime: held by shared_ptr. It lives while someone holds it (a handler
/// that captures it counts) or while it still has frames to write. Dropping
/// the last reference closes it: calls in flight complete with
/// operation_aborted. It also closes itself on a protocol error or when the
/// peer goes, and on close(), which is abortive (unsent frames are dropped).
class connection : public std::enable_shared_from_this<connection> {
 public:
  using pointer = std::shared_ptr<connection>;
  using send_handler = boost::asio::any_completion_handler<void(error_code)>;
  using frame_handler = boost::asio::any_completion_handler<void(error_code, frame)>;

  /// Connects to a listener's socket path. Never blocks: a listener whose
  /// backlog is full gives EAGAIN (resource_unavailable_try_again).
  static result<pointer> connect(boost::asio::io_context& ctx, const std::string& path,
                                 connection_options options = {});
  /// Takes over a connected Unix stream socket (made close-on-exec). Anything
  /// else, or a socket whose peer credentials cannot be read, is refused.
  static result<pointer> adopt(boost::asio::io_context& ctx, unique_fd socket,
                               connection_options options = {});
  /// Two connected ends (socketpair), e.g. for a child process or a test.
  static result<std::pair<pointer, pointer>> pair(boost::asio::io_context& ctx,
                                                  connection_options options = {});

  ~connection();
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

  /// Sends `f` as it is (kind, correlation id and all). Completes with no error
  /// once the frame is in the kernel's hands. Fails alone, nothing sent and the
  /// connection open: errc::frame_too_large, errc::too_many_fds (over
  /// max_fds_per_frame or 64), bad_file_descriptor (an empty unique_fd).
  /// Otherwise the close reason.
  template <class Token>
  auto async_send(frame f, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code)>(
        [this](auto handler, frame f) {
          start_send(std::move(f), send_handler(std::move(handler)));
        },
        token, std::move(f));
  }

  /// Sends `f` as it is, with nothing to wait for: the frame is queued and
  /// written in order with the rest. Local refusals come back at once
  /// (errc::frame_too_large, errc::too_many_fds, bad_file_descriptor; nothing
  /// queued); a later failure shows only as the close reason. For replies and
  /// notices whose sender has nothing to do once they are out.
  error_code send(frame f);

  /// Sends `request` as a request with a fresh correlation id and completes with
  /// the peer's reply. A reply carrying an error completes with that error (decoded
  /// through connection_options::error_categories, else errc::remote_error) and
  /// the reply frame. If the connection closes first: the close reason.
  template <class Token>
  auto async_call(frame request, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, frame)>(
        [this](auto handler, frame f) {
          start_call(std::move(f), frame_handler(std::move(handler)));
        },
        token, std::move(request));
  }

  /// Completes with the next request or notice from the peer. Frames received
  /// before the connection closed are still delivered; after them, the close reason.
  template <class Token>
  auto async_receive(Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, frame)>(
        [this](auto handler) { start_receive(frame_handler(std::move(handler))); }, token);
  }

  /// Closes the socket; pending sends, calls and receives complete with
  /// boost::asio::error::operation_aborted. Idempotent. The close runs on the
  /// connection's strand: called from outside the loop, it takes effect when
  /// the loop next runs (or at once if the caller is on the strand).
  void close();

  /// The peer, as the kernel reported it at connect time.
  const peer_credentials& peer() const noexcept;
  /// Why the connection closed (empty while open).
  error_code close_reason() const;
  bool is_open() const;
  connection_stats stats() const;

  struct impl;

 private:
  friend struct detail::connection_access;
  explicit connection(std::unique_ptr<impl> p);
  void start();
  void start_send(frame f, send_handler handler);
  void enqueue(outgoing_frame f);
  void start_call(frame f, frame_handler handler);
  void start_receive(frame_handler handler);

  std::unique_ptr<impl> impl_;
};

/// Options of a listener.
struct listener_options {
  connection_options connection;  ///< for every accepted connection
  int backlog = 128;
  /// Permission bits of the socket file, e.g. 0600 for the owner only.
  unsigned mode = 0600;
  /// Socket activation: when the service manager passed this process a
  /// listening socket bound to the path (systemd's LISTEN_FDS protocol), take
  /// it instead of binding one. The manager then owns the socket file: its
  /// mode and backlog are the manager's, and close() leaves the file in place
  /// so that the next connection starts the server again.
  bool inherited = true;
};

/// The sockets the service manager passed this process (listener_options::
/// inherited) that no listener has taken, each by its bound path (empty when
/// it is not a named Unix socket). A daemon expects none once it serves: one
/// left means its unit's ListenStream= and the path it serves differ, which
/// it should say, since clients of that socket would wait for nobody.
std::vector<std::string> untaken_passed_sockets();

/// Listens on a Unix-domain socket path. A socket file left by a dead server is
/// reclaimed; a live listener on the path is never displaced (errc::address_in_use).
/// A socket passed by the service manager for the path is taken instead of
/// binding one (listener_options::inherited).
///
/// Threading: not thread-safe; call it from the loop (or one strand). Lifetime:
/// the socket file is removed by close() or the destructor, unless another
/// listener has taken the path since or the service manager owns it; an
/// accept still pending then completes
/// with operation_aborted.
class listener {
 public:
  using accept_handler = boost::asio::any_completion_handler<void(error_code, connection::pointer)>;

  static result<std::unique_ptr<listener>> bind(boost::asio::io_context& ctx,
                                                const std::string& path,
                                                listener_options options = {});
  ~listener();
  listener(const listener&) = delete;
  listener& operator=(const listener&) = delete;

  /// Completes with the next connection (its credentials read), or
  /// operation_aborted after close().
  template <class Token>
  auto async_accept(Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, connection::pointer)>(
        [this](auto handler) { start_accept(accept_handler(std::move(handler))); }, token);
  }

  using socket_handler = boost::asio::any_completion_handler<void(error_code, unique_fd)>;

  /// Completes with the next accepted socket as it is: nothing read from it,
  /// no connection made (close-on-exec; blocking mode as accepted). For a
  /// server that decides from the peer's credentials whether to take it on
  /// (connection::adopt) before any of its bytes is read.
  template <class Token>
  auto async_accept_socket(Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, unique_fd)>(
        [this](auto handler) { start_accept_socket(socket_handler(std::move(handler))); }, token);
  }

  /// Stops listening and removes the socket file. Idempotent.
  void close();
  const std::string& path() const noexcept;

  struct impl;

 private:
  explicit listener(std::unique_ptr<impl> p);
  void start_accept(accept_handler handler);
  void start_accept_socket(socket_handler handler);

  std::unique_ptr<impl> impl_;
};

}  // namespace uipc
