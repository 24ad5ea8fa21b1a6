// server_session and peer_identity: what the kernel says about a server's peer.
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include "frame_io.hpp"
#include "uipc/core/process.hpp"
#include "uipc/core/server.hpp"

namespace uipc {

bool peer_identity::in_group(gid_t g) const noexcept {
  return g == gid || std::find(groups.begin(), groups.end(), g) != groups.end();
}

result<peer_identity> read_peer_identity(int socket_fd) {
  auto cred = detail::claim_unix_stream(socket_fd);
  if (!cred) return cred.error();
  peer_identity id{cred->pid, cred->uid, cred->gid, {}};
  // Most peers have a handful of groups: try a small buffer, then the size
  // the kernel asks for.
  std::array<gid_t, 32> small{};
  socklen_t len = sizeof small;
  if (::getsockopt(socket_fd, SOL_SOCKET, SO_PEERGROUPS, small.data(), &len) == 0) {
    id.groups.assign(small.begin(), small.begin() + len / sizeof(gid_t));
  } else if (errno == ERANGE) {
    id.groups.resize(len / sizeof(gid_t));
    if (::getsockopt(socket_fd, SOL_SOCKET, SO_PEERGROUPS, id.groups.data(), &len) != 0) {
      return error_code(errno, boost::system::system_category());
    }
    id.groups.resize(len / sizeof(gid_t));
  } else if (errno != ENOPROTOOPT) {
    return error_code(errno, boost::system::system_category());
  }
  return id;
}

server_session::server_session(std::uint64_t id, peer_identity peer, unique_fd pidfd,
                               connection::pointer conn)
    : id_(id), peer_(std::move(peer)), pidfd_(std::move(pidfd)), conn_(std::move(conn)) {}

server_session::~server_session() = default;

bool server_session::peer_alive() const noexcept {
  return pidfd_ ? !pidfd_exited(pidfd_.get()) : process_alive(peer_.pid);
}

}  // namespace uipc
