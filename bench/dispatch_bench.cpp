// Microbenchmarks of the UDP dispatcher: ID allocation, event dispatch to a
// listener (next to a plain recvmmsg loop, the floor), and full transactions.
#include <benchmark/benchmark.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <boost/asio/io_context.hpp>
#include <vector>

#include "uipc/dispatch/dispatcher.hpp"

namespace {

namespace asio = boost::asio;
using namespace uipc;
using namespace uipc::dispatch;

const udp::endpoint loopback_any(asio::ip::make_address("127.0.0.1"), 0);
constexpr int batch = 32;

/// 32 12-byte DNS-style queries, sent with one sendmmsg.
class query_burst {
 public:
  explicit query_burst(const udp::endpoint& to) : to_(to) {
    fd_ = ::socket(AF_INET, SOCK_DGRAM, 0);
    for (int i = 0; i < batch; ++i) {
      messages_[i].fill(std::byte{0});
      messages_[i][1] = static_cast<std::byte>(i);
      iov_[i] = {messages_[i].data(), messages_[i].size()};
      headers_[i].msg_hdr = {};
      headers_[i].msg_hdr.msg_name = to_.data();
      headers_[i].msg_hdr.msg_namelen = static_cast<socklen_t>(to_.size());
      headers_[i].msg_hdr.msg_iov = &iov_[i];
      headers_[i].msg_hdr.msg_iovlen = 1;
    }
  }
  ~query_burst() { ::close(fd_); }
  void send() { ::sendmmsg(fd_, headers_.data(), batch, 0); }

