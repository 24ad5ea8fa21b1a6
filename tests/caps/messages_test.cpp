// REQUEST / REPLY / DISPOSE, credentials, limits, abort and timeouts, async.
#include <unistd.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/post.hpp>
#include <cstring>
#include <future>
#include <stdexcept>

#include "caps_support.hpp"
#include "uipc/caps/point.hpp"

namespace uipc::caps::test {
namespace {

class Messages : public caps_test {};

TEST_F(Messages, RequestReplyDisposeWithKernelCredentials) {
  auto svc = serve("echo.one");
  ASSERT_TRUE(svc) << svc.error().message();
  auto c = connect("echo.one");
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ((*c)->server().pid, ::getpid());
  EXPECT_EQ((*c)->generation(), (*svc)->generation());

  const event hello = next_event(**svc, event_kind::connected);
  EXPECT_EQ(hello.sender().pid, ::getpid());

  auto pending = std::async(std::launch::async, [&] { return (*c)->call("ping", in(5s)); });
  const event req = next_event(**svc, event_kind::request);
  EXPECT_EQ(req.client, hello.client);
  EXPECT_EQ(req.copy(), "ping");
  EXPECT_EQ(req.sender().pid, ::getpid());
  EXPECT_EQ(req.sender().uid, ::geteuid());
  EXPECT_EQ(req.sender().gid, ::getegid());
  EXPECT_TRUE(req.sender().in_group(::getegid()));
  ASSERT_FALSE((*svc)->reply(req.client, req.id, "pong"));

  auto r = pending.get();
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->copy(), "pong");
  // Answered once only.
  EXPECT_EQ((*svc)->reply(req.client, req.id, "again"), make_error_code(errc::unknown_message));
  r->release();
  const event done = next_event(**svc, event_kind::dispose);
  EXPECT_EQ(done.id, req.id);
  EXPECT_EQ((*svc)->stats().disposals, 1u);
}

TEST_F(Messages, ReplyToAnUnknownIdOrClientIsRefused) {
  auto svc = serve("unknown.ids");
  ASSERT_TRUE(svc);
  auto c = connect("unknown.ids");
  ASSERT_TRUE(c);
  const event hello = next_event(**svc, event_kind::connected);
  EXPECT_EQ((*svc)->reply(hello.client, 12345, "x"), make_error_code(errc::unknown_message));
  EXPECT_EQ((*svc)->reply(hello.client + 1000, 1, "x"), make_error_code(errc::disconnected));
  EXPECT_EQ((*svc)->reject(hello.client, 777, errc::no_buffers),
            make_error_code(errc::unknown_message));
  // The client is unharmed.
  responder echo(**svc);
  auto r = (*c)->call("still fine", in(5s));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->copy(), "still fine");
}

