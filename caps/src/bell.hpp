// A channel's doorbells: one AF_UNIX datagram socket pair, an end on each side.
// Ringing sends a one-byte datagram without waiting; the side rung watches its
// own end for reading and empties it.
//
// Not eventfds, as first built: an eventfd passed to the peer stays one open
// file description shared by both, so the peer could clear O_NONBLOCK on our
// copy too and fill the counter, and our next write (in the server's reply(),
// or on a loop thread as a client left) would block for ever. A socket end is
// ours alone, and MSG_DONTWAIT holds whatever the peer does to its own.
// Datagrams, not a stream: the peer closing or shutting down its end leaves
// ours unreadable (a stream end would read EOF, ready for ever), and a full
// queue (the peer does not read; net.unix.max_dgram_qlen datagrams) means the
// bell is ringing already.
#pragma once

#include <sys/socket.h>

#include <array>
#include <cerrno>

#include "uipc/core/error.hpp"
#include "uipc/core/unique_fd.hpp"

namespace uipc::caps::detail {

struct bell_pair {
  unique_fd ours;    ///< kept: rung by the peer, and rings the peer
  unique_fd theirs;  ///< passed to the peer in WELCOME
};

inline result<bell_pair> make_bell_pair() {
  int ends[2];
  if (::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, ends) != 0)
    return error_code(errno, boost::system::system_category());
  return bell_pair{unique_fd(ends[0]), unique_fd(ends[1])};
}

/// Whether `fd` is a datagram socket: what a bell a peer passed must be.
inline bool is_bell(int fd) noexcept {
  int type = 0;
  socklen_t length = sizeof type;
  return ::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) == 0 && type == SOCK_DGRAM;
}

/// Rings the peer. A full queue, or a peer gone, is no error: it will look.
inline void ring_bell(int fd) noexcept {
  const char one = 1;
  (void)::send(fd, &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

/// Empties our end in one system call (the queue holds net.unix.max_dgram_qlen
/// datagrams, 10 by default; a peer that keeps sending leaves it readable, and
/// the next look empties it again).
inline void clear_bell(int fd) noexcept {
  constexpr unsigned batch = 32;
  std::array<char, batch> bytes;
  std::array<iovec, batch> iov;
  std::array<mmsghdr, batch> msgs{};
  for (unsigned i = 0; i < batch; ++i) {
    iov[i] = {&bytes[i], 1};
    msgs[i].msg_hdr.msg_iov = &iov[i];
    msgs[i].msg_hdr.msg_iovlen = 1;
  }
  (void)::recvmmsg(fd, msgs.data(), batch, MSG_DONTWAIT, nullptr);
}

}  // namespace uipc::caps::detail
