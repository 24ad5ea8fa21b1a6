// The dispatcher's responses: reply matching, IDs, timeouts, cancel and detach, IPv6.
#include "dispatch_support.hpp"

namespace uipc::dispatch {
namespace {

// ---------------------------------------------------------------- responses

TEST_F(DispatcherTest, ReplyIsMatchedByIdAndPeerAddressAndPort) {
  auto d = make();
  auto server = peer();
  auto r = d->add_response(server.local_endpoint());
  ASSERT_TRUE(r);
  std::optional<received> got;
  receive_into(*r, got);
  ASSERT_TRUE(r->send(message(r->id(), false, 1)));
  udp::endpoint client;
  auto query = read(server, &client);
  ASSERT_EQ(query.size(), 13u);
  EXPECT_EQ(std::to_integer<unsigned>(query[0]) << 8 | std::to_integer<unsigned>(query[1]),
            r->id());
  EXPECT_EQ(client, d->local_endpoint());

  auto other_port = peer();
  // The SAME port number as the server, on another loopback address: a matcher
  // that checked only the port would take this one.
  udp::socket other_address(
      ctx_, udp::endpoint(asio::ip::make_address("127.0.0.2"), server.local_endpoint().port()));
  ASSERT_EQ(other_address.local_endpoint().port(), server.local_endpoint().port());
  send(other_port, message(r->id(), true, 2), d->local_endpoint());  // same address, wrong port
  send(other_address, message(r->id(), true, 3),
       d->local_endpoint());  // same port number, wrong address
  send(server, message(static_cast<std::uint16_t>(r->id() + 1), true, 4),
       d->local_endpoint());                                     // wrong ID
  send(server, message(r->id(), true, 5), d->local_endpoint());  // the reply
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec);
  EXPECT_EQ(tag_of(got->ev), 5);
  EXPECT_EQ(got->ev.peer(), server.local_endpoint());
  EXPECT_EQ(d->stats().dropped_unmatched, 3u);
}

TEST_F(DispatcherTest, RepliesQueueInOrderPerResponseAndTheQueueIsBounded) {
  dispatcher_options o;
  o.max_queued_per_response = 3;
  auto d = make(o);
  auto server = peer();
  auto r = d->add_response(server.local_endpoint());
  ASSERT_TRUE(r);
  for (std::uint8_t i = 0; i < 5; ++i) send(server, message(r->id(), true, i), d->local_endpoint());
  until_received(d, 5);
  EXPECT_EQ(d->stats().dropped_queue_full, 2u);
  for (std::uint8_t expected = 0; expected < 3; ++expected) {
    std::optional<received> got;
    receive_into(*r, got);
    ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    EXPECT_EQ(tag_of(got->ev), expected);
  }
}

TEST_F(DispatcherTest, AsyncSendCompletesAndListenerSendsAnywhere) {
  auto d = make();
  auto server = peer();
  auto r = d->add_response(server.local_endpoint());
  auto l = d->add_listener();
  ASSERT_TRUE(r && l);
  const auto query = message(r->id(), false, 8);
  std::optional<error_code> sent;
  r->async_send(query, [&](error_code ec) { sent = ec; });
  ASSERT_TRUE(run_until(ctx_, [&] { return sent.has_value(); }));
  EXPECT_FALSE(*sent);
  EXPECT_EQ(read(server).size(), 13u);
  sent.reset();
  const auto note = message(1, false, 9);
  l->async_send_to(note, server.local_endpoint(), [&](error_code ec) { sent = ec; });
  ASSERT_TRUE(run_until(ctx_, [&] { return sent.has_value(); }));
  EXPECT_FALSE(*sent);
  EXPECT_EQ(std::to_integer<int>(read(server)[12]), 9);
  EXPECT_EQ(d->stats().sent, 2u);
}

TEST_F(DispatcherTest, IdsAreUniquePerPeerUntilExhaustedThenFailClearly) {
  auto d = make();
  const udp::endpoint server(asio::ip::make_address("127.0.0.1"), 5353);
  std::vector<response> all;
  all.reserve(65536);
  std::vector<bool> seen(65536, false);
  for (int i = 0; i < 65536; ++i) {
    auto r = d->add_response(server);
    ASSERT_TRUE(r) << "at " << i << ": " << r.error().message();
    ASSERT_FALSE(seen[r->id()]) << "ID " << r->id() << " given twice";
    seen[r->id()] = true;
    all.push_back(std::move(*r));
  }
  auto none = d->add_response(server);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error(), make_error_code(errc::no_free_id));
  // Another port is another peer, with IDs of its own.
  auto elsewhere = d->add_response(udp::endpoint(server.address(), 5354));
  EXPECT_TRUE(elsewhere);
  // Detaching frees exactly that ID.
  const std::uint16_t freed = all[12345].id();
  all[12345].detach();
  auto again = d->add_response(server);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->id(), freed);
  EXPECT_EQ(d->stats().responses, 65537u);
}

TEST_F(DispatcherTest, IdsAreNotSequentialOrPredictable) {
  auto d = make();
  const udp::endpoint server(asio::ip::make_address("127.0.0.1"), 5353);
  std::vector<std::uint16_t> ids;
  for (int i = 0; i < 4000; ++i) {
    auto r = d->add_response(server);  // detached at once: each draw is over the whole space
    ASSERT_TRUE(r);
    ids.push_back(r->id());
  }
  int successors = 0;
  int small_steps = 0;
  std::array<int, 16> buckets{};
  for (std::size_t i = 1; i < ids.size(); ++i) {
    const int step = (ids[i] - ids[i - 1] + 65536) % 65536;
    successors += step == 1;
    small_steps += step < 64 || step > 65536 - 64;
  }
  for (auto id : ids) ++buckets[id >> 12];
  // A sequential or near-sequential allocator has successors near 4000; a
  // uniform one ~0.06 and ~8 small steps in 4000 draws.
  EXPECT_LE(successors, 3);
  EXPECT_LE(small_steps, 40);
  for (int b : buckets) EXPECT_GT(b, 150) << "IDs are not spread over the space";
  EXPECT_GT(std::set<std::uint16_t>(ids.begin(), ids.end()).size(), 3800u);
}