TEST_F(Messages, AnswersGivenTheRequestEvent) {
  auto svc = serve("by.event");
  auto other = serve("by.event.other");
  ASSERT_TRUE(svc && other);
  auto c = connect("by.event");
  ASSERT_TRUE(c);
  const event hello = next_event(**svc, event_kind::connected);
  EXPECT_EQ((*svc)->reply(hello, "x"), make_error_code(errc::unknown_message)) << "not a request";
  EXPECT_EQ((*svc)->reply(event{}, "x"), make_error_code(errc::unknown_message));

  auto pending = std::async(std::launch::async, [&] { return (*c)->call("ping", in(5s)); });
  const event req = next_event(**svc, event_kind::request);
  EXPECT_EQ((*other)->reply(req, "forged"), make_error_code(errc::unknown_message))
      << "another service's request";
  EXPECT_EQ((*other)->reject(req, errc::no_buffers), make_error_code(errc::unknown_message));
  ASSERT_FALSE((*svc)->reply(req, "pong"));
  auto r = pending.get();
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->copy(), "pong");
  EXPECT_EQ((*svc)->reply(req, "again"), make_error_code(errc::unknown_message)) << "answered once";
  EXPECT_EQ((*svc)->reject(req, errc::no_buffers), make_error_code(errc::unknown_message));
  r->release();
  const event done = next_event(**svc, event_kind::dispose);
  EXPECT_EQ(done.id, req.id);

  // In place, and a rejection.
  pending = std::async(std::launch::async, [&] { return (*c)->call("fill", in(5s)); });
  const event fill = next_event(**svc, event_kind::request);
  ASSERT_FALSE((*svc)->reply_in_place(
      fill, 3, [](std::span<std::byte> out) { std::memcpy(out.data(), "abc", 3); }));
  r = pending.get();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->copy(), "abc");
  r->release();
  pending = std::async(std::launch::async, [&] { return (*c)->call("no", in(5s)); });
  const event no = next_event(**svc, event_kind::request);
  ASSERT_FALSE((*svc)->reject(no, errc::no_buffers));
  r = pending.get();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), make_error_code(errc::no_buffers));

  // The client gone: its request's channel is closed.
  pending = std::async(std::launch::async, [&] { return (*c)->call("last", in(5s)); });
  const event last = next_event(**svc, event_kind::request);
  (*svc)->disconnect(last.client);
  (void)next_event(**svc, event_kind::disconnected);
  EXPECT_EQ((*svc)->reply(last, "late"), make_error_code(errc::disconnected));
  EXPECT_FALSE(pending.get());
}

TEST_F(Messages, RejectFailsTheCallWithTheCode) {
  auto svc = serve("rejects");
  ASSERT_TRUE(svc);
  responder no(
      **svc, [](service& s, const event& e) { (void)s.reject(e.client, e.id, errc::no_buffers); });
  auto c = connect("rejects");
  ASSERT_TRUE(c);
  auto r = (*c)->call("x", in(5s));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), make_error_code(errc::no_buffers));
  EXPECT_EQ((*c)->in_flight(), 0u);
}

TEST_F(Messages, ReceiveIntoATooSmallBufferLeavesTheMessageQueued) {
  auto svc = serve("small.buffer");
  ASSERT_TRUE(svc);
  auto c = connect("small.buffer");
  ASSERT_TRUE(c);
  (void)next_event(**svc, event_kind::connected);
  const std::string big(1000, 'b');
  auto id = (*c)->send(bytes(big));
  ASSERT_TRUE(id);
  std::array<std::byte, 100> small{};
  std::size_t size = 0;
  auto e = (*svc)->receive_into(small, size, in(5s));
  ASSERT_FALSE(e);
  EXPECT_EQ(e.error(), make_error_code(errc::buffer_too_small));
  EXPECT_EQ(size, big.size());
  std::vector<std::byte> enough(size);
  e = (*svc)->receive_into(enough, size, in(5s));
  ASSERT_TRUE(e) << e.error().message();
  EXPECT_EQ(e->copy(), big);
  EXPECT_EQ(e->view().data(), enough.data());  // the copy, not the channel
  ASSERT_FALSE((*svc)->reply(e->client, e->id, "ok"));
  auto r = (*c)->wait(*id, in(5s));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->copy(), "ok");
}

