// The UDP dispatcher through its facade: every branch of the seed's receive,
// restart, add, detach and event-return flows, IDs, timeouts and the failsafe shutdown.
// This file: framing, completion tokens and listeners; the rest in dispatcher_*_test.cpp.
#include "dispatch_support.hpp"

namespace uipc::dispatch {
namespace {

// ---------------------------------------------------------------- framing, no listener

TEST_F(DispatcherTest, ShortDatagramsAreCountedAndDropped) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> got;
  receive_into(*l, got);
  auto p = peer();
  std::vector<std::byte> short_one(11, std::byte{0});
  send(p, short_one, d->local_endpoint());
  send(p, message(7, false, 42), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_FALSE(got->ec);
  EXPECT_EQ(tag_of(got->ev), 42);
  EXPECT_EQ(d->stats().dropped_short, 1u);
}

TEST_F(DispatcherTest, QueriesWithNoListenerAreDropped) {
  auto d = make();
  auto r = d->add_response(
      udp::endpoint(asio::ip::make_address("127.0.0.1"), 9));  // keeps the receiver running
  ASSERT_TRUE(r);
  auto p = peer();
  send(p, message(1, false), d->local_endpoint());
  send(p, message(2, false), d->local_endpoint());
  until_received(d, 2);
  EXPECT_EQ(d->stats().dropped_no_listener, 2u);
  EXPECT_EQ(d->stats().queued_queries, 0u);
  EXPECT_EQ(d->stats().buffers_in_use, 0u);
}

TEST_F(DispatcherTest, CustomFramingCarriesIdAndFlagElsewhere) {
  dispatcher_options o;
  o.frame = framing{.header_size = 4, .id_offset = 2, .flag_offset = 0, .response_mask = 0x01};
  auto d = make(o);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> got;
  receive_into(*l, got);
  auto p = peer();
  const std::vector<std::byte> query = {std::byte{0x00}, std::byte{0xff}, std::byte{0x12},
                                        std::byte{0x34}};
  const std::vector<std::byte> reply = {std::byte{0x01}, std::byte{0xff}, std::byte{0x12},
                                        std::byte{0x34}};
  send(p, reply, d->local_endpoint());  // a response to no one: unmatched
  send(p, query, d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ev.id(), 0x1234);
  EXPECT_EQ(d->stats().dropped_unmatched, 1u);
  dispatcher_options bad;
  bad.frame = framing{.header_size = 2, .id_offset = 1, .flag_offset = 0, .response_mask = 1};
  EXPECT_EQ(dispatcher::create(ctx_, loopback_any, bad).error(),
            make_error_code(errc::bad_options));
}

/// A coroutine that waits for one reply and records its tag (no capturing lambda).
asio::awaitable<void> await_reply(response* r, int* tag, error_code* ec) {
  auto [e, ev] = co_await r->async_receive(asio::as_tuple(asio::use_awaitable));
  *ec = e;
  *tag = ev ? tag_of(ev) : -1;
}

TEST_F(DispatcherTest, CompletionTokensKeepTheirExecutorAndCoroutinesWork) {
  auto d = make();
  auto server = peer();
  auto l = d->add_listener();
  auto r = d->add_response(server.local_endpoint());
  ASSERT_TRUE(l && r);
  auto strand = asio::make_strand(ctx_);
  std::optional<bool> on_strand;
  l->async_receive(asio::bind_executor(
      strand, [&](error_code, event) { on_strand = strand.running_in_this_thread(); }));
  int tag = 0;
  error_code ec = asio::error::would_block;
  asio::co_spawn(ctx_, await_reply(&*r, &tag, &ec), asio::detached);
  auto client = peer();
  send(client, message(1, false, 1), d->local_endpoint());
  send(server, message(r->id(), true, 77), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return on_strand.has_value() && tag != 0; }));
  EXPECT_TRUE(*on_strand);
  EXPECT_FALSE(ec);
  EXPECT_EQ(tag, 77);
}

// ---------------------------------------------------------------- listeners

