// The framed transport at its edges: big frames, split prefixes, descriptors in
// a row, busy peers under timeouts, two-way streaming, cancellation, modes.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <cstring>
#include <thread>

#include "raw_peer.hpp"
#include "test_support.hpp"
#include "uipc/core/event_loop.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/proto/envelope.pb.h"

namespace uipc {
namespace {

using test::run_until;

frame notice(std::string payload) {
  frame f;
  f.kind = frame_kind::notice;
  f.payload = std::move(payload);
  return f;
}

using test::envelope_bytes;

// What collect() has received, and why it stopped. Shared with the pending
// handler, so a completion that runs after the test body finds it alive.
struct received {
  std::vector<frame> frames;
  error_code end;
};

void collect_into(const connection::pointer& c, const std::shared_ptr<received>& into) {
  c->async_receive([c, into](error_code ec, frame f) {
    if (ec) {
      into->end = ec;
      return;
    }
    into->frames.push_back(std::move(f));
    collect_into(c, into);
  });
}

// Receives frames until the connection ends.
std::shared_ptr<received> collect(const connection::pointer& c) {
  auto into = std::make_shared<received>();
  collect_into(c, into);
  return into;
}

class FramedEdgeTest : public test::loop_test {};

TEST_F(FramedEdgeTest, FramesLargerThanTheReadBufferArriveWhole) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  auto in_got = collect(b);
  auto& got = in_got->frames;
  std::string big(900 * 1024, '\0');
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 7);
  for (int i = 0; i < 3; ++i) a->async_send(notice(big), [](error_code ec) { EXPECT_FALSE(ec); });
  a->async_send(notice("small after big"), [](error_code) {});
  ASSERT_TRUE(run_until(ctx_, [&] { return got.size() == 4; }));
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(got[i].payload == big) << i;
  EXPECT_EQ(got[3].payload, "small after big");
  a->close();
  b->close();
}

TEST_F(FramedEdgeTest, PrefixSplitAcrossReadsIsReassembled) {
  auto [conn, raw] = test::make_raw_peer(ctx_);
  auto in_got = collect(conn);
  auto& got = in_got->frames;
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);
  env.set_payload("split");
  const std::string bytes = envelope_bytes(env);
  for (char byte : bytes) {  // one byte per write, each read by itself
    ASSERT_EQ(::write(raw.get(), &byte, 1), 1);
    ctx_.poll();
  }
  ASSERT_TRUE(run_until(ctx_, [&] { return got.size() == 1; }));
  EXPECT_EQ(got[0].payload, "split");
  conn->close();
}

TEST_F(FramedEdgeTest, DescriptorFramesBackToBackKeepTheirOwnDescriptors) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  auto in_got = collect(b);
  auto& got = in_got->frames;
  constexpr int frames = 20;
  for (int i = 0; i < frames; ++i) {
    int p[2];
    ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
    const std::string tag = "frame " + std::to_string(i);
    ASSERT_EQ(::write(p[1], tag.data(), tag.size()), static_cast<ssize_t>(tag.size()));
    ::close(p[1]);
    frame f = notice(tag);
    f.fds.emplace_back(p[0]);
    if (i % 3 == 0) a->async_send(notice("no descriptor"), [](error_code) {});
    a->async_send(std::move(f), [](error_code ec) { EXPECT_FALSE(ec); });
  }
  ASSERT_TRUE(run_until(ctx_, [&] { return got.size() == frames + 7; }));
  int checked = 0;
  for (auto& f : got) {
    if (f.payload == "no descriptor") {
      EXPECT_TRUE(f.fds.empty());
      continue;
    }
    ASSERT_EQ(f.fds.size(), 1u) << f.payload;
    std::string read_back(64, '\0');
    const ssize_t n = ::read(f.fds[0].get(), read_back.data(), read_back.size());
    read_back.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
    EXPECT_EQ(read_back, f.payload);
    ++checked;
  }
  EXPECT_EQ(checked, frames);
  got.clear();
  a->close();
  b->close();
}

TEST_F(FramedEdgeTest, UnannouncedDescriptorsAreBadFrameAndClosed) {
  auto [conn, raw] = test::make_raw_peer(ctx_);
  auto in_got = collect(conn);
  auto& got = in_got->frames;
  auto& end = in_got->end;
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);  // fd_count stays 0
  const std::string bytes = envelope_bytes(env);
  ASSERT_EQ(test::send_with_descriptors(raw.get(), bytes, 1), static_cast<ssize_t>(bytes.size()));
  ASSERT_TRUE(run_until(ctx_, [&] { return static_cast<bool>(end); }));
  EXPECT_EQ(end, make_error_code(errc::bad_frame));
  got.clear();  // the TearDown check proves the stray descriptor was closed
}

