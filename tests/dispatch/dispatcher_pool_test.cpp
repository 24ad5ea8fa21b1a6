// The dispatcher when its buffer pool runs dry.
#include "dispatch_support.hpp"

namespace uipc::dispatch {
namespace {

// ---------------------------------------------------------------- the pool runs dry

TEST_F(DispatcherTest, DryPoolWithALentBufferWaitsForItToComeBack) {
  dispatcher_options o;
  o.buffers = 2;
  o.max_receives = 2;
  auto d = make(o);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> got;
  receive_into(*l, got);
  auto p = peer();
  for (std::uint8_t i = 0; i < 5; ++i) send(p, message(i, false, i), d->local_endpoint());
  until_received(d, 2);
  // Query 0 is lent, query 1 holds the other buffer: the receiver waits.
  auto st = d->stats();
  EXPECT_EQ(st.buffers_in_use, 2u);
  EXPECT_EQ(st.buffers_lent, 1u);
  EXPECT_EQ(st.receiving_sockets, 0u);
  EXPECT_EQ(st.received, 2u);
  EXPECT_EQ(st.no_buffer_events, 0u);
  std::vector<int> order;
  for (;;) {
    ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    ASSERT_FALSE(got->ec) << got->ec.message();
    order.push_back(tag_of(got->ev));
    EXPECT_LE(d->stats().buffers_in_use, 2u);
    got->ev.release();  // a buffer comes back: receiving restarts
    if (order.size() == 5) break;
    receive_into(*l, got);
  }
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4}));
  EXPECT_EQ(d->stats().no_buffer_events, 0u);
  EXPECT_EQ(d->stats().dropped_queue_full, 0u);
}

TEST_F(DispatcherTest, DryPoolWithNothingLentAndOnlyListenersGivesOneListenerANoBuffersEvent) {
  dispatcher_options o;
  o.buffers = 2;
  o.max_receives = 2;
  auto d = make(o);
  auto l = d->add_listener();  // attached but not receiving: queries queue
  ASSERT_TRUE(l);
  auto p = peer();
  for (std::uint8_t i = 0; i < 4; ++i) send(p, message(i, false, i), d->local_endpoint());
  until_received(d, 2);
  auto st = d->stats();
  EXPECT_EQ(st.queued_queries, 2u);
  EXPECT_EQ(st.buffers_lent, 0u);
  EXPECT_EQ(st.receiving_sockets, 0u);
  EXPECT_EQ(st.no_buffer_events, 1u);
  std::optional<received> got;
  receive_into(*l, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ec, make_error_code(errc::no_buffers));
  EXPECT_EQ(got->ev.kind(), event_kind::no_buffers);
  std::vector<int> order;
  got->ev.release();
  while (order.size() < 4) {
    receive_into(*l, got);
    ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    ASSERT_FALSE(got->ec) << got->ec.message();
    order.push_back(tag_of(got->ev));
    got->ev.release();
  }
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(d->stats().no_buffer_events, 1u);
}

// With a SO_REUSEPORT group, the restart flow decides for every socket: all of
// them stop on a dry pool (one that wakes up to find no buffer stops too), and
// all of them start again when buffers come back, so that the queries of every
// client come through, whichever socket the kernel gave them to.
TEST_F(DispatcherTest, SocketGroupStopsOnADryPoolAndEverySocketRestartsWhenBuffersComeBack) {
  dispatcher_options o;
  o.sockets = 2;
  o.buffers = 2;
  o.max_receives = 2;
  auto d = make(o);
  auto l = d->add_listener();  // attached but not receiving yet: queries queue
  ASSERT_TRUE(l);
  std::vector<udp::socket> clients;  // one port each: the kernel spreads them over the group
  for (int i = 0; i < 8; ++i) clients.push_back(peer());
  for (std::uint8_t i = 0; i < 8; ++i) send(clients[i], message(i, false, i), d->local_endpoint());
  until_received(d, 2);
  auto st = d->stats();
  EXPECT_EQ(st.queued_queries, 2u);
  EXPECT_EQ(st.no_buffer_events, 1u);
  std::optional<received> got;
  receive_into(*l, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ec, errc::no_buffers);
  std::set<int> tags;
  while (tags.size() < 8) {
    receive_into(*l, got);
    ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    if (got->ec == errc::no_buffers) continue;  // the pool ran dry again: legitimate
    ASSERT_FALSE(got->ec) << got->ec.message();
    EXPECT_TRUE(tags.insert(tag_of(got->ev)).second) << "delivered twice";
    got->ev.release();  // a buffer comes back: every stopped socket restarts
  }
  got.reset();
  ctx_.poll();
  st = d->stats();
  EXPECT_EQ(st.received, 8u);
  EXPECT_EQ(st.buffers_in_use, 0u);
  EXPECT_EQ(st.queued_queries, 0u);
  EXPECT_EQ(st.receiving_sockets, 2u);
}

