// The dispatcher's review fixes: one test per finding.
#include "../../dispatch/src/engine.hpp"  // peer_key, for the scope id test
#include "alloc_fault.hpp"
#include "dispatch_support.hpp"

namespace uipc::dispatch {
namespace {

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
