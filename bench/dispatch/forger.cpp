// bench_dispatch_forger: an off-path forger for the forgery benchmark. Sprays DNS
// replies (NXDOMAIN for one name, so that an accepted forgery is visible in the
// query tool's nxdomain count) with random IDs at random ports of a range, their
// source spoofed to the server's address and port, through a raw socket (needs
// CAP_NET_RAW). Loopback only: it refuses any other destination.
#include <arpa/inet.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "dns_message.hpp"

namespace {

void usage() {
  std::fprintf(stderr,
               "usage: bench_dispatch_forger --server 127.0.0.1:PORT --ports FIRST-LAST --count N\n"
               "                             [--name NAME] [--target 127.0.0.1]\n"
               "Sends N forged NXDOMAIN replies for NAME (default a.uipc.test, type A) from the\n"
               "server's address and port to random ports of FIRST-LAST, with random IDs.\n"
               "Prints: sent S elapsed_s T\n");
}

bool parse_number(std::string_view text, unsigned long& out) {
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
  return ec == std::errc() && end == text.data() + text.size();
}

}  // namespace

int main(int argc, char** argv) {
  std::string server, target = "127.0.0.1", name = "a.uipc.test";
  unsigned long first = 0, last = 0, count = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view arg = argv[i], value = argv[i + 1];
    if (arg == "--server") {
      server = value;
    } else if (arg == "--target") {
      target = value;
    } else if (arg == "--name") {
      name = value;
    } else if (arg == "--count") {
      if (!parse_number(value, count)) count = 0;
    } else if (arg == "--ports") {
      const auto dash = value.find('-');
      if (dash == std::string_view::npos || !parse_number(value.substr(0, dash), first) ||
          !parse_number(value.substr(dash + 1), last))
        first = last = 0;
    } else {
      usage();
      return 2;
    }
  }
  const auto colon = server.rfind(':');
  unsigned long server_port = 0;
  in_addr server_address{}, target_address{};
  if (colon == std::string::npos ||
      !parse_number(std::string_view(server).substr(colon + 1), server_port) || server_port == 0 ||
      server_port > 65535 ||
      ::inet_pton(AF_INET, server.substr(0, colon).c_str(), &server_address) != 1 ||
      ::inet_pton(AF_INET, target.c_str(), &target_address) != 1 || first == 0 || first > last ||
      last > 65535 || count == 0) {
    usage();
    return 2;
  }
  // Loopback only: this program forges source addresses.
  if ((ntohl(server_address.s_addr) >> 24) != 127 || (ntohl(target_address.s_addr) >> 24) != 127) {
    std::fprintf(stderr, "bench_dispatch_forger: loopback addresses only\n");
    return 2;
  }
  const int fd = ::socket(AF_INET, SOCK_RAW, IPPROTO_RAW);  // IP_HDRINCL implied
  if (fd < 0) {
    std::perror("bench_dispatch_forger: raw socket (needs CAP_NET_RAW)");
    return 1;
  }
  // The DNS reply: header, then the question; the ID is patched per datagram.
  std::array<std::byte, 300> dns{};
  const std::size_t dns_length = uipc::dns::build_query(dns, 0, name, uipc::dns::type_a);
  if (dns_length == 0) {
    usage();
    return 2;
  }
  dns[2] = std::byte{0x85};  // QR, AA, RD
  dns[3] = std::byte{0x83};  // RA, NXDOMAIN
  constexpr std::size_t batch = 64;
  const std::size_t packet_length = sizeof(iphdr) + sizeof(udphdr) + dns_length;
  std::vector<std::array<std::byte, 400>> packets(batch);
  std::array<sockaddr_in, batch> to{};
  std::array<iovec, batch> iov{};
  std::array<mmsghdr, batch> headers{};
  for (std::size_t i = 0; i < batch; ++i) {
    auto* ip = reinterpret_cast<iphdr*>(packets[i].data());
    ip->version = 4;
    ip->ihl = 5;
    ip->ttl = 64;
    ip->protocol = IPPROTO_UDP;
    ip->saddr = server_address.s_addr;  // spoofed: the server's
    ip->daddr = target_address.s_addr;
    ip->tot_len =
        htons(static_cast<std::uint16_t>(packet_length));  // the kernel fills id, checksum
    auto* udp = reinterpret_cast<udphdr*>(packets[i].data() + sizeof(iphdr));
    udp->source = htons(static_cast<std::uint16_t>(server_port));
    udp->len = htons(static_cast<std::uint16_t>(sizeof(udphdr) + dns_length));
    udp->check = 0;  // none (allowed over IPv4)
    std::memcpy(packets[i].data() + sizeof(iphdr) + sizeof(udphdr), dns.data(), dns_length);
    to[i].sin_family = AF_INET;
    to[i].sin_addr = target_address;
    iov[i] = {packets[i].data(), packet_length};
    headers[i].msg_hdr.msg_name = &to[i];
    headers[i].msg_hdr.msg_namelen = sizeof(sockaddr_in);
    headers[i].msg_hdr.msg_iov = &iov[i];
    headers[i].msg_hdr.msg_iovlen = 1;
  }
  // The forger's own randomness: it only has to be uniform, not secret.
  std::mt19937_64 random(std::random_device{}());
  std::uniform_int_distribution<unsigned long> port_of(first, last);
  const auto started = std::chrono::steady_clock::now();
  unsigned long sent = 0;
  while (sent < count) {
    const std::size_t n = std::min<unsigned long>(batch, count - sent);
    for (std::size_t i = 0; i < n; ++i) {
      auto* udp = reinterpret_cast<udphdr*>(packets[i].data() + sizeof(iphdr));
      udp->dest = htons(static_cast<std::uint16_t>(port_of(random)));
      const auto id = static_cast<std::uint16_t>(random());
      packets[i][sizeof(iphdr) + sizeof(udphdr)] = static_cast<std::byte>(id >> 8);
      packets[i][sizeof(iphdr) + sizeof(udphdr) + 1] = static_cast<std::byte>(id & 0xff);
    }
    const int got = ::sendmmsg(fd, headers.data(), static_cast<unsigned>(n), 0);
    if (got < 0) {
      if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR) continue;
      std::perror("bench_dispatch_forger: sendmmsg");
      return 1;
    }
    sent += static_cast<unsigned long>(got);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::printf("sent %lu elapsed_s %.3f\n", sent, seconds);
  ::close(fd);
  return 0;
}
