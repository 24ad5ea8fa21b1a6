// Test helpers that speak the frame format by hand: a connection whose other end
// is a raw socket, and the bytes of a frame.
#pragma once

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <boost/asio/io_context.hpp>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "uipc/core/framed.hpp"
#include "uipc/proto/envelope.pb.h"

namespace uipc::test {

/// The 4-byte length prefix (little-endian on every platform we build for).
inline std::string prefix(std::uint32_t length) {
  std::string p(4, '\0');
  std::memcpy(p.data(), &length, 4);
  return p;
}

/// A whole frame: prefix and envelope.
inline std::string envelope_bytes(const proto::Envelope& env) {
  std::string body = env.SerializeAsString();
  return prefix(static_cast<std::uint32_t>(body.size())) + body;
}

/// A connection whose other end is a raw socket the test reads and writes.
struct raw_peer {
  connection::pointer conn;
  unique_fd raw;
};

inline raw_peer make_raw_peer(boost::asio::io_context& ctx, connection_options options = {}) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  auto c = connection::adopt(ctx, unique_fd(fds[0]), std::move(options));
  if (!c) std::abort();
  return {*c, unique_fd(fds[1])};
}

/// Sends `bytes` on `fd` with `count` fresh descriptors (of /dev/null) in one
/// SCM_RIGHTS message, as a peer would pass them; closes its own copies.
/// sendmsg's result.
inline ssize_t send_with_descriptors(int fd, std::string bytes, std::size_t count) {
  std::vector<int> passed(count);
  for (int& p : passed) p = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  std::vector<char> control(CMSG_SPACE(sizeof(int) * count));
  iovec iov{bytes.data(), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * count);
  std::memcpy(CMSG_DATA(c), passed.data(), sizeof(int) * count);
  const ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
  for (int p : passed) ::close(p);
  return n;
}

/// A raw socket connected to the listener at `path` with a blocking connect
/// (the kernel queues it while the backlog has room); empty on failure.
inline unique_fd raw_connect(const std::string& path) {
  unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
    return {};  // NOLINT: sockets API
  return fd;
}

}  // namespace uipc::test
