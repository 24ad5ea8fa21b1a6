// Listener replies made inside a receive batch. A handler run inline on the loop
// thread that answers with listener::reply() does not return its event under
// the lock at once: the return is left to that thread's next lock (the
// handler's next async_receive, as a rule) or to the batch's end. These tests
// check that nothing is lost that way, whatever the handler does after its
// reply: re-arm or not, detach, throw, shut down, or reply a second time.
#include "dispatch_support.hpp"

namespace uipc::dispatch {
namespace {

/// Answers a query in place: the same message with the QR bit set.
result<void> answer(listener& l, event&& ev) {
  auto data = ev.data();
  data[2] |= std::byte{0x80};
  return l.reply(std::move(ev), data);
}

/// Reads every datagram that reaches a peer socket, keeping the IDs of the
/// answers (QR set) and counting anything else.
class collector {
 public:
  explicit collector(udp::socket& s) : s_(s) { start(); }
  ~collector() {
    error_code ignored;
    s_.cancel(ignored);
  }
  collector(const collector&) = delete;
  collector& operator=(const collector&) = delete;

  std::vector<std::uint16_t> ids;  // in arrival order
  int not_answers = 0;
  int wrong_sender = 0;
  udp::endpoint expected_sender;

 private:
  void start() {
    s_.async_receive_from(asio::buffer(buf_), from_, [this](error_code ec, std::size_t n) {
      if (ec) return;  // cancelled: `this` may be gone, touch nothing
      if (n == 13 && (std::to_integer<int>(buf_[2]) & 0x80) != 0) {
        ids.push_back(static_cast<std::uint16_t>(std::to_integer<int>(buf_[0]) << 8 |
                                                 std::to_integer<int>(buf_[1])));
      } else {
        ++not_answers;
      }
      if (expected_sender != udp::endpoint{} && from_ != expected_sender) ++wrong_sender;
      start();
    });
  }
  udp::socket& s_;
  std::array<std::byte, 2048> buf_{};
  udp::endpoint from_;
};

class DispatcherReplyTest : public DispatcherTest {
 protected:
  /// Sends three queries; `l`'s handler answers the first and detaches `l`
  /// inside the handler, without asking for more. Returns once both happened.
  void answer_first_of_three_then_detach(const ref_ptr<dispatcher>& d, listener& l,
                                         udp::socket& client, const collector& answers) {
    bool detached = false;
    l.async_receive([&](error_code ec, event ev) {
      ASSERT_FALSE(ec);
      EXPECT_TRUE(answer(l, std::move(ev)));
      l.detach();
      detached = true;
    });
    for (std::uint8_t i = 1; i <= 3; ++i) send(client, message(i, false, i), d->local_endpoint());
    ASSERT_TRUE(run_until(ctx_, [&] { return detached && answers.ids.size() == 1; }));
  }

  /// Runs the loop until `done()`, catching what handlers throw out of it;
  /// returns how many exceptions came out.
  int run_catching(const std::function<bool()>& done,
                   std::chrono::milliseconds deadline = std::chrono::seconds(10)) {
    const auto until = std::chrono::steady_clock::now() + deadline;
    int caught = 0;
    if (ctx_.stopped()) ctx_.restart();
    while (!done()) {
      if (std::chrono::steady_clock::now() > until) {
        ADD_FAILURE() << "deadline passed before the condition held";
        break;
      }
      try {
        ctx_.run_for(std::chrono::milliseconds(5));
      } catch (const std::runtime_error&) {
        ++caught;
      }
      if (ctx_.stopped()) ctx_.restart();
    }
    return caught;
  }

  /// Every buffer back, none lent, no query left waiting.
  void expect_nothing_held(const ref_ptr<dispatcher>& d) {
    EXPECT_TRUE(run_until(ctx_, [&] { return d->stats().buffers_in_use == 0; }))
        << "buffers in use: " << d->stats().buffers_in_use;
    EXPECT_EQ(d->stats().buffers_lent, 0u);
    EXPECT_EQ(d->stats().queued_queries, 0u);
  }

