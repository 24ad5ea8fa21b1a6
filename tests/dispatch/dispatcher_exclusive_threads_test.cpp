// Exclusive ports on a loop with two threads (run under TSan too): sockets
// opened, read and closed while other threads read the set and detach.
#include <boost/asio/post.hpp>
#include <list>
#include <thread>

#include "test_support.hpp"
#include "threads_support.hpp"
#include "uipc/core/event_loop.hpp"

namespace uipc::dispatch {
namespace {

using test_threads::client;
using test_threads::echo_listener;
using test_threads::loopback_any;
namespace asio = boost::asio;

TEST(DispatcherThreadsTest, ExclusivePortsServeFromTwoThreadsWithoutLosingATransaction) {
  event_loop loop(2);
  const std::size_t fds_before = test::descriptors_with_reactor(loop.context());
  auto server = dispatcher::create(loop.context(), loopback_any);
  ASSERT_TRUE(server) << server.error().message();
  auto l = (*server)->add_listener();
  ASSERT_TRUE(l);
  echo_listener echo(std::move(*l));
  constexpr int clients = 2;
  constexpr int per_client = 600;
  std::list<client> all;
  std::vector<ref_ptr<dispatcher>> dispatchers;
  for (int i = 0; i < clients; ++i) {
    dispatcher_options o;
    o.exclusive_sockets = 8;  // as many as the client keeps in flight
    auto d = dispatcher::create(loop.context(), loopback_any, o);
    ASSERT_TRUE(d);
    dispatchers.push_back(*d);
    all.emplace_back(*d, (*server)->local_endpoint(), 8, per_client, port_mode::exclusive);
  }
  asio::post(loop.context(), [&echo] { echo.start(); });
  for (auto& c : all) asio::post(loop.context(), [&c] { c.start(); });
  test::loop_runner runner(loop);
  auto finished = [&] {
    int n = 0;
    for (auto& c : all) n += c.completed() + c.failed();
    return n == clients * per_client;
  };
  EXPECT_TRUE(test::eventually(finished, std::chrono::seconds(30)));
  ASSERT_TRUE(test::run_on(loop.context(), [&] {
    for (auto& c : all) c.stop();
    echo.detach();
  }));
  std::size_t open = 0, kept = 0;
  std::uint64_t received = 0, unmatched = 0, reused = 0;
  for (auto& d : dispatchers) {
    const auto st = d->stats();
    open += st.exclusive_open;
    kept += st.exclusive_kept;
    reused += st.exclusive_reused;
    received += st.exclusive_received;
    unmatched += st.exclusive_dropped_unmatched + st.dropped_unmatched;
  }
  dispatchers.clear();
  server->reset();
  runner.stop();
  loop.context().restart();
  loop.context().poll();
  int completed = 0, failed = 0;
  for (auto& c : all) {
    completed += c.completed();
    failed += c.failed();
  }
  EXPECT_EQ(completed, clients * per_client);
  EXPECT_EQ(failed, 0);
  // Every exclusive socket closed with its response or kept for the next one
  // (ports are reused, across the two threads, without losing a reply).
  EXPECT_EQ(open, kept);
  EXPECT_GT(reused, 0u);
  EXPECT_EQ(received, static_cast<std::uint64_t>(clients * per_client));
  EXPECT_EQ(unmatched, 0u);
  all.clear();
  EXPECT_EQ(echo.answered(), static_cast<std::uint64_t>(clients * per_client));
  EXPECT_EQ(test::open_fd_count(), fds_before) << "a descriptor leaked";
}

}  // namespace
}  // namespace uipc::dispatch
