// The server kit: what every per-user server needs, written once — an accept
// loop that backs off when descriptors run out, sessions with the peer's kernel
// identity, admission before any frame is read, typed request handlers, an
// end-of-session hook that runs exactly once, idle exit and ordered stop.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "uipc/core/error.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/typed.hpp"

namespace boost::asio {
class io_context;
}

namespace uipc {

/// Who a session's peer is, as the kernel says: SO_PEERCRED and SO_PEERGROUPS
/// at connect time. Nothing of it comes from the peer's frames.
struct peer_identity {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  ///< supplementary groups (may include gid)

  /// Whether `g` is the primary group or one of the supplementary ones.
  bool in_group(gid_t g) const noexcept;
};

/// Reads the kernel's identity of the peer of a connected Unix socket.
/// Fails closed: without credentials there is no identity.
result<peer_identity> read_peer_identity(int socket_fd);

/// Raises this process's soft limit of open descriptors to its hard limit and
/// returns the soft limit now. For a server's main: each client costs it a
/// socket and a pidfd, and a soft limit of 1024 (systemd's default, kept for
/// select(), which an epoll loop does not use) lets a few hundred clients
/// refuse everyone else. Children inherit the raised limit: one that uses
/// select() must lower it again (uipc's own runners do not use it).
std::uint64_t raise_descriptor_limit() noexcept;

/// One accepted, admitted connection of a server.
///
/// Threading: every member may be called from any thread. Lifetime: held by
/// the server while the session lives; handlers get a reference valid during
/// the call, or keep the shared_ptr from server_options::on_session_start.
class server_session {
 public:
  server_session(std::uint64_t id, peer_identity peer, unique_fd pidfd, connection::pointer conn);
  ~server_session();
  server_session(const server_session&) = delete;
  server_session& operator=(const server_session&) = delete;

  /// Unique within the server's life, never 0: a key for ledgers.
  std::uint64_t id() const noexcept { return id_; }
  const peer_identity& peer() const noexcept { return peer_; }
  /// A pidfd of the peer's process (SO_PEERPIDFD, else pidfd_open of its pid),
  /// or -1 where the kernel has neither.
  int pidfd() const noexcept { return pidfd_.get(); }
  /// Whether the peer's process still runs (asks its pidfd; without one, kill(pid, 0)).
  bool peer_alive() const noexcept;
  const connection::pointer& conn() const noexcept { return conn_; }
  /// Sends a frame (a notice, say) with nothing to wait for; see connection::send.
  error_code send(frame f) const { return conn_->send(std::move(f)); }
  /// Ends the session: the connection closes and on_session_end runs once.
  void close() const { conn_->close(); }

 private:
  std::uint64_t id_;
  peer_identity peer_;
  unique_fd pidfd_;
  connection::pointer conn_;
};

/// Counters of a server, for a stats call.
struct server_stats {
  std::uint64_t sessions = 0;         ///< open now
  std::uint64_t sessions_total = 0;   ///< admitted since start
  std::uint64_t requests = 0;         ///< frames served (requests and notices)
  std::uint64_t errors = 0;           ///< requests answered with an error, notices that failed
  std::uint64_t refusals = 0;         ///< connections refused by admission or the session limit
  std::uint64_t accept_failures = 0;  ///< accepts that failed for lack of descriptors or memory
  std::uint64_t protocol_errors = 0;  ///< sessions closed for bad frames or a silent peer
};

/// How a server is set up.
struct server_options {
  /// The socket file: mode, backlog, and the options of every connection.
  listener_options listen;
  /// A connection that has not sent one whole frame this long after it was
  /// accepted is closed (errc::timed_out); it holds nothing meanwhile.
  std::chrono::milliseconds first_frame_timeout{10'000};
  /// A frame begun must be finished within this, or the session is closed
  /// (errc::timed_out): a peer that stops halfway through a large frame holds
  /// its buffer (and any descriptors sent with it) no longer. This, not
  /// listen.connection's, is what the sessions use (as first_frame_timeout).
  std::chrono::milliseconds partial_frame_timeout{10'000};
  /// Decides whether a peer may connect, before any of its frames is read:
  /// return an error to refuse (the connection is closed unread). Empty: the
  /// peer must run as the server's effective uid. Runs on a loop thread with
  /// no server lock held.
  std::function<error_code(const peer_identity&)> admit;
  /// Most open sessions; more are refused (counted as refusals).
  std::size_t max_sessions = 16384;
  /// Called once a session is admitted, before its first request is served.
  std::function<void(const std::shared_ptr<server_session>&)> on_session_start;
  /// Called exactly once for every session that started, however it ends (the
  /// peer closed or died, bad frames, a silent peer, close(), stop()), with the
  /// reason. Release what the session held here. No server lock is held.
  std::function<void(server_session&, error_code reason)> on_session_end;
  /// With on_idle: how long the server waits, once its last session ended, before
  /// it stops accepting and calls on_idle. At start it waits at least
  /// `startup_grace` for a first session.
  std::chrono::milliseconds linger{0};
  std::chrono::milliseconds startup_grace{2'000};
  /// Called once when the server has been without sessions for `linger`, after
  /// it stopped accepting (a client still in the backlog finds the socket gone
  /// and can start a successor). Usually stops the loop. No server lock held.
  std::function<void()> on_idle;
};

/// A per-user server on a Unix socket: accepts, admits, serves typed requests
/// through a request_router, and ends every session exactly once.
///
/// Threading: every member may be called from any thread. Requests of one
/// session are served in order on its connection's strand; different
/// sessions run concurrently on the loop's threads, so handlers guard shared
/// state themselves. No server lock is held while user code (handlers,
/// hooks) runs.
///
/// Lifetime: the io_context and the router must outlive the server. stop()
/// (or the destructor) stops in order: stop accepting (the socket file goes),
/// wait for handlers running on other threads to finish, close every session
/// and end it (on_session_end), then return. A copy a fork() gave a child is
/// the parent's server: stopped there it only closes the child's descriptors
/// (no hook, no wait, the socket file stays).
class server {
 public:
  /// Binds `path` (see listener::bind: address_in_use when a live server holds it)
  /// and starts accepting on `ctx`.
  static result<std::unique_ptr<server>> start(boost::asio::io_context& ctx,
                                               const std::string& path,
                                               const request_router& router,
                                               server_options options = {});
  ~server();
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  /// Ordered stop (see the class comment). Idempotent: a call while another
  /// thread's stop() is under way returns once that one is done, except from
  /// inside a handler or hook of any server, where it returns at once (the
  /// first may be waiting for that handler). May be called from a handler or
  /// hook (it then does not wait for the calling handler).
  void stop();

  server_stats stats() const;
  /// The sessions open now.
  std::vector<std::shared_ptr<server_session>> sessions() const;
  const std::string& path() const noexcept;

  struct impl;

 private:
  explicit server(std::shared_ptr<impl> p);
  std::shared_ptr<impl> impl_;
};

}  // namespace uipc