  /// `count` listeners that each answer and re-arm inside their handler answer
  /// `total` queries sent in bursts of `burst`: every answer arrives, once.
  void answer_in_bursts(std::size_t count, int total, int burst) {
    auto d = make();
    std::vector<listener> ls;
    std::vector<int> handled(count, 0);
    std::function<void(std::size_t)> arm = [&](std::size_t k) {
      ls[k].async_receive([&, k](error_code ec, event ev) {
        if (ec) return;  // aborted at the end
        ++handled[k];
        EXPECT_TRUE(answer(ls[k], std::move(ev)));
        arm(k);
      });
    };
    for (std::size_t k = 0; k < count; ++k) {
      auto l = d->add_listener();
      ASSERT_TRUE(l);
      ls.push_back(std::move(*l));
    }
    for (std::size_t k = 0; k < count; ++k) arm(k);
    auto client = peer();
    collector answers(client);
    answers.expected_sender = d->local_endpoint();
    for (int sent = 0; sent < total;) {
      for (int i = 0; i < burst && sent < total; ++i, ++sent)
        send(client, message(static_cast<std::uint16_t>(sent), false), d->local_endpoint());
      ASSERT_TRUE(
          run_until(ctx_, [&] { return answers.ids.size() >= static_cast<std::size_t>(sent); }))
          << answers.ids.size() << " answers for " << sent << " queries";
    }
    ctx_.poll();
    // Each query answered exactly once, and in order: one socket, one thread,
    // queries served first come first served.
    std::vector<std::uint16_t> expected(static_cast<std::size_t>(total));
    for (int i = 0; i < total; ++i)
      expected[static_cast<std::size_t>(i)] = static_cast<std::uint16_t>(i);
    EXPECT_EQ(answers.ids, expected);
    EXPECT_EQ(answers.not_answers, 0);
    EXPECT_EQ(answers.wrong_sender, 0);
    int all_handled = 0;
    for (int h : handled) all_handled += h;
    EXPECT_EQ(all_handled, total);
    const auto st = d->stats();
    EXPECT_EQ(st.received, static_cast<std::uint64_t>(total));
    EXPECT_EQ(st.sent, static_cast<std::uint64_t>(total));
    EXPECT_EQ(
        st.dropped_queue_full + st.dropped_no_listener + st.dropped_no_memory + st.send_errors, 0u);
    expect_nothing_held(d);
    EXPECT_EQ(st.listeners, count);
    ls.clear();  // detached: the pending receives complete aborted
    ctx_.poll();
  }

  // d. One handler answers events of two listeners: the first reply takes the
  // deferred path, the second the locked one. Both answers arrive, and both
  // listeners get their next queries.
  void two_listeners_two_replies(bool own_first) {
    auto d = make();
    auto client = peer();
    auto l1 = d->add_listener();
    auto l2 = d->add_listener();
    ASSERT_TRUE(l1 && l2);
    std::optional<event> stash;  // l1's query, answered from l2's handler
    std::vector<event> held;     // second round: kept, one per listener
    int l1_second = 0, l2_second = 0;
    auto keep = [&](int* count) {
      return [&, count](error_code ec, event ev) {
        if (ec) return;  // aborted at the end
        ++*count;
        held.push_back(std::move(ev));
      };
    };
    // l1 (first in line) keeps its query and waits again at once.
    l1->async_receive([&](error_code ec, event ev) {
      ASSERT_FALSE(ec);
      stash = std::move(ev);
      l1->async_receive(keep(&l1_second));
    });
    l2->async_receive([&](error_code ec, event ev) {
      ASSERT_FALSE(ec);
      ASSERT_TRUE(stash.has_value()) << "l2 was served before l1";
      if (own_first) {
        EXPECT_TRUE(answer(*l2, std::move(ev)));
        EXPECT_TRUE(answer(*l1, std::move(*stash)));
      } else {
        EXPECT_TRUE(answer(*l1, std::move(*stash)));
        EXPECT_TRUE(answer(*l2, std::move(ev)));
      }
      l2->async_receive(keep(&l2_second));
    });
    collector answers(client);
    answers.expected_sender = d->local_endpoint();
    send(client, message(1, false, 1), d->local_endpoint());
    send(client, message(2, false, 2), d->local_endpoint());
    ASSERT_TRUE(run_until(ctx_, [&] { return answers.ids.size() == 2; }));
    std::vector<std::uint16_t> ids = answers.ids;
    std::sort(ids.begin(), ids.end());
    EXPECT_EQ(ids, (std::vector<std::uint16_t>{1, 2}));
    EXPECT_EQ(answers.wrong_sender, 0);
    // Second round: one query each. A listener left "holding" would get none,
    // and the other could take only one.
    send(client, message(3, false, 3), d->local_endpoint());
    send(client, message(4, false, 4), d->local_endpoint());
    ASSERT_TRUE(run_until(
        ctx_, [&] { return held.size() == 2; }, std::chrono::seconds(3)))
        << "l1 got " << l1_second << ", l2 got " << l2_second;
    EXPECT_EQ(l1_second, 1);
    EXPECT_EQ(l2_second, 1);
    held.clear();
    EXPECT_TRUE(run_until(ctx_, [&] { return d->stats().buffers_in_use == 0; }));
    EXPECT_EQ(d->stats().buffers_lent, 0u);
    l1->detach();
    l2->detach();
    ctx_.poll();
  }