TEST_F(Messages, ManyInFlightThenNoBuffersOrWaiting) {
  auto o = options();
  o.max_in_flight = 8;
  auto svc = serve("bounded", o);
  ASSERT_TRUE(svc);
  client_options co;
  co.wait_for_slot = false;
  auto c = connect("bounded", co);
  ASSERT_TRUE(c);
  std::vector<message_id> ids;
  for (int i = 0; i < 8; ++i) {
    auto id = (*c)->send(bytes(std::to_string(i)));
    ASSERT_TRUE(id) << i << ": " << id.error().message();
    ids.push_back(*id);
  }
  auto over = (*c)->send(bytes("one too many"));
  ASSERT_FALSE(over);
  EXPECT_EQ(over.error(), make_error_code(errc::no_buffers));
  EXPECT_EQ((*c)->in_flight(), 8u);
  {
    responder echo(**svc);
    for (std::size_t i = 0; i < ids.size(); ++i) {
      auto r = (*c)->wait(ids[i], in(5s));
      ASSERT_TRUE(r) << r.error().message();
      EXPECT_EQ(r->copy(), std::to_string(i));
    }
  }
  EXPECT_EQ((*c)->in_flight(), 0u);

  // A waiting client blocks for a slot instead, and gets it when one frees.
  auto w = connect("bounded");
  ASSERT_TRUE(w);
  responder echo(**svc);
  std::vector<std::future<std::string>> calls;
  for (int i = 0; i < 40; ++i) {
    calls.push_back(std::async(std::launch::async, [&, i] {
      auto r = (*w)->call(std::to_string(i), in(10s));
      return r ? r->copy() : r.error().message();
    }));
  }
  for (int i = 0; i < 40; ++i)
    EXPECT_EQ(calls[static_cast<std::size_t>(i)].get(), std::to_string(i));
}

TEST_F(Messages, AbortWithdrawsAndGivesOneOutcome) {
  auto svc = serve("aborts");
  ASSERT_TRUE(svc);
  auto c = connect("aborts");
  ASSERT_TRUE(c);
  auto id = (*c)->send(bytes("slow"));
  ASSERT_TRUE(id);
  const event req = next_event(**svc, event_kind::request);
  auto aborted = (*c)->abort(*id);
  ASSERT_TRUE(aborted);
  EXPECT_TRUE(*aborted);
  auto w = (*c)->wait(*id, in(1s));
  ASSERT_FALSE(w);
  EXPECT_EQ(w.error(), make_error_code(boost::asio::error::operation_aborted));
  const event gone = next_event(**svc, event_kind::withdrawn);
  EXPECT_EQ(gone.id, req.id);
  // Answering it frees the slot and sends nothing.
  EXPECT_EQ((*svc)->reply(req.client, req.id, "late"), make_error_code(errc::withdrawn));
  for (int i = 0; i < 500 && (*c)->in_flight() != 0; ++i) std::this_thread::sleep_for(1ms);
  EXPECT_EQ((*c)->in_flight(), 0u);
  // Aborting after the reply arrived changes nothing: the reply stands.
  responder echo(**svc);
  auto id2 = (*c)->send(bytes("quick"));
  ASSERT_TRUE(id2);
  std::this_thread::sleep_for(100ms);
  auto late = (*c)->abort(*id2);
  ASSERT_TRUE(late);
  EXPECT_FALSE(*late);
  auto r = (*c)->wait(*id2, in(5s));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->copy(), "quick");
  EXPECT_EQ((*c)->abort(987654).error(), make_error_code(errc::unknown_message));
}

