// Exclusive ports under bad input and faults: replies from the wrong port or
// address, another transaction's ID, late replies, ICMP errors, the range and
// the socket set exhausted, shutdown with exclusive sockets open, a reply
// handler that throws.
#include "exclusive_support.hpp"

namespace uipc::dispatch {
namespace {

udp::endpoint port_of(const udp::socket& server, const response& r) {
  return udp::endpoint(server.local_endpoint().address(), r.local_port());
}

TEST_F(DispatcherTest, ExclusiveReplyFromTheRightAddressButTheWrongPortIsDropped) {
  auto d = make();
  auto server = peer();
  auto r = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(r);
  std::optional<received> got;
  receive_into(*r, got);
  auto other_port = peer();  // 127.0.0.1, another port
  send(other_port, message(r->id(), true, 1), port_of(server, *r));
  // A datagram sent after it from the right peer proves the first had its chance.
  send(server, message(static_cast<std::uint16_t>(r->id() + 1), true, 2), port_of(server, *r));
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().exclusive_received >= 1; }));
  ctx_.poll();
  EXPECT_FALSE(got.has_value());
  // The kernel dropped the wrong port's datagram before the socket saw it.
  EXPECT_EQ(d->stats().exclusive_received, 1u);
  EXPECT_EQ(d->stats().exclusive_dropped_unmatched, 1u);  // the wrong ID
  send(server, message(r->id(), true, 3), port_of(server, *r));
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(tag_of(got->ev), 3);
}

TEST_F(DispatcherTest, ExclusiveReplyFromTheRightPortButAnotherAddressIsDropped) {
  auto d = make();
  auto server = peer();
  // The same port number as the server, on another loopback address.
  udp::socket other_address(
      ctx_, udp::endpoint(asio::ip::make_address("127.0.0.2"), server.local_endpoint().port()));
  auto r = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(r);
  std::optional<received> got;
  receive_into(*r, got);
  send(other_address, message(r->id(), true, 1), port_of(server, *r));
  send(server, message(static_cast<std::uint16_t>(r->id() ^ 0x8000), true, 2), port_of(server, *r));
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().exclusive_received >= 1; }));
  ctx_.poll();
  EXPECT_FALSE(got.has_value());
  EXPECT_EQ(d->stats().exclusive_received, 1u);
  send(server, message(r->id(), true, 3), port_of(server, *r));
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(tag_of(got->ev), 3);
  EXPECT_EQ(got->ev.peer(), server.local_endpoint());
}

TEST_F(DispatcherTest, ExclusiveReplyWithTheRightIdOnAnotherTransactionsPortIsDropped) {
  auto d = make();
  auto server = peer();
  auto a = d->add_response(server.local_endpoint(), exclusive_options());
  auto b = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(a && b);
  while (b->id() == a->id()) b = d->add_response(server.local_endpoint(), exclusive_options());
  std::optional<received> got_a, got_b;
  receive_into(*a, got_a);
  receive_into(*b, got_b);
  send(server, message(a->id(), true, 1), port_of(server, *b));  // a's ID, b's port
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().exclusive_received >= 1; }));
  ctx_.poll();
  EXPECT_FALSE(got_a.has_value());
  EXPECT_FALSE(got_b.has_value());
  EXPECT_EQ(d->stats().exclusive_dropped_unmatched, 1u);
  send(server, message(a->id(), true, 2), port_of(server, *a));
  send(server, message(b->id(), true, 3), port_of(server, *b));
  ASSERT_TRUE(run_until(ctx_, [&] { return got_a && got_b; }));
  EXPECT_EQ(tag_of(got_a->ev), 2);
  EXPECT_EQ(tag_of(got_b->ev), 3);
}

