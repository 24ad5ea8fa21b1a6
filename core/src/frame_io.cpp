// Receive buffer and descriptor-carrying sendmsg shared by both connection kinds.
#include "frame_io.hpp"

#include <fcntl.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>

#include "wire.hpp"

namespace uipc::detail {

error_code socket_error(int e) {
  if (e == EPIPE || e == ECONNRESET) return make_error_code(errc::peer_closed);
  return {e, boost::system::system_category()};
}

std::span<char> frame_reader::space(std::size_t max_frame_size) {
  make_room(max_frame_size);
  return {buffer_.data() + end_, buffer_.size() - end_};
}

ssize_t frame_reader::receive(int fd, int flags, std::size_t max_frame_size, bool& fds_complete,
                              bool& drained) {
  if (buffer_.empty()) {
    // Nothing received yet: allocate only once a byte is there (a connection
    // that never sends costs no buffer). The peek leaves descriptors queued.
    char probe = 0;
    const ssize_t n = ::recv(fd, &probe, 1, (flags & MSG_DONTWAIT) | MSG_PEEK);
    if (n <= 0) {
      drained = true;
      return n;
    }
  }
  make_room(max_frame_size);
  // Aligned: CMSG_FIRSTHDR hands the buffer back as a cmsghdr*.
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * max_fds_per_message)> control{};
  iovec iov{buffer_.data() + end_, buffer_.size() - end_};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  const ssize_t n = ::recvmsg(fd, &msg, flags | MSG_CMSG_CLOEXEC);
  if (n < 0) return n;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const auto* in =
        reinterpret_cast<const int*>(CMSG_DATA(c));  // NOLINT: the cmsg layout is the kernel's
    for (std::size_t i = 0; i < count; ++i) fds_.emplace_back(in[i]);
  }
  fds_complete = (msg.msg_flags & MSG_CTRUNC) == 0;
  drained = static_cast<std::size_t>(n) < iov.iov_len;
  end_ += static_cast<std::size_t>(n);
  return n;
}

std::optional<result<frame>> frame_reader::next(const connection_options& options) {
  const std::size_t have = end_ - begin_;
  if (have < 4) return std::nullopt;
  const char* base = buffer_.data() + begin_;
  const std::size_t length = read_prefix(base);
  if (length > options.max_frame_size) return result<frame>(make_error_code(errc::frame_too_large));
  if (length == 0) return result<frame>(make_error_code(errc::bad_frame));
  if (have < 4 + length) return std::nullopt;
  auto f = decode_frame(scratch_, base + 4, length, fds_,
                        options.peer_sends_fds ? options.max_fds_per_frame : 0);
  if (f) {
    begin_ += 4 + length;
    consumed_ += 4 + length;
  }
  return f;
}

void frame_reader::make_room(std::size_t max_frame_size) {
  shrink();
  if (buffer_.empty()) buffer_.resize(initial_size);
  const std::size_t have = end_ - begin_;
  if (have == 0) {
    begin_ = end_ = 0;
  } else if (begin_ > 0 && buffer_.size() - end_ < buffer_.size() / 4) {
    std::memmove(buffer_.data(), buffer_.data() + begin_, have);
    begin_ = 0;
    end_ = have;
  }
  if (end_ < buffer_.size()) return;
  // Full: a frame larger than the buffer is arriving. Grow as its bytes come
  // (a bare prefix buys no allocation), never past the frame's own size.
  std::size_t limit = max_frame_size + 4;
  if (have >= 4) limit = 4 + read_prefix(buffer_.data() + begin_);
  if (begin_ > 0) {
    std::memmove(buffer_.data(), buffer_.data() + begin_, have);
    begin_ = 0;
    end_ = have;
    return;
  }
  buffer_.resize(std::max(buffer_.size(), std::min(buffer_.size() * 2, limit)));
}

void frame_reader::shrink() {
  if (begin_ == end_ && buffer_.size() > shrink_above) {
    buffer_.resize(initial_size);
    buffer_.shrink_to_fit();
    begin_ = end_ = 0;
  }
}

error_code check_outgoing(const frame& f, const connection_options& options) {
  if (f.fds.size() > options.max_fds_per_frame || f.fds.size() > max_fds_per_message) {
    return make_error_code(errc::too_many_fds);
  }
  for (const auto& fd : f.fds) {
    if (!fd) return make_error_code(boost::system::errc::bad_file_descriptor);
  }
  return {};
}

ssize_t send_with_fds(int fd, std::span<const iovec> iov, std::span<const unique_fd> fds,
                      int flags) {
  msghdr msg{};
  msg.msg_iov = const_cast<iovec*>(iov.data());  // NOLINT: sendmsg does not write it
  msg.msg_iovlen = iov.size();
  alignas(cmsghdr) std::array<char, CMSG_SPACE(sizeof(int) * max_fds_per_message)> control{};
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    auto* out = reinterpret_cast<int*>(CMSG_DATA(c));  // NOLINT: the cmsg layout is the kernel's
    for (std::size_t i = 0; i < fds.size(); ++i) out[i] = fds[i].get();
  }
  return ::sendmsg(fd, &msg, flags | MSG_NOSIGNAL);
}

result<peer_credentials> claim_unix_stream(int fd) {
  int domain = 0;
  int type = 0;
  socklen_t len = sizeof domain;
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) return socket_error(errno);
  len = sizeof type;
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) return socket_error(errno);
  if (domain != AF_UNIX || type != SOCK_STREAM)
    return make_error_code(boost::system::errc::invalid_argument);
  if (::fcntl(fd, F_SETFD, FD_CLOEXEC) != 0) return socket_error(errno);
  ucred cred{};
  len = sizeof cred;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return socket_error(errno);
  return peer_credentials{cred.pid, cred.uid, cred.gid};
}

result<unique_fd> connect_unix(const std::string& path) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof addr.sun_path) return socket_error(ENAMETOOLONG);
  unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return socket_error(errno);
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  int rc;
  do {
    rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr),
                   sizeof addr);  // NOLINT: sockets API
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return socket_error(errno);
  return fd;
}

}  // namespace uipc::detail
