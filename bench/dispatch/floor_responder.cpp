// The floor for uipc-dns-responder: one thread, one socket, blocking recvmmsg and
// sendmmsg, the same answers (dns::answer_in_place) and nothing else. What a
// dispatcher costs is what the responder spends per query above this.
#include <netinet/in.h>
#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "dns_message.hpp"
#include "program_args.hpp"

int main(int argc, char** argv) {
  if (argc != 3 || std::string_view(argv[1]) != "--listen") {
    std::fprintf(stderr, "usage: floor-responder --listen ADDR:PORT\n");
    return 2;
  }
  auto local = uipc::dns::parse_endpoint(argv[2]);
  if (!local) return 2;
  const int fd = ::socket(local->address().is_v6() ? AF_INET6 : AF_INET, SOCK_DGRAM, 0);
  int size = 4 << 20;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  if (fd < 0 || ::bind(fd, local->data(), static_cast<socklen_t>(local->size())) != 0) {
    std::perror("floor-responder: bind");
    return 1;
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof bound;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  uipc::dispatch::udp::endpoint ep;
  std::memcpy(ep.data(), &bound, len);
  std::printf("listening on %s:%u\n", ep.address().to_string().c_str(), ep.port());
  std::fflush(stdout);

  constexpr unsigned batch = 32;
  constexpr std::size_t buffer_size = 1232;
  std::vector<std::array<std::byte, buffer_size>> buffers(batch);
  std::array<mmsghdr, batch> in{};
  std::array<mmsghdr, batch> out{};
  std::array<iovec, batch> in_iov{};
  std::array<iovec, batch> out_iov{};
  std::array<sockaddr_storage, batch> peers{};
  for (;;) {
    for (unsigned i = 0; i < batch; ++i) {
      in_iov[i] = {buffers[i].data(), buffer_size};
      in[i].msg_hdr = {};
      in[i].msg_hdr.msg_name = &peers[i];
      in[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage);
      in[i].msg_hdr.msg_iov = &in_iov[i];
      in[i].msg_hdr.msg_iovlen = 1;
    }
    const int got = ::recvmmsg(fd, in.data(), batch, MSG_WAITFORONE, nullptr);
    if (got < 0) {
      if (errno == EINTR) continue;
      std::perror("floor-responder: recvmmsg");
      return 1;
    }
    unsigned n = 0;
    for (int i = 0; i < got; ++i) {
      const std::size_t answer = uipc::dns::answer_in_place(buffers[i], in[i].msg_len);
      if (answer == 0) continue;
      out_iov[n] = {buffers[i].data(), answer};
      out[n].msg_hdr = {};
      out[n].msg_hdr.msg_name = &peers[i];
      out[n].msg_hdr.msg_namelen = in[i].msg_hdr.msg_namelen;
      out[n].msg_hdr.msg_iov = &out_iov[n];
      out[n].msg_hdr.msg_iovlen = 1;
      ++n;
    }
    for (unsigned sent = 0; sent < n;) {
      const int r = ::sendmmsg(fd, out.data() + sent, n - sent, 0);
      if (r < 0) {
        if (errno == EINTR) continue;
        break;  // drop the rest, as a UDP server does
      }
      sent += static_cast<unsigned>(r);
    }
  }
}
