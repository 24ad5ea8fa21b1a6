// The floor for uipc-dns-query: one thread, one socket, M queries in flight with
// random IDs, recvmmsg/sendmmsg, the same query building and reply checks, and
// nothing else. Same options and output line as uipc-dns-query.
#include <poll.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "dns_message.hpp"
#include "program_args.hpp"

namespace {

struct name_type {
  std::string name;
  std::uint16_t type;
};

struct slot {
  std::uint16_t id = 0;
  std::size_t name = 0;
  bool busy = false;
  std::chrono::steady_clock::time_point deadline;
};

}  // namespace

int main(int argc, char** argv) {
  std::string server, names_file;
  unsigned long count = 0, inflight = 1, timeout_ms = 2000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view a = argv[i];
    const auto v = uipc::dns::parse_count(argv[i + 1]);
    if (a == "--server")
      server = argv[i + 1];
    else if (a == "--names")
      names_file = argv[i + 1];
    else if (a == "--count" && v)
      count = *v;
    else if (a == "--inflight" && v && *v > 0 && *v <= 4096)
      inflight = *v;
    else if (a == "--timeout" && v && *v > 0)
      timeout_ms = *v;
    else {
      std::fprintf(stderr,
                   "usage: floor-query --server ADDR:PORT --names FILE --count N --inflight M "
                   "--timeout MS\n");
      return 2;
    }
  }
  auto peer = uipc::dns::parse_endpoint(server);
  std::vector<name_type> names;
  std::ifstream in(names_file);
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line);
    std::string n, t = "A";
    if (!(f >> n)) continue;
    f >> t;
    names.push_back({n, uipc::dns::parse_type(t).value_or(1)});
  }
  if (!peer || names.empty()) return 2;
  if (count == 0) count = names.size();
  const int fd =
      ::socket(peer->address().is_v6() ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  int size = 4 << 20;
  ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
  // Connected: the kernel drops datagrams from anyone but the server.
  if (::connect(fd, peer->data(), static_cast<socklen_t>(peer->size())) != 0) {
    std::perror("floor-query: connect");
    return 1;
  }

  std::vector<slot> slots(inflight);
  std::vector<std::int32_t> by_id(65536, -1);
  std::array<std::uint16_t, 1024> random{};
  std::size_t random_left = 0;
  auto next_id = [&] {
    for (;;) {
      if (random_left == 0) {
        ::arc4random_buf(random.data(), sizeof random);
        random_left = random.size();
      }
      const std::uint16_t id = random[--random_left];
      if (by_id[id] < 0) return id;
    }
  };

  constexpr unsigned batch = 32;
  std::vector<std::array<std::byte, 1232>> rx(batch);
  std::vector<std::array<std::byte, 300>> tx(inflight);
  std::array<mmsghdr, batch> rh{};
  std::array<iovec, batch> riov{};
  std::vector<mmsghdr> th(inflight);
  std::vector<iovec> tiov(inflight);
  unsigned pending_sends = 0;
  unsigned long issued = 0, done = 0, completed = 0, timed_out = 0, mismatched = 0, nxdomain = 0;
  const auto timeout = std::chrono::milliseconds(timeout_ms);

  auto start_query = [&](std::size_t s) {
    slot& sl = slots[s];
    if (sl.busy) by_id[sl.id] = -1;
    sl.busy = false;
    if (issued == count) return;
    sl.name = issued++ % names.size();
    sl.id = next_id();
    sl.busy = true;
    sl.deadline = std::chrono::steady_clock::now() + timeout;
    by_id[sl.id] = static_cast<std::int32_t>(s);
    const std::size_t len =
        uipc::dns::build_query(tx[s], sl.id, names[sl.name].name, names[sl.name].type);
    tiov[pending_sends] = {tx[s].data(), len};
    th[pending_sends].msg_hdr = {};
    th[pending_sends].msg_hdr.msg_iov = &tiov[pending_sends];
    th[pending_sends].msg_hdr.msg_iovlen = 1;
    ++pending_sends;
  };
  auto flush = [&] {
    for (unsigned sent = 0; sent < pending_sends;) {
      const int r = ::sendmmsg(fd, th.data() + sent, pending_sends - sent, 0);
      if (r < 0) {
        if (errno == EAGAIN || errno == EINTR) {
          pollfd p{fd, POLLOUT, 0};
          ::poll(&p, 1, 10);
          continue;
        }
        std::perror("floor-query: sendmmsg");
        std::exit(1);
      }
      sent += static_cast<unsigned>(r);
    }
    pending_sends = 0;
  };

  const auto started = std::chrono::steady_clock::now();
  for (std::size_t s = 0; s < slots.size(); ++s) start_query(s);
  flush();
  auto last_sweep = started;
  while (done < count) {
    for (unsigned i = 0; i < batch; ++i) {
      riov[i] = {rx[i].data(), rx[i].size()};
      rh[i].msg_hdr = {};
      rh[i].msg_hdr.msg_iov = &riov[i];
      rh[i].msg_hdr.msg_iovlen = 1;
    }
    const int got = ::recvmmsg(fd, rh.data(), batch, 0, nullptr);
    if (got < 0) {
      if (errno != EAGAIN && errno != EINTR) {
        std::perror("floor-query: recvmmsg");
        return 1;
      }
      pollfd p{fd, POLLIN, 0};
      ::poll(&p, 1, 10);
    }
    for (int i = 0; i < got; ++i) {
      const std::span<const std::byte> reply(rx[i].data(), rh[i].msg_len);
      if (reply.size() < 12) continue;
      const auto id = static_cast<std::uint16_t>(std::to_integer<unsigned>(reply[0]) << 8 |
                                                 std::to_integer<unsigned>(reply[1]));
      const std::int32_t s = by_id[id];
      if (s < 0) continue;  // an ID not in use
      const auto& q = names[slots[static_cast<std::size_t>(s)].name];
      if (!uipc::dns::reply_matches(reply, q.name, q.type)) {
        ++mismatched;
      } else {
        ++completed;
        if (uipc::dns::rcode(reply) == uipc::dns::rcode_nxdomain) ++nxdomain;
      }
      ++done;
      start_query(static_cast<std::size_t>(s));
    }
    const auto now = std::chrono::steady_clock::now();
    if (now - last_sweep > std::chrono::milliseconds(10)) {
      last_sweep = now;
      for (std::size_t s = 0; s < slots.size(); ++s) {
        if (slots[s].busy && slots[s].deadline <= now) {
          ++timed_out;
          ++done;
          start_query(s);
        }
      }
    }
    flush();
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  const double cpu = static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                     static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
  std::printf(
      "completed %lu timed_out %lu mismatched %lu errors 0 nxdomain %lu elapsed_s %.3f qps %.0f "
      "cpu_s %.3f\n",
      completed, timed_out, mismatched, nxdomain, seconds, static_cast<double>(completed) / seconds,
      cpu);
  return 0;
}
