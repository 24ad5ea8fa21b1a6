// The UDP dispatcher through its facade: every branch of the seed's receive,
// restart, add, detach and event-return flows, IDs, timeouts and the failsafe shutdown.
#include "uipc/dispatch/dispatcher.hpp"

#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstdlib>
#include <functional>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "../../dispatch/src/engine.hpp"  // peer_key, for the scope id test
#include "alloc_fault.hpp"
#include "test_support.hpp"

namespace uipc::dispatch {
namespace {

namespace asio = boost::asio;
using test::run_until;

const udp::endpoint loopback_any(asio::ip::make_address("127.0.0.1"), 0);

/// A 12-byte DNS-style header with `id`, the QR bit and one payload byte (a tag).
std::vector<std::byte> message(std::uint16_t id, bool response, std::uint8_t tag = 0) {
  std::vector<std::byte> m(13, std::byte{0});
  m[0] = static_cast<std::byte>(id >> 8);
  m[1] = static_cast<std::byte>(id & 0xff);
  m[2] = response ? std::byte{0x80} : std::byte{0};
  m[12] = static_cast<std::byte>(tag);
  return m;
}

std::uint8_t tag_of(const event& ev) { return std::to_integer<std::uint8_t>(ev.data()[12]); }

/// What a receive completed with, kept for inspection.
struct received {
  error_code ec;
  event ev;
};

class DispatcherTest : public ::testing::Test {
 protected:
  void SetUp() override { fds_before_ = test::descriptors_with_reactor(ctx_); }

  /// Every test ends here: nothing attached, the socket closed, no descriptor left.
  void TearDown() override {
    ctx_.restart();
    ctx_.poll();
    EXPECT_EQ(test::open_fd_count(), fds_before_) << "a descriptor leaked";
  }

  ref_ptr<dispatcher> make(dispatcher_options options = {}, udp::endpoint local = loopback_any) {
    auto d = dispatcher::create(ctx_, local, options);
    EXPECT_TRUE(d) << d.error().message();
    return d ? *d : nullptr;
  }

  udp::socket peer(const char* address = "127.0.0.1") {
    return udp::socket(ctx_, udp::endpoint(asio::ip::make_address(address), 0));
  }

  void send(udp::socket& from, const std::vector<std::byte>& m, const udp::endpoint& to) {
    from.send_to(asio::buffer(m), to);
  }

  /// Starts a receive whose result lands in `out`.
  template <class Party>
  void receive_into(Party& p, std::optional<received>& out) {
    out.reset();
    p.async_receive([&out](error_code ec, event ev) { out.emplace(received{ec, std::move(ev)}); });
  }

  /// Reads one datagram at `s` (with a deadline).
  std::vector<std::byte> read(udp::socket& s, udp::endpoint* from = nullptr) {
    std::vector<std::byte> buf(2048);
    std::optional<std::size_t> got;
    udp::endpoint sender;
    s.async_receive_from(asio::buffer(buf), sender, [&](error_code ec, std::size_t n) {
      EXPECT_FALSE(ec);
      got = n;
    });
    EXPECT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    buf.resize(got.value_or(0));
    if (from) *from = sender;
    return buf;
  }

  /// Runs the loop until the dispatcher has read `n` datagrams in all.
  void until_received(const ref_ptr<dispatcher>& d, std::uint64_t n) {
    ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().received >= n; }));
    ctx_.poll();
  }

  asio::io_context ctx_;
  std::size_t fds_before_ = 0;
};

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

// ---------------------------------------------------------------- failsafe shutdown