TEST_F(DispatcherTest, ExclusiveLateReplyAfterItsPortWentBackReachesNoOne) {
  const port_block block(4);
  dispatcher_options o;
  o.first_port = block.first();
  o.last_port = block.last();
  o.recent_ports = 2;
  auto d = make(o);
  auto server = peer();
  auto a = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(a);
  const std::uint16_t old_id = a->id();
  const udp::endpoint old_port = port_of(server, *a);
  a->detach();
  EXPECT_EQ(d->stats().exclusive_open, 0u);
  // The next transactions to the same peer draw other ports: the old one rests.
  auto b = d->add_response(server.local_endpoint(), exclusive_options());
  auto c = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(b && c);
  EXPECT_NE(b->local_port(), old_port.port());
  EXPECT_NE(c->local_port(), old_port.port());
  std::optional<received> got_b, got_c;
  receive_into(*b, got_b);
  receive_into(*c, got_c);
  send(server, message(old_id, true, 1), old_port);  // the late reply: no socket there
  send(server, message(b->id(), true, 2), port_of(server, *b));
  ASSERT_TRUE(run_until(ctx_, [&] { return got_b.has_value(); }));
  ctx_.poll();
  EXPECT_EQ(tag_of(got_b->ev), 2);
  EXPECT_FALSE(got_c.has_value());
  EXPECT_EQ(d->stats().exclusive_received, 1u);
  EXPECT_EQ(d->stats().exclusive_dropped_unmatched, 0u);
  c->detach();  // its receive ends before `got_c` goes
  ASSERT_TRUE(run_until(ctx_, [&] { return got_c.has_value(); }));
  EXPECT_EQ(got_c->ec, asio::error::operation_aborted);
}

TEST_F(DispatcherTest, IcmpErrorOnAnExclusiveSocketFailsThatTransactionOnly) {
  auto d = make();
  auto server = peer();
  udp::endpoint dead;
  {
    auto closed = peer();
    dead = closed.local_endpoint();
  }  // nobody listens there now: the kernel answers with ICMP port unreachable
  auto doomed = d->add_response(dead, exclusive_options(std::chrono::seconds(5)));
  auto fine = d->add_response(server.local_endpoint(), exclusive_options());
  auto shared = d->add_response(server.local_endpoint());
  ASSERT_TRUE(doomed && fine && shared);
  std::optional<received> got_doomed, got_fine, got_shared;
  receive_into(*doomed, got_doomed);
  receive_into(*fine, got_fine);
  receive_into(*shared, got_shared);
  ASSERT_TRUE(doomed->send(message(doomed->id(), false)));
  ASSERT_TRUE(run_until(ctx_, [&] { return got_doomed.has_value(); }));
  EXPECT_EQ(got_doomed->ec, boost::asio::error::connection_refused);
  EXPECT_EQ(got_doomed->ev.kind(), event_kind::socket_error);
  EXPECT_EQ(got_doomed->ev.reason(), boost::asio::error::connection_refused);
  EXPECT_EQ(d->stats().exclusive_socket_errors, 1u);
  EXPECT_FALSE(d->stats().shutting_down);
  // Everyone else goes on.
  ASSERT_TRUE(fine->send(message(fine->id(), false)));
  ASSERT_TRUE(shared->send(message(shared->id(), false)));
  udp::endpoint from;
  for (int i = 0; i < 2; ++i) {
    auto q = read(server, &from);
    q[2] = std::byte{0x80};
    server.send_to(asio::buffer(q), from);
  }
  ASSERT_TRUE(run_until(ctx_, [&] { return got_fine && got_shared; }));
  EXPECT_FALSE(got_fine->ec);
  EXPECT_FALSE(got_shared->ec);
  // The failed one gets nothing more (no timeout after the failure), and
  // another response can be added at once.
  got_doomed.reset();
  receive_into(*doomed, got_doomed);
  ctx_.poll();
  EXPECT_FALSE(got_doomed.has_value());
  EXPECT_TRUE(d->add_response(server.local_endpoint(), exclusive_options()));
  doomed->detach();
  ASSERT_TRUE(run_until(ctx_, [&] { return got_doomed.has_value(); }));
  EXPECT_EQ(got_doomed->ec, asio::error::operation_aborted);
}

