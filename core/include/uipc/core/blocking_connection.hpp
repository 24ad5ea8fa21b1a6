// A framed connection for callers that block: the same frames as `connection`,
// read and written by the calling thread itself, with no event loop.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "uipc/core/framed.hpp"

namespace uipc {

/// The client end of a framed connection, driven by the calling thread.
///
/// A blocking client (a command-line tool, a library call that returns its
/// answer) pays for no loop: call() is one sendmsg and one recvmsg, where
/// `connection` adds a strand, a reactor wait and a handler hand-off per
/// message. Frames, descriptors, error notices and limits are `connection`'s;
/// the two ends interoperate with each other and with a `listener`.
///
/// Threading: every member may be called from any thread; they run one at a
/// time. Frames the peer sends on its own (requests and notices) wait in an
/// inbox, bounded by connection_options::max_queued_frames, for receive();
/// replies that match no call (a call given up at its deadline, or a reply to
/// a request sent with send()) are counted and dropped.
///
/// Failure: a deadline that passes fails only that call or receive
/// (errc::timed_out). A write that cannot finish (the peer stopped reading for
/// longer than the deadline) or bad bytes from the peer close the connection;
/// later operations fail with the close reason.
class blocking_connection {
 public:
  using clock = std::chrono::steady_clock;

  /// Connects to a listener's socket path. A listener whose backlog is full
  /// gives EAGAIN (resource_unavailable_try_again) instead of blocking.
  static result<blocking_connection> connect(const std::string& path,
                                             connection_options options = {});
  /// Takes over a connected Unix stream socket (made close-on-exec and blocking).
  static result<blocking_connection> adopt(unique_fd socket, connection_options options = {});

  blocking_connection(blocking_connection&&) noexcept;
  blocking_connection& operator=(blocking_connection&&) noexcept;
  ~blocking_connection();

  /// Sends `request` as a request with a fresh correlation id and waits for its
  /// reply until `deadline`. A reply carrying an error returns that error
  /// (decoded as `connection` does). Fails alone, the connection open:
  /// errc::frame_too_large, errc::too_many_fds, errc::timed_out.
  result<frame> call(frame request, clock::time_point deadline);
  /// Sends `f` as it is and returns once it is in the kernel's hands (or the
  /// deadline passed, which closes the connection: part of a frame may be out).
  error_code send(frame f, clock::time_point deadline);
  /// The next request or notice from the peer, waiting until `deadline`.
  result<frame> receive(clock::time_point deadline);

  /// Shuts the socket down; later operations fail with operation_aborted.
  void close();
  /// For a child process after fork(), from a pthread_atfork child handler:
  /// closes the child's copy of the socket and nothing else, so the connection
  /// stays the parent's and ends when the parent goes. Takes no lock (another
  /// thread of the parent may have held it at the fork): afterwards the only
  /// thing to do with this object is to destroy it.
  void release_after_fork() noexcept;
  bool is_open() const;
  /// Why the connection closed (empty while open).
  error_code close_reason() const;
  /// The peer, as the kernel reported it at connect time.
  const peer_credentials& peer() const noexcept;
  connection_stats stats() const;

  struct impl;

 private:
  explicit blocking_connection(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace uipc
