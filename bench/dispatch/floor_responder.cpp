// The floor for uipc-dns-responder: one thread, one socket, recvmmsg and
// sendmmsg, the same answers (dns::answer_in_place) and nothing else. What a
// dispatcher costs is what the responder spends per query above this.
//
// Two forms:
//  - blocking (the floor): recvmmsg sleeps until a datagram comes;
//  - --epoll: what any event loop pays before it does anything: the socket is
//    non-blocking in an edge-triggered epoll set, read until a short read, and
//    re-armed with EPOLL_CTL_MOD before each wait (as Asio does). Against the
//    blocking form it measures the event loop's own cost (an epoll wake-up, and
//    the kernel's epoll callback on every datagram the socket sends or
//    receives); uipc's responder over it is what the dispatcher adds.
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "dns_message.hpp"
#include "program_args.hpp"

int main(int argc, char** argv) {
  bool with_epoll = false;
  std::string_view listen;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--epoll") {
      with_epoll = true;
    } else if (arg == "--listen" && i + 1 < argc) {
      listen = argv[++i];
    } else {
      listen = {};
      break;
    }
  }
  auto local = uipc::dns::parse_endpoint(std::string(listen));
  if (listen.empty() || !local) {
    std::fprintf(stderr, "usage: floor-responder --listen ADDR:PORT [--epoll]\n");
    return 2;
  }
  const int fd = ::socket(local->address().is_v6() ? AF_INET6 : AF_INET,
                          SOCK_DGRAM | (with_epoll ? SOCK_NONBLOCK : 0), 0);
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
  const int poller = with_epoll ? ::epoll_create1(0) : -1;
  epoll_event interest{};
  interest.events = EPOLLIN | EPOLLPRI | EPOLLERR | EPOLLHUP | EPOLLET;
  if (with_epoll && ::epoll_ctl(poller, EPOLL_CTL_ADD, fd, &interest) != 0) {
    std::perror("floor-responder: epoll_ctl");
    return 1;
  }
  // Re-arms, then sleeps until the socket is readable.
  auto wait_readable = [&] {
    ::epoll_ctl(poller, EPOLL_CTL_MOD, fd, &interest);
    epoll_event ready{};
    while (::epoll_wait(poller, &ready, 1, -1) < 0 && errno == EINTR) {
    }
  };
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
    const int got = ::recvmmsg(fd, in.data(), batch, with_epoll ? 0 : MSG_WAITFORONE, nullptr);
    if (got < 0) {
      if (errno == EINTR) continue;
      if (with_epoll && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        wait_readable();
        continue;
      }
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
    // A short read drained the socket: an event loop goes back to epoll here.
    if (with_epoll && got < static_cast<int>(batch)) wait_readable();
  }
}
