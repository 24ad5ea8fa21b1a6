// Exclusive random ports (port_mode::exclusive): a port of its own per response,
// drawn from the range, connected to the peer; the mode per dispatcher and per
// response; replies, timeouts, cancel, lent buffers and async sends on it.
#include "exclusive_support.hpp"

namespace uipc::dispatch {
namespace {

TEST_F(DispatcherTest, ExclusiveResponseSendsAndReceivesOnItsOwnRandomPort) {
  auto d = make();
  auto server = peer();
  const response_options exclusive{std::chrono::milliseconds(0), port_mode::exclusive};
  auto r = d->add_response(server.local_endpoint(), exclusive);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->ports(), port_mode::exclusive);
  EXPECT_NE(r->local_port(), d->local_endpoint().port());
  const auto [first, last] = ephemeral_range();
  EXPECT_GE(r->local_port(), first);
  EXPECT_LE(r->local_port(), last);
  EXPECT_EQ(d->stats().exclusive_open, 1u);

  std::optional<received> got;
  receive_into(*r, got);
  ASSERT_TRUE(r->send(message(r->id(), false, 1)));
  udp::endpoint client;
  auto query = read(server, &client);
  ASSERT_EQ(query.size(), 13u);
  EXPECT_EQ(client.port(), r->local_port());  // the query left from the exclusive port
  send(server, message(r->id(), true, 7), client);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec) << got->ec.message();
  EXPECT_EQ(got->ev.kind(), event_kind::message);
  EXPECT_EQ(tag_of(got->ev), 7);
  EXPECT_EQ(got->ev.peer(), server.local_endpoint());
  const auto st = d->stats();
  EXPECT_EQ(st.exclusive_received, 1u);
  EXPECT_EQ(st.responses, 1u);
  EXPECT_EQ(st.receiving_sockets, 0u);  // the shared socket has no one to read for
  got.reset();
  r->detach();
  // Its transaction ended well: the port is kept for the next response to
  // this peer (see dispatcher_exclusive_reuse_test.cpp), not held by anyone.
  EXPECT_EQ(d->stats().exclusive_open, 1u);
  EXPECT_EQ(d->stats().exclusive_kept, 1u);
}

TEST_F(DispatcherTest, PortModeIsChosenPerDispatcherAndPerResponse) {
  dispatcher_options o;
  o.ports = port_mode::exclusive;
  auto d = make(o);
  auto server = peer();
  auto by_default = d->add_response(server.local_endpoint());
  auto shared = d->add_response(server.local_endpoint(),
                                response_options{std::chrono::milliseconds(0), port_mode::shared});
  ASSERT_TRUE(by_default && shared);
  while (shared->id() == by_default->id())  // 1 in 65536: the test needs them apart
    shared = d->add_response(server.local_endpoint(),
                             response_options{std::chrono::milliseconds(0), port_mode::shared});
  EXPECT_EQ(by_default->ports(), port_mode::exclusive);
  EXPECT_EQ(shared->ports(), port_mode::shared);
  EXPECT_EQ(shared->local_port(), d->local_endpoint().port());
  EXPECT_NE(by_default->local_port(), d->local_endpoint().port());

  // Both work side by side, and a shared reply never reaches the exclusive one
  // (even with its ID: the exclusive response is not in the shared table).
  std::optional<received> got_shared, got_exclusive;
  receive_into(*shared, got_shared);
  receive_into(*by_default, got_exclusive);
  send(server, message(by_default->id(), true, 1), d->local_endpoint());
  send(server, message(shared->id(), true, 2), d->local_endpoint());
  send(server, message(by_default->id(), true, 3),
       udp::endpoint(server.local_endpoint().address(), by_default->local_port()));
  ASSERT_TRUE(run_until(ctx_, [&] { return got_shared && got_exclusive; }));
  EXPECT_EQ(tag_of(got_shared->ev), 2);
  EXPECT_EQ(tag_of(got_exclusive->ev), 3);
  const auto st = d->stats();
  EXPECT_EQ(st.dropped_unmatched, 1u);
  EXPECT_EQ(st.exclusive_dropped_unmatched, 0u);
}

TEST_F(DispatcherTest, PortsAreDrawnFromTheRangeAndAJustUsedPortIsNotReused) {
  const port_block block(16);
  dispatcher_options o;
  o.first_port = block.first();
  o.last_port = block.last();
  o.recent_ports = 8;
  auto d = make(o);
  auto server = peer();
  std::deque<std::uint16_t> recent;
  std::set<std::uint16_t> seen;
  for (int i = 0; i < 200; ++i) {
    auto r = d->add_response(server.local_endpoint(), exclusive_options());
    ASSERT_TRUE(r) << r.error().message();
    const std::uint16_t port = r->local_port();
    EXPECT_GE(port, block.first());
    EXPECT_LE(port, block.last());
    EXPECT_EQ(std::count(recent.begin(), recent.end(), port), 0) << "port " << port << " reused";
    recent.push_back(port);
    if (recent.size() > 8) recent.pop_front();
    seen.insert(port);
  }
  EXPECT_EQ(seen.size(), 16u);  // 200 uniform draws over 16 ports reach every one
}