  enum class after_reply { shutdown_then_rearm, rearm_then_shutdown, shutdown_only };

  /// A handler answers its query and calls dispatcher::shutdown(), re-arming
  /// before, after, or not at all (then the test re-arms from outside): the
  /// listener gets exactly one shutdown event, and nothing leaks.
  void reply_and_shut_down(after_reply order) {
    auto d = make();
    auto l = d->add_listener();
    ASSERT_TRUE(l);
    int shutdown_events = 0;
    int other_events = 0;
    std::optional<error_code> refused;  // the receive after the shutdown event
    std::function<void()> arm = [&] {
      l->async_receive([&](error_code ec, event ev) {
        if (ev && ev.kind() == event_kind::shutdown) {
          EXPECT_EQ(ec, make_error_code(errc::shutting_down));
          EXPECT_EQ(ev.reason(), asio::error::operation_aborted);
          ++shutdown_events;
          // Exactly one: the next receive completes with the error and no event.
          l->async_receive([&](error_code again, event none) {
            EXPECT_FALSE(none);
            refused = again;
          });
        } else {
          ++other_events;
        }
      });
    };
    bool answered = false;
    l->async_receive([&](error_code ec, event ev) {
      ASSERT_FALSE(ec);
      EXPECT_TRUE(answer(*l, std::move(ev)));
      answered = true;
      if (order == after_reply::rearm_then_shutdown) arm();
      d->shutdown();
      if (order == after_reply::shutdown_then_rearm) arm();
    });
    auto client = peer();
    send(client, message(1, false), d->local_endpoint());
    ASSERT_TRUE(run_until(ctx_, [&] { return answered; }));
    if (order == after_reply::shutdown_only) {
      // Re-armed later, outside the batch: the event's return was applied at
      // the batch's end, or the shutdown event could never come.
      ctx_.poll();
      EXPECT_EQ(shutdown_events, 0);
      asio::post(ctx_, [&] { arm(); });
    }
    ASSERT_TRUE(run_until(
        ctx_, [&] { return refused.has_value(); }, std::chrono::seconds(3)));
    ctx_.poll();
    EXPECT_EQ(*refused, make_error_code(errc::shutting_down));
    EXPECT_EQ(shutdown_events, 1);
    EXPECT_EQ(other_events, 0);
    EXPECT_TRUE(d->stats().shutting_down);
    EXPECT_TRUE(run_until(ctx_, [&] { return d->stats().buffers_in_use == 0; }));
    EXPECT_EQ(d->stats().buffers_lent, 0u);
    l->detach();
    d.reset();
    // Once every party has detached, the dispatcher leaves no work on the loop.
    ctx_.restart();
    EXPECT_LT(ctx_.run_for(std::chrono::seconds(2)), 100u);
    EXPECT_TRUE(ctx_.stopped()) << "work left on the loop after the shutdown";
  }
};

// ---------------------------------------------------------------- the answer loop

// a. The usual loop: answer, re-arm, inside the handler; queries come in bursts,
// so most are delivered by the re-arm from the same batch.
TEST_F(DispatcherReplyTest, AnswerAndRearmInTheHandlerAnswersEveryQueryOfEveryBurst) {
  answer_in_bursts(1, 200, 25);
}

TEST_F(DispatcherReplyTest, ThreeListenersAnsweringInTheirHandlersAnswerEveryQuery) {
  answer_in_bursts(3, 210, 30);
}

// The handler re-arms first, then answers: its next query can come only from
// the return applied after the handler (at the batch's end), and does.
TEST_F(DispatcherReplyTest, RearmThenReplyStillGetsTheNextQueuedQuery) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::vector<std::uint8_t> tags;
  std::function<void()> arm = [&] {
    l->async_receive([&](error_code ec, event ev) {
      if (ec) return;  // aborted at the end
      tags.push_back(tag_of(ev));
      arm();  // waits while the event is held
      EXPECT_TRUE(answer(*l, std::move(ev)));
    });
  };
  arm();
  auto client = peer();
  collector answers(client);
  for (std::uint8_t i = 0; i < 40; ++i) send(client, message(i, false, i), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return answers.ids.size() >= 40; }));
  std::vector<std::uint8_t> expected(40);
  for (std::uint8_t i = 0; i < 40; ++i) expected[i] = i;
  EXPECT_EQ(tags, expected);
  expect_nothing_held(d);
  l->detach();
  ctx_.poll();
}

