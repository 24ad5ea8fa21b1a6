// The dispatcher's failsafe shutdown and its lifetime.
#include <boost/asio/bind_allocator.hpp>
#include <cstdlib>

#include "alloc_fault.hpp"
#include "dispatch_support.hpp"

namespace uipc::dispatch {
namespace {

/// Allocates with malloc, not operator new: a completion whose handler carries
/// it is posted without an allocation that the fault injection counts.
template <class T>
struct malloc_allocator {
  using value_type = T;
  malloc_allocator() noexcept = default;
  template <class U>
  malloc_allocator(const malloc_allocator<U>& /*other*/) noexcept {}  // NOLINT: rebinding
  T* allocate(std::size_t n) {
    if (void* p = std::malloc(n * sizeof(T))) return static_cast<T*>(p);
    throw std::bad_alloc();
  }
  void deallocate(T* p, std::size_t /*n*/) noexcept { std::free(p); }
  template <class U>
  bool operator==(const malloc_allocator<U>& /*other*/) const noexcept {
    return true;
  }
};

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

// A shutdown() that runs out of memory, at any allocation of its own, changes
// nothing (a later one gives every party its event) or shuts down with every
// waiting party's event on its way: never shut down halfway, with the events
// of the parties it had not reached lost.
TEST_F(DispatcherTest, ShutdownThatRunsOutOfMemoryLosesNoPartysShutdownEvent) {
  int failures = 0;
  for (int k = 1; k <= 8; ++k) {
    auto d = make();
    auto server = peer();
    auto r = d->add_response(server.local_endpoint());
    auto l = d->add_listener();
    auto other = d->add_listener();
    ASSERT_TRUE(r && l && other);
    std::vector<received> events;
    // Posting the events allocates through the handlers' allocator: only the
    // dispatcher's own allocations meet the injected failure.
    const auto record = [&] {
      return asio::bind_allocator(malloc_allocator<void>(), [&](error_code ec, event ev) {
        events.push_back(received{ec, std::move(ev)});
      });
    };
    r->async_receive(record());
    l->async_receive(record());
    other->async_receive(record());
    ctx_.poll();
    test::alloc_fail_countdown() = k;
    bool threw = false;
    try {
      d->shutdown();
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    test::alloc_fail_countdown() = 0;
    if (threw) {
      ++failures;
      EXPECT_FALSE(d->stats().shutting_down) << "allocation " << k << ": shut down halfway";
      d->shutdown();
    }
    ASSERT_TRUE(run_until(
        ctx_, [&] { return events.size() == 3; }, std::chrono::seconds(2)))
        << "allocation " << k << ": " << events.size() << " of 3 events";
    for (const auto& e : events) EXPECT_EQ(e.ev.kind(), event_kind::shutdown) << "allocation " << k;
  }
  EXPECT_GT(failures, 0);
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

// ---------------------------------------------------------------- stop_receiving

// A draining server: queries already read are answered, later ones stay in the
// kernel, and the count it drains against no longer moves.
TEST_F(DispatcherTest, StopReceivingLeavesNewDatagramsInTheKernelAndKeepsWhatWasRead) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  auto p = peer();
  for (std::uint8_t i = 1; i <= 3; ++i) send(p, message(i, false, i), d->local_endpoint());
  until_received(d, 3);  // queued: the listener has not asked yet
  EXPECT_EQ(d->stats().queued_queries, 3u);
  d->stop_receiving();
  d->stop_receiving();  // idempotent
  EXPECT_TRUE(d->stats().receiving_stopped);
  for (std::uint8_t i = 4; i <= 5; ++i) send(p, message(i, false, i), d->local_endpoint());
  ctx_.run_for(std::chrono::milliseconds(30));
  EXPECT_EQ(d->stats().received, 3u);
  // What was read is still delivered, in order, and can be answered.
  for (std::uint8_t i = 1; i <= 3; ++i) {
    std::optional<received> got;
    receive_into(*l, got);
    ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    ASSERT_FALSE(got->ec) << got->ec.message();
    EXPECT_EQ(tag_of(got->ev), i);
    ASSERT_TRUE(l->reply(std::move(got->ev), message(i, true, i)));
  }
  for (std::uint8_t i = 1; i <= 3; ++i) EXPECT_EQ(read(p)[12], std::byte{i});
  // A listener asking now waits: nothing more is read.
  std::optional<received> waiting;
  receive_into(*l, waiting);
  ctx_.run_for(std::chrono::milliseconds(30));
  EXPECT_FALSE(waiting.has_value());
  EXPECT_EQ(d->stats().received, 3u);
  EXPECT_EQ(d->stats().receiving_sockets, 0u);
  // The two late datagrams are still in the socket's kernel buffer.
  std::array<std::byte, 64> buf{};
  const int fd = d->native_handles().front();
  for (std::uint8_t i = 4; i <= 5; ++i) {
    const ssize_t n = ::recv(fd, buf.data(), buf.size(), MSG_DONTWAIT);
    ASSERT_EQ(n, 13);
    EXPECT_EQ(buf[12], std::byte{i});
  }
  d->shutdown();
  ASSERT_TRUE(run_until(ctx_, [&] { return waiting.has_value(); }));
  EXPECT_EQ(waiting->ev.kind(), event_kind::shutdown);
  waiting->ev.release();
  l->detach();
  EXPECT_EQ(d->stats().buffers_in_use, 0u);
}

// Called from the handler that took a query (as a server's drain may be), it
// returns at once: the handler's own batch is already classified.
TEST_F(DispatcherTest, StopReceivingFromAHandlerReturnsAndTheRestOfTheBatchIsDelivered) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  auto p = peer();
  int delivered = 0;
  std::function<void()> next = [&] {
    l->async_receive([&](error_code ec, event ev) {
      if (ec) return;
      if (++delivered == 1) d->stop_receiving();
      ev.release();
      next();
    });
  };
  next();
  for (std::uint8_t i = 1; i <= 4; ++i) send(p, message(i, false, i), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return delivered >= 1; }));
  ctx_.run_for(std::chrono::milliseconds(30));
  const auto st = d->stats();
  EXPECT_TRUE(st.receiving_stopped);
  EXPECT_EQ(static_cast<std::uint64_t>(delivered), st.received) << "read but not delivered";
  EXPECT_LE(st.received, 4u);
  d->shutdown();
  ctx_.run_for(std::chrono::milliseconds(10));
  l->detach();
}

}  // namespace
}  // namespace uipc::dispatch
