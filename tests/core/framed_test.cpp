// The framed transport between well-behaved peers: calls, notices, descriptors,
// credentials, socket paths.
#include "uipc/core/framed.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/use_future.hpp>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "test_support.hpp"
#include "uipc/core/event_loop.hpp"

namespace uipc {
namespace {

using test::run_until;

// Serves `c`: every request is answered with its payload reversed; a request of
// type 99 is answered with an error; a request of type 7 gets back a dup of each
// descriptor it brought, with the payload read from the first one.
void serve(const connection::pointer& c) {
  c->async_receive([c](error_code ec, frame f) {
    if (ec) return;
    frame reply;
    if (f.type == 99) {
      reply = make_error_reply(f, make_error_code(errc::shutting_down));
    } else if (f.type == 7) {
      std::string text(64, '\0');
      const ssize_t n = ::pread(f.fds.at(0).get(), text.data(), text.size(), 0);
      text.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
      reply = make_reply(f, 7, text);
      reply.fds = std::move(f.fds);
    } else {
      reply = make_reply(f, f.type, std::string(f.payload.rbegin(), f.payload.rend()));
    }
    EXPECT_FALSE(c->send(std::move(reply)));
    serve(c);
  });
}

frame request(std::uint32_t type, std::string payload) {
  frame f;
  f.type = type;
  f.payload = std::move(payload);
  return f;
}

class FramedTest : public ::testing::Test {
 protected:
  boost::asio::io_context ctx_;
  test::temp_dir dir_;
  std::size_t fds_before_ = test::descriptors_with_reactor(ctx_);

  void TearDown() override {
    // Every connection, listener and descriptor of the test is gone: the loop
    // drains to nothing and the process holds what it held before.
    ctx_.restart();
    ctx_.run_for(std::chrono::milliseconds(50));
    EXPECT_EQ(test::open_fd_count(), fds_before_);
  }
};

TEST_F(FramedTest, CallGetsItsReply) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  serve(server);
  error_code got_ec = make_error_code(errc::bad_frame);
  frame got;
  client->async_call(request(3, "abc"), [&](error_code ec, frame f) {
    got_ec = ec;
    got = std::move(f);
  });
  ASSERT_TRUE(run_until(ctx_, [&] { return !got.payload.empty(); }));
  EXPECT_FALSE(got_ec);
  EXPECT_EQ(got.payload, "cba");
  EXPECT_EQ(got.kind, frame_kind::reply);
  client->close();
  server->close();
}

TEST_F(FramedTest, ManyCallsInFlightAreMatchedToTheirReplies) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  serve(server);
  constexpr int calls = 500;
  int ok = 0;
  for (int i = 0; i < calls; ++i) {
    std::string payload = std::to_string(i);
    std::string expected(payload.rbegin(), payload.rend());
    client->async_call(request(1, payload), [&ok, expected](error_code ec, frame f) {
      if (!ec && f.payload == expected) ++ok;
    });
  }
  ASSERT_TRUE(run_until(ctx_, [&] { return ok == calls; }));
  EXPECT_EQ(client->stats().calls_in_flight, 0u);
  client->close();
  server->close();
}

TEST_F(FramedTest, ErrorReplyCompletesTheCallWithTheError) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  serve(server);
  error_code got;
  bool done = false;
  client->async_call(request(99, "x"), [&](error_code ec, frame) {
    got = ec;
    done = true;
  });
  ASSERT_TRUE(run_until(ctx_, [&] { return done; }));
  EXPECT_EQ(got, make_error_code(errc::shutting_down));
  client->close();
  server->close();
}

TEST_F(FramedTest, UnknownErrorCategoryBecomesRemoteError) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  server->async_receive([server](error_code, frame f) {
    frame r = make_reply(f, 0, {});
    r.error = wire_error{"some.module", 4, "no such thing"};
    server->async_send(std::move(r), [](error_code) {});
  });
  error_code got;
  frame reply;
  bool done = false;
  client->async_call(request(1, "x"), [&](error_code ec, frame f) {
    got = ec;
    reply = std::move(f);
    done = true;
  });
  ASSERT_TRUE(run_until(ctx_, [&] { return done; }));
  EXPECT_EQ(got, make_error_code(errc::remote_error));
  ASSERT_TRUE(reply.error);
  EXPECT_EQ(reply.error->message, "no such thing");
  client->close();
  server->close();
}

TEST_F(FramedTest, NoticesArriveInOrder) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  for (int i = 0; i < 100; ++i) a->async_send(request(2, std::to_string(i)), [](error_code) {});
  std::vector<std::string> got;
  std::function<void()> next = [&] {
    b->async_receive([&](error_code ec, frame f) {
      if (ec) return;
      EXPECT_EQ(f.kind, frame_kind::notice);
      got.push_back(f.payload);
      next();
    });
  };
  next();
  ASSERT_TRUE(run_until(ctx_, [&] { return got.size() == 100; }));
  for (int i = 0; i < 100; ++i) EXPECT_EQ(got[i], std::to_string(i));
  a->close();
  b->close();
}