TEST_F(DispatcherTest, ListenerGetsQueryAndRepliesToItsSender) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> got;
  receive_into(*l, got);
  auto p = peer();
  send(p, message(0xbeef, false, 5), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec);
  EXPECT_EQ(got->ev.kind(), event_kind::message);
  EXPECT_EQ(got->ev.id(), 0xbeef);
  EXPECT_EQ(got->ev.peer(), p.local_endpoint());
  EXPECT_EQ(got->ev.data().size(), 13u);
  EXPECT_EQ(d->stats().buffers_lent, 1u);
  // Answer in place: flip QR, change the tag.
  auto data = got->ev.data();
  data[2] = std::byte{0x80};
  data[12] = std::byte{99};
  ASSERT_TRUE(l->reply(std::move(got->ev), data));
  udp::endpoint from;
  auto answer = read(p, &from);
  ASSERT_EQ(answer.size(), 13u);
  EXPECT_EQ(std::to_integer<int>(answer[12]), 99);
  EXPECT_EQ(std::to_integer<int>(answer[0]), 0xbe);
  EXPECT_EQ(from, d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().buffers_in_use == 0; }));
  EXPECT_EQ(d->stats().buffers_lent, 0u);
}

TEST_F(DispatcherTest, QueriesQueueWhileTheListenerHoldsAnEventAndComeInOrderAsEventsReturn) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> got;
  receive_into(*l, got);
  auto p = peer();
  for (std::uint8_t i = 0; i < 5; ++i) send(p, message(i, false, i), d->local_endpoint());
  until_received(d, 5);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(tag_of(got->ev), 0);
  EXPECT_EQ(d->stats().queued_queries, 4u);
  for (std::uint8_t expected = 1; expected < 5; ++expected) {
    event held = std::move(got->ev);
    receive_into(*l, got);
    ctx_.poll();
    EXPECT_FALSE(got.has_value()) << "delivered while the previous event was still held";
    held.release();  // returning the event lets the next one through
    ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    ASSERT_FALSE(got->ec);
    EXPECT_EQ(tag_of(got->ev), expected);
  }
  EXPECT_EQ(d->stats().queued_queries, 0u);
}

TEST_F(DispatcherTest, QueryQueueIsBounded) {
  dispatcher_options o;
  o.max_queued_queries = 3;
  auto d = make(o);
  auto l = d->add_listener();  // attached, not receiving: everything queues
  ASSERT_TRUE(l);
  auto p = peer();
  for (std::uint8_t i = 0; i < 6; ++i) send(p, message(i, false, i), d->local_endpoint());
  until_received(d, 6);
  EXPECT_EQ(d->stats().queued_queries, 3u);
  EXPECT_EQ(d->stats().dropped_queue_full, 3u);
  std::optional<received> got;
  receive_into(*l, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(tag_of(got->ev), 0);  // the oldest kept
}

TEST_F(DispatcherTest, ListenerThatAttachesTakesAWaitingQueryAtOnce) {
  auto d = make();
  auto first = d->add_listener();
  ASSERT_TRUE(first);
  std::optional<received> got_first;
  receive_into(*first, got_first);
  auto p = peer();
  for (std::uint8_t i = 0; i < 3; ++i) send(p, message(i, false, i), d->local_endpoint());
  until_received(d, 3);
  ASSERT_TRUE(got_first.has_value());  // holds query 0; 1 and 2 wait
  EXPECT_EQ(d->stats().queued_queries, 2u);
  auto second = d->add_listener();
  ASSERT_TRUE(second);
  std::optional<received> got_second;
  receive_into(*second, got_second);
  ASSERT_TRUE(run_until(ctx_, [&] { return got_second.has_value(); }));
  EXPECT_EQ(tag_of(got_second->ev), 1);
  EXPECT_EQ(d->stats().queued_queries, 1u);
}

TEST_F(DispatcherTest, DetachingTheLastListenerDropsWaitingQueries) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  auto p = peer();
  for (std::uint8_t i = 0; i < 3; ++i) send(p, message(i, false, i), d->local_endpoint());
  until_received(d, 3);
  EXPECT_EQ(d->stats().buffers_in_use, 3u);
  auto keep = d->add_response(p.local_endpoint());  // keeps the dispatcher's port busy
  l->detach();
  EXPECT_EQ(d->stats().queued_queries, 0u);
  EXPECT_EQ(d->stats().buffers_in_use, 0u);
}

TEST_F(DispatcherTest, SecondReceiveWhileOneIsPendingIsRefused) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> first, second;
  receive_into(*l, first);
  receive_into(*l, second);
  ASSERT_TRUE(run_until(ctx_, [&] { return second.has_value(); }));
  EXPECT_EQ(second->ec, asio::error::already_started);
  EXPECT_FALSE(first.has_value());
  l->cancel();
  ASSERT_TRUE(run_until(ctx_, [&] { return first.has_value(); }));
  EXPECT_EQ(first->ec, asio::error::operation_aborted);
  EXPECT_FALSE(first->ev);
}

}  // namespace
}  // namespace uipc::dispatch