// A call withdrawn while one thread writes its reply in place: a reject from
// another thread (the withdrawn event's answer) must not end the message under
// the writer, whose reply then ends it; the client disposes of that reply
// unseen, and the whole reply arena is free again.
TEST_F(Messages, AWithdrawalWhileAReplyIsWrittenInPlaceLosesNoReplySpace) {
  auto o = options();
  o.reply_arena = 64 << 10;
  auto svc = serve("withdrawn.midway", o);
  ASSERT_TRUE(svc);
  auto c = connect("withdrawn.midway");
  ASSERT_TRUE(c);
  auto id = (*c)->send(bytes("slow"));
  ASSERT_TRUE(id);
  const event req = next_event(**svc, event_kind::request);
  std::promise<void> filling, go_on;
  auto writer = std::async(std::launch::async, [&] {
    return (*svc)->reply_in_place(req, 4096, [&](std::span<std::byte> out) {
      std::memset(out.data(), 'r', out.size());
      filling.set_value();
      (void)go_on.get_future().wait_for(5s);
    });
  });
  ASSERT_EQ(filling.get_future().wait_for(5s), std::future_status::ready);
  auto aborted = (*c)->abort(*id);
  ASSERT_TRUE(aborted);
  EXPECT_TRUE(*aborted);
  const event gone = next_event(**svc, event_kind::withdrawn);
  EXPECT_EQ(gone.id, req.id);
  EXPECT_EQ((*svc)->reject(req, errc::no_buffers), make_error_code(errc::withdrawn));
  go_on.set_value();
  EXPECT_FALSE(writer.get());  // its reply ended the message
  for (int i = 0; i < 500 && (*c)->in_flight() != 0; ++i) std::this_thread::sleep_for(1ms);
  EXPECT_EQ((*c)->in_flight(), 0u);
  (void)next_event(**svc, event_kind::dispose);  // the client's, of the reply it never saw
  responder whole(**svc, [](service& s, const event& e) {
    (void)s.reply_in_place(e.client, e.id, 64 << 10, [](std::span<std::byte> out) {
      std::memset(out.data(), 'w', out.size());
    });
  });
  auto r = (*c)->call("all of it", in(5s));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->size(), std::size_t{64} << 10);
}

// A fill that throws gives its block back: the request can be answered again.
TEST_F(Messages, AFillThatThrowsGivesItsReplySpaceBack) {
  auto o = options();
  o.reply_arena = 64 << 10;
  auto svc = serve("throwing.fill", o);
  ASSERT_TRUE(svc);
  auto c = connect("throwing.fill");
  ASSERT_TRUE(c);
  auto id = (*c)->send(bytes("once more"));
  ASSERT_TRUE(id);
  const event req = next_event(**svc, event_kind::request);
  EXPECT_THROW((void)(*svc)->reply_in_place(
                   req, 64 << 10,
                   [](std::span<std::byte>) { throw std::runtime_error("user code failed"); }),
               std::runtime_error);
  EXPECT_FALSE((*svc)->reply_in_place(
      req, 64 << 10, [](std::span<std::byte> out) { std::memset(out.data(), 'a', out.size()); }));
  auto r = (*c)->wait(*id, in(5s));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->size(), std::size_t{64} << 10);
}

TEST_F(Messages, ACallPastItsDeadlineIsAbortedAndTimesOut) {
  auto svc = serve("deadlines");
  ASSERT_TRUE(svc);
  auto c = connect("deadlines");
  ASSERT_TRUE(c);
  const auto start = clock::now();
  auto r = (*c)->call("never answered", in(100ms));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), make_error_code(errc::timed_out));
  EXPECT_TRUE(r.error() == condition::timed_out);
  EXPECT_LT(clock::now() - start, 2s);
  (void)next_event(**svc, event_kind::request);
  (void)next_event(**svc, event_kind::withdrawn);
}

TEST_F(Messages, LargePayloadsInPlaceAndTooLarge) {
  auto o = options();
  o.request_arena = 2 << 20;
  o.reply_arena = 2 << 20;
  auto svc = serve("large", o);
  ASSERT_TRUE(svc);
  responder twice(**svc, [](service& s, const event& e) {
    const auto in = e.view();
    (void)s.reply_in_place(e.client, e.id, in.size(), [&](std::span<std::byte> out) {
      for (std::size_t i = 0; i < in.size(); ++i)
        out[i] = std::byte(static_cast<unsigned char>(in[i]) ^ 0xff);
    });
  });
  auto c = connect("large");
  ASSERT_TRUE(c);
  const std::size_t mib = 1 << 20;
  auto r = (*c)->call_in_place(
      mib,
      [](std::span<std::byte> out) {
        for (std::size_t i = 0; i < out.size(); ++i)
          out[i] = std::byte(static_cast<unsigned char>(i * 7));
      },
      in(10s));
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_EQ(r->size(), mib);
  for (std::size_t i = 0; i < mib; i += 4099) {
    ASSERT_EQ(r->view()[i], std::byte(static_cast<unsigned char>(i * 7) ^ 0xff)) << i;
  }
  auto too_big = (*c)->call(std::string((2 << 20) + 1, 'x'), in(5s));
  ASSERT_FALSE(too_big);
  EXPECT_EQ(too_big.error(), make_error_code(errc::message_too_large));
}