TEST_F(DispatcherTest, DryPoolWithNothingLentAndAResponseAttachedJustWaits) {
  dispatcher_options o;
  o.buffers = 2;
  o.max_receives = 2;
  o.max_queued_per_response = 8;
  auto d = make(o);
  auto server = peer();
  auto r = d->add_response(server.local_endpoint());
  auto l = d->add_listener();
  ASSERT_TRUE(r && l);
  for (std::uint8_t i = 0; i < 4; ++i) send(server, message(r->id(), true, i), d->local_endpoint());
  until_received(d, 2);
  auto st = d->stats();
  EXPECT_EQ(st.buffers_in_use, 2u);
  EXPECT_EQ(st.buffers_lent, 0u);
  EXPECT_EQ(st.receiving_sockets, 0u);
  EXPECT_EQ(st.no_buffer_events, 0u);  // not the listeners' fault: no error event
  std::vector<int> order;
  while (order.size() < 4) {
    std::optional<received> got;
    receive_into(*r, got);
    ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    ASSERT_FALSE(got->ec);
    order.push_back(tag_of(got->ev));
  }
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3}));
}

TEST_F(DispatcherTest, DetachThatFreesQueuedBuffersRestartsTheReceiver) {
  dispatcher_options o;
  o.buffers = 2;
  o.max_receives = 2;
  auto d = make(o);
  auto server = peer();
  auto r = d->add_response(server.local_endpoint());
  auto l = d->add_listener();  // not receiving: queries queue and hold the whole pool
  ASSERT_TRUE(r && l);
  auto p = peer();
  for (std::uint8_t i = 0; i < 4; ++i) send(p, message(i, false, i), d->local_endpoint());
  until_received(d, 2);
  EXPECT_EQ(d->stats().receiving_sockets, 0u);
  l->detach();  // drops the two queued queries: the pool has buffers again
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().received == 4; }));
  EXPECT_EQ(d->stats().dropped_no_listener, 2u);  // the two read after the detach
  EXPECT_EQ(d->stats().buffers_in_use, 0u);
}

// Replies queued for an exclusive response hold the pool as a shared
// response's do: the shared socket just stops, with no no_buffers event for
// the listeners (they are not the cause), and starts again once the response
// lets the buffers go.
TEST_F(DispatcherTest, DryPoolWithRepliesQueuedOnAnExclusivePortJustWaits) {
  dispatcher_options o;
  o.buffers = 4;
  o.max_receives = 2;
  auto d = make(o);
  auto server = peer();
  auto l = d->add_listener();
  auto r = d->add_response(server.local_endpoint(),
                           response_options{std::chrono::milliseconds(0), port_mode::exclusive});
  ASSERT_TRUE(l && r);
  std::optional<received> got;
  receive_into(*l, got);
  // Four replies the response never asks for: they hold the whole pool.
  const udp::endpoint exclusive_port(server.local_endpoint().address(), r->local_port());
  for (std::uint8_t i = 0; i < 4; ++i) send(server, message(r->id(), true, i), exclusive_port);
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().exclusive_received == 4; }));
  ctx_.poll();
  EXPECT_EQ(d->stats().buffers_in_use, 4u);
  EXPECT_EQ(d->stats().receiving_sockets, 1u);
  // A query wakes the shared socket, which finds the pool dry and stops.
  auto client = peer();
  send(client, message(7, false, 7), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().receiving_sockets == 0; }));
  ctx_.run_for(std::chrono::milliseconds(20));
  EXPECT_EQ(d->stats().no_buffer_events, 0u);
  ASSERT_FALSE(got.has_value()) << "the listener was given " << got->ec.message();
  r->detach();  // its queued replies give their buffers back
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec) << got->ec.message();
  EXPECT_EQ(tag_of(got->ev), 7);
  EXPECT_EQ(d->stats().no_buffer_events, 0u);
}

