// The server kit through its public face: admission, typed requests, sessions that
// end exactly once, the first-frame deadline, idle exit, ordered stop, accept
// under descriptor exhaustion.
#include "uipc/core/server.hpp"

#include <fcntl.h>
#include <google/protobuf/wrappers.pb.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_future.hpp>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "raw_peer.hpp"
#include "test_support.hpp"
#include "uipc/core/typed.hpp"

namespace uipc {
namespace {

using google::protobuf::StringValue;
using google::protobuf::UInt32Value;
using test::raw_connect;
using clock_type = std::chrono::steady_clock;

constexpr std::uint32_t echo_type = 1;
constexpr std::uint32_t count_type = 2;
constexpr std::uint32_t slow_type = 3;

clock_type::time_point soon() { return clock_type::now() + std::chrono::seconds(5); }

// The bytes of a whole frame: a count notice adding 1.
std::string count_notice() {
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);
  env.set_type(count_type);
  UInt32Value one;
  one.set_value(1);
  env.set_payload(one.SerializeAsString());
  return test::envelope_bytes(env);
}

// Whether the peer closed `fd` within a few seconds (EOF or reset; an error
// notice may come first).
bool closed_by_peer(int fd) {
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[512];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n == 0) return true;
    if (n < 0) return errno == ECONNRESET;
  }
}

// A server on its own loop thread, with hooks that record what happened.
class ServerTest : public ::testing::Test {
 protected:
  ServerTest() {
    router_.on<StringValue, StringValue>(
        echo_type, [this](request_context& ctx, const StringValue& in) {
          handled_at_echo_ = handled_.load();
          ++handled_;
          last_peer_pid_ = ctx.session.peer().pid;
          StringValue out;
          out.set_value(std::string(in.value().rbegin(), in.value().rend()));
          return result<StringValue>(out);
        });
    router_.on<UInt32Value, UInt32Value>(
        count_type,
        [this](request_context& ctx, const UInt32Value& in) -> result<UInt32Value> {
          ++handled_;
          if (in.value() == 0) return make_error_code(errc::not_held);
          std::lock_guard lock(mutex_);
          held_[ctx.session.id()] += in.value();
          UInt32Value out;
          out.set_value(held_[ctx.session.id()]);
          return out;
        },
        request_router::notices::served);
    router_.on<UInt32Value, UInt32Value>(
        slow_type, [this](request_context&, const UInt32Value& in) {
          ++handled_;
          slow_started_ = true;
          std::this_thread::sleep_for(std::chrono::milliseconds(in.value()));
          slow_finished_ = true;
          return result<UInt32Value>(in);
        });
  }

  ~ServerTest() override {
    if (server_) server_->stop();
    server_.reset();
    guard_.reset();
    if (thread_.joinable()) thread_.join();
  }

  void start(server_options o = {}) {
    o.on_session_end = [this, user = std::move(o.on_session_end)](server_session& s,
                                                                  error_code reason) {
      {
        std::lock_guard lock(mutex_);
        ++ended_[s.id()];
        reasons_[s.id()] = reason;
        released_ += held_[s.id()];
        held_.erase(s.id());
      }
      if (user) user(s, reason);
    };
    auto s = server::start(ctx_, path_, router_, std::move(o));
    ASSERT_TRUE(s) << s.error().message();
    server_ = std::move(*s);
    thread_ = std::thread([this] { ctx_.run(); });
  }

  blocking_connection client() {
    auto c = blocking_connection::connect(path_);
    EXPECT_TRUE(c) << c.error().message();
    return std::move(*c);
  }