TEST_F(FramedEdgeTest, BusyPeerIsNotTimedOutByThePartialFrameTimeout) {
  connection_options options;
  options.partial_frame_timeout = std::chrono::milliseconds(1000);
  auto [conn, raw] = test::make_raw_peer(ctx_, options);
  auto in_got = collect(conn);
  auto& got = in_got->frames;
  auto& end = in_got->end;
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);
  env.set_payload(std::string(1000, 'b'));
  const std::string bytes = envelope_bytes(env);
  // Eight frames, each sent in two halves 150 ms apart: every frame completes
  // well within its 1000 ms (a loaded machine under TSan once took more than
  // 150 ms for a 60 ms gap), the whole stream takes longer than that. A
  // dropped connection fails the send, not the test program (MSG_NOSIGNAL).
  for (int i = 0; i < 8; ++i) {
    ASSERT_EQ(::send(raw.get(), bytes.data(), 500, MSG_NOSIGNAL), 500);
    ctx_.run_for(std::chrono::milliseconds(150));
    ASSERT_EQ(::send(raw.get(), bytes.data() + 500, bytes.size() - 500, MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size() - 500));
    ctx_.restart();
  }
  ASSERT_TRUE(run_until(ctx_, [&] { return got.size() == 8 || end; }));
  EXPECT_FALSE(end) << end.message();
  EXPECT_TRUE(conn->is_open());
  conn->close();
}

TEST_F(FramedEdgeTest, BothSidesStreamingAtOnceDoNotDeadlock) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  constexpr int count = 100;  // 100 x 64 KiB = 6.4 MiB each way, above the 4 MiB send limit
  const std::string chunk(64 * 1024, 'z');
  for (int i = 0; i < count; ++i) {
    a->async_send(notice(chunk), [](error_code) {});
    b->async_send(notice(chunk), [](error_code) {});
  }
  ctx_.poll();  // both sides fill their socket before either reads
  auto in_a = collect(a);
  auto in_b = collect(b);
  ASSERT_TRUE(run_until(
      ctx_, [&] { return in_a->frames.size() == count && in_b->frames.size() == count; }));
  a->close();
  b->close();
}

TEST_F(FramedEdgeTest, ThePeersReasonForDroppingUsBecomesOurCloseReason) {
  connection_options strict;
  strict.max_frame_size = 1024;
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  auto small = connection::adopt(ctx_, unique_fd(fds[0]), strict);
  auto large = connection::adopt(ctx_, unique_fd(fds[1]));
  ASSERT_TRUE(small && large);
  auto in_small = collect(*small);
  auto in_large = collect(*large);
  auto& end_small = in_small->end;
  auto& end_large = in_large->end;
  (*large)->async_send(notice(std::string(4096, 'L')), [](error_code) {});
  ASSERT_TRUE(run_until(ctx_, [&] { return end_small && end_large; }));
  EXPECT_EQ(end_small, make_error_code(errc::frame_too_large));
  EXPECT_EQ(end_large, make_error_code(errc::frame_too_large)) << end_large.message();
}

TEST_F(FramedEdgeTest, CancelledCallCompletesAbortedAndItsLateReplyIsDropped) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  frame held;
  bool request_arrived = false;
  server->async_receive([&](error_code ec, frame f) {
    request_arrived = !ec;
    held = std::move(f);
  });
  boost::asio::cancellation_signal cancel;
  error_code call_ec;
  bool call_done = false;
  frame request;
  request.payload = "slow";
  client->async_call(std::move(request),
                     boost::asio::bind_cancellation_slot(cancel.slot(), [&](error_code ec, frame) {
                       call_ec = ec;
                       call_done = true;
                     }));
  ASSERT_TRUE(run_until(ctx_, [&] { return request_arrived; }));
  cancel.emit(boost::asio::cancellation_type::terminal);
  ASSERT_TRUE(run_until(ctx_, [&] { return call_done; }));
  EXPECT_EQ(call_ec, boost::asio::error::operation_aborted);
  EXPECT_EQ(client->stats().calls_in_flight, 0u);
  server->async_send(make_reply(held, 0, "too late"), [](error_code) {});
  ASSERT_TRUE(run_until(ctx_, [&] { return client->stats().replies_dropped == 1; }));
  EXPECT_TRUE(client->is_open());
  client->close();
  server->close();
}

TEST_F(FramedEdgeTest, CancelledReceiveCompletesAborted) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  boost::asio::cancellation_signal cancel;
  error_code got;
  bool done = false;
  b->async_receive(boost::asio::bind_cancellation_slot(cancel.slot(), [&](error_code ec, frame) {
    got = ec;
    done = true;
  }));
  ctx_.poll();
  cancel.emit(boost::asio::cancellation_type::terminal);
  ASSERT_TRUE(run_until(ctx_, [&] { return done; }));
  EXPECT_EQ(got, boost::asio::error::operation_aborted);
  // The connection still works for the next receive.
  auto in_frames = collect(b);
  auto& frames = in_frames->frames;
  a->async_send(notice("after cancel"), [](error_code) {});
  ASSERT_TRUE(run_until(ctx_, [&] { return frames.size() == 1; }));
  a->close();
  b->close();
}