TEST_F(DispatcherTest, ExclusiveResponseTimesOutAndCancels) {
  auto d = make();
  auto server = peer();
  auto r = d->add_response(server.local_endpoint(),
                           response_options{std::chrono::milliseconds(30), port_mode::exclusive});
  ASSERT_TRUE(r);
  std::optional<received> got;
  receive_into(*r, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ec, errc::timed_out);
  EXPECT_EQ(got->ev.kind(), event_kind::timed_out);
  got.reset();
  receive_into(*r, got);
  r->cancel();
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ec, asio::error::operation_aborted);
  EXPECT_EQ(d->stats().timeouts, 1u);
}

TEST_F(DispatcherTest, ExclusiveRepliesQueueBehindALentEventAndTheQueueIsBounded) {
  dispatcher_options o;
  o.max_queued_per_response = 2;
  auto d = make(o);
  auto server = peer();
  auto r = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_TRUE(r);
  const udp::endpoint to(server.local_endpoint().address(), r->local_port());
  for (std::uint8_t i = 0; i < 4; ++i) send(server, message(r->id(), true, i), to);
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().exclusive_received >= 4; }));
  EXPECT_EQ(d->stats().dropped_queue_full, 2u);
  std::optional<received> first;
  receive_into(*r, first);
  ASSERT_TRUE(run_until(ctx_, [&] { return first.has_value(); }));
  EXPECT_EQ(tag_of(first->ev), 0);
  EXPECT_EQ(d->stats().buffers_lent, 1u);
  // While the first event is held, the next waits for it.
  std::optional<received> second;
  receive_into(*r, second);
  ctx_.poll();
  EXPECT_FALSE(second.has_value());
  first->ev.release();
  ASSERT_TRUE(run_until(ctx_, [&] { return second.has_value(); }));
  EXPECT_EQ(tag_of(second->ev), 1);
  second.reset();
  EXPECT_EQ(d->stats().buffers_lent, 0u);
}

TEST_F(DispatcherTest, ExclusiveAsyncSendCompletesAndAsyncAddResponseGivesAPort) {
  auto d = make();
  auto server = peer();
  std::optional<std::pair<error_code, response>> added;
  d->async_add_response(server.local_endpoint(), exclusive_options(),
                        [&](error_code ec, response r) { added.emplace(ec, std::move(r)); });
  EXPECT_FALSE(added.has_value());  // never inside the call
  ASSERT_TRUE(run_until(ctx_, [&] { return added.has_value(); }));
  ASSERT_FALSE(added->first) << added->first.message();
  response& r = added->second;
  const auto query = message(r.id(), false, 4);
  std::optional<error_code> sent;
  r.async_send(query, [&](error_code ec) { sent = ec; });
  ASSERT_TRUE(run_until(ctx_, [&] { return sent.has_value(); }));
  EXPECT_FALSE(*sent);
  udp::endpoint client;
  EXPECT_EQ(read(server, &client).size(), 13u);
  EXPECT_EQ(client.port(), r.local_port());
  EXPECT_EQ(d->stats().sent, 1u);
}

TEST_F(DispatcherTest, ExclusivePortOptionsOutOfRangeAreRefused) {
  auto refused = [&](dispatcher_options o) {
    auto d = dispatcher::create(ctx_, loopback_any, o);
    return !d && d.error() == errc::bad_options;
  };
  dispatcher_options o;
  o.first_port = 40000;  // one end alone
  EXPECT_TRUE(refused(o));
  o.first_port = 0;
  o.last_port = 40000;
  EXPECT_TRUE(refused(o));
  o.first_port = 40010;  // reversed
  EXPECT_TRUE(refused(o));
  o.first_port = 40000;
  o.last_port = 40003;
  o.recent_ports = 4;  // the whole range would rest
  EXPECT_TRUE(refused(o));
  o.recent_ports = 3;
  EXPECT_FALSE(refused(o));

  // No exclusive sockets at all: an exclusive response is a bad option, and
  // nothing is attached or opened.
  dispatcher_options none;
  none.exclusive_sockets = 0;
  auto d = make(none);
  auto server = peer();
  const std::size_t fds = test::open_fd_count();
  auto r = d->add_response(server.local_endpoint(), exclusive_options());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::bad_options);
  EXPECT_EQ(test::open_fd_count(), fds);
  EXPECT_EQ(d->stats().responses, 0u);
}

}  // namespace
}  // namespace uipc::dispatch