 private:
  udp::endpoint to_;
  int fd_;
  std::array<std::array<std::byte, 12>, batch> messages_{};
  std::array<iovec, batch> iov_{};
  std::array<mmsghdr, batch> headers_{};
};

/// Times one add_response plus its detach (the response is destroyed each
/// iteration), with state.range(0) other responses to the same peer live.
void BM_Dispatcher_AddDetachResponse(benchmark::State& state) {
  asio::io_context ctx;
  auto d = dispatcher::create(ctx, loopback_any);
  const udp::endpoint peer(asio::ip::make_address("127.0.0.1"), 53);
  std::vector<response> live;
  for (int64_t i = 0; i < state.range(0); ++i) live.push_back(std::move(*(*d)->add_response(peer)));
  for (auto _ : state) {
    auto r = (*d)->add_response(peer);
    benchmark::DoNotOptimize(r->id());
  }
  state.SetItemsProcessed(state.iterations());
  live.clear();
  d->reset();
  ctx.poll();
}
BENCHMARK(BM_Dispatcher_AddDetachResponse)->Arg(0)->Arg(1024)->Arg(49152);

/// Re-arms its listener after each query and counts them.
struct counting_sink {
  listener* l;
  int* got;
  void operator()(error_code ec, event ev) const {
    if (ec) return;
    ++*got;
    ev.release();
    l->async_receive(*this);
  }
};

void BM_Dispatcher_ListenerEvent(benchmark::State& state) {
  asio::io_context ctx;
  auto d = dispatcher::create(ctx, loopback_any);
  auto l = (*d)->add_listener();
  int got = 0;
  l->async_receive(counting_sink{&*l, &got});
  query_burst burst((*d)->local_endpoint());
  for (auto _ : state) {
    got = 0;
    burst.send();
    while (got < batch) ctx.run_one();
  }
  state.SetItemsProcessed(state.iterations() * batch);
  l->detach();
  d->reset();
  ctx.restart();
  ctx.poll();
}
BENCHMARK(BM_Dispatcher_ListenerEvent);

// The floor for the one above: the same bursts read with plain recvmmsg.
void BM_PlainSocket_RecvmmsgEvent(benchmark::State& state) {
  const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
  udp::endpoint local = loopback_any;
  ::bind(fd, local.data(), static_cast<socklen_t>(local.size()));
  socklen_t len = static_cast<socklen_t>(local.capacity());
  ::getsockname(fd, local.data(), &len);
  query_burst burst(local);
  std::vector<std::array<std::byte, 4096>> buffers(batch);
  std::array<mmsghdr, batch> headers{};
  std::array<iovec, batch> iov{};
  std::array<sockaddr_storage, batch> from{};
  for (auto _ : state) {
    burst.send();
    int got = 0;
    while (got < batch) {
      for (int i = 0; i < batch; ++i) {
        iov[i] = {buffers[i].data(), buffers[i].size()};
        headers[i].msg_hdr = {};
        headers[i].msg_hdr.msg_name = &from[i];
        headers[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage);
        headers[i].msg_hdr.msg_iov = &iov[i];
        headers[i].msg_hdr.msg_iovlen = 1;
      }
      const int n = ::recvmmsg(fd, headers.data(), batch - got, MSG_WAITFORONE, nullptr);
      if (n > 0) got += n;
    }
  }
  state.SetItemsProcessed(state.iterations() * batch);
  ::close(fd);
}
BENCHMARK(BM_PlainSocket_RecvmmsgEvent);

/// Answers each query in place (QR set) and re-arms.
struct echo_sink {
  listener* l;
  void operator()(error_code ec, event ev) const {
    if (ec) return;
    auto data = ev.data();
    data[2] |= std::byte{0x80};
    (void)l->reply(std::move(ev), data);
    l->async_receive(*this);
  }
};

/// Keeps 32 transactions in flight from one dispatcher to another, in one loop,
/// each response on the shared socket or on an exclusive random port.
void run_transactions(benchmark::State& state, port_mode ports,
                      const dispatcher_options& client_options = {}) {
  asio::io_context ctx;
  auto server = dispatcher::create(ctx, loopback_any);
  auto client = dispatcher::create(ctx, loopback_any, client_options);
  auto l = (*server)->add_listener();
  l->async_receive(echo_sink{&*l});
  const udp::endpoint to = (*server)->local_endpoint();
  std::array<response, batch> slots;
  std::int64_t done = 0;
  std::int64_t target = 0;
  struct starter {
    ref_ptr<dispatcher> d;
    udp::endpoint to;
    response_options options;
    std::array<response, batch>* slots;
    std::int64_t* done;
    bool* failed;
    void start(std::size_t i) const {
      (*slots)[i].detach();  // the exclusive port goes back before the next is drawn
      auto r = d->add_response(to, options);
      if (!r) {
        *failed = true;
        return;
      }
      std::array<std::byte, 12> q{};
      d->frame().write_id(q, r->id());
      (void)r->send(q);
      (*slots)[i] = std::move(*r);
      (*slots)[i].async_receive([s = *this, i](error_code ec, event ev) {
        if (ec == asio::error::operation_aborted) return;
        ev.release();
        ++*s.done;
        s.start(i);
      });
    }
  };
  bool failed = false;
  starter go{*client, to,    response_options{std::chrono::milliseconds(0), ports},
             &slots,  &done, &failed};
  for (std::size_t i = 0; i < batch; ++i) go.start(i);
  for (auto _ : state) {
    target += 256;
    while (done < target && !failed) ctx.run_one();
    if (failed) {
      state.SkipWithError("add_response failed");
      break;
    }
  }
  state.SetItemsProcessed(state.iterations() * 256);
  for (auto& s : slots) s.detach();
  l->detach();
  go.d.reset();
  client->reset();
  server->reset();
  ctx.restart();
  ctx.poll();
}

void BM_Dispatcher_Transaction(benchmark::State& state) {
  run_transactions(state, port_mode::shared);
}
BENCHMARK(BM_Dispatcher_Transaction);

/// The same with every response on a random port of its own, connected to the
/// peer, with the defaults: a port whose transaction ended well carries the
/// next ones to that peer (port_uses 16, within port_lifetime), so socket,
/// bind, connect and close are paid once per 16 transactions.
void BM_Dispatcher_TransactionExclusivePort(benchmark::State& state) {
  run_transactions(state, port_mode::exclusive);
}
BENCHMARK(BM_Dispatcher_TransactionExclusivePort);

/// Strict: a fresh random port for every response (port_uses 1): socket,
/// bind, connect and close per transaction.
void BM_Dispatcher_TransactionFreshPort(benchmark::State& state) {
  dispatcher_options o;
  o.port_uses = 1;
  run_transactions(state, port_mode::exclusive, o);
}
BENCHMARK(BM_Dispatcher_TransactionFreshPort);

/// The floor for BM_Dispatcher_Transaction: the same transaction (a 12-byte
/// query, answered with QR set, 32 in flight, 256 per iteration) over two
/// plain connected UDP sockets with send/recv, in one thread.
void BM_PlainUdp_Transaction(benchmark::State& state) {
  const int server = ::socket(AF_INET, SOCK_DGRAM, 0);
  const int client = ::socket(AF_INET, SOCK_DGRAM, 0);
  udp::endpoint any = loopback_any;
  ::bind(server, any.data(), static_cast<socklen_t>(any.size()));
  ::bind(client, any.data(), static_cast<socklen_t>(any.size()));
  udp::endpoint server_at, client_at;
  socklen_t len = sizeof(sockaddr_in);
  ::getsockname(server, server_at.data(), &len);
  len = sizeof(sockaddr_in);
  ::getsockname(client, client_at.data(), &len);
  ::connect(server, client_at.data(), static_cast<socklen_t>(client_at.size()));
  ::connect(client, server_at.data(), static_cast<socklen_t>(server_at.size()));
  std::array<std::byte, 12> q{};
  std::array<std::byte, 512> buf{};
  std::uint16_t id = 0;
  auto send_query = [&] {
    ++id;
    q[0] = static_cast<std::byte>(id >> 8);
    q[1] = static_cast<std::byte>(id & 0xff);
    (void)::send(client, q.data(), q.size(), 0);
  };
  for (int i = 0; i < batch; ++i) send_query();
  for (auto _ : state) {
    for (int i = 0; i < 256; ++i) {
      const ssize_t n = ::recv(server, buf.data(), buf.size(), 0);  // the server answers
      if (n < 12) {
        state.SkipWithError("server recv failed");
        break;
      }
      buf[2] |= std::byte{0x80};
      (void)::send(server, buf.data(), static_cast<std::size_t>(n), 0);
      const ssize_t got = ::recv(client, buf.data(), buf.size(), 0);  // the client matches
      if (got < 12) {
        state.SkipWithError("client recv failed");
        break;
      }
      benchmark::DoNotOptimize(buf[1]);
      send_query();  // the next transaction keeps 32 in flight
    }
  }
  state.SetItemsProcessed(state.iterations() * 256);
  ::close(client);
  ::close(server);
}
BENCHMARK(BM_PlainUdp_Transaction);

}  // namespace

BENCHMARK_MAIN();