TEST_F(FramedTest, SendWithoutAHandlerQueuesInOrderAndRefusesLocally) {
  connection_options options;
  options.max_frame_size = 1024;
  auto pair = connection::pair(ctx_, options);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  EXPECT_EQ(a->send(request(2, std::string(4096, 'x'))), errc::frame_too_large);
  frame with_empty_fd = request(2, "bad");
  with_empty_fd.fds.emplace_back();
  EXPECT_EQ(a->send(std::move(with_empty_fd)), boost::system::errc::bad_file_descriptor);
  for (int i = 0; i < 50; ++i) EXPECT_FALSE(a->send(request(2, std::to_string(i))));
  std::vector<std::string> got;
  std::function<void()> next = [&] {
    b->async_receive([&](error_code ec, frame f) {
      if (ec) return;
      got.push_back(f.payload);
      next();
    });
  };
  next();
  ASSERT_TRUE(run_until(ctx_, [&] { return got.size() == 50; }));
  for (int i = 0; i < 50; ++i) EXPECT_EQ(got[i], std::to_string(i));
  EXPECT_EQ(a->stats().frames_sent, 50u);
  a->close();
  b->close();
}

// Frames read off the socket may be handed to a waiting receiver at once, but
// never from inside one of the application's own calls: a handler that takes
// a lock and then sends or receives must not be re-entered under that lock.
TEST_F(FramedTest, HandlersAreNeverCalledInsideAnInitiatingCall) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  bool inside = false;
  int handled = 0;
  std::function<void()> next = [&] {
    b->async_receive([&](error_code ec, frame f) {
      if (ec) return;
      EXPECT_FALSE(inside) << "re-entered from inside a call";
      inside = true;
      ++handled;
      next();  // a receive and a send from inside the handler
      EXPECT_FALSE(b->send(make_reply(f, f.type, f.payload)));
      b->async_send(request(3, "and one more"), [](error_code) {});
      inside = false;
    });
  };
  next();
  for (int i = 0; i < 20; ++i) EXPECT_FALSE(a->send(request(2, "x")));
  ASSERT_TRUE(run_until(ctx_, [&] { return handled == 20; }));
  a->close();
  b->close();
}

