// Sessions are cheap and reclaimed: a thousand idle connections cost at most
// 8 KB each, and once they close the server's memory returns to within 2 MB of
// where it started. Resident memory is the measure, so the plain build only
// (sanitizers keep freed memory in quarantine on purpose). And a server whose
// loop stopped before its stop's closes ran leaves nothing behind (every build).
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <cstring>
#include <fstream>
#include <thread>
#include <vector>

#include "raw_peer.hpp"
#include "test_support.hpp"
#include "uipc/core/server.hpp"

namespace uipc {
namespace {

using test::raw_connect;
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)

std::size_t resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t total = 0;
  std::size_t resident = 0;
  statm >> total >> resident;
  return resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
}

bool wait_for_sessions(const server& s, std::uint64_t n) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (s.stats().sessions != n) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// Each configuration a module uses: peers that pass descriptors (the read waits
// with a peek, no buffer) and peers that never do (the read waits in the
// buffer itself, as the handle daemon's connections do).
class ServerMemoryTest : public ::testing::TestWithParam<bool> {};

TEST_P(ServerMemoryTest, ThousandIdleSessionsAreCheapAndGiveTheirMemoryBack) {
  constexpr std::size_t sessions = 1000;
  rlimit lim{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &lim), 0);
  if (lim.rlim_cur < 4 * sessions) {
    lim.rlim_cur = std::min<rlim_t>(lim.rlim_max, 4 * sessions);
    ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &lim), 0);
  }
  if (lim.rlim_cur < 3 * sessions + 64) GTEST_SKIP() << "RLIMIT_NOFILE too low: " << lim.rlim_cur;

  test::temp_dir dir;
  boost::asio::io_context ctx;
  auto guard = boost::asio::make_work_guard(ctx);
  request_router router;
  server_options o;
  o.first_frame_timeout = std::chrono::minutes(5);
  o.listen.backlog = 1024;
  o.listen.connection.peer_sends_fds = GetParam();
  auto s = server::start(ctx, dir.file("mem.sock"), router, o);
  ASSERT_TRUE(s) << s.error().message();
  std::thread loop([&] { ctx.run(); });

  // Warm up what is made once (strand pools, the loop thread's malloc arena).
  std::vector<unique_fd> clients;
  for (int round = 0; round < 2; ++round) {
    for (std::size_t i = 0; i < 100; ++i) clients.push_back(raw_connect(dir.file("mem.sock")));
    ASSERT_TRUE(wait_for_sessions(**s, 100));
    clients.clear();
    ASSERT_TRUE(wait_for_sessions(**s, 0));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const std::size_t before = resident_bytes();

  clients.reserve(sessions);
  for (std::size_t i = 0; i < sessions; ++i) {
    clients.push_back(raw_connect(dir.file("mem.sock")));
    ASSERT_TRUE(clients.back()) << i;
  }
  ASSERT_TRUE(wait_for_sessions(**s, sessions));
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const std::size_t held = resident_bytes();
  const double per_session = (static_cast<double>(held) - static_cast<double>(before)) / sessions;
  EXPECT_LE(per_session, 8192.0) << "before " << before << " held " << held;

  clients.clear();
  ASSERT_TRUE(wait_for_sessions(**s, 0));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const std::size_t after = resident_bytes();
  EXPECT_LE(after, before + 2 * 1024 * 1024) << "before " << before << " after " << after;
  RecordProperty("bytes_per_idle_session", static_cast<int>(per_session));
  std::printf("idle session: %.0f bytes; before %zu KiB, held %zu KiB, after %zu KiB\n",
              per_session, before / 1024, held / 1024, after / 1024);

  (*s)->stop();
  guard.reset();
  loop.join();
}

INSTANTIATE_TEST_SUITE_P(PeerPassesFds, ServerMemoryTest, ::testing::Bool());

#endif

// Stopped outside its loop, the server posts its sessions' closes; a loop
// that stops before they run leaves nothing behind when its context goes.
TEST(ServerLifetimeTest, AServerStoppedAfterItsLoopLeavesNothingWithTheContext) {
  test::temp_dir dir;
  request_router router;
  std::weak_ptr<server_session> session_left;
  std::atomic<bool> started{false};
  {
    boost::asio::io_context ctx;
    server_options o;
    o.on_session_start = [&](const std::shared_ptr<server_session>& s) {
      session_left = s;
      started = true;
    };
    auto srv = server::start(ctx, dir.file("s.sock"), router, std::move(o));
    ASSERT_TRUE(srv) << srv.error().message();
    auto client = blocking_connection::connect(dir.file("s.sock"));
    ASSERT_TRUE(client) << client.error().message();
    for (int i = 0; i < 1000 && !started; ++i) ctx.run_for(std::chrono::milliseconds(5));
    ASSERT_TRUE(started.load());
    ctx.poll();  // the session's receive is waiting
    (*srv)->stop();
    srv->reset();
  }
  EXPECT_TRUE(session_left.expired()) << "the session outlived its context";
}

}  // namespace
}  // namespace uipc