TEST_F(DispatcherTest, SocketErrorShutsDownAndEveryPartyGetsExactlyOneShutdownEvent) {
  auto d = make();
  // Injected error: with IP_RECVERR the kernel reports the ICMP port-unreachable
  // of a datagram to a closed port as ECONNREFUSED on the next receive.
  int on = 1;
  ASSERT_EQ(::setsockopt(d->native_handles().front(), IPPROTO_IP, IP_RECVERR, &on, sizeof on), 0);
  udp::endpoint closed_port;
  {
    auto gone = peer();
    closed_port = gone.local_endpoint();
  }
  auto waiting = d->add_response(closed_port);
  auto idle = d->add_response(closed_port);
  auto l = d->add_listener();
  auto busy = d->add_listener();
  ASSERT_TRUE(waiting && idle && l && busy);
  // `busy` holds a query when the error comes.
  std::optional<received> busy_got;
  receive_into(*busy, busy_got);
  auto client = peer();
  send(client, message(1, false, 1), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return busy_got.has_value(); }));
  event busy_held = std::move(busy_got->ev);
  receive_into(*busy, busy_got);
  std::optional<received> waiting_got, l_got;
  receive_into(*waiting, waiting_got);
  receive_into(*l, l_got);
  ASSERT_TRUE(waiting->send(message(waiting->id(), false)));
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().shutting_down; }));
  ASSERT_TRUE(run_until(ctx_, [&] { return waiting_got.has_value() && l_got.has_value(); }));
  for (auto* got : {&waiting_got, &l_got}) {
    EXPECT_EQ((*got)->ec, make_error_code(errc::shutting_down));
    EXPECT_EQ((*got)->ev.kind(), event_kind::shutdown);
    EXPECT_EQ((*got)->ev.reason(), asio::error::connection_refused)
        << (*got)->ev.reason().message();
  }
  // New work is refused.
  EXPECT_EQ(d->add_response(closed_port).error(), make_error_code(errc::shutting_down));
  EXPECT_EQ(d->add_listener().error(), make_error_code(errc::shutting_down));
  EXPECT_EQ(waiting->send(message(1, false)).error(), make_error_code(errc::shutting_down));
  // The busy listener gets its shutdown event once it returns what it holds;
  // the idle response gets it at its first receive.
  ctx_.poll();
  EXPECT_FALSE(busy_got.has_value());
  busy_held.release();
  ASSERT_TRUE(run_until(ctx_, [&] { return busy_got.has_value(); }));
  EXPECT_EQ(busy_got->ev.kind(), event_kind::shutdown);
  std::optional<received> idle_got;
  receive_into(*idle, idle_got);
  ASSERT_TRUE(run_until(ctx_, [&] { return idle_got.has_value(); }));
  EXPECT_EQ(idle_got->ev.kind(), event_kind::shutdown);
  // Exactly one: the next receive completes with the error and no event.
  for (auto* got : {&waiting_got, &l_got, &busy_got, &idle_got}) (*got)->ev.release();
  std::optional<received> again;
  receive_into(*waiting, again);
  ASSERT_TRUE(run_until(ctx_, [&] { return again.has_value(); }));
  EXPECT_EQ(again->ec, make_error_code(errc::shutting_down));
  EXPECT_FALSE(again->ev);
  EXPECT_EQ(d->stats().buffers_in_use, 0u);
}

TEST_F(DispatcherTest, ExplicitShutdownDeliversShutdownEventsAndLeavesNoWorkOnTheLoop) {
  auto d = make();
  auto server = peer();
  auto l = d->add_listener();
  auto r = d->add_response(server.local_endpoint(), response_options{std::chrono::seconds(30)});
  ASSERT_TRUE(l && r);
  std::optional<received> got;
  receive_into(*l, got);
  ctx_.poll();
  EXPECT_EQ(d->stats().receiving_sockets, 1u);
  d->shutdown();
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ev.kind(), event_kind::shutdown);
  EXPECT_EQ(got->ev.reason(), asio::error::operation_aborted);
  got.reset();
  receive_into(*r, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ev.kind(), event_kind::shutdown);
  got.reset();
  l->detach();
  r->detach();
  // The dispatcher still exists, but holds no receive and no timer: run() returns.
  ctx_.restart();
  const auto start = std::chrono::steady_clock::now();
  ctx_.run_for(std::chrono::seconds(5));
  EXPECT_TRUE(ctx_.stopped());
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(1));
  EXPECT_EQ(d->stats().receiving_sockets, 0u);
}

// ---------------------------------------------------------------- lifetime