  bool wait_for(const std::function<bool()>& done,
                std::chrono::seconds patience = std::chrono::seconds(10)) {
    const auto until = clock_type::now() + patience;
    while (!done()) {
      if (clock_type::now() > until) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
  }

  std::size_t sessions_ended() {
    std::lock_guard lock(mutex_);
    return ended_.size();
  }

  test::temp_dir dir_;
  std::string path_ = dir_.file("server.sock");
  boost::asio::io_context ctx_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard_{
      ctx_.get_executor()};
  request_router router_;
  std::unique_ptr<server> server_;
  std::thread thread_;

  std::atomic<int> handled_{0};
  std::atomic<int> handled_at_echo_{0};
  std::atomic<pid_t> last_peer_pid_{0};
  std::atomic<bool> slow_started_{false};
  std::atomic<bool> slow_finished_{false};
  std::mutex mutex_;
  std::map<std::uint64_t, std::uint32_t> held_;
  std::map<std::uint64_t, int> ended_;
  std::map<std::uint64_t, error_code> reasons_;
  std::uint64_t released_ = 0;
};

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

TEST_F(ServerTest, SilentConnectionIsClosedAfterTheFirstFrameDeadline) {
  server_options o;
  o.first_frame_timeout = std::chrono::milliseconds(100);
  start(std::move(o));
  auto fd = raw_connect(path_);
  ASSERT_TRUE(fd);
  EXPECT_TRUE(closed_by_peer(fd.get()));
  ASSERT_TRUE(wait_for([&] { return sessions_ended() == 1; }));
  EXPECT_EQ(server_->stats().protocol_errors, 1u);
  EXPECT_EQ(server_->stats().sessions, 0u);
  std::lock_guard lock(mutex_);
  EXPECT_EQ(reasons_.begin()->second, errc::timed_out);
}

// A frame begun and never finished closes the session at the server's
// partial-frame deadline (on by default), whatever came before it.
TEST_F(ServerTest, AFrameBegunAndNeverFinishedClosesTheSession) {
  EXPECT_GT(server_options{}.partial_frame_timeout.count(), 0);
  server_options o;
  o.partial_frame_timeout = std::chrono::milliseconds(100);
  start(std::move(o));
  auto fd = raw_connect(path_);
  ASSERT_TRUE(fd);
  const std::string whole = count_notice();
  const std::string begun = test::prefix(1 << 20) + "abc";  // announces 1 MiB, sends 3 bytes
  ASSERT_EQ(::send(fd.get(), whole.data(), whole.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(whole.size()));
  ASSERT_EQ(::send(fd.get(), begun.data(), begun.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(begun.size()));
  EXPECT_TRUE(closed_by_peer(fd.get()));
  ASSERT_TRUE(wait_for([&] { return sessions_ended() == 1; }));
  std::lock_guard lock(mutex_);
  EXPECT_EQ(reasons_.begin()->second, errc::timed_out);
}

// Descriptors from a peer that may not send any are not kept, even beside a
// frame still arriving.
TEST_F(ServerTest, DescriptorsFromAPeerThatMayNotSendAnyCloseTheSession) {
  server_options o;
  o.listen.connection.peer_sends_fds = false;
  start(std::move(o));
  const std::size_t fds_before = test::open_fd_count();
  auto fd = raw_connect(path_);
  ASSERT_TRUE(fd);
  const std::string begun = test::prefix(64);  // a frame begun, with 4 descriptors
  ASSERT_EQ(test::send_with_descriptors(fd.get(), begun, 4), static_cast<ssize_t>(begun.size()));
  EXPECT_TRUE(closed_by_peer(fd.get()));
  ASSERT_TRUE(wait_for([&] { return sessions_ended() == 1; }));
  fd.reset();
  EXPECT_TRUE(wait_for([&] { return test::open_fd_count() <= fds_before; }))
      << "the peer's descriptors were kept";
}

TEST_F(ServerTest, IdleServerStopsAcceptingThenCallsOnIdle) {
  std::atomic<int> idle{0};
  server_options o;
  o.linger = std::chrono::milliseconds(50);
  o.startup_grace = std::chrono::milliseconds(50);
  o.on_idle = [&] { ++idle; };
  start(std::move(o));
  {
    auto c = client();
    ASSERT_TRUE(typed_call<StringValue>(c, echo_type, StringValue{}, soon()));
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    EXPECT_EQ(idle.load(), 0);  // a session is open
  }
  ASSERT_TRUE(wait_for([&] { return idle.load() == 1; }));
  EXPECT_FALSE(blocking_connection::connect(path_));  // the socket is gone
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(idle.load(), 1);
}

TEST_F(ServerTest, StopWaitsForRunningHandlersThenEndsEverySessionOnce) {
  start();
  auto a = client();
  auto b = client();
  ASSERT_TRUE(typed_call<StringValue>(b, echo_type, StringValue{}, soon()));
  std::thread caller([&] {
    UInt32Value slow;
    slow.set_value(200);
    (void)typed_call<UInt32Value>(a, slow_type, slow, soon());
  });
  ASSERT_TRUE(wait_for([&] { return slow_started_.load(); }));
  server_->stop();
  EXPECT_TRUE(slow_finished_.load());
  caller.join();
  {
    std::lock_guard lock(mutex_);
    ASSERT_EQ(ended_.size(), 2u);
    for (const auto& [id, n] : ended_) EXPECT_EQ(n, 1) << id;
    for (const auto& [id, why] : reasons_) EXPECT_EQ(why, errc::shutting_down) << id;
  }
  EXPECT_FALSE(blocking_connection::connect(path_));
  auto late = typed_call<StringValue>(b, echo_type, StringValue{}, soon());
  EXPECT_FALSE(late);
  server_->stop();  // idempotent
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::lock_guard lock(mutex_);
  for (const auto& [id, n] : ended_) EXPECT_EQ(n, 1) << id;
}

// stop() returns only once no session hook runs: a session still in its
// start hook (not yet among the sessions stop() ends) ends itself first.
TEST_F(ServerTest, StopWaitsForASessionStillInItsStartHook) {
  std::promise<void> entered, release;
  std::shared_future<void> go = release.get_future().share();
  std::atomic<bool> stop_returned{false};
  std::atomic<bool> end_after_stop{false};
  std::atomic<int> ends{0};
  server_options o;
  o.on_session_start = [&, go](const std::shared_ptr<server_session>&) {
    entered.set_value();
    (void)go.wait_for(std::chrono::seconds(10));
  };
  o.on_session_end = [&](server_session&, error_code) {
    ++ends;
    if (stop_returned.load()) end_after_stop = true;
  };
  start(std::move(o));
  auto fd = raw_connect(path_);
  ASSERT_TRUE(fd);
  ASSERT_EQ(entered.get_future().wait_for(std::chrono::seconds(5)), std::future_status::ready);
  auto stopping = std::async(std::launch::async, [&] {
    server_->stop();
    stop_returned = true;
  });
  EXPECT_EQ(stopping.wait_for(std::chrono::milliseconds(100)), std::future_status::timeout)
      << "stop() returned while a start hook ran";
  release.set_value();
  stopping.get();
  EXPECT_EQ(ends.load(), 1);
  EXPECT_FALSE(end_after_stop.load());
}

// A program serving on a server that forks. The child goes on with Asio
// (notify_fork, then its loop) while the parent's client sends a request: the
// child's copy takes nothing (the parent serves the request), and stopping
// the copy there closes the child's descriptors and nothing else — the
// parent's socket file, sessions and hooks are untouched. The parent's loop
// is paused across the fork, so no thread of it holds Asio's locks then.
TEST_F(ServerTest, ACopyInAForkedChildTakesNothingAndStoppedLeavesTheParentServing) {
  start();
  auto a = client();
  ASSERT_TRUE(typed_call<StringValue>(a, echo_type, StringValue{}, soon()));
  ctx_.stop();
  thread_.join();
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ctx_.notify_fork(boost::asio::execution_context::fork_child);
    ctx_.restart();
    (void)::write(ready[1], "r", 1);
    ctx_.run_for(std::chrono::milliseconds(300));  // the parent's request arrives meanwhile
    server_->stop();
    server_.reset();
    ctx_.restart();
    ctx_.poll();
    ::_exit(sessions_ended() == 0 && handled_ == 1 ? 0 : 1);
  }
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);
  ::close(ready[0]);
  ::close(ready[1]);
  StringValue hello;
  hello.set_value("still here");
  std::optional<result<StringValue>> r;
  std::thread caller([&] { r = typed_call<StringValue>(a, echo_type, hello, soon()); });
  const int status = test::wait_exit(child, std::chrono::seconds(10));
  ctx_.restart();
  thread_ = std::thread([this] { ctx_.run(); });
  caller.join();
  EXPECT_EQ(status, 0) << "the child's copy served or ended the parent's sessions";
  ASSERT_TRUE(r && *r) << (r ? r->error().message() : "no call");
  EXPECT_EQ((*r)->value(), "ereh llits");
  EXPECT_EQ(handled_.load(), 2) << "the request was served by the child's copy";
  auto b = blocking_connection::connect(path_);
  EXPECT_TRUE(b) << "the socket file went with the child's copy";
  EXPECT_EQ(sessions_ended(), 0u);
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

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
TEST_F(ServerTest, AcceptBacksOffWhileDescriptorsRunOutThenServes) {
  start();
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
  rlimit low = old;
  low.rlim_cur = test::open_fd_count() + 8;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  unique_fd null_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(null_fd);
  std::vector<unique_fd> filler;
  for (;;) {
    unique_fd f(::fcntl(null_fd.get(), F_DUPFD_CLOEXEC, 0));
    if (!f) break;
    filler.push_back(std::move(f));
  }
  // One descriptor left, for our end: the server's accept finds none.
  ASSERT_FALSE(filler.empty());
  filler.pop_back();
  auto fd = raw_connect(path_);
  ASSERT_TRUE(fd);
  ASSERT_TRUE(wait_for([&] { return server_->stats().accept_failures >= 2; }));
  filler.clear();
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);
  auto c = blocking_connection::adopt(std::move(fd));
  ASSERT_TRUE(c);
  StringValue in;
  in.set_value("back");
  auto r = typed_call<StringValue>(*c, echo_type, in, soon());
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->value(), "kcab");
}
#endif

}  // namespace
}  // namespace uipc