TEST_F(FramedEdgeTest, BadDescriptorsFailTheSendAloneTheConnectionStays) {
  connection_options options;
  options.max_fds_per_frame = 2;
  auto pair = connection::pair(ctx_, options);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  frame too_many = notice("x");
  for (int i = 0; i < 3; ++i) too_many.fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  frame invalid = notice("y");
  invalid.fds.emplace_back(-1);
  error_code first;
  error_code second;
  int done = 0;
  a->async_send(std::move(too_many), [&](error_code ec) {
    first = ec;
    ++done;
  });
  a->async_send(std::move(invalid), [&](error_code ec) {
    second = ec;
    ++done;
  });
  ASSERT_TRUE(run_until(ctx_, [&] { return done == 2; }));
  EXPECT_EQ(first, make_error_code(errc::too_many_fds));
  EXPECT_EQ(second, boost::system::errc::bad_file_descriptor);
  auto in_got = collect(b);
  auto& got = in_got->frames;
  a->async_send(notice("still here"), [](error_code) {});
  ASSERT_TRUE(run_until(ctx_, [&] { return got.size() == 1; }));
  EXPECT_EQ(got[0].payload, "still here");
  a->close();
  b->close();
}

TEST(ListenerModeTest, SocketModeIsTheOptionsWhateverTheUmask) {
  boost::asio::io_context ctx;
  test::temp_dir dir;
  const mode_t old_mask = ::umask(0);
  listener_options options;
  options.mode = 0660;
  auto l = listener::bind(ctx, dir.file("s"), options);
  ::umask(old_mask);
  ASSERT_TRUE(l);
  struct stat st {};
  ASSERT_EQ(::stat(dir.file("s").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);
  EXPECT_EQ(::umask(old_mask), old_mask) << "bind changed the process umask";
}

TEST(ListenerModeTest, AcceptCompletedJustBeforeTheListenerIsDestroyedIsSafe) {
  boost::asio::io_context ctx;
  test::temp_dir dir;
  auto l = listener::bind(ctx, dir.file("s"));
  ASSERT_TRUE(l);
  connection::pointer accepted;
  error_code accept_ec;
  (*l)->async_accept([&](error_code ec, connection::pointer c) {
    accept_ec = ec;
    accepted = std::move(c);
  });
  auto client = connection::connect(ctx, dir.file("s"));
  ASSERT_TRUE(client);
  // Let the reactor complete the accept, then destroy the listener before the
  // completion runs (ASan proves the handler does not touch it).
  ctx.poll_one();
  l->reset();
  ctx.run_for(std::chrono::milliseconds(50));
  if (!accept_ec) {
    EXPECT_TRUE(accepted);
  }
  (*client)->close();
  if (accepted) accepted->close();
  ctx.restart();
  ctx.run_for(std::chrono::milliseconds(10));
}

// A handler a connection stores (a receive, a call, a send in its outbox)
// that holds the connection itself is destroyed, like Asio's own, with the
// context that never ran it: no cycle outlives the context.
TEST(ConnectionLifetimeTest, HandlersNeverRunAreDestroyedWithTheContext) {
  std::weak_ptr<connection> a_left;
  std::weak_ptr<connection> b_left;
  {
    boost::asio::io_context ctx;
    auto pair = connection::pair(ctx);
    ASSERT_TRUE(pair);
    auto [a, b] = *pair;
    b->async_receive([b = b](error_code, frame) {});
    frame request;
    request.payload = "never answered";
    b->async_call(std::move(request), [b = b](error_code, frame) {});
    ctx.poll();
    ASSERT_EQ(b->stats().calls_in_flight, 1u);
    b->close();  // posted, never run
    a_left = a;
    b_left = b;
  }
  EXPECT_TRUE(a_left.expired());
  EXPECT_TRUE(b_left.expired()) << "handlers holding their connection leaked";
}

// A stop hook closes a connection whose receive handler runs on the
// connection's strand: the handler still sees operation_aborted before run()
// returns (two hops: strand, then the handler's completion).
TEST(EventLoopStopTest, StopWaitsForCompletionsThatTakeSeveralHops) {
  event_loop loop;
  auto pair = connection::pair(loop.context());
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  error_code got;
  bool done = false;
  b->async_receive([&](error_code ec, frame) {
    got = ec;
    done = true;
  });
  loop.on_stop([a = a, b = b] {
    a->close();
    b->close();
  });
  boost::asio::post(loop.context(), [&] { loop.stop(); });
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(test::run_within(loop));
  EXPECT_TRUE(done);
  EXPECT_EQ(got, boost::asio::error::operation_aborted);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(1))
      << "waited for the grace period";
}

}  // namespace
}  // namespace uipc