TEST_F(DispatcherTest, LastDetachDestroysTheDispatcherAndClosesItsSocket) {
  auto d = make();
  const std::size_t with_socket = test::open_fd_count();
  const auto local = d->local_endpoint();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  d.reset();  // the listener keeps it alive
  EXPECT_EQ(test::open_fd_count(), with_socket);
  std::optional<received> got;
  receive_into(*l, got);
  auto p = peer();
  send(p, message(3, false, 3), local);
  send(p, message(4, false, 4), local);  // stays queued when the listener goes
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  event held = std::move(got->ev);
  l->detach();  // the held event still references the dispatcher
  EXPECT_EQ(test::open_fd_count(), with_socket + 1 /* peer */);
  held.release();  // the last reference: socket closed, queue and buffers freed
  EXPECT_EQ(test::open_fd_count(), with_socket);
}

TEST_F(DispatcherTest, ReceivingStopsWhenNoOneIsAttached) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  ctx_.poll();
  EXPECT_EQ(d->stats().receiving_sockets, 1u);
  l->detach();
  auto p = peer();
  send(p, message(1, false), d->local_endpoint());
  ctx_.run_for(std::chrono::milliseconds(20));
  // The armed receive may read that one datagram (and drop it), then stops.
  ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().receiving_sockets == 0; }));
  send(p, message(2, false), d->local_endpoint());
  ctx_.run_for(std::chrono::milliseconds(20));
  EXPECT_LE(d->stats().received, 1u);
  // Attaching starts it again: the waiting datagram is read at once.
  auto again = d->add_listener();
  std::optional<received> got;
  receive_into(*again, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ev.id(), 2);
}

// ---------------------------------------------------------------- review fixes

// Finding 1: a deferred initiation that runs after the handle detached must
// find the party alive and complete with errc::detached (ASan: no use-after-free).
TEST_F(DispatcherTest, DeferredInitiationAfterDetachCompletesWithDetached) {
  auto d = make();
  auto server = peer();
  auto r = d->add_response(server.local_endpoint());
  auto l = d->add_listener();
  ASSERT_TRUE(r && l);
  auto op = r->async_receive(asio::deferred);
  static const std::array<std::byte, 1> one{};
  auto send_op = r->async_send(one, asio::deferred);
  auto lop = l->async_receive(asio::deferred);
  r->detach();
  l->detach();
  d.reset();  // the deferred operations hold the last references
  std::optional<error_code> got, sent, lgot;
  std::move(op)([&](error_code ec, event ev) {
    EXPECT_FALSE(ev);
    got = ec;
  });
  std::move(send_op)([&](error_code ec) { sent = ec; });
  std::move(lop)([&](error_code ec, event ev) {
    EXPECT_FALSE(ev);
    lgot = ec;
  });
  ASSERT_TRUE(run_until(ctx_, [&] { return got && sent && lgot; }));
  EXPECT_EQ(*got, make_error_code(errc::detached));
  EXPECT_EQ(*sent, make_error_code(errc::detached));
  EXPECT_EQ(*lgot, make_error_code(errc::detached));
}

