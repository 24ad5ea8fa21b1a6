// The receive path when memory runs out while a datagram is classified (the
// seed's "cannot allocate: free the buffer, restart"), through alloc_fault.
#include "alloc_fault.hpp"
#include "dispatch_support.hpp"

namespace uipc::dispatch {
namespace {

/// Arms the fault injection for the loop's next allocation on this thread (the
/// test runs the loop), and disarms it whatever happens.
class fail_next_allocation {
 public:
  fail_next_allocation() { test::alloc_fail_countdown() = 1; }
  ~fail_next_allocation() { test::alloc_fail_countdown() = 0; }
  fail_next_allocation(const fail_next_allocation&) = delete;
  fail_next_allocation& operator=(const fail_next_allocation&) = delete;
  /// The armed allocation happened (and threw).
  static bool hit() { return test::alloc_fail_countdown() == 0; }
};

// A query that arrives while the listener holds an event must wait in the
// query queue; when that queue cannot grow, the query is dropped and counted,
// its buffer goes back, the ones queued before it stay, and receiving goes on.
TEST_F(DispatcherTest, QueryThatCannotBeQueuedForLackOfMemoryIsDroppedCountedAndFreed) {
  dispatcher_options o;
  o.buffers = 64;
  o.max_queued_queries = 64;
  auto d = make(o);
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> got;
  receive_into(*l, got);
  auto p = peer();
  send(p, message(0, false, 0), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec);
  event held = std::move(got->ev);  // kept: later queries queue

  // Queries one at a time, each with the loop's next allocation armed to fail,
  // until one of them needs the queue to grow (the allocation is then used up).
  // The messages are built before arming: only the loop may allocate meanwhile.
  std::vector<std::vector<std::byte>> queries;
  for (std::uint8_t tag = 1; tag <= 40; ++tag) queries.push_back(message(tag, false, tag));
  std::uint8_t dropped_tag = 0;
  for (std::uint8_t tag = 1; tag <= 40 && dropped_tag == 0; ++tag) {
    bool hit = false;
    {
      fail_next_allocation armed;
      send(p, queries[tag - 1], d->local_endpoint());
      // An exception out of the loop is what this test guards against: the
      // receive path must catch it.
      ASSERT_NO_THROW(
          ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().received >= 1u + tag; })));
      hit = fail_next_allocation::hit();
    }
    if (hit) dropped_tag = tag;
  }
  ASSERT_NE(dropped_tag, 0) << "the query queue never had to grow: nothing was tested";
  auto st = d->stats();
  EXPECT_EQ(st.dropped_no_memory, 1u);
  EXPECT_EQ(st.queued_queries, dropped_tag - 1u);  // the ones before it, still queued
  EXPECT_EQ(st.buffers_in_use, dropped_tag);       // theirs and the held event's: none leaked
  EXPECT_EQ(st.buffers_lent, 1u);
  EXPECT_EQ(st.receiving_sockets, 1u);  // not left stuck "receiving" or stopped

  // Receiving goes on: one more query, after the queued ones.
  send(p, message(99, false, 99), d->local_endpoint());
  until_received(d, dropped_tag + 2u);
  held.release();
  std::vector<int> order;
  while (order.size() < dropped_tag) {
    receive_into(*l, got);
    ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    ASSERT_FALSE(got->ec) << got->ec.message();
    order.push_back(tag_of(got->ev));
    got->ev.release();
  }
  std::vector<int> expected;
  for (int tag = 1; tag < dropped_tag; ++tag) expected.push_back(tag);
  expected.push_back(99);  // the dropped one never comes
  EXPECT_EQ(order, expected);
  st = d->stats();
  EXPECT_EQ(st.buffers_in_use, 0u);
  EXPECT_EQ(st.buffers_lent, 0u);
  EXPECT_EQ(st.queued_queries, 0u);
  EXPECT_EQ(st.dropped_no_memory, 1u);
}

// The same for a reply: a response's reply queue that cannot grow drops the
// reply (counted, buffer freed); the response stays attached, its receive still
// waits, and the peer's next reply is delivered.
TEST_F(DispatcherTest, ReplyThatCannotBeQueuedForLackOfMemoryIsDroppedAndTheResponseKeepsWaiting) {
  auto d = make();
  auto server = peer();
  auto r = d->add_response(server.local_endpoint());
  ASSERT_TRUE(r);
  std::optional<received> got;
  receive_into(*r, got);
  const auto first = message(r->id(), true, 1);
  const auto second = message(r->id(), true, 2);
  // A fresh response's reply queue is empty; its first reply makes it grow.
  {
    fail_next_allocation armed;
    send(server, first, d->local_endpoint());
    ASSERT_NO_THROW(ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().received >= 1u; })));
    ASSERT_TRUE(fail_next_allocation::hit())
        << "the reply needed no allocation: nothing was tested";
  }
  ctx_.poll();
  EXPECT_FALSE(got.has_value());  // dropped, not delivered, and the receive still waits
  auto st = d->stats();
  EXPECT_EQ(st.dropped_no_memory, 1u);
  EXPECT_EQ(st.buffers_in_use, 0u);
  EXPECT_EQ(st.responses, 1u);
  EXPECT_EQ(st.receiving_sockets, 1u);

  send(server, second, d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  ASSERT_FALSE(got->ec) << got->ec.message();
  EXPECT_EQ(tag_of(got->ev), 2);
  got.reset();
  r->detach();
  st = d->stats();
  EXPECT_EQ(st.buffers_in_use, 0u);
  EXPECT_EQ(st.buffers_lent, 0u);
  EXPECT_EQ(st.dropped_no_memory, 1u);
}

}  // namespace
}  // namespace uipc::dispatch
