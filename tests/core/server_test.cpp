// The server kit through its public face: typed requests, fairness between
// clients, bad requests and replies, admission by kernel identity, sessions
// that end exactly once when their peer dies.
#include "server_fixture.hpp"

namespace uipc::server_test {
namespace {

TEST_F(ServerTest, TypedRequestIsServedAndAnswered) {
  start();
  auto c = client();
  StringValue in;
  in.set_value("abc");
  auto out = typed_call<StringValue>(c, echo_type, in, soon());
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->value(), "cba");
  EXPECT_EQ(last_peer_pid_.load(), ::getpid());
  EXPECT_EQ(server_->stats().requests, 1u);
  EXPECT_EQ(server_->stats().errors, 0u);
}

// A client with a long backlog of frames gets a fair share of the loop
// thread, not all of it: another client's call, waiting behind it, is
// answered long before the backlog is through (reading pauses while the
// frames read wait for their handlers, which take turns with every other
// connection's).
TEST_F(ServerTest, AClientWithALongBacklogStarvesNoOtherClient) {
  start();  // one loop thread
  // The loop held while the backlog is written.
  std::promise<void> holding, release;
  boost::asio::post(ctx_, [&, go = release.get_future()] {
    holding.set_value();
    go.wait();
  });
  holding.get_future().wait();
  unique_fd hog = raw_connect(path_);
  ASSERT_TRUE(hog);
  const int four_mib = 4 << 20;
  ::setsockopt(hog.get(), SOL_SOCKET, SO_SNDBUF, &four_mib, sizeof four_mib);
  const std::string frame = count_notice();
  std::string block;
  while (block.size() < 4096) block += frame;
  std::size_t sent = 0;
  for (int i = 0; i < 4096; ++i) {  // bounded: the socket's buffer ends it first
    const ssize_t n = ::send(hog.get(), block.data(), block.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n <= 0) break;
    sent += static_cast<std::size_t>(n);
    if (static_cast<std::size_t>(n) < block.size()) break;
  }
  const std::size_t notices = sent / frame.size();
  ASSERT_GT(notices, 20'000u);
  release.set_value();  // the hog is read first, then another client calls
  ASSERT_TRUE(wait_for([&] { return handled_.load() > 1000; }));
  auto other = client();
  auto answered = std::async(std::launch::async, [&] {
    StringValue in;
    in.set_value("still here");
    return typed_call<StringValue>(other, echo_type, in,
                                   clock_type::now() + std::chrono::seconds(30));
  });
  auto out = answered.get();
  ASSERT_TRUE(out) << out.error().message();
  EXPECT_EQ(out->value(), "ereh llits");
  EXPECT_LT(static_cast<std::size_t>(handled_at_echo_.load()), notices / 2)
      << "the call waited for " << handled_at_echo_.load() << " of " << notices << " notices";
  // Every notice is served in the end (none lost to the pauses). Tens of
  // thousands of them: a sanitized build beside another test takes seconds.
  ASSERT_TRUE(wait_for([&] { return static_cast<std::size_t>(handled_.load()) > notices; },
                       std::chrono::seconds(120)))
      << handled_.load() << " of " << notices << " notices served";
}

TEST_F(ServerTest, AsyncTypedCallParsesTheReply) {
  start();
  boost::asio::io_context client_ctx;
  auto c = connection::connect(client_ctx, path_);
  ASSERT_TRUE(c);
  StringValue in;
  in.set_value("loop");
  auto f = async_typed_call<StringValue>(**c, echo_type, in, boost::asio::use_future);
  test::run_until(client_ctx,
                  [&] { return f.wait_for(std::chrono::seconds(0)) == std::future_status::ready; });
  EXPECT_EQ(f.get().value(), "pool");
}

TEST_F(ServerTest, GarbagePayloadIsBadRequestAndReachesNoHandler) {
  start();
  auto c = client();
  frame f;
  f.type = echo_type;
  f.payload = "\xff\xff\xff\xff";  // not a protobuf message: a truncated varint tag
  auto r = c.call(std::move(f), soon());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::bad_request);
  EXPECT_EQ(handled_.load(), 0);
  EXPECT_EQ(server_->stats().errors, 1u);
  // The session goes on.
  StringValue in;
  in.set_value("ok");
  EXPECT_TRUE(typed_call<StringValue>(c, echo_type, in, soon()));
}

TEST_F(ServerTest, UnknownTypeIsUnknownRequest) {
  start();
  auto c = client();
  auto r = typed_call<StringValue>(c, 77, StringValue{}, soon());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::unknown_request);
}