// ---------------------------------------------------------------- no re-arm in the handler

// b. The handler answers and does not ask for more. Re-armed later, from a
// posted function outside any batch, the listener still gets the next query:
// the event's return was applied when the batch ended.
TEST_F(DispatcherReplyTest, ReplyWithoutRearmReturnsTheEventByTheBatchEnd) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::vector<std::uint8_t> tags;
  auto answer_once = [&](error_code ec, event ev) {
    ASSERT_FALSE(ec);
    tags.push_back(tag_of(ev));
    EXPECT_TRUE(answer(*l, std::move(ev)));
  };
  l->async_receive(answer_once);
  auto client = peer();
  collector answers(client);
  for (std::uint8_t i = 1; i <= 3; ++i) send(client, message(i, false, i), d->local_endpoint());
  until_received(d, 3);
  ASSERT_TRUE(run_until(ctx_, [&] { return answers.ids.size() == 1; }));
  EXPECT_EQ(tags, (std::vector<std::uint8_t>{1}));
  EXPECT_EQ(d->stats().queued_queries, 2u);
  EXPECT_TRUE(run_until(ctx_, [&] { return d->stats().buffers_lent == 0; }));
  for (std::uint8_t next = 2; next <= 3; ++next) {
    asio::post(ctx_, [&] { l->async_receive(answer_once); });
    ASSERT_TRUE(run_until(
        ctx_, [&] { return tags.size() == next; }, std::chrono::seconds(3)))
        << "the queued query was not delivered: the listener still counts as holding an event";
    EXPECT_EQ(tags.back(), next);
    ASSERT_TRUE(run_until(ctx_, [&] { return answers.ids.size() == next; }));
  }
  EXPECT_EQ(answers.ids, (std::vector<std::uint16_t>{1, 2, 3}));
  expect_nothing_held(d);
  // And a query that comes while it waits idle goes straight to it.
  std::optional<received> got;
  receive_into(*l, got);
  send(client, message(4, false, 4), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(tag_of(got->ev), 4);
}