// Finding 2a: a timeout whose wait completed before shutdown() ran (its handler
// already queued) must not deliver timed_out after the shutdown event, nor
// re-arm the timer for a later deadline and keep the loop busy.
TEST_F(DispatcherTest, NothingButOneShutdownEventAfterShutdownAndTheLoopRunsOutOfWork) {
  auto d = make();
  auto server = peer();
  auto soon =
      d->add_response(server.local_endpoint(), response_options{std::chrono::milliseconds(5)});
  auto late = d->add_response(server.local_endpoint(), response_options{std::chrono::seconds(20)});
  auto idle = d->add_response(server.local_endpoint());  // not waiting when shutdown comes
  auto l = d->add_listener();
  ASSERT_TRUE(soon && late && idle && l);
  // Expires before `soon`'s timeout: both are due at the loop's first look,
  // and this handler (the earlier deadline) runs first.
  asio::steady_timer trigger(ctx_, std::chrono::milliseconds(1));
  trigger.async_wait([&](error_code) { d->shutdown(); });
  std::map<int, std::vector<event_kind>> kinds;
  std::map<int, error_code> last;
  std::function<void(int, response&)> pump_r;
  pump_r = [&](int who, response& r) {
    r.async_receive([&, who](error_code ec, event ev) {
      if (!ev) {
        last[who] = ec;
        r.detach();
        return;
      }
      kinds[who].push_back(ev.kind());
      ev.release();
      pump_r(who, r);
    });
  };
  pump_r(0, *soon);
  pump_r(1, *late);
  l->async_receive([&](error_code ec, event ev) {
    EXPECT_EQ(ec, make_error_code(errc::shutting_down));
    kinds[2].push_back(ev.kind());
    ev.release();
    l->async_receive([&](error_code ec2, event ev2) {
      EXPECT_FALSE(ev2);
      last[2] = ec2;
      l->detach();
    });
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  const auto start = std::chrono::steady_clock::now();
  ctx_.run_for(std::chrono::seconds(10));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3))
      << "the loop kept work after shutdown";
  // The party that was not waiting gets its one shutdown event all the same.
  std::optional<received> got;
  receive_into(*idle, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(got->ev.kind(), event_kind::shutdown);
  got->ev.release();
  receive_into(*idle, got);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_FALSE(got->ev);
  EXPECT_EQ(got->ec, make_error_code(errc::shutting_down));
  for (int who : {0, 1, 2}) {
    EXPECT_EQ(kinds[who], std::vector<event_kind>{event_kind::shutdown}) << "party " << who;
    EXPECT_EQ(last[who], make_error_code(errc::shutting_down)) << "party " << who;
  }
}

// Finding 2c: a send refused or accepted, never sent after the shutdown.
TEST_F(DispatcherTest, SendsAfterShutdownAreRefusedAndNeverGoOut) {
  auto d = make();
  auto server = peer();
  auto r = d->add_response(server.local_endpoint());
  ASSERT_TRUE(r);
  d->shutdown();
  EXPECT_EQ(r->send(message(r->id(), false)).error(), make_error_code(errc::shutting_down));
  std::optional<error_code> sent;
  const auto m = message(r->id(), false);
  r->async_send(m, [&](error_code ec) { sent = ec; });
  ASSERT_TRUE(run_until(ctx_, [&] { return sent.has_value(); }));
  EXPECT_EQ(*sent, make_error_code(errc::shutting_down));
  ctx_.run_for(std::chrono::milliseconds(20));
  EXPECT_EQ(d->stats().sent, 0u);
  EXPECT_EQ(server.available(), 0u);
  EXPECT_EQ(d->stats().buffers_in_use, 0u);
}

// Finding 4: a handler that throws (run inline from a receive batch) leaves
// the dispatcher working: the socket restarts, the thread's state is restored.
TEST_F(DispatcherTest, AHandlerThatThrowsDoesNotStallReceiving) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  bool thrown = false;
  l->async_receive([&](error_code, event ev) {
    ev.release();
    thrown = true;
    throw std::runtime_error("handler failed");
  });
  auto p = peer();
  send(p, message(1, false, 1), d->local_endpoint());
  for (int i = 0; i < 400 && !thrown; ++i) {
    try {
      ctx_.run_for(std::chrono::milliseconds(5));
    } catch (const std::runtime_error&) {
      EXPECT_TRUE(thrown);
    }
    if (ctx_.stopped()) ctx_.restart();
  }
  ASSERT_TRUE(thrown);
  ctx_.restart();
  std::optional<received> got;
  receive_into(*l, got);
  send(p, message(2, false, 2), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec) << got->ec.message();
  EXPECT_EQ(tag_of(got->ev), 2);
  got->ev.release();
  // A send from outside a batch goes to the first socket and out (the batch
  // socket pointer was restored).
  std::optional<error_code> sent;
  const auto m = message(3, false, 3);
  l->async_send_to(m, p.local_endpoint(), [&](error_code ec) { sent = ec; });
  ASSERT_TRUE(run_until(ctx_, [&] { return sent.has_value(); }));
  EXPECT_FALSE(*sent);
  EXPECT_EQ(read(p).size(), 13u);
}

// Finding 7: max_queued_queries = 0 still hands a query to an idle listener.
TEST_F(DispatcherTest, ZeroLengthQueryQueueStillHandsQueriesToAnIdleListener) {
  dispatcher_options o;
  o.max_queued_queries = 0;
  auto d = make(o);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> got;
  receive_into(*l, got);
  ctx_.poll();
  auto p = peer();
  send(p, message(7, false, 7), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec) << got->ec.message();
  EXPECT_EQ(tag_of(got->ev), 7);
  // While it holds the event, there is no room: the next query is dropped.
  send(p, message(8, false, 8), d->local_endpoint());
  until_received(d, 2);
  EXPECT_EQ(d->stats().dropped_queue_full, 1u);
}