// A peer that never passes descriptors is read without a control buffer (the
// reactor's own receive fills the buffer): frames, a descriptor sent anyway,
// and the peer's close must all come out as they do on the usual path.
TEST_F(FramedTest, APeerWithoutDescriptorsIsReadDirectlyAndItsCloseIsSeen) {
  connection_options plain;
  plain.peer_sends_fds = false;
  for (const bool send_a_descriptor : {false, true}) {
    int fds[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    auto reader = connection::adopt(ctx_, unique_fd(fds[0]), plain);
    auto writer = connection::adopt(ctx_, unique_fd(fds[1]));
    ASSERT_TRUE(reader && writer);
    std::vector<std::string> got;
    error_code end;
    std::function<void()> next = [&] {
      (*reader)->async_receive([&](error_code ec, frame f) {
        if (ec) {
          end = ec;
          return;
        }
        got.push_back(f.payload);
        next();
      });
    };
    next();
    ASSERT_TRUE(run_until(ctx_, [&] { return (*reader)->stats().frames_received == 0; }));
    for (int i = 0; i < 5; ++i) EXPECT_FALSE((*writer)->send(request(2, "f" + std::to_string(i))));
    ASSERT_TRUE(run_until(ctx_, [&] { return got.size() == 5; }));
    if (send_a_descriptor) {
      frame f = request(2, "with a descriptor");
      f.fds.emplace_back(::open("/dev/null", O_RDONLY | O_CLOEXEC));
      EXPECT_FALSE((*writer)->send(std::move(f)));
      ASSERT_TRUE(run_until(ctx_, [&] { return static_cast<bool>(end); }));
      EXPECT_EQ(end, errc::too_many_fds);
    } else {
      (*writer)->close();
      ASSERT_TRUE(run_until(ctx_, [&] { return static_cast<bool>(end); }));
      EXPECT_EQ(end, errc::peer_closed);
    }
    for (int i = 0; i < 5; ++i) EXPECT_EQ(got[i], "f" + std::to_string(i));
    EXPECT_EQ(got.size(), 5u);
    (*writer)->close();
    (*reader)->close();
  }
}

TEST_F(FramedTest, DescriptorsTravelWithTheirFrame) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  serve(server);
  std::string path = dir_.file("passed");
  unique_fd file(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
  ASSERT_TRUE(file);
  ASSERT_EQ(::write(file.get(), "through the socket", 18), 18);
  frame f = request(7, {});
  f.fds.push_back(std::move(file));
  frame got;
  bool done = false;
  client->async_call(std::move(f), [&](error_code ec, frame r) {
    EXPECT_FALSE(ec);
    got = std::move(r);
    done = true;
  });
  ASSERT_TRUE(run_until(ctx_, [&] { return done; }));
  EXPECT_EQ(got.payload, "through the socket");
  ASSERT_EQ(got.fds.size(), 1u);
  struct stat original {};
  struct stat returned {};
  ASSERT_EQ(::stat(path.c_str(), &original), 0);
  ASSERT_EQ(::fstat(got.fds[0].get(), &returned), 0);
  EXPECT_EQ(original.st_ino, returned.st_ino);
  client->close();
  server->close();
}

TEST_F(FramedTest, OversizedSendFailsLocallyAndKeepsTheConnection) {
  connection_options options;
  options.max_frame_size = 1024;
  auto pair = connection::pair(ctx_, options);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  serve(server);
  error_code send_ec;
  bool sent = false;
  client->async_send(request(1, std::string(4096, 'x')), [&](error_code ec) {
    send_ec = ec;
    sent = true;
  });
  ASSERT_TRUE(run_until(ctx_, [&] { return sent; }));
  EXPECT_EQ(send_ec, make_error_code(errc::frame_too_large));
  bool answered = false;
  client->async_call(request(1, "ok"),
                     [&](error_code ec, frame f) { answered = !ec && f.payload == "ko"; });
  ASSERT_TRUE(run_until(ctx_, [&] { return answered; }));
  client->close();
  server->close();
}

TEST_F(FramedTest, CloseFailsPendingCallsAndTheServerSeesPeerClosed) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  error_code call_ec;
  error_code server_ec;
  bool call_done = false;
  bool server_done = false;
  server->async_receive([&](error_code ec, frame) {
    // The request arrives; the server never answers and waits for more.
    EXPECT_FALSE(ec);
    server->async_receive([&](error_code ec2, frame) {
      server_ec = ec2;
      server_done = true;
    });
  });
  client->async_call(request(1, "never answered"), [&](error_code ec, frame) {
    call_ec = ec;
    call_done = true;
  });
  ctx_.run_for(std::chrono::milliseconds(20));
  client->close();
  ASSERT_TRUE(run_until(ctx_, [&] { return call_done && server_done; }));
  EXPECT_EQ(call_ec, boost::asio::error::operation_aborted);
  EXPECT_EQ(server_ec, make_error_code(errc::peer_closed));
  EXPECT_FALSE(server->is_open());
  server->close();
}

TEST_F(FramedTest, DroppingTheLastReferenceClosesTheConnection) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  error_code server_ec;
  bool server_done = false;
  server->async_receive([&](error_code ec, frame) {
    server_ec = ec;
    server_done = true;
  });
  error_code call_ec;
  bool call_done = false;
  client->async_call(request(1, "abandoned"), [&](error_code ec, frame) {
    call_ec = ec;
    call_done = true;
  });
  ctx_.poll();
  client.reset();  // nobody holds the client any more
  pair->first.reset();
  ASSERT_TRUE(run_until(ctx_, [&] { return call_done; }));
  EXPECT_EQ(call_ec, boost::asio::error::operation_aborted);
  ASSERT_TRUE(server_done);  // the request itself arrived first
  server->async_receive([&](error_code ec, frame) {
    server_ec = ec;
    server_done = true;
  });
  server_done = false;
  ASSERT_TRUE(run_until(ctx_, [&] { return server_done; }));
  EXPECT_EQ(server_ec, make_error_code(errc::peer_closed));
  server->close();
}

TEST_F(FramedTest, PeerCredentialsAreTheKernels) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  EXPECT_EQ(a->peer().pid, ::getpid());
  EXPECT_EQ(a->peer().uid, ::getuid());
  EXPECT_EQ(a->peer().gid, ::getgid());
  EXPECT_EQ(b->peer().pid, ::getpid());
  a->close();
  b->close();
}

