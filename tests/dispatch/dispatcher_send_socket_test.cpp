// dispatcher_options::separate_send_sockets: datagrams go out through send
// sockets kept out of the epoll set, from the dispatcher's own address and
// port; incoming datagrams still reach only the receiving sockets.
#include "dispatch_support.hpp"

namespace uipc::dispatch {
namespace {

dispatcher_options with_send_sockets(unsigned sockets = 1) {
  dispatcher_options o;
  o.sockets = sockets;
  o.separate_send_sockets = true;
  return o;
}

/// Answers every query in place (QR set) and asks for the next one.
struct echo_loop {
  listener* l;
  int* answered;
  void operator()(error_code ec, event ev) const {
    if (ec) return;
    ev.data()[2] |= std::byte{0x80};
    const auto answer = ev.data();
    if (l->reply(std::move(ev), answer)) ++*answered;
    l->async_receive(*this);
  }
};

using DispatcherSendSocketTest = DispatcherTest;

TEST_F(DispatcherSendSocketTest, RepliesComeFromTheDispatchersAddressAndPort) {
  auto d = make(with_send_sockets());
  EXPECT_EQ(d->stats().send_sockets, 1u);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  int answered = 0;
  l->async_receive(echo_loop{&*l, &answered});
  auto p = peer();
  for (std::uint16_t id = 1; id <= 20; ++id) send(p, message(id, false, 7), d->local_endpoint());
  for (std::uint16_t id = 1; id <= 20; ++id) {
    udp::endpoint from;
    const auto reply = read(p, &from);
    ASSERT_EQ(reply.size(), 13u);
    EXPECT_EQ(from, d->local_endpoint()) << "a reply must come from the port the query went to";
    EXPECT_EQ(std::to_integer<int>(reply[1]), id) << "replies in order";
    EXPECT_NE(std::to_integer<int>(reply[2]) & 0x80, 0);
  }
  EXPECT_EQ(answered, 20);
  EXPECT_EQ(d->stats().sent, 20u);
  EXPECT_EQ(d->stats().buffers_in_use, 0u);
  l->detach();
}

TEST_F(DispatcherSendSocketTest, ResponsesSendThroughItAndTheirRepliesAreMatched) {
  auto d = make(with_send_sockets());
  auto p = peer();
  const udp::endpoint to(asio::ip::make_address("127.0.0.1"), p.local_endpoint().port());
  auto r = d->add_response(to);
  ASSERT_TRUE(r);
  const auto query = message(r->id(), false, 3);
  ASSERT_TRUE(r->send(query));
  udp::endpoint from;
  const auto got = read(p, &from);
  EXPECT_EQ(got, query);
  EXPECT_EQ(from, d->local_endpoint());
  std::optional<received> reply;
  receive_into(*r, reply);
  send(p, message(r->id(), true, 9), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return reply.has_value(); }));
  EXPECT_FALSE(reply->ec);
  EXPECT_EQ(tag_of(reply->ev), 9);
}

TEST_F(DispatcherSendSocketTest, AnotherSocketOnThePortGetsNothing) {
  // The port is in a SO_REUSEPORT group now; the group's filter gives every
  // datagram to the receiving socket, so a socket that joins later (here in
  // the same process; another process of the same user alike) gets none.
  auto d = make(with_send_sockets());
  const int stranger = ::socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  ASSERT_GE(stranger, 0);
  const int one = 1;
  ASSERT_EQ(::setsockopt(stranger, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one), 0);
  const udp::endpoint local = d->local_endpoint();
  ASSERT_EQ(::bind(stranger, local.data(), static_cast<socklen_t>(local.size())), 0);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  int answered = 0;
  l->async_receive(echo_loop{&*l, &answered});
  // From 16 source ports: without the filter, the group's hash would give
  // some of these flows to the stranger.
  std::vector<udp::socket> peers;
  for (int i = 0; i < 16; ++i) peers.push_back(peer());
  for (std::uint16_t id = 0; id < 64; ++id) send(peers[id % 16], message(id, false), local);
  ASSERT_TRUE(run_until(ctx_, [&] { return answered == 64; }));
  std::array<std::byte, 64> buf{};
  EXPECT_LT(::recv(stranger, buf.data(), buf.size(), MSG_DONTWAIT), 0);
  EXPECT_EQ(errno, EAGAIN);
  ::close(stranger);
  l->detach();
}

TEST_F(DispatcherSendSocketTest, WithoutTheOptionThePortIsNotShared) {
  auto d = make();
  EXPECT_EQ(d->stats().send_sockets, 0u);
  const int stranger = ::socket(AF_INET, SOCK_DGRAM, 0);
  ASSERT_GE(stranger, 0);
  const int one = 1;
  ASSERT_EQ(::setsockopt(stranger, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one), 0);
  const udp::endpoint local = d->local_endpoint();
  EXPECT_NE(::bind(stranger, local.data(), static_cast<socklen_t>(local.size())), 0);
  EXPECT_EQ(errno, EADDRINUSE);
  ::close(stranger);
}

TEST_F(DispatcherSendSocketTest, SeveralReceivingSocketsShareTheQueriesByIdAndAnswerAll) {
  auto d = make(with_send_sockets(2));
  EXPECT_EQ(d->stats().send_sockets, 2u);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  int answered = 0;
  l->async_receive(echo_loop{&*l, &answered});
  auto p = peer();
  std::set<int> ids;
  for (std::uint16_t id = 0; id < 100; ++id) send(p, message(id, false), d->local_endpoint());
  for (int i = 0; i < 100; ++i) {
    udp::endpoint from;
    const auto reply = read(p, &from);
    ASSERT_EQ(reply.size(), 13u);
    EXPECT_EQ(from, d->local_endpoint());
    ids.insert(std::to_integer<int>(reply[0]) << 8 | std::to_integer<int>(reply[1]));
  }
  EXPECT_EQ(ids.size(), 100u) << "every query answered once";
  l->detach();
}

TEST_F(DispatcherSendSocketTest, WorksOnIpv6Loopback) {
  error_code ec;
  udp::socket probe(ctx_);
  probe.open(udp::v6(), ec);
  if (!ec) probe.bind(udp::endpoint(asio::ip::make_address("::1"), 0), ec);
  if (ec) GTEST_SKIP() << "no IPv6 loopback here: " << ec.message();
  probe.close();
  auto d = make(with_send_sockets(), udp::endpoint(asio::ip::make_address("::1"), 0));
  ASSERT_TRUE(d);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  int answered = 0;
  l->async_receive(echo_loop{&*l, &answered});
  auto p = peer("::1");
  send(p, message(42, false), d->local_endpoint());
  udp::endpoint from;
  const auto reply = read(p, &from);
  EXPECT_EQ(reply.size(), 13u);
  EXPECT_EQ(from, d->local_endpoint());
  l->detach();
}

TEST_F(DispatcherSendSocketTest, ShutdownClosesTheSendSockets) {
  // The fixture's TearDown checks that no descriptor outlives the dispatcher;
  // here the dispatcher goes while a listener is still attached and detaches after.
  auto d = make(with_send_sockets(3));
  EXPECT_EQ(d->stats().send_sockets, 3u);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  d->shutdown();
  d.reset();
  l->detach();
  ctx_.restart();
  ctx_.poll();
}

}  // namespace
}  // namespace uipc::dispatch