// Finding 7: a pool too large to allocate is a bad option, not an exception.
TEST_F(DispatcherTest, HugePoolIsABadOption) {
  dispatcher_options o;
  o.buffers = 0xffffffffu;
  o.buffer_size = std::size_t{1} << 40;
  auto d = dispatcher::create(ctx_, loopback_any, o);
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error(), make_error_code(errc::bad_options));
  o.buffers = 1u << 20;
  o.buffer_size = std::size_t{1} << 30;  // 1 PiB in all
  d = dispatcher::create(ctx_, loopback_any, o);
  ASSERT_FALSE(d);
  EXPECT_EQ(d.error(), make_error_code(errc::bad_options));
}

// Finding 8: a datagram larger than the buffer (MSG_TRUNC) is dropped, not
// delivered cut short.
TEST_F(DispatcherTest, TruncatedDatagramIsDropped) {
  dispatcher_options o;
  o.buffer_size = 64;
  auto d = make(o);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> got;
  receive_into(*l, got);
  auto p = peer();
  auto big = message(1, false, 1);
  big.resize(200, std::byte{0x55});
  send(p, big, d->local_endpoint());
  send(p, message(2, false, 2), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec);
  EXPECT_EQ(tag_of(got->ev), 2);
  EXPECT_EQ(got->ev.data().size(), 13u);
  EXPECT_EQ(d->stats().dropped_short, 1u);
}

// Finding 7: the IPv6 scope id is part of a peer's identity.
TEST(PeerKeyTest, Ipv6ScopeIdDistinguishesPeers) {
  auto a = asio::ip::make_address_v6("fe80::1");
  auto b = a;
  a.scope_id(1);
  b.scope_id(2);
  const auto ka = detail::peer_key::of(udp::endpoint(a, 53));
  const auto kb = detail::peer_key::of(udp::endpoint(b, 53));
  EXPECT_NE(ka, kb);
  EXPECT_EQ(ka, detail::peer_key::of(udp::endpoint(a, 53)));
  EXPECT_NE(detail::peer_key_hash{}(ka), detail::peer_key_hash{}(kb));
}

// Finding 3: an add_response that throws bad_alloc at any allocation leaves no
// trace: neither map names the freed party (ASan: no use-after-free after).
TEST_F(DispatcherTest, AddResponseThatRunsOutOfMemoryLeavesNoTrace) {
  auto d = make();
  auto server = peer();
  std::vector<response> kept;
  int failures = 0;
  for (int k = 1; k <= 12; ++k) {
    // A new peer each time (so per_peer_ inserts) and a new timeout duration
    // (so a timeout list is made): every allocation of the call gets its turn.
    const udp::endpoint to(asio::ip::make_address("127.0.0.1"),
                           static_cast<unsigned short>(40000 + k));
    const auto before = d->stats().responses;
    test::alloc_fail_countdown() = k;
    bool threw = false;
    try {
      auto r = d->add_response(to, response_options{std::chrono::seconds(100 + k)});
      test::alloc_fail_countdown() = 0;
      if (r) kept.push_back(std::move(*r));
    } catch (const std::bad_alloc&) {
      test::alloc_fail_countdown() = 0;
      threw = true;
      ++failures;
    }
    test::alloc_fail_countdown() = 0;
    EXPECT_EQ(d->stats().responses, before + (threw ? 0 : 1)) << "allocation " << k;
  }
  EXPECT_GT(failures, 1);
  // Everything still works: a transaction with the server.
  auto r = d->add_response(server.local_endpoint());
  ASSERT_TRUE(r);
  std::optional<received> got;
  receive_into(*r, got);
  ASSERT_TRUE(r->send(message(r->id(), false)));
  udp::endpoint client;
  read(server, &client);
  send(server, message(r->id(), true, 9), client);
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(tag_of(got->ev), 9);
  got.reset();
  kept.clear();
  r->detach();
  EXPECT_EQ(d->stats().responses, 0u);
}

}  // namespace
}  // namespace uipc::dispatch