TEST_F(ServerTest, HandlerErrorTravelsAsTheReplysError) {
  start();
  auto c = client();
  auto r = typed_call<UInt32Value>(c, count_type, UInt32Value{}, soon());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::not_held);
}

TEST_F(ServerTest, NoticeIsServedOnlyWhereTheTypeAcceptsNotices) {
  start();
  auto c = client();
  UInt32Value three;
  three.set_value(3);
  frame n;
  n.kind = frame_kind::notice;
  n.type = count_type;
  n.payload = three.SerializeAsString();
  ASSERT_FALSE(c.send(std::move(n), soon()));
  frame refused;
  refused.kind = frame_kind::notice;
  refused.type = echo_type;
  ASSERT_FALSE(c.send(std::move(refused), soon()));
  // Served in order: the next call sees the notice's 3.
  UInt32Value one;
  one.set_value(1);
  auto r = typed_call<UInt32Value>(c, count_type, one, soon());
  ASSERT_TRUE(r);
  EXPECT_EQ(r->value(), 4u);
  EXPECT_EQ(handled_.load(), 2);
  EXPECT_EQ(server_->stats().errors, 1u);  // the refused notice
}

TEST_F(ServerTest, ReplyThatDoesNotParseIsBadReplyNotBadRequest) {
  // A server that breaks the protocol: every reply carries garbage.
  auto l = listener::bind(ctx_, path_);
  ASSERT_TRUE(l);
  std::shared_ptr<connection> accepted;
  (*l)->async_accept([&](error_code ec, connection::pointer c) {
    ASSERT_FALSE(ec);
    accepted = c;
    c->async_receive([c](error_code ec2, frame f) {
      ASSERT_FALSE(ec2);
      (void)c->send(make_reply(f, f.type, "\xff\xff\xff"));
    });
  });
  thread_ = std::thread([this] { ctx_.run(); });
  auto c = client();
  auto r = typed_call<StringValue>(c, echo_type, StringValue{}, soon());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::bad_reply);
  std::promise<void> closed;
  boost::asio::post(ctx_, [&] {
    (*l)->close();
    if (accepted) accepted->close();
    closed.set_value();
  });
  closed.get_future().wait();
}

TEST_F(ServerTest, AdmissionSeesTheKernelIdentityAndRefusesBeforeReading) {
  std::atomic<int> asked{0};
  peer_identity seen;
  server_options o;
  o.admit = [&](const peer_identity& id) {
    seen = id;
    ++asked;
    return make_error_code(errc::permission_denied);
  };
  start(std::move(o));
  auto fd = raw_connect(path_);
  ASSERT_TRUE(fd);
  // A whole request is on its way before admission runs; it must never be served.
  StringValue in;
  in.set_value("x");
  auto c = blocking_connection::adopt(std::move(fd));
  ASSERT_TRUE(c);
  auto r = typed_call<StringValue>(*c, echo_type, in, soon());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), make_error_code(errc::permission_denied));  // told why, not just hung up on
  EXPECT_EQ(asked.load(), 1);
  EXPECT_EQ(handled_.load(), 0);
  EXPECT_EQ(seen.pid, ::getpid());
  EXPECT_EQ(seen.uid, ::geteuid());
  EXPECT_EQ(seen.gid, ::getegid());
  std::vector<gid_t> mine(static_cast<std::size_t>(::getgroups(0, nullptr)));
  ::getgroups(static_cast<int>(mine.size()), mine.data());
  for (gid_t g : mine) EXPECT_TRUE(seen.in_group(g)) << g;
  EXPECT_EQ(server_->stats().refusals, 1u);
  EXPECT_EQ(server_->stats().sessions_total, 0u);
  EXPECT_EQ(sessions_ended(), 0u);  // never started, so never ended
}

// The refusal and the close come before the client's first byte: its write
// fails (the server is gone), and the refusal waiting in its socket still
// tells it why.
TEST_F(ServerTest, AClientRefusedBeforeItWritesStillLearnsWhy) {
  server_options o;
  o.admit = [](const peer_identity&) { return make_error_code(errc::permission_denied); };
  start(std::move(o));
  auto fd = raw_connect(path_);
  ASSERT_TRUE(fd);
  ASSERT_TRUE(test::eventually([&] { return server_->stats().refusals == 1; }));
  auto c = blocking_connection::adopt(std::move(fd));
  ASSERT_TRUE(c);
  StringValue in;
  in.set_value("x");
  auto r = typed_call<StringValue>(*c, echo_type, in, soon());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), make_error_code(errc::permission_denied));
  EXPECT_EQ(handled_.load(), 0);
}