TEST_F(Messages, AClientThatNeverReleasesRepliesIsBoundedByItsArena) {
  auto o = options();
  o.reply_arena = 64 << 10;
  auto svc = serve("hoarder", o);
  ASSERT_TRUE(svc);
  std::atomic<int> refused{0};
  responder echo(**svc, [&](service& s, const event& e) {
    if (s.reply(e.client, e.id, std::string(4096, 'r')) == make_error_code(errc::no_buffers)) {
      ++refused;
      (void)s.reject(e.client, e.id, errc::no_buffers);
    }
  });
  auto c = connect("hoarder");
  ASSERT_TRUE(c);
  std::vector<reply> kept;
  int failed = 0;
  for (int i = 0; i < 40; ++i) {
    auto r = (*c)->call("give", in(5s));
    if (r) {
      kept.push_back(std::move(*r));
    } else {
      EXPECT_EQ(r.error(), make_error_code(errc::no_buffers));
      ++failed;
    }
  }
  EXPECT_EQ(kept.size(), 16u);  // 64 KiB of 4 KiB replies
  EXPECT_EQ(failed, 24);
  EXPECT_EQ(refused.load(), 24);
  kept.clear();  // disposing frees the arena
  auto r = (*c)->call("again", in(5s));
  ASSERT_TRUE(r) << r.error().message();
}

// An answer short of reply space reads the client's disposals itself; the
// disposal events it queues must wake a receiver asleep on the doorbells
// (the client does not ring for a disposal).
TEST_F(Messages, DisposalsReadByAnAnswerWakeASleepingReceiver) {
  auto o = options();
  o.reply_arena = 64 << 10;
  auto svc = serve("short.space", o);
  ASSERT_TRUE(svc);
  auto c = connect("short.space");
  ASSERT_TRUE(c);
  (void)next_event(**svc, event_kind::connected);
  // Sixteen replies of 4 KiB fill the arena; the client keeps them.
  std::vector<reply> kept;
  for (int i = 0; i < 16; ++i) {
    auto pending = std::async(std::launch::async, [&] { return (*c)->call("give", in(5s)); });
    const event req = next_event(**svc, event_kind::request);
    ASSERT_FALSE((*svc)->reply(req, std::string(4096, 'r')));
    auto r = pending.get();
    ASSERT_TRUE(r) << r.error().message();
    kept.push_back(std::move(*r));
  }
  auto last = (*c)->send(bytes("last"));
  ASSERT_TRUE(last);
  const event req = next_event(**svc, event_kind::request);
  // A receiver goes to sleep on the bells (nothing to read, channels cooled).
  auto receiving = std::async(std::launch::async, [&] { return (*svc)->receive(in(10s)); });
  std::this_thread::sleep_for(200ms);
  kept.clear();  // sixteen disposals, published without a ring
  // The answer finds no space, reads the disposals, and answers.
  ASSERT_FALSE((*svc)->reply(req, std::string(4096, 'l')));
  ASSERT_EQ(receiving.wait_for(2s), std::future_status::ready)
      << "the queued disposals did not wake the receiver";
  auto e = receiving.get();
  ASSERT_TRUE(e) << e.error().message();
  EXPECT_EQ(e->kind, event_kind::dispose);
  auto r = (*c)->wait(*last, in(5s));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->size(), 4096u);
}