// The same with the next query arriving only after the batch: the listener,
// re-armed from outside, is idle (not stuck "holding") and takes it.
TEST_F(DispatcherReplyTest, ReplyWithoutRearmThenALaterQueryReachesTheRearmedListener) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  bool answered = false;
  l->async_receive([&](error_code ec, event ev) {
    ASSERT_FALSE(ec);
    EXPECT_TRUE(answer(*l, std::move(ev)));
    answered = true;
  });
  auto client = peer();
  collector answers(client);
  send(client, message(1, false, 1), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return answered && answers.ids.size() == 1; }));
  std::optional<received> got;
  asio::post(ctx_, [&] { receive_into(*l, got); });
  ctx_.poll();
  send(client, message(2, false, 2), d->local_endpoint());
  ASSERT_TRUE(run_until(
      ctx_, [&] { return got.has_value(); }, std::chrono::seconds(3)));
  ASSERT_FALSE(got->ec);
  EXPECT_EQ(tag_of(got->ev), 2);
  got->ev.release();
  expect_nothing_held(d);
}

// ---------------------------------------------------------------- detach in the handler

// c. Answer, then detach inside the handler (no re-arm): the queries still
// queued are dropped with the last listener, every buffer comes back, and the
// dispatcher goes cleanly (ASan reports a party or buffer left behind).
TEST_F(DispatcherReplyTest, ReplyThenDetachInTheHandlerLeaksNothing) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  auto client = peer();
  collector answers(client);
  ASSERT_NO_FATAL_FAILURE(answer_first_of_three_then_detach(d, *l, client, answers));
  EXPECT_EQ(answers.ids, (std::vector<std::uint16_t>{1}));
  ctx_.poll();
  EXPECT_EQ(d->stats().listeners, 0u);
  expect_nothing_held(d);
  d.reset();
}

// The same with a second listener attached: the queued queries stay for it and
// reach it in order once it asks.
TEST_F(DispatcherReplyTest, ReplyThenDetachInTheHandlerLeavesTheQueueToAnotherListener) {
  auto d = make();
  auto l = d->add_listener();
  auto other = d->add_listener();  // attached, not receiving yet
  ASSERT_TRUE(l && other);
  auto client = peer();
  collector answers(client);
  ASSERT_NO_FATAL_FAILURE(answer_first_of_three_then_detach(d, *l, client, answers));
  until_received(d, 3);
  EXPECT_EQ(d->stats().queued_queries, 2u);
  for (std::uint8_t expected = 2; expected <= 3; ++expected) {
    std::optional<received> got;
    receive_into(*other, got);
    ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    ASSERT_FALSE(got->ec);
    EXPECT_EQ(tag_of(got->ev), expected);
    EXPECT_TRUE(answer(*other, std::move(got->ev)));
  }
  ASSERT_TRUE(run_until(ctx_, [&] { return answers.ids.size() == 3; }));
  expect_nothing_held(d);
}

// Answer, detach and drop the application's last reference on the dispatcher,
// all inside the handler: the dispatcher goes when the batch gives the party
// back, in the middle of its own receive, without a crash or a leak.
TEST_F(DispatcherReplyTest, ReplyDetachAndDropTheDispatcherInTheHandler) {
  auto d = make();
  const auto to = d->local_endpoint();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  bool done = false;
  l->async_receive([&](error_code ec, event ev) {
    ASSERT_FALSE(ec);
    EXPECT_TRUE(answer(*l, std::move(ev)));
    l->detach();
    d.reset();  // the event's reference is now the last one
    done = true;
  });
  auto client = peer();
  send(client, message(1, false, 1), to);
  send(client, message(2, false, 2), to);
  ASSERT_TRUE(run_until(ctx_, [&] { return done; }));
  ctx_.restart();
  ctx_.run_for(std::chrono::milliseconds(50));
  // TearDown checks that the socket is closed: the dispatcher is gone.
}

// ---------------------------------------------------------------- two listeners, two replies

// d. (see two_listeners_two_replies) The other listener's event answered first,
// then the handler's own; and the other way round.
TEST_F(DispatcherReplyTest, OneHandlerRepliesForTwoListenersOtherFirst) {
  two_listeners_two_replies(/*own_first=*/false);
}