// The same through the asynchronous connection, idle and waiting to read when
// the refusal comes: its call's write runs before the wait completes and
// fails (the server is gone), and the refusal read from the socket then is
// the reason the call gets.
TEST_F(ServerTest, AnAsyncClientRefusedBeforeItWritesStillLearnsWhy) {
  std::promise<void> gate;
  server_options o;
  o.admit = [opened = gate.get_future().share()](const peer_identity&) {
    opened.wait();
    return make_error_code(errc::permission_denied);
  };
  start(std::move(o));
  boost::asio::io_context client_ctx;
  auto c = connection::connect(client_ctx, path_);
  ASSERT_TRUE(c);
  client_ctx.run_for(std::chrono::milliseconds(20));  // its first read finds nothing and waits
  gate.set_value();
  ASSERT_TRUE(test::eventually([&] { return server_->stats().refusals == 1; }));
  StringValue in;
  in.set_value("x");
  auto f = async_typed_call<StringValue>(**c, echo_type, in, boost::asio::use_future);
  test::run_until(client_ctx,
                  [&] { return f.wait_for(std::chrono::seconds(0)) == std::future_status::ready; });
  error_code got;
  try {
    (void)f.get();
  } catch (const boost::system::system_error& e) {
    got = e.code();
  }
  EXPECT_EQ(got, make_error_code(errc::permission_denied));
  EXPECT_EQ(handled_.load(), 0);
}

TEST_F(ServerTest, AnotherUserIsRefusedByDefault) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to connect as another uid";
  start();
  const pid_t child = ::fork();
  if (child == 0) {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(2);
    auto c = blocking_connection::connect(path_);
    if (!c) ::_exit(0);  // the directory may already keep it out
    auto r = typed_call<StringValue>(*c, echo_type, StringValue{}, soon());
    ::_exit(r ? 1 : 0);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  EXPECT_EQ(handled_.load(), 0);
}

TEST_F(ServerTest, SessionCarriesAPidfdThatSeesThePeerDie) {
  std::shared_ptr<server_session> session;
  std::mutex m;
  server_options o;
  o.on_session_start = [&](const std::shared_ptr<server_session>& s) {
    std::lock_guard lock(m);
    session = s;
  };
  start(std::move(o));
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    auto c = blocking_connection::connect(path_);
    char byte;
    (void)::read(go[0], &byte, 1);
    ::_exit(c ? 0 : 1);
  }
  ASSERT_TRUE(wait_for([&] {
    std::lock_guard lock(m);
    return session != nullptr;
  }));
  EXPECT_EQ(session->peer().pid, child);
  EXPECT_GE(session->pidfd(), 0);
  EXPECT_TRUE(session->peer_alive());
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  EXPECT_FALSE(session->peer_alive());
  ::close(go[0]);
  ::close(go[1]);
  EXPECT_TRUE(wait_for([&] { return sessions_ended() == 1; }));
}

TEST_F(ServerTest, PeerKilledMidRequestIsReleasedExactlyOnce) {
  start();
  const pid_t child = ::fork();
  if (child == 0) {
    auto c = blocking_connection::connect(path_);
    if (!c) ::_exit(1);
    UInt32Value five;
    five.set_value(5);
    if (!typed_call<UInt32Value>(*c, count_type, five, soon())) ::_exit(1);
    UInt32Value slow;
    slow.set_value(300);
    (void)typed_call<UInt32Value>(*c, slow_type, slow, soon());  // killed while this runs
    ::_exit(0);
  }
  ASSERT_TRUE(wait_for([&] { return slow_started_.load(); }));
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ASSERT_TRUE(wait_for([&] { return sessions_ended() == 1; }));
  EXPECT_TRUE(slow_finished_.load());  // the handler ran to its end; its reply went nowhere
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::lock_guard lock(mutex_);
  ASSERT_EQ(ended_.size(), 1u);
  EXPECT_EQ(ended_.begin()->second, 1);
  EXPECT_EQ(released_, 5u);
  EXPECT_EQ(reasons_.begin()->second, errc::peer_closed);
}

TEST_F(ServerTest, ReplyOverTheFrameLimitIsAnsweredWithTheRoutersError) {
  router_.on<StringValue, StringValue>(9, [](request_context&, const StringValue&) {
    StringValue big;
    big.set_value(std::string(8192, 'x'));
    return result<StringValue>(big);
  });
  server_options o;
  o.listen.connection.max_frame_size = 4096;
  start(std::move(o));
  auto c = client();
  auto r = typed_call<StringValue>(c, 9, StringValue{}, soon());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), errc::frame_too_large);
}

}  // namespace
}  // namespace uipc::server_test
