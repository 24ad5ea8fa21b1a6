// Kept exclusive ports (dispatcher_options::port_uses, port_lifetime): a port
// whose transaction ended well carries the next response to the same peer,
// with another ID; anything else closes it. Uses, lifetime, the socket limit,
// waiting callers, a second datagram, the loop, shutdown, no memory to keep one.
#include "alloc_fault.hpp"
#include "exclusive_support.hpp"

namespace uipc::dispatch {
namespace {

udp::endpoint port_of(const udp::socket& server, const response& r) {
  return udp::endpoint(server.local_endpoint().address(), r.local_port());
}

class KeptPortTest : public DispatcherTest {
 protected:
  /// One transaction on an exclusive port: the query leaves from the response's
  /// port, `server` answers it, the reply arrives. The response stays attached.
  response transact(const ref_ptr<dispatcher>& d, udp::socket& server,
                    response_options options = exclusive_options(), std::uint8_t tag = 5) {
    auto r = d->add_response(server.local_endpoint(), options);
    EXPECT_TRUE(r) << r.error().message();
    if (!r) return response{};
    std::optional<received> got;
    receive_into(*r, got);
    EXPECT_TRUE(r->send(message(r->id(), false, tag)));
    udp::endpoint from;
    auto query = read(server, &from);
    EXPECT_EQ(from.port(), r->local_port());
    query[2] = std::byte{0x80};
    server.send_to(asio::buffer(query), from);
    EXPECT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    if (got) {
      EXPECT_FALSE(got->ec) << got->ec.message();
      if (got->ev) {
        EXPECT_EQ(tag_of(got->ev), tag);
      }
    }
    got.reset();  // the event goes back
    return std::move(*r);
  }
};

TEST_F(KeptPortTest, AnAnsweredTransactionsPortCarriesTheNextToItsPeerWithAnotherId) {
  auto d = make();
  auto server = peer();
  auto a = transact(d, server);
  const std::uint16_t port = a.local_port();
  const std::uint16_t old_id = a.id();
  a.detach();
  EXPECT_EQ(d->stats().exclusive_kept, 1u);
  EXPECT_EQ(d->stats().exclusive_open, 1u);

  auto b = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(b) << b.error().message();
  EXPECT_EQ(b->local_port(), port);
  EXPECT_NE(b->id(), old_id);  // a duplicate of the old reply cannot answer it
  auto st = d->stats();
  EXPECT_EQ(st.exclusive_reused, 1u);
  EXPECT_EQ(st.exclusive_kept, 0u);
  EXPECT_EQ(st.exclusive_open, 1u);

  std::optional<received> got;
  receive_into(*b, got);
  send(server, message(old_id, true, 1), port_of(server, *b));  // the old reply, again
  send(server, message(b->id(), true, 2), port_of(server, *b));
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ctx_.poll();
  EXPECT_EQ(tag_of(got->ev), 2);
  EXPECT_EQ(d->stats().exclusive_dropped_unmatched, 1u);
  got.reset();
  b->detach();
}

TEST_F(KeptPortTest, APortClosesAfterItsUsesAndTheNextDrawsAnother) {
  dispatcher_options o;
  o.port_uses = 3;
  auto d = make(o);
  auto server = peer();
  std::vector<std::uint16_t> ports;
  for (int i = 0; i < 6; ++i) ports.push_back(transact(d, server).local_port());  // detached
  EXPECT_EQ(ports[0], ports[1]);
  EXPECT_EQ(ports[1], ports[2]);
  EXPECT_NE(ports[2], ports[3]);  // three uses: closed, and its port rests
  EXPECT_EQ(ports[3], ports[4]);
  EXPECT_EQ(ports[4], ports[5]);
  const auto st = d->stats();
  EXPECT_EQ(st.exclusive_reused, 4u);
  EXPECT_EQ(st.exclusive_kept, 0u);  // the sixth was the second port's third
  EXPECT_EQ(st.exclusive_open, 0u);
}

TEST_F(KeptPortTest, ATransactionThatDidNotEndWellClosesItsPort) {
  auto d = make();
  auto server = peer();
  // Detached before its reply: the reply may still come.
  auto unanswered = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(unanswered);
  ASSERT_TRUE(unanswered->send(message(unanswered->id(), false)));
  (void)read(server);
  const std::uint16_t first = unanswered->local_port();
  unanswered->detach();
  EXPECT_EQ(d->stats().exclusive_open, 0u);

  // Timed out.
  auto slow =
      d->add_response(server.local_endpoint(), exclusive_options(std::chrono::milliseconds(20)));
  ASSERT_TRUE(slow);
  EXPECT_NE(slow->local_port(), first);
  std::optional<received> got;
  receive_into(*slow, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ec, errc::timed_out);
  got.reset();
  slow->detach();
  EXPECT_EQ(d->stats().exclusive_open, 0u);
  EXPECT_EQ(d->stats().exclusive_kept, 0u);
  EXPECT_EQ(d->stats().exclusive_reused, 0u);
}

TEST_F(KeptPortTest, AnotherPeerGetsAPortOfItsOwn) {
  auto d = make();
  auto one = peer();
  auto two = peer();
  const std::uint16_t port_one = transact(d, one).local_port();
  auto b = transact(d, two);
  EXPECT_NE(b.local_port(), port_one);
  EXPECT_EQ(d->stats().exclusive_kept, 1u);  // one's, waiting for one
  EXPECT_EQ(d->stats().exclusive_open, 2u);
  EXPECT_EQ(transact(d, one).local_port(), port_one);
  b.detach();
  EXPECT_EQ(d->stats().exclusive_kept, 2u);
  EXPECT_EQ(d->stats().exclusive_reused, 1u);
}

TEST_F(KeptPortTest, APortPastItsLifetimeCarriesNoMoreTransactions) {
  dispatcher_options o;
  // Long enough that a loaded machine still sees the port kept at first (at
  // 30 ms, CI once read the stats after it had expired).
  o.port_lifetime = std::chrono::milliseconds(300);
  auto d = make(o);
  auto server = peer();
  const std::uint16_t old_port = transact(d, server).local_port();
  EXPECT_EQ(d->stats().exclusive_kept, 1u);
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  auto b = transact(d, server);
  EXPECT_NE(b.local_port(), old_port);
  const auto st = d->stats();
  EXPECT_EQ(st.exclusive_reused, 0u);
  EXPECT_EQ(st.exclusive_kept, 0u);  // the expired one closed on the way
  EXPECT_EQ(st.exclusive_open, 1u);
  b.detach();
}

TEST_F(KeptPortTest, AtTheSocketLimitAKeptPortGivesWay) {
  dispatcher_options o;
  o.exclusive_sockets = 1;
  auto d = make(o);
  auto one = peer();
  auto two = peer();
  const std::uint16_t port_one = transact(d, one).local_port();
  EXPECT_EQ(d->stats().exclusive_kept, 1u);
  auto b = d->add_response(two.local_endpoint(), exclusive_options());
  ASSERT_TRUE(b) << b.error().message();
  EXPECT_NE(b->local_port(), port_one);
  const auto st = d->stats();
  EXPECT_EQ(st.exclusive_kept, 0u);
  EXPECT_EQ(st.exclusive_open, 1u);
  EXPECT_EQ(st.exclusive_no_port, 0u);
}

// Keeping a port that runs out of memory (at any of its allocations) closes
// it instead, and leaves nothing behind: at the socket limit a kept port still
// gives way to a new transaction (an empty list of kept ports for the failed
// peer had it take back() of an empty vector).
TEST_F(KeptPortTest, KeepingAPortThatRunsOutOfMemoryClosesItAndLeavesNoTrace) {
  int failures = 0;
  for (int k = 1; k <= 4; ++k) {
    dispatcher_options o;
    o.exclusive_sockets = 2;
    auto d = make(o);
    auto kept_peer = peer();
    auto failing_peer = peer();
    transact(d, kept_peer).detach();
    ASSERT_EQ(d->stats().exclusive_kept, 1u);
    auto r = transact(d, failing_peer);
    test::alloc_fail_countdown() = k;
    r.detach();  // would keep its port: the k-th allocation fails
    const bool failed = test::alloc_fail_countdown() == 0;
    test::alloc_fail_countdown() = 0;
    if (failed) ++failures;
    auto st = d->stats();
    EXPECT_EQ(st.exclusive_kept, failed ? 1u : 2u) << "allocation " << k;
    EXPECT_EQ(st.exclusive_open, failed ? 1u : 2u) << "allocation " << k;
    // Two new transactions to other peers: at the limit, each takes a kept
    // port's place.
    auto busy_peer = peer();
    auto new_peer = peer();
    auto busy = d->add_response(busy_peer.local_endpoint(), exclusive_options());
    ASSERT_TRUE(busy) << busy.error().message() << ", allocation " << k;
    auto fresh = d->add_response(new_peer.local_endpoint(), exclusive_options());
    ASSERT_TRUE(fresh) << fresh.error().message() << ", allocation " << k;
    st = d->stats();
    EXPECT_EQ(st.exclusive_kept, 0u) << "allocation " << k;
    EXPECT_EQ(st.exclusive_open, 2u) << "allocation " << k;
    EXPECT_EQ(st.exclusive_no_port, 0u) << "allocation " << k;
  }
  EXPECT_GE(failures, 2);  // the map's node and the list's element, at least
}

TEST_F(KeptPortTest, ACallerWaitingForAPortIsServedBeforeOneIsKept) {
  dispatcher_options o;
  o.exclusive_sockets = 1;
  auto d = make(o);
  auto server = peer();
  auto a = transact(d, server);  // answered, still attached: the one socket
  std::optional<response> waited;
  d->async_add_response(server.local_endpoint(), exclusive_options(),
                        [&](error_code ec, response r) {
                          EXPECT_FALSE(ec) << ec.message();
                          waited = std::move(r);
                        });
  ctx_.poll();
  EXPECT_FALSE(waited.has_value());
  EXPECT_EQ(d->stats().port_waiters, 1u);
  const std::uint16_t old_port = a.local_port();
  a.detach();
  ASSERT_TRUE(run_until(ctx_, [&] { return waited.has_value(); }));
  ASSERT_TRUE(*waited);
  EXPECT_NE(waited->local_port(), old_port);  // a fresh port: the old one closed
  const auto st = d->stats();
  EXPECT_EQ(st.exclusive_kept, 0u);
  EXPECT_EQ(st.exclusive_reused, 0u);
  EXPECT_EQ(st.exclusive_open, 1u);
  waited->detach();
}

// A transaction that sent a second datagram after its reply: the peer may be
// gone, and the ICMP error for it still on its way. Its port is not kept, so
// no error of it can reach the next transaction.
TEST_F(KeptPortTest, ATransactionThatSentMoreThanOneDatagramClosesItsPort) {
  auto d = make();
  auto server = peer();
  auto a = transact(d, server);
  const std::uint16_t old_port = a.local_port();
  const udp::endpoint at = server.local_endpoint();
  server.close();  // nobody listens: the kernel answers the next datagram with ICMP
  ASSERT_TRUE(a.send(message(a.id(), false)));
  a.detach();
  EXPECT_EQ(d->stats().exclusive_kept, 0u);
  EXPECT_EQ(d->stats().exclusive_open, 0u);
  udp::socket again(ctx_, at);  // the peer is back on its port
  auto b = transact(d, again);
  EXPECT_NE(b.local_port(), old_port);
  const auto st = d->stats();
  EXPECT_EQ(st.exclusive_reused, 0u);
  EXPECT_EQ(st.exclusive_socket_errors, 0u);
  b.detach();
}

TEST_F(KeptPortTest, KeptPortsDoNotHoldTheLoop) {
  auto d = make();
  auto server = peer();
  transact(d, server).detach();
  EXPECT_EQ(d->stats().exclusive_kept, 1u);
  ctx_.restart();
  ctx_.poll();
  EXPECT_TRUE(ctx_.stopped());  // nothing left to wait for: run() would return
  // And a kept port still serves once the loop runs again.
  auto b = transact(d, server);
  EXPECT_EQ(d->stats().exclusive_reused, 1u);
  b.detach();
}

TEST_F(KeptPortTest, ShutdownClosesKeptPorts) {
  auto d = make();
  auto one = peer();
  auto two = peer();
  transact(d, one).detach();
  transact(d, two).detach();
  EXPECT_EQ(d->stats().exclusive_kept, 2u);
  d->shutdown();
  const auto st = d->stats();
  EXPECT_EQ(st.exclusive_kept, 0u);
  EXPECT_EQ(st.exclusive_open, 0u);
  auto late = d->add_response(one.local_endpoint(), exclusive_options());
  ASSERT_FALSE(late);
  EXPECT_EQ(late.error(), errc::shutting_down);
}

TEST_F(KeptPortTest, OneUseOrNoLifetimeGivesEveryResponseAFreshPort) {
  for (int variant = 0; variant < 2; ++variant) {
    dispatcher_options o;
    if (variant == 0) o.port_uses = 1;
    if (variant == 1) o.port_lifetime = std::chrono::milliseconds(0);
    auto d = make(o);
    auto server = peer();
    const std::uint16_t first = transact(d, server).local_port();
    EXPECT_EQ(d->stats().exclusive_open, 0u) << variant;
    EXPECT_NE(transact(d, server).local_port(), first) << variant;
    EXPECT_EQ(d->stats().exclusive_reused, 0u) << variant;
  }
}

TEST_F(KeptPortTest, BadReuseOptionsAreRefused) {
  dispatcher_options o;
  o.port_uses = 0;
  auto zero = dispatcher::create(ctx_, loopback_any, o);
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error(), errc::bad_options);
  o = {};
  o.port_lifetime = std::chrono::milliseconds(-1);
  auto negative = dispatcher::create(ctx_, loopback_any, o);
  ASSERT_FALSE(negative);
  EXPECT_EQ(negative.error(), errc::bad_options);
}

}  // namespace
}  // namespace uipc::dispatch