TEST_F(DispatcherTest, ExhaustedPortRangeGivesNoFreePortAndChangesNothing) {
  const port_block block(3);
  dispatcher_options o;
  o.first_port = block.first();
  o.last_port = block.last();
  o.recent_ports = 0;
  auto d = make(o);
  auto server = peer();
  std::vector<udp::socket> squatters;
  for (std::uint16_t p = block.first(); p <= block.last(); ++p)
    squatters.emplace_back(ctx_, udp::endpoint(asio::ip::make_address("127.0.0.1"), p));
  const std::size_t fds = test::open_fd_count();
  auto r = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::no_free_port);
  EXPECT_EQ(r.error(), uipc::condition::no_buffers);
  EXPECT_EQ(test::open_fd_count(), fds);
  auto st = d->stats();
  EXPECT_EQ(st.responses, 0u);
  EXPECT_EQ(st.exclusive_open, 0u);
  EXPECT_GE(st.exclusive_port_redraws, 3u);
  EXPECT_EQ(st.exclusive_no_port, 1u);
  // Waiting would never end (nothing of ours holds a port): refused at once too.
  std::optional<error_code> waited;
  d->async_add_response(server.local_endpoint(), exclusive_options(),
                        [&](error_code ec, response) { waited = ec; });
  ASSERT_TRUE(run_until(ctx_, [&] { return waited.has_value(); }));
  EXPECT_EQ(*waited, errc::no_free_port);
  // A port comes free: that one is taken.
  const std::uint16_t freed = squatters[1].local_endpoint().port();
  squatters[1].close();
  auto ok = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(ok) << ok.error().message();
  EXPECT_EQ(ok->local_port(), freed);
}

TEST_F(DispatcherTest, ExclusiveSocketsRunOutThenTheCallerFailsOrWaits) {
  dispatcher_options o;
  o.exclusive_sockets = 2;
  auto d = make(o);
  auto server = peer();
  auto a = d->add_response(server.local_endpoint(), exclusive_options());
  auto b = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(a && b);
  auto c = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), errc::no_free_port);
  // A shared response is not limited by the exclusive sockets.
  EXPECT_TRUE(d->add_response(server.local_endpoint()));
  std::vector<std::pair<error_code, response>> waited;
  for (int i = 0; i < 2; ++i) {
    d->async_add_response(
        server.local_endpoint(), exclusive_options(),
        [&](error_code ec, response r) { waited.emplace_back(ec, std::move(r)); });
  }
  ctx_.poll();
  EXPECT_TRUE(waited.empty());
  EXPECT_EQ(d->stats().port_waiters, 2u);
  // While some wait, a new synchronous add does not overtake them.
  a->detach();
  EXPECT_FALSE(d->add_response(server.local_endpoint(), exclusive_options()));
  ASSERT_TRUE(run_until(ctx_, [&] { return waited.size() == 1; }));
  ASSERT_FALSE(waited[0].first) << waited[0].first.message();
  EXPECT_EQ(waited[0].second.ports(), port_mode::exclusive);
  EXPECT_EQ(d->stats().exclusive_open, 2u);
  // The waiter still waiting gets shutting_down from a shutdown.
  d->shutdown();
  ASSERT_TRUE(run_until(ctx_, [&] { return waited.size() == 2; }));
  EXPECT_EQ(waited[1].first, errc::shutting_down);
  EXPECT_FALSE(waited[1].second);
  EXPECT_EQ(d->stats().port_waiters, 0u);
}