TEST_F(DispatcherReplyTest, OneHandlerRepliesForTwoListenersOwnFirst) {
  two_listeners_two_replies(/*own_first=*/true);
}

// ---------------------------------------------------------------- a handler that throws

// e. Answer, then throw: the exception comes out of io_context::run, the answer
// still goes out, and the listener, re-armed afterwards, gets the next query.
TEST_F(DispatcherReplyTest, ReplyThenThrowKeepsTheListenerServing) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  bool thrown = false;
  l->async_receive([&](error_code ec, event ev) {
    ASSERT_FALSE(ec);
    EXPECT_TRUE(answer(*l, std::move(ev)));
    thrown = true;
    throw std::runtime_error("handler failed after its reply");
  });
  auto client = peer();
  collector answers(client);
  send(client, message(1, false, 1), d->local_endpoint());
  send(client, message(2, false, 2), d->local_endpoint());
  EXPECT_EQ(run_catching([&] { return thrown; }), 1);
  ASSERT_TRUE(thrown);
  ASSERT_TRUE(run_until(ctx_, [&] { return answers.ids.size() == 1; }));
  EXPECT_EQ(answers.ids, (std::vector<std::uint16_t>{1}));
  until_received(d, 2);
  EXPECT_EQ(d->stats().queued_queries, 1u);
  // Re-armed from outside: the queued query comes (the return was applied
  // while the exception left the batch).
  std::optional<received> got;
  receive_into(*l, got);
  ASSERT_TRUE(run_until(
      ctx_, [&] { return got.has_value(); }, std::chrono::seconds(3)));
  ASSERT_FALSE(got->ec);
  EXPECT_EQ(tag_of(got->ev), 2);
  EXPECT_TRUE(answer(*l, std::move(got->ev)));
  // And the receive was restarted: a new query reaches it too.
  receive_into(*l, got);
  send(client, message(3, false, 3), d->local_endpoint());
  ASSERT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
  EXPECT_EQ(tag_of(got->ev), 3);
  got->ev.release();
  ASSERT_TRUE(run_until(ctx_, [&] { return answers.ids.size() == 2; }));
  EXPECT_EQ(answers.ids, (std::vector<std::uint16_t>{1, 2}));
  expect_nothing_held(d);
}

// Re-arm, answer, then throw: the next query, made ready as the exception
// leaves the batch, is posted and delivered without the test asking again.
TEST_F(DispatcherReplyTest, RearmReplyThenThrowStillDeliversTheNextQuery) {
  auto d = make();
  auto l = d->add_listener();
  ASSERT_TRUE(l);
  std::optional<received> next;
  l->async_receive([&](error_code ec, event ev) {
    ASSERT_FALSE(ec);
    receive_into(*l, next);
    EXPECT_TRUE(answer(*l, std::move(ev)));
    throw std::runtime_error("handler failed after its reply");
  });
  auto client = peer();
  collector answers(client);
  send(client, message(1, false, 1), d->local_endpoint());
  send(client, message(2, false, 2), d->local_endpoint());
  EXPECT_EQ(run_catching([&] { return next.has_value() && answers.ids.size() == 1; },
                         std::chrono::seconds(3)),
            1);
  ASSERT_TRUE(next.has_value());
  ASSERT_FALSE(next->ec);
  EXPECT_EQ(tag_of(next->ev), 2);
  EXPECT_TRUE(answer(*l, std::move(next->ev)));
  ASSERT_TRUE(run_until(ctx_, [&] { return answers.ids.size() == 2; }));
  EXPECT_EQ(answers.ids, (std::vector<std::uint16_t>{1, 2}));
  expect_nothing_held(d);
}

// ---------------------------------------------------------------- shutdown in the handler

// f. Answer, then dispatcher::shutdown() in the same handler: exactly one
// shutdown event, whenever the listener re-arms, and nothing leaks.
TEST_F(DispatcherReplyTest, ReplyShutdownThenRearmGivesOneShutdownEvent) {
  reply_and_shut_down(after_reply::shutdown_then_rearm);
}

