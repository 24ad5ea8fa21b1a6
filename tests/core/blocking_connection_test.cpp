// blocking_connection: calls against an event-driven server, descriptors,
// deadlines, the peer's error notices, bad bytes, closing from another thread.
#include "uipc/core/blocking_connection.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <cstring>
#include <functional>
#include <future>
#include <thread>

#include "raw_peer.hpp"
#include "test_support.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/proto/envelope.pb.h"

namespace uipc {
namespace {

using namespace std::chrono_literals;
using clock = std::chrono::steady_clock;

frame request_with(std::string payload) {
  frame f;
  f.type = 7;
  f.payload = std::move(payload);
  return f;
}

// The server end of a socketpair: a `connection` on a loop thread that hands
// every received frame to `serve`, which may answer with send().
class server_side {
 public:
  using serve_fn = std::function<void(const connection::pointer&, frame)>;

  server_side(unique_fd fd, serve_fn serve) : serve_(std::move(serve)) {
    auto c = connection::adopt(ctx_, std::move(fd));
    if (!c) std::abort();
    conn_ = *c;
    receive(conn_);
    thread_ = std::jthread([this] { ctx_.run(); });
  }
  ~server_side() {
    boost::asio::post(ctx_, [c = conn_] { c->close(); });
    work_.reset();
  }

  const connection::pointer& conn() const { return conn_; }

 private:
  void receive(const connection::pointer& c) {
    c->async_receive([this, c](error_code ec, frame f) {
      if (ec) return;
      serve_(c, std::move(f));
      receive(c);
    });
  }

  serve_fn serve_;
  boost::asio::io_context ctx_{1};
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_{
      ctx_.get_executor()};
  connection::pointer conn_;
  std::jthread thread_;  // last: joined before the rest goes
};

std::size_t prefix_length(const std::string& bytes) {
  std::uint32_t v = 0;
  std::memcpy(&v, bytes.data(), sizeof v);
  return v;
}

std::pair<unique_fd, unique_fd> socket_pair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) std::abort();
  return {unique_fd(fds[0]), unique_fd(fds[1])};
}

void echo(const connection::pointer& c, frame f) {
  frame reply = make_reply(f, f.type, std::move(f.payload));
  reply.fds = std::move(f.fds);
  EXPECT_FALSE(c->send(std::move(reply)));
}

class BlockingConnectionTest : public ::testing::Test {
 protected:
  void TearDown() override { EXPECT_EQ(test::open_fd_count(), fds_before_); }
  std::size_t fds_before_ = test::open_fd_count();
};

TEST_F(BlockingConnectionTest, CallsAnEventDrivenServerInOrder) {
  auto [mine, theirs] = socket_pair();
  auto client = blocking_connection::adopt(std::move(mine));
  ASSERT_TRUE(client);
  {
    server_side server(std::move(theirs), echo);
    for (int i = 0; i < 200; ++i) {
      auto reply = client->call(request_with("n" + std::to_string(i)), clock::now() + 10s);
      ASSERT_TRUE(reply) << reply.error().message();
      EXPECT_EQ(reply->payload, "n" + std::to_string(i));
      EXPECT_EQ(reply->type, 7u);
      EXPECT_EQ(reply->kind, frame_kind::reply);
    }
    const auto stats = client->stats();
    EXPECT_EQ(stats.frames_sent, 200u);
    EXPECT_EQ(stats.frames_received, 200u);
    EXPECT_EQ(stats.replies_dropped, 0u);
    EXPECT_EQ(client->peer().pid, ::getpid());
  }
}

TEST_F(BlockingConnectionTest, ConnectsToAListenerPath) {
  test::temp_dir dir;
  boost::asio::io_context ctx{1};
  auto l = listener::bind(ctx, dir.file("sock"));
  ASSERT_TRUE(l);
  connection::pointer accepted;
  (*l)->async_accept([&](error_code ec, connection::pointer c) {
    ASSERT_FALSE(ec);
    accepted = c;
    c->async_receive([c](error_code, frame f) { echo(c, std::move(f)); });
  });
  auto client = blocking_connection::connect(dir.file("sock"));
  ASSERT_TRUE(client);
  auto reply = std::async(std::launch::async,
                          [&] { return client->call(request_with("hi"), clock::now() + 10s); });
  ASSERT_TRUE(
      test::run_until(ctx, [&] { return reply.wait_for(0s) == std::future_status::ready; }));
  auto r = reply.get();
  ASSERT_TRUE(r);
  EXPECT_EQ(r->payload, "hi");
  accepted->close();
  (*l)->close();
  ctx.run_for(20ms);
  EXPECT_FALSE(blocking_connection::connect(dir.file("nothing-here")));
}

