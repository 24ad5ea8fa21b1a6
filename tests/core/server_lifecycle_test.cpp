// The server kit's lifecycle: the first-frame and partial-frame deadlines,
// idle exit, ordered stop, a copy in a forked child, accept under descriptor
// exhaustion.
#include "server_fixture.hpp"

namespace uipc::server_test {
namespace {

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

// A second stop(), on another thread while the first waits for a handler,
// returns only once the first is done: the handler finished and every session
// ended (its caller may destroy what the hooks use once it returns).
TEST_F(ServerTest, ASecondStopReturnsOnlyOnceTheFirstIsDone) {
  start();
  auto a = client();
  std::thread caller([&] {
    UInt32Value slow;
    slow.set_value(300);
    (void)typed_call<UInt32Value>(a, slow_type, slow, soon());
  });
  ASSERT_TRUE(wait_for([&] { return slow_started_.load(); }));
  auto first = std::async(std::launch::async, [&] { server_->stop(); });
  // The first is under way once the socket file is gone; it then waits for
  // the handler (300 ms long).
  ASSERT_TRUE(wait_for([&] { return ::access(path_.c_str(), F_OK) != 0; }));
  ASSERT_FALSE(slow_finished_.load()) << "the handler ended before the second stop() was called";
  server_->stop();
  EXPECT_TRUE(slow_finished_.load()) << "the second stop() returned while a handler ran";
  EXPECT_EQ(sessions_ended(), 1u) << "the second stop() returned before the sessions ended";
  first.get();
  caller.join();
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
}  // namespace uipc::server_test