TEST_F(DispatcherReplyTest, ReplyRearmThenShutdownGivesOneShutdownEvent) {
  reply_and_shut_down(after_reply::rearm_then_shutdown);
}

TEST_F(DispatcherReplyTest, ReplyAndShutdownThenRearmOutsideGivesOneShutdownEvent) {
  reply_and_shut_down(after_reply::shutdown_only);
}

// ---------------------------------------------------------------- threads

// The answer loop on two loop threads and a SO_REUSEPORT pair of sockets: each
// thread defers its own handlers' returns (run under ThreadSanitizer too).
TEST_F(DispatcherReplyTest, AnswerLoopOnTwoThreadsAnswersEveryQuery) {
  asio::io_context server_ctx;
  dispatcher_options o;
  o.sockets = 2;
  auto created = dispatcher::create(server_ctx, loopback_any, o);
  ASSERT_TRUE(created) << created.error().message();
  auto d = *created;
  constexpr std::size_t count = 3;
  std::vector<listener> ls;
  for (std::size_t k = 0; k < count; ++k) {
    auto l = d->add_listener();
    ASSERT_TRUE(l);
    ls.push_back(std::move(*l));
  }
  std::atomic<int> handled{0};
  // A listener's handle is used by one thread at a time: by its own handler,
  // which runs again only after this one re-armed it.
  std::function<void(std::size_t)> arm = [&](std::size_t k) {
    ls[k].async_receive([&, k](error_code ec, event ev) {
      if (ec) return;
      handled.fetch_add(1, std::memory_order_relaxed);
      (void)answer(ls[k], std::move(ev));
      arm(k);
    });
  };
  for (std::size_t k = 0; k < count; ++k) arm(k);
  auto guard = asio::make_work_guard(server_ctx);
  std::vector<std::jthread> threads;
  for (int t = 0; t < 2; ++t) threads.emplace_back([&] { server_ctx.run(); });
  // On an early return (a failed assertion) the loop stops before the threads are joined.
  struct stop_on_exit {
    asio::io_context& ctx;
    ~stop_on_exit() { ctx.stop(); }
  } stopper{server_ctx};
  // Several clients: the kernel spreads their flows over the two sockets.
  constexpr int clients = 4, rounds = 10, burst = 20;
  std::vector<udp::socket> peers;
  std::vector<std::unique_ptr<collector>> answers;
  for (int c = 0; c < clients; ++c) peers.push_back(peer());
  for (auto& p : peers) answers.push_back(std::make_unique<collector>(p));
  for (int r = 0; r < rounds; ++r) {
    for (int c = 0; c < clients; ++c) {
      for (int i = 0; i < burst; ++i) {
        send(peers[static_cast<std::size_t>(c)],
             message(static_cast<std::uint16_t>(r * burst + i), false), d->local_endpoint());
      }
    }
    ASSERT_TRUE(run_until(ctx_,
                          [&] {
                            for (auto& a : answers) {
                              if (a->ids.size() < static_cast<std::size_t>((r + 1) * burst))
                                return false;
                            }
                            return true;
                          }))
        << "round " << r;
  }
  for (auto& a : answers) {
    std::vector<std::uint16_t> ids = a->ids;
    std::sort(ids.begin(), ids.end());
    std::vector<std::uint16_t> expected(rounds * burst);
    for (std::size_t i = 0; i < expected.size(); ++i) expected[i] = static_cast<std::uint16_t>(i);
    EXPECT_EQ(ids, expected);
  }
  EXPECT_EQ(handled.load(), clients * rounds * burst);
  // Every buffer back (the counters are read from another thread: atomics).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (d->stats().buffers_in_use != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(d->stats().buffers_in_use, 0u);
  EXPECT_EQ(d->stats().buffers_lent, 0u);
  // Stop the threads before the handles go: they are not the handlers' to share.
  guard.reset();
  server_ctx.stop();
  threads.clear();
  ls.clear();
  d.reset();
  server_ctx.restart();
  server_ctx.poll();
  answers.clear();
}

}  // namespace
}  // namespace uipc::dispatch