TEST_F(BlockingConnectionTest, DescriptorsTravelBothWays) {
  auto [mine, theirs] = socket_pair();
  auto client = blocking_connection::adopt(std::move(mine));
  ASSERT_TRUE(client);
  server_side server(std::move(theirs), echo);
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  unique_fd read_end(p[0]);
  frame f = request_with("with a pipe");
  f.fds.emplace_back(p[1]);
  auto reply = client->call(std::move(f), clock::now() + 10s);
  ASSERT_TRUE(reply);
  ASSERT_EQ(reply->fds.size(), 1u);
  ASSERT_EQ(::write(reply->fds[0].get(), "x", 1), 1);
  char c = 0;
  ASSERT_EQ(::read(read_end.get(), &c, 1), 1);
  EXPECT_EQ(c, 'x');
  // Received descriptors are close-on-exec, like the event-driven end's.
  EXPECT_TRUE(::fcntl(reply->fds[0].get(), F_GETFD) & FD_CLOEXEC);
}

TEST_F(BlockingConnectionTest, ADeadlineFailsTheCallAloneAndTheLateReplyIsDropped) {
  auto [mine, theirs] = socket_pair();
  auto client = blocking_connection::adopt(std::move(mine));
  ASSERT_TRUE(client);
  std::promise<frame> held_promise;
  auto held = held_promise.get_future();
  bool first = true;
  server_side server(std::move(theirs), [&](const connection::pointer& c, frame f) {
    if (first) {
      first = false;
      held_promise.set_value(std::move(f));  // answered later, too late
      return;
    }
    echo(c, std::move(f));
  });
  auto late = client->call(request_with("slow"), clock::now() + 50ms);
  ASSERT_FALSE(late);
  EXPECT_EQ(late.error(), errc::timed_out);
  EXPECT_TRUE(client->is_open());
  frame slow = held.get();
  EXPECT_FALSE(server.conn()->send(make_reply(slow, slow.type, "too late")));
  auto next = client->call(request_with("next"), clock::now() + 10s);
  ASSERT_TRUE(next) << next.error().message();
  EXPECT_EQ(next->payload, "next");
  EXPECT_EQ(client->stats().replies_dropped, 1u);
}

TEST_F(BlockingConnectionTest, AnErrorReplyComesBackAsItsCode) {
  auto [mine, theirs] = socket_pair();
  auto client = blocking_connection::adopt(std::move(mine));
  ASSERT_TRUE(client);
  server_side server(std::move(theirs), [](const connection::pointer& c, frame f) {
    EXPECT_FALSE(c->send(make_error_reply(f, make_error_code(errc::pool_exhausted))));
  });
  auto r = client->call(request_with("x"), clock::now() + 10s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::pool_exhausted);
  EXPECT_TRUE(client->is_open());
}

TEST_F(BlockingConnectionTest, OversizedRequestFailsAloneAndNothingIsSent) {
  auto [mine, theirs] = socket_pair();
  connection_options options;
  options.max_frame_size = 1024;
  auto client = blocking_connection::adopt(std::move(mine), options);
  ASSERT_TRUE(client);
  server_side server(std::move(theirs), echo);
  auto big = client->call(request_with(std::string(4096, 'b')), clock::now() + 10s);
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error(), errc::frame_too_large);
  frame empty_fd = request_with("bad fd");
  empty_fd.fds.emplace_back();
  auto bad = client->call(std::move(empty_fd), clock::now() + 10s);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error(), boost::system::errc::bad_file_descriptor);
  auto ok = client->call(request_with("small"), clock::now() + 10s);
  ASSERT_TRUE(ok);
  EXPECT_EQ(ok->payload, "small");
  EXPECT_EQ(client->stats().frames_sent, 1u);
}