// An exclusive socket that finds the pool dry waits for a buffer with one
// read, and the replies that come meanwhile add no waiting read of their own:
// a second one would read the socket while the first one's read still
// delivers (on another loop thread, its replies could overtake the first's).
TEST_F(DispatcherTest, DryPoolLeavesAnExclusiveSocketOneReadAtATime) {
  dispatcher_options o;
  o.buffers = 2;
  auto d = make(o);
  auto server = peer();
  auto holder0 = d->add_response(server.local_endpoint());
  auto holder1 = d->add_response(server.local_endpoint());
  auto r = d->add_response(server.local_endpoint(),
                           response_options{std::chrono::milliseconds(0), port_mode::exclusive});
  ASSERT_TRUE(holder0 && holder1 && r);
  // A reply to each shared response, lent to the test: the whole pool.
  send(server, message(holder0->id(), true, 0), d->local_endpoint());
  send(server, message(holder1->id(), true, 1), d->local_endpoint());
  until_received(d, 2);
  std::optional<received> held0, held1;
  receive_into(*holder0, held0);
  receive_into(*holder1, held1);
  ASSERT_TRUE(run_until(ctx_, [&] { return held0 && held1; }));
  ASSERT_EQ(d->stats().buffers_in_use, 2u);
  const auto run_for = [&](std::chrono::milliseconds t) {
    const auto until = std::chrono::steady_clock::now() + t;
    run_until(ctx_, [&] { return std::chrono::steady_clock::now() >= until; });
  };
  // The exclusive reply finds the pool dry, and the next one comes while it waits.
  const udp::endpoint to(server.local_endpoint().address(), r->local_port());
  send(server, message(r->id(), true, 2), to);
  run_for(std::chrono::milliseconds(20));
  send(server, message(r->id(), true, 3), to);
  run_for(std::chrono::milliseconds(20));
  EXPECT_EQ(d->stats().exclusive_received, 0u);
  // The first buffer back wakes the read, whose delivery runs the handler
  // inline; there the second buffer comes back and the loop runs, as another
  // loop thread would: no other read of the socket may take the next reply.
  std::vector<int> tags;
  std::optional<std::uint64_t> read_meanwhile;
  r->async_receive([&](error_code ec, event ev) {
    EXPECT_FALSE(ec) << ec.message();
    if (ec) return;
    tags.push_back(tag_of(ev));
    held1->ev.release();
    ctx_.poll();
    read_meanwhile = d->stats().exclusive_received;
  });
  held0->ev.release();
  ASSERT_TRUE(run_until(ctx_, [&] { return read_meanwhile.has_value(); }));
  EXPECT_EQ(*read_meanwhile, 1u) << "the socket was read while its read delivered";
  std::optional<received> next;
  receive_into(*r, next);
  ASSERT_TRUE(run_until(ctx_, [&] { return next.has_value(); }));
  ASSERT_FALSE(next->ec) << next->ec.message();
  tags.push_back(tag_of(next->ev));
  EXPECT_EQ(tags, (std::vector<int>{2, 3}));
  EXPECT_EQ(d->stats().exclusive_received, 2u);
}

}  // namespace
}  // namespace uipc::dispatch