TEST_F(DispatcherTest, TimeoutDeliversOneTimedOutEventAfterQueuedReplies) {
  auto d = make();
  auto server = peer();
  auto r =
      d->add_response(server.local_endpoint(), response_options{std::chrono::milliseconds(50)});
  ASSERT_TRUE(r);
  send(server, message(r->id(), true, 1), d->local_endpoint());
  until_received(d, 1);
  ctx_.run_for(std::chrono::milliseconds(80));  // the timeout passes while the reply waits
  std::optional<received> got;
  receive_into(*r, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_FALSE(got->ec);
  EXPECT_EQ(tag_of(got->ev), 1);
  got->ev.release();
  receive_into(*r, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ec, make_error_code(errc::timed_out));
  EXPECT_EQ(got->ev.kind(), event_kind::timed_out);
  EXPECT_EQ(got->ev.id(), r->id());
  EXPECT_EQ(d->stats().timeouts, 1u);
}

TEST_F(DispatcherTest, PendingReceiveTimesOut) {
  auto d = make();
  auto server = peer();
  auto r =
      d->add_response(server.local_endpoint(), response_options{std::chrono::milliseconds(30)});
  ASSERT_TRUE(r);
  std::optional<received> got;
  receive_into(*r, got);
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(25));
  EXPECT_EQ(got->ec, make_error_code(errc::timed_out));
}

TEST_F(DispatcherTest, TimeoutsOfDifferentLengthsFireInDeadlineOrderAndDetachedOnesNever) {
  auto d = make();
  auto server = peer();
  auto slow =
      d->add_response(server.local_endpoint(), response_options{std::chrono::milliseconds(120)});
  auto fast =
      d->add_response(server.local_endpoint(), response_options{std::chrono::milliseconds(30)});
  auto gone =
      d->add_response(server.local_endpoint(), response_options{std::chrono::milliseconds(20)});
  auto middle =
      d->add_response(server.local_endpoint(), response_options{std::chrono::milliseconds(60)});
  ASSERT_TRUE(slow && fast && gone && middle);
  std::vector<std::uint16_t> order;
  for (auto* r : {&*slow, &*fast, &*middle}) {
    r->async_receive([&order, id = r->id()](error_code ec, event) {
      if (ec == make_error_code(errc::timed_out)) order.push_back(id);
    });
  }
  gone->detach();  // the earliest deadline, gone before it passes
  ASSERT_TRUE(run_until(ctx_, [&] { return order.size() == 3; }));
  EXPECT_EQ(order, (std::vector<std::uint16_t>{fast->id(), middle->id(), slow->id()}));
  EXPECT_EQ(d->stats().timeouts, 3u);
}

TEST_F(DispatcherTest, CancelAbortsTheReceiveAndStopsTheTimeoutButKeepsTheResponse) {
  auto d = make();
  auto server = peer();
  auto r =
      d->add_response(server.local_endpoint(), response_options{std::chrono::milliseconds(40)});
  ASSERT_TRUE(r);
  std::optional<received> got;
  receive_into(*r, got);
  r->cancel();
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ec, asio::error::operation_aborted);
  ctx_.run_for(std::chrono::milliseconds(80));
  EXPECT_EQ(d->stats().timeouts, 0u);
  // Still attached: a reply still reaches it.
  send(server, message(r->id(), true, 3), d->local_endpoint());
  receive_into(*r, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_FALSE(got->ec);
  EXPECT_EQ(tag_of(got->ev), 3);
}

TEST_F(DispatcherTest, DetachAbortsAPendingReceiveAndFreesQueuedReplies) {
  auto d = make();
  auto server = peer();
  auto r = d->add_response(server.local_endpoint());
  auto r2 = d->add_response(server.local_endpoint());
  ASSERT_TRUE(r && r2);
  std::optional<received> got;
  receive_into(*r, got);
  send(server, message(r2->id(), true), d->local_endpoint());
  send(server, message(r2->id(), true), d->local_endpoint());
  until_received(d, 2);
  EXPECT_EQ(d->stats().buffers_in_use, 2u);
  r2->detach();
  EXPECT_EQ(d->stats().buffers_in_use, 0u);
  r->detach();
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ec, asio::error::operation_aborted);
  EXPECT_EQ(d->stats().responses, 0u);
}

TEST_F(DispatcherTest, AddressFamilyMismatchIsRefused) {
  auto d = make();
  auto r = d->add_response(udp::endpoint(asio::ip::make_address("::1"), 53));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), asio::error::address_family_not_supported);
}

TEST_F(DispatcherTest, WorksOverIpv6) {
  auto made = dispatcher::create(ctx_, udp::endpoint(asio::ip::make_address("::1"), 0));
  if (!made) GTEST_SKIP() << "no IPv6 loopback: " << made.error().message();
  auto d = *made;
  udp::socket server(ctx_, udp::endpoint(asio::ip::make_address("::1"), 0));
  auto r = d->add_response(server.local_endpoint());
  ASSERT_TRUE(r);
  std::optional<received> got;
  receive_into(*r, got);
  ASSERT_TRUE(r->send(message(r->id(), false)));
  udp::endpoint client;
  read(server, &client);
  send(server, message(r->id(), true, 6), client);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(tag_of(got->ev), 6);
}

}  // namespace
}  // namespace uipc::dispatch