TEST_F(Messages, AsyncCallsAndAsyncReceive) {
  auto svc = serve("async");
  ASSERT_TRUE(svc);
  auto c = connect("async");
  ASSERT_TRUE(c);
  std::promise<void> served;
  std::atomic<int> answered{0};
  std::function<void()> receive_next = [&] {
    (*svc)->async_receive([&](error_code ec, event e) {
      if (ec) return;
      if (e.kind == event_kind::request) {
        (void)(*svc)->reply(e.client, e.id, "re:" + e.copy());
        if (++answered == 20) served.set_value();
      }
      receive_next();
    });
  };
  boost::asio::post(loop_.ctx(), receive_next);
  std::vector<std::promise<std::string>> results(20);
  for (int i = 0; i < 20; ++i) {
    const std::string text = std::to_string(i);
    boost::asio::post(loop_.ctx(), [&, i, text] {
      (*c)->async_call(bytes(text), [&, i](error_code ec, reply r) {
        results[static_cast<std::size_t>(i)].set_value(ec ? ec.message() : r.copy());
      });
    });
  }
  for (int i = 0; i < 20; ++i) {
    auto f = results[static_cast<std::size_t>(i)].get_future();
    ASSERT_EQ(f.wait_for(5s), std::future_status::ready) << i;
    EXPECT_EQ(f.get(), "re:" + std::to_string(i));
  }
  EXPECT_EQ(served.get_future().wait_for(5s), std::future_status::ready);
  (*svc)->stop();
}

TEST_F(Messages, AsyncCallCancellationAborts) {
  auto svc = serve("async.cancel");
  ASSERT_TRUE(svc);
  auto c = connect("async.cancel");
  ASSERT_TRUE(c);
  boost::asio::cancellation_signal cancel;
  std::promise<error_code> outcome;
  boost::asio::post(loop_.ctx(), [&] {
    (*c)->async_call(bytes("hang"),
                     boost::asio::bind_cancellation_slot(
                         cancel.slot(), [&](error_code ec, reply) { outcome.set_value(ec); }));
  });
  (void)next_event(**svc, event_kind::request);
  boost::asio::post(loop_.ctx(), [&] { cancel.emit(boost::asio::cancellation_type::terminal); });
  auto f = outcome.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(f.get(), make_error_code(boost::asio::error::operation_aborted));
  (void)next_event(**svc, event_kind::withdrawn);
}

TEST_F(Messages, ForkedCopiesAnswerAClearError) {
  auto svc = serve("forks");
  ASSERT_TRUE(svc);
  responder echo(**svc);
  auto c = connect("forks");
  ASSERT_TRUE(c);
  const int status = in_child([&] {
    auto r = (*c)->call("from the child", in(1s));
    return !r && r.error() == make_error_code(errc::forked_copy) ? 0 : 1;
  });
  EXPECT_EQ(status, 0);
  auto r = (*c)->call("from the parent", in(5s));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->copy(), "from the parent");
}

TEST_F(Messages, AServiceCopyStoppedInAForkedChildLeavesThePointServing) {
  auto svc = serve("forked.service");
  ASSERT_TRUE(svc);
  responder echo(**svc);
  auto c = connect("forked.service");
  ASSERT_TRUE(c);
  ASSERT_TRUE((*c)->call("before", in(5s)));
  loop_.pause();  // no thread inside Asio at the fork
  const int status = in_child([&] {
    loop_.ctx().notify_fork(boost::asio::execution_context::fork_child);  // as Asio asks
    (*svc)->stop();  // as a child returning from main would, through the destructor
    return 0;
  });
  loop_.resume();
  EXPECT_EQ(status, 0);
  auto r = (*c)->call("from the parent", in(5s));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->copy(), "from the parent");
  auto points = list_points(dir_.path());
  ASSERT_TRUE(points);
  EXPECT_EQ(points->size(), 1u) << "the child's copy removed the point's registration";
  auto again = connect("forked.service");
  ASSERT_TRUE(again) << again.error().message();
  EXPECT_TRUE((*again)->call("a new client", in(5s)));
}

}  // namespace
}  // namespace uipc::caps::test