TEST_F(BlockingConnectionTest, ThePeersErrorNoticeBecomesTheCloseReason) {
  auto [mine, theirs] = socket_pair();
  auto client = blocking_connection::adopt(std::move(mine));
  ASSERT_TRUE(client);
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);
  env.mutable_error()->set_category(core_category().name());
  env.mutable_error()->set_value(static_cast<int>(errc::shutting_down));
  const std::string bytes = test::envelope_bytes(env);
  ASSERT_EQ(::write(theirs.get(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  auto r = client->call(request_with("x"), clock::now() + 10s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::shutting_down);
  EXPECT_FALSE(client->is_open());
  EXPECT_EQ(client->close_reason(), errc::shutting_down);
  // Later operations fail with the same reason, without touching the socket.
  EXPECT_EQ(client->send(request_with("y"), clock::now() + 1s), errc::shutting_down);
}

TEST_F(BlockingConnectionTest, GarbageFromThePeerClosesWithBadFrameAndTellsIt) {
  auto [mine, theirs] = socket_pair();
  auto client = blocking_connection::adopt(std::move(mine));
  ASSERT_TRUE(client);
  const std::string garbage = test::prefix(5) + "\xff\xff\xff\xff\xff";
  ASSERT_EQ(::write(theirs.get(), garbage.data(), garbage.size()),
            static_cast<ssize_t>(garbage.size()));
  auto r = client->call(request_with("x"), clock::now() + 10s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::bad_frame);
  // The peer got our request, then a notice saying why it was dropped.
  std::string got(4096, '\0');
  std::size_t have = 0;
  for (ssize_t n; (n = ::read(theirs.get(), got.data() + have, got.size() - have)) > 0;) have += n;
  proto::Envelope first;
  proto::Envelope second;
  ASSERT_GE(have, 4u);
  const std::size_t first_length = prefix_length(got);
  ASSERT_GE(have, 8 + first_length);
  ASSERT_TRUE(first.ParseFromArray(got.data() + 4, static_cast<int>(first_length)));
  EXPECT_EQ(first.kind(), proto::Envelope::REQUEST);
  const std::string rest = got.substr(4 + first_length, have - 4 - first_length);
  ASSERT_TRUE(second.ParseFromArray(rest.data() + 4, static_cast<int>(prefix_length(rest))));
  EXPECT_EQ(second.kind(), proto::Envelope::NOTICE);
  EXPECT_EQ(second.error().value(), static_cast<int>(errc::bad_frame));
}

TEST_F(BlockingConnectionTest, APeerThatDiesMidCallEndsTheCall) {
  auto [mine, theirs] = socket_pair();
  auto client = blocking_connection::adopt(std::move(mine));
  ASSERT_TRUE(client);
  std::jthread peer([fd = std::move(theirs)]() mutable {
    char buf[64];
    (void)::read(fd.get(), buf, sizeof buf);  // the request, then gone
    fd.reset();
  });
  auto r = client->call(request_with("x"), clock::now() + 10s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::peer_closed);
  EXPECT_FALSE(client->is_open());
}

TEST_F(BlockingConnectionTest, ReceiveTakesWhatThePeerSendsUnasked) {
  auto [mine, theirs] = socket_pair();
  auto client = blocking_connection::adopt(std::move(mine));
  ASSERT_TRUE(client);
  server_side server(std::move(theirs), [](const connection::pointer& c, frame f) {
    frame push;
    push.kind = frame_kind::notice;
    push.payload = "pushed before the reply";
    EXPECT_FALSE(c->send(std::move(push)));
    echo(c, std::move(f));
  });
  auto empty = client->receive(clock::now() + 20ms);
  ASSERT_FALSE(empty);
  EXPECT_EQ(empty.error(), errc::timed_out);
  auto r = client->call(request_with("x"), clock::now() + 10s);
  ASSERT_TRUE(r);
  auto pushed = client->receive(clock::now() + 10s);
  ASSERT_TRUE(pushed);
  EXPECT_EQ(pushed->payload, "pushed before the reply");
  EXPECT_EQ(pushed->kind, frame_kind::notice);
}

TEST_F(BlockingConnectionTest, APeerFloodingNoticesIsDroppedNotBuffered) {
  auto [mine, theirs] = socket_pair();
  connection_options options;
  options.max_queued_frames = 4;
  auto client = blocking_connection::adopt(std::move(mine), options);
  ASSERT_TRUE(client);
  server_side server(std::move(theirs), [](const connection::pointer& c, frame f) {
    for (int i = 0; i < 10; ++i) {
      frame push;
      push.kind = frame_kind::notice;
      EXPECT_FALSE(c->send(std::move(push)));
    }
    echo(c, std::move(f));
  });
  auto r = client->call(request_with("x"), clock::now() + 10s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), boost::system::errc::no_buffer_space);
  EXPECT_FALSE(client->is_open());
}

TEST_F(BlockingConnectionTest, CloseFromAnotherThreadEndsABlockedCall) {
  auto [mine, theirs] = socket_pair();
  auto client = blocking_connection::adopt(std::move(mine));
  ASSERT_TRUE(client);
  server_side server(std::move(theirs), [](const connection::pointer&, frame) {});  // never answers
  std::jthread closer([&] {
    std::this_thread::sleep_for(50ms);
    client->close();
  });
  auto r = client->call(request_with("x"), clock::now() + 60s);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), boost::asio::error::operation_aborted);
  closer.join();
  EXPECT_EQ(client->close_reason(), boost::asio::error::operation_aborted);
}

TEST_F(BlockingConnectionTest, AdoptRefusesWhatIsNotAUnixStreamSocket) {
  int p[2];
  ASSERT_EQ(::pipe2(p, O_CLOEXEC), 0);
  unique_fd keep(p[1]);
  EXPECT_FALSE(blocking_connection::adopt(unique_fd(p[0])));
  int d[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, d), 0);
  unique_fd other(d[1]);
  auto r = blocking_connection::adopt(unique_fd(d[0]));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), boost::system::errc::invalid_argument);
}

}  // namespace
}  // namespace uipc
