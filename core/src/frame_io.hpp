// The socket side of framing, shared by the event-driven `connection` and the
// `blocking_connection`: a receive buffer that turns bytes and SCM_RIGHTS
// descriptors into frames, and a sendmsg that carries descriptors.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <vector>

#include "uipc/core/framed.hpp"
#include "uipc/proto/envelope.pb.h"

namespace uipc::detail {

/// The peer going away shows up as EOF, EPIPE or ECONNRESET: one code for all.
error_code socket_error(int e);

/// Most descriptors one recvmsg accepts, and one sendmsg carries.
inline constexpr std::size_t max_fds_per_message = 64;

/// Bytes received and not yet parsed, with the descriptors that came with them.
class frame_reader {
 public:
  /// The buffer's size once the first byte is due: an idle connection costs
  /// no buffer at all (it waits without one), and a small one otherwise.
  /// It grows with the frames that need more, and goes back to this size when
  /// it is empty and larger than `shrink_above`.
  static constexpr std::size_t initial_size = 4 * 1024;
  static constexpr std::size_t shrink_above = 64 * 1024;

  frame_reader() = default;

  /// One recvmsg into the free space (made first, growing the buffer only as a
  /// frame larger than it arrives, up to `max_frame_size`). Returns what
  /// recvmsg returned; `errno` is set when that is negative. `fds_complete`
  /// turns false when the kernel had to drop descriptors (MSG_CTRUNC).
  /// `drained` is set when the read did not fill the space: the socket had no more.
  ssize_t receive(int fd, int flags, std::size_t max_frame_size, bool& fds_complete, bool& drained);

  /// The free space after the received bytes, made first as receive() does,
  /// for a receive done elsewhere; commit() what it wrote.
  std::span<char> space(std::size_t max_frame_size);
  void commit(std::size_t n) noexcept { end_ += n; }

  /// The next whole frame: nullopt when none is complete, an error inside when
  /// the bytes are bad (over max_frame_size, empty, or not an envelope).
  std::optional<result<frame>> next(const connection_options& options);

  bool empty() const noexcept { return begin_ == end_; }
  /// Whether the buffer has been allocated (it is, from the first byte received on).
  bool has_buffer() const noexcept { return !buffer_.empty(); }
  /// Whether descriptors wait that no frame can claim: once every whole frame
  /// is parsed, only the frame still arriving may be owed some, and no more
  /// than one frame's worth. Anything else was sent unannounced.
  bool has_unclaimed_fds(std::size_t max_fds_per_frame) const noexcept {
    return !fds_.empty() && (empty() || fds_.size() > max_fds_per_frame);
  }
  /// Stream offset of the first unparsed byte: names the frame now arriving.
  std::uint64_t consumed() const noexcept { return consumed_; }
  /// Descriptors received and not yet claimed by a frame.
  std::deque<unique_fd>& pending_fds() noexcept { return fds_; }

 private:
  /// Gives a buffer grown for a large frame back once it is empty.
  void shrink();
  void make_room(std::size_t max_frame_size);

  std::vector<char> buffer_;
  std::size_t begin_ = 0;       // first unparsed byte
  std::size_t end_ = 0;         // one past the last received byte
  std::uint64_t consumed_ = 0;  // stream offset of begin_
  std::deque<unique_fd> fds_;
  proto::Envelope scratch_;
};

/// Local checks before a frame is sent: it fails alone, the connection stays.
/// errc::too_many_fds, bad_file_descriptor (an empty unique_fd).
error_code check_outgoing(const frame& f, const connection_options& options);

/// One sendmsg of `iov`, with `fds` (if any) attached as SCM_RIGHTS to its
/// first byte. MSG_NOSIGNAL is added to `flags`. Returns what sendmsg returned.
ssize_t send_with_fds(int fd, std::span<const iovec> iov, std::span<const unique_fd> fds,
                      int flags);

/// Takes `fd` on as a connection: it must be a Unix stream socket; it is made
/// close-on-exec (accepted sockets do not inherit it, and a child must never
/// get them); its peer's credentials are read, and without them there is no
/// connection (fail closed). invalid_argument for any other kind of descriptor.
result<peer_credentials> claim_unix_stream(int fd);

/// Makes a non-blocking connect to the Unix socket at `path`: a listener whose
/// backlog is full gives EAGAIN instead of blocking.
result<unique_fd> connect_unix(const std::string& path);

}  // namespace uipc::detail