TEST_F(FramedTest, ListenerAcceptsAndBothEndsKnowEachOther) {
  auto l = listener::bind(ctx_, dir_.file("s"));
  ASSERT_TRUE(l) << l.error().message();
  connection::pointer accepted;
  (*l)->async_accept([&](error_code ec, connection::pointer c) {
    EXPECT_FALSE(ec);
    accepted = c;
    if (c) serve(c);
  });
  auto client = connection::connect(ctx_, dir_.file("s"));
  ASSERT_TRUE(client);
  std::string got;
  (*client)->async_call(request(1, "hello"), [&](error_code ec, frame f) {
    if (!ec) got = f.payload;
  });
  ASSERT_TRUE(run_until(ctx_, [&] { return got == "olleh"; }));
  ASSERT_TRUE(accepted);
  EXPECT_EQ(accepted->peer().pid, ::getpid());
  struct stat st {};
  ASSERT_EQ(::stat(dir_.file("s").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  (*client)->close();
  accepted->close();
  (*l)->close();
  EXPECT_NE(::access(dir_.file("s").c_str(), F_OK), 0) << "socket file left behind";
}

TEST_F(FramedTest, SecondListenerOnALivePathIsRefused) {
  auto first = listener::bind(ctx_, dir_.file("s"));
  ASSERT_TRUE(first);
  auto second = listener::bind(ctx_, dir_.file("s"));
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error(), make_error_code(errc::address_in_use));
  // The first one still serves.
  (*first)->async_accept([](error_code, connection::pointer c) {
    if (c) serve(c);
  });
  auto client = connection::connect(ctx_, dir_.file("s"));
  ASSERT_TRUE(client);
  bool answered = false;
  (*client)->async_call(request(1, "ab"),
                        [&](error_code ec, frame f) { answered = !ec && f.payload == "ba"; });
  ASSERT_TRUE(run_until(ctx_, [&] { return answered; }));
  (*client)->close();
}

TEST_F(FramedTest, ForeignLiveSocketIsNotStolen) {
  // A server outside uipc (no lock file) listens on the path.
  int raw = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strcpy(addr.sun_path, dir_.file("s").c_str());
  ASSERT_EQ(::bind(raw, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(raw, 4), 0);
  auto l = listener::bind(ctx_, dir_.file("s"));
  EXPECT_EQ(l.error(), make_error_code(errc::address_in_use));
  EXPECT_NE(::access((dir_.file("s") + ".lock").c_str(), F_OK), 0)
      << "a failed bind left its lock file";
  ::close(raw);
}

TEST_F(FramedTest, StaleSocketOfAKilledServerIsReclaimed) {
  const std::string path = dir_.file("s");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    boost::asio::io_context child_ctx;
    auto l = listener::bind(child_ctx, path);
    if (!l) ::_exit(1);
    ::kill(::getpid(), SIGKILL);  // dies holding the path
    ::_exit(2);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status));
  ASSERT_EQ(::access(path.c_str(), F_OK), 0)
      << "the killed server should have left its socket file";
  auto l = listener::bind(ctx_, path);
  ASSERT_TRUE(l) << l.error().message();
  (*l)->async_accept([](error_code, connection::pointer c) {
    if (c) serve(c);
  });
  auto client = connection::connect(ctx_, path);
  ASSERT_TRUE(client);
  bool answered = false;
  (*client)->async_call(request(1, "xy"),
                        [&](error_code ec, frame f) { answered = !ec && f.payload == "yx"; });
  ASSERT_TRUE(run_until(ctx_, [&] { return answered; }));
  (*client)->close();
}

TEST_F(FramedTest, PathThatIsNotASocketIsLeftAlone) {
  const std::string path = dir_.file("s");
  { unique_fd f(::open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0600)); }
  auto l = listener::bind(ctx_, path);
  EXPECT_EQ(l.error(), make_error_code(errc::not_a_socket));
  EXPECT_EQ(::access(path.c_str(), F_OK), 0);
  EXPECT_NE(::access((path + ".lock").c_str(), F_OK), 0) << "a failed bind left its lock file";
}

TEST_F(FramedTest, ConnectToNothingFailsClearly) {
  auto c = connection::connect(ctx_, dir_.file("nobody"));
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), boost::system::errc::no_such_file_or_directory);
}

}  // namespace
}  // namespace uipc

namespace uipc {
namespace {

// The connection's strand makes it safe to call from any thread while the loop
// runs on several: run under ThreadSanitizer, this is the proof.
TEST(FramedThreadsTest, CallsFromManyThreadsOnAMultiThreadedLoop) {
  event_loop loop(2);
  auto pair = connection::pair(loop.context());
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  serve(server);
  test::loop_runner runner(loop);
  std::atomic<int> ok{0};
  {
    std::vector<std::jthread> callers;
    for (int t = 0; t < 4; ++t) {
      callers.emplace_back([&, t] {
        for (int i = 0; i < 200; ++i) {
          const std::string payload = std::to_string(t * 1000 + i);
          auto reply = client->async_call(request(1, payload), boost::asio::use_future);
          if (reply.wait_for(std::chrono::seconds(10)) != std::future_status::ready) return;
          if (reply.get().payload == std::string(payload.rbegin(), payload.rend())) ++ok;
        }
      });
    }
  }
  EXPECT_EQ(ok.load(), 800);
  EXPECT_EQ(client->stats().calls_in_flight, 0u);
  client->close();
  server->close();
  EXPECT_TRUE(runner.stop());
}

}  // namespace
}  // namespace uipc