TEST_F(DispatcherTest, ShutdownWithExclusiveSocketsOpenGivesEachPartyOneEvent) {
  auto d = make();
  auto server = peer();
  auto waiting = d->add_response(server.local_endpoint(), exclusive_options());
  auto idle = d->add_response(server.local_endpoint(), exclusive_options(std::chrono::seconds(5)));
  auto shared = d->add_response(server.local_endpoint());
  auto l = d->add_listener();
  ASSERT_TRUE(waiting && idle && shared && l);
  std::map<int, std::vector<received>> events;
  auto collect = [&](int who, auto& party) {
    party.async_receive([&, who](error_code ec, event ev) {
      events[who].push_back(received{ec, std::move(ev)});
    });
  };
  collect(0, *waiting);
  collect(2, *shared);
  collect(3, *l);
  ctx_.poll();
  d->shutdown();
  ASSERT_TRUE(run_until(ctx_, [&] { return events.size() == 3; }));
  collect(1, *idle);  // asks after the shutdown: its one event waited for it
  ASSERT_TRUE(run_until(ctx_, [&] { return events.size() == 4; }));
  for (auto& [who, list] : events) {
    ASSERT_EQ(list.size(), 1u) << who;
    EXPECT_EQ(list[0].ec, errc::shutting_down) << who;
    EXPECT_EQ(list[0].ev.kind(), event_kind::shutdown) << who;
    EXPECT_EQ(list[0].ev.reason(), asio::error::operation_aborted) << who;
  }
  // A reply to an exclusive port after the shutdown is not delivered; adds fail.
  send(server, message(waiting->id(), true), port_of(server, *waiting));
  auto late = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_FALSE(late);
  EXPECT_EQ(late.error(), errc::shutting_down);
  for (auto& [who, list] : events) list.clear();
  collect(0, *waiting);  // after its shutdown event: refused
  ASSERT_TRUE(run_until(ctx_, [&] { return !events[0].empty(); }));
  EXPECT_EQ(events[0][0].ec, errc::shutting_down);
  EXPECT_FALSE(events[0][0].ev);
  events.clear();
  // Detaching closes the exclusive sockets: no descriptor is left (TearDown),
  // and the loop has no work left.
  waiting->detach();
  idle->detach();
  shared->detach();
  l->detach();
  EXPECT_EQ(d->stats().exclusive_open, 0u);
  d.reset();
  ctx_.restart();
  ctx_.poll();
  server.close();
  ctx_.restart();
  EXPECT_EQ(ctx_.poll(), 0u);
  EXPECT_TRUE(ctx_.stopped());
}

// A reply handler on an exclusive port that throws (through io_context::run
// to the application, which runs the loop again) leaves the exclusive ports
// working: their sockets are still read, and the next transaction is answered.
TEST_F(DispatcherTest, AnExclusiveReplyHandlerThatThrowsDoesNotStopLaterExclusiveReplies) {
  auto d = make();
  auto server = peer();
  // Echoes one query back to its exclusive port as the reply.
  const auto answer = [&] {
    udp::endpoint client;
    auto query = read(server, &client);
    ASSERT_EQ(query.size(), 13u);
    query[2] = std::byte{0x80};
    server.send_to(asio::buffer(query), client);
  };
  auto first = d->add_response(server.local_endpoint(), exclusive_options(std::chrono::seconds(2)));
  ASSERT_TRUE(first) << first.error().message();
  bool thrown = false;
  first->async_receive([&](error_code ec, event ev) {
    EXPECT_FALSE(ec) << ec.message();
    ev.release();
    thrown = true;
    throw std::runtime_error("handler failed");
  });
  ASSERT_TRUE(first->send(message(first->id(), false, 1)));
  answer();
  bool caught = false;
  for (int i = 0; i < 400 && !thrown; ++i) {
    try {
      ctx_.run_for(std::chrono::milliseconds(5));
    } catch (const std::runtime_error&) {
      caught = true;
    }
    if (ctx_.stopped()) ctx_.restart();
  }
  ASSERT_TRUE(thrown);
  EXPECT_TRUE(caught) << "the handler's exception did not reach io_context::run";
  ctx_.restart();

  auto second =
      d->add_response(server.local_endpoint(), exclusive_options(std::chrono::milliseconds(500)));
  ASSERT_TRUE(second) << second.error().message();
  std::optional<received> got;
  receive_into(*second, got);
  ASSERT_TRUE(second->send(message(second->id(), false, 2)));
  answer();
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec) << got->ec.message();  // not timed_out: the reply was read
  EXPECT_EQ(got->ev.kind(), event_kind::message);
  EXPECT_EQ(tag_of(got->ev), 2);
  EXPECT_EQ(d->stats().timeouts, 0u);
}

}  // namespace
}  // namespace uipc::dispatch
