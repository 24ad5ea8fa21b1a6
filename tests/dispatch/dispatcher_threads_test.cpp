// The dispatcher on a loop with two threads and a SO_REUSEPORT socket group (run under TSan too).
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <chrono>
#include <cstring>
#include <list>
#include <thread>
#include <vector>

#include "test_support.hpp"
#include "threads_support.hpp"
#include "uipc/core/event_loop.hpp"
#include "uipc/dispatch/dispatcher.hpp"

namespace uipc::dispatch {
namespace {

using test::eventually;
using test_threads::client;
using test_threads::echo_listener;
using test_threads::loopback_any;
namespace asio = boost::asio;

TEST(DispatcherThreadsTest, ReusePortGroupServesFromTwoThreadsWithoutLosingATransaction) {
  event_loop loop(2);
  dispatcher_options server_options;
  server_options.sockets = 2;
  auto server = dispatcher::create(loop.context(), loopback_any, server_options);
  ASSERT_TRUE(server) << server.error().message();
  EXPECT_EQ((*server)->native_handles().size(), 2u);
  std::list<echo_listener> listeners;
  for (int i = 0; i < 2; ++i) {
    auto l = (*server)->add_listener();
    ASSERT_TRUE(l);
    listeners.emplace_back(std::move(*l));
  }
  constexpr int clients = 4;
  constexpr int per_client = 1500;
  std::list<client> all;
  for (int i = 0; i < clients; ++i) {
    dispatcher_options o;
    o.sockets = i % 2 == 0 ? 1 : 2;  // replies land on either socket of a group
    auto d = dispatcher::create(loop.context(), loopback_any, o);
    ASSERT_TRUE(d);
    all.emplace_back(*d, (*server)->local_endpoint(), 16, per_client);
  }
  for (auto& l : listeners) asio::post(loop.context(), [&l] { l.start(); });
  for (auto& c : all) asio::post(loop.context(), [&c] { c.start(); });
  test::loop_runner runner(loop);
  auto finished = [&] {
    int n = 0;
    for (auto& c : all) n += c.completed() + c.failed();
    return n == clients * per_client;
  };
  EXPECT_TRUE(test::eventually(finished, std::chrono::seconds(30)));
  // Detach from the loop's threads, then stop.
  ASSERT_TRUE(test::run_on(loop.context(), [&] {
    for (auto& c : all) c.stop();
    for (auto& l : listeners) l.detach();
  }));
  const auto stats = (*server)->stats();
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
  std::uint64_t answered = 0;
  for (auto& l : listeners) answered += l.answered();
  EXPECT_EQ(answered, static_cast<std::uint64_t>(clients * per_client));
  EXPECT_EQ(stats.received, static_cast<std::uint64_t>(clients * per_client));
}

/// A plain UDP client on its own port (the kernel spreads ports over a
/// SO_REUSEPORT group), outside any io_context: the tests' load and probes.
class plain_client {
 public:
  plain_client() : fd_(::socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0)) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  }
  ~plain_client() { ::close(fd_); }
  plain_client(const plain_client&) = delete;
  plain_client& operator=(const plain_client&) = delete;

  /// A 12-byte query with `id`; false when the socket buffer is full.
  bool send_query(const udp::endpoint& to, std::uint16_t id) {
    std::array<std::byte, 12> q{};
    q[0] = static_cast<std::byte>(id >> 8);
    q[1] = static_cast<std::byte>(id & 0xff);
    return ::sendto(fd_, q.data(), q.size(), 0, to.data(), static_cast<socklen_t>(to.size())) ==
           static_cast<ssize_t>(q.size());
  }
  /// Reads every reply waiting now; returns how many.
  int drain() {
    int n = 0;
    std::array<std::byte, 64> buf{};
    while (::recv(fd_, buf.data(), buf.size(), 0) > 0) ++n;
    return n;
  }
  /// Sends a query with `id` until its reply comes (a lost datagram is sent
  /// again); false if none came within `deadline`. Older replies are skipped.
  bool transaction(const udp::endpoint& to, std::uint16_t id, std::chrono::milliseconds deadline) {
    const auto until = std::chrono::steady_clock::now() + deadline;
    while (std::chrono::steady_clock::now() < until) {
      if (!send_query(to, id)) continue;
      pollfd p{fd_, POLLIN, 0};
      const auto resend_at = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
      while (std::chrono::steady_clock::now() < resend_at && ::poll(&p, 1, 20) >= 0) {
        std::array<std::byte, 64> buf{};
        const auto n = ::recv(fd_, buf.data(), buf.size(), 0);
        if (n >= 12 &&
            (std::to_integer<unsigned>(buf[0]) << 8 | std::to_integer<unsigned>(buf[1])) == id)
          return true;
      }
    }
    return false;
  }

 private:
  int fd_;
};

/// Answers only the probes (ID >= 1000). Other queries are returned from a
/// posted task, which may run on the other thread: until then the listener
/// holds them (and gets no next one), so the pool runs dry with buffers lent
/// and comes back to life as they return, on both sockets of a group. Counts
/// no_buffers events and asks again after them.
class probe_listener {
 public:
  probe_listener(listener l, asio::io_context& ctx) : l_(std::move(l)), ctx_(ctx) {}
  void start() {
    l_.async_receive([this](error_code ec, event ev) {
      if (ec == errc::no_buffers) {
        no_buffers_.fetch_add(1);
      } else if (ec) {
        return;  // detached: `this` may be gone, touch nothing
      } else if (ev.id() >= 1000) {
        auto data = ev.data();
        data[2] |= std::byte{0x80};
        (void)l_.reply(std::move(ev), data);
      } else {
        asio::post(ctx_, [kept = std::move(ev)]() mutable { kept.release(); });
      }
      ev.release();
      start();
    });
  }
  void detach() { l_.detach(); }
  int no_buffers() const { return no_buffers_.load(); }

 private:
  listener l_;
  asio::io_context& ctx_;
  std::atomic<int> no_buffers_{0};
};

// The restart flow's decisions with two sockets sharing one small pool, on two
// threads: a socket that finds the pool dry while buffers are lent (events the
// listeners keep, replies waiting to be sent) or held by the other socket's
// read stops and waits for them; it never gives a listener a no_buffers event
// (with a query queue shorter than the pool, queued queries never hold every
// buffer); and it restarts when they come back. However the threads
// interleave, afterwards every socket of the group still receives: each
// client, whichever socket its port hashes to, is answered.
TEST(DispatcherThreadsTest, ReusePortGroupWithATinyPoolKeepsEverySocketReceiving) {
  event_loop loop(2);
  dispatcher_options o;
  o.sockets = 2;
  o.buffers = 4;  // less than one read's worth per socket: the sockets compete
  o.max_receives = 4;
  o.max_queued_queries = 2;
  auto d = dispatcher::create(loop.context(), loopback_any, o);
  ASSERT_TRUE(d) << d.error().message();
  const udp::endpoint server = (*d)->local_endpoint();
  std::list<probe_listener> listeners;
  for (int i = 0; i < 2; ++i) {
    auto l = (*d)->add_listener();
    ASSERT_TRUE(l);
    listeners.emplace_back(std::move(*l), loop.context());
  }
  for (auto& l : listeners) asio::post(loop.context(), [&l] { l.start(); });
  test::loop_runner runner(loop);

  std::vector<std::unique_ptr<plain_client>> clients;
  for (int i = 0; i < 16; ++i) clients.push_back(std::make_unique<plain_client>());
  // Bursts far beyond the pool, from every client at once: dry pools, full
  // queues and reads racing on both threads.
  for (int burst = 0; burst < 20; ++burst) {
    for (auto& c : clients) {
      for (int k = 0; k < 32; ++k) c->send_query(server, static_cast<std::uint16_t>(k));
    }
    for (auto& c : clients) c->drain();
  }
  // Every client is answered afterwards (liveness of both sockets).
  for (std::size_t i = 0; i < clients.size(); ++i) {
    EXPECT_TRUE(clients[i]->transaction(server, static_cast<std::uint16_t>(1000 + i),
                                        std::chrono::seconds(10)))
        << "client " << i << " got no answer: its socket stopped receiving";
  }
  // Once the replies are out and the kept events back, every buffer is back,
  // and both sockets are armed.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  dispatcher_stats st;
  do {
    for (auto& c : clients) c->drain();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    st = (*d)->stats();
  } while ((st.buffers_in_use != 0 || st.receiving_sockets != 2) &&
           std::chrono::steady_clock::now() < until);
  EXPECT_EQ(st.buffers_in_use, 0u);
  EXPECT_EQ(st.buffers_lent, 0u);
  EXPECT_EQ(st.queued_queries, 0u);
  EXPECT_EQ(st.receiving_sockets, 2u);
  EXPECT_EQ(st.no_buffer_events, 0u) << "a socket gave up while buffers were coming back";
  for (auto& l : listeners) EXPECT_EQ(l.no_buffers(), 0);
  EXPECT_GT(st.received, 0u);

  ASSERT_TRUE(test::run_on(loop.context(), [&] {
    for (auto& l : listeners) l.detach();
  }));
  d->reset();
  runner.stop();
  loop.context().restart();
  loop.context().poll();
}

/// Answers each query with a reply and a second, asynchronous datagram (a
/// send with a completion), from whichever loop thread runs it; records the
/// shutdown event and anything that would wrongly come after it.
class racing_listener {
 public:
  racing_listener(listener l, asio::io_context& ctx) : l_(std::move(l)), ctx_(ctx) {}
  void start() {
    l_.async_receive([this](error_code ec, event ev) {
      if (ev.kind() == event_kind::shutdown) {
        shutdowns_.fetch_add(1);
        ev.release();
        return;  // nothing may follow; not asked again
      }
      if (ec) {
        if (ec != asio::error::operation_aborted && ec != errc::detached) unexpected_.fetch_add(1);
        return;
      }
      if (shutdowns_.load() != 0) after_shutdown_.fetch_add(1);
      const udp::endpoint to = ev.peer();
      auto data = ev.data();
      data[2] |= std::byte{0x80};
      answered_.fetch_add(1);
      (void)l_.reply(std::move(ev), data);  // shutting_down once it started: fine
      send_extra(to);                       // joins this read's sendmmsg
      // And one from outside the read: queued for a posted flush, which the
      // shutdown may overtake.
      asio::post(ctx_, [this, to] { send_extra(to); });
      start();
    });
  }
  void detach() { l_.detach(); }
  void send_extra(const udp::endpoint& to) {
    sends_started_.fetch_add(1);
    l_.async_send_to(extra_, to, [this](error_code ec) {
      if (ec && ec != errc::shutting_down && ec != asio::error::operation_aborted &&
          ec != errc::detached)
        unexpected_.fetch_add(1);
      sends_done_.fetch_add(1);
    });
  }

  std::atomic<int> shutdowns_{0}, after_shutdown_{0}, unexpected_{0}, answered_{0};
  std::atomic<int> sends_started_{0}, sends_done_{0};

 private:
  static constexpr std::array<std::byte, 12> extra_{std::byte{0xff}, std::byte{0xff},
                                                    std::byte{0x80}};
  listener l_;
  asio::io_context& ctx_;
};

// dispatcher::shutdown() from a thread that is not the loop's, or from one loop
// thread while the other works, while both loop threads receive, reply
// (batched at their read's end), re-arm and send: each listener gets exactly
// one shutdown event and nothing after it, every send completes exactly once
// (sent, or refused with shutting_down), and every buffer comes back. Several
// rounds, shutting down at different moments.
TEST(DispatcherThreadsTest, ShutdownFromAnotherThreadRacesRepliesSendsAndReArmsCleanly) {
  constexpr std::array<int, 3> moments{1, 100, 2000};  // queries answered before the shutdown
  for (std::size_t run = 0; run < 2 * moments.size(); ++run) {
    const int shut_after = moments[run % moments.size()];
    const bool from_loop = run >= moments.size();
    SCOPED_TRACE(testing::Message() << shut_after << (from_loop ? " from a loop thread" : ""));
    event_loop loop(2);
    dispatcher_options o;
    o.sockets = 2;
    o.buffers = 64;
    o.max_receives = 8;
    auto d = dispatcher::create(loop.context(), loopback_any, o);
    ASSERT_TRUE(d) << d.error().message();
    const udp::endpoint server = (*d)->local_endpoint();
    std::list<racing_listener> listeners;
    for (int i = 0; i < 2; ++i) {
      auto l = (*d)->add_listener();
      ASSERT_TRUE(l);
      listeners.emplace_back(std::move(*l), loop.context());
    }
    for (auto& l : listeners) asio::post(loop.context(), [&l] { l.start(); });
    test::loop_runner runner(loop);

    std::atomic<bool> stop_load{false};
    std::thread load([&] {
      std::vector<std::unique_ptr<plain_client>> clients;
      for (int i = 0; i < 8; ++i) clients.push_back(std::make_unique<plain_client>());
      for (int round = 0; round < 4000 && !stop_load.load(); ++round) {
        for (auto& c : clients) {
          c->send_query(server, static_cast<std::uint16_t>(round));
          c->drain();
        }
      }
    });
    auto answered = [&] {
      int n = 0;
      for (auto& l : listeners) n += l.answered_.load();
      return n;
    };
    eventually(
        [&] { return answered() >= shut_after; });  // not asserted: only where the race falls
    if (from_loop) {
      asio::post(loop.context(), [dispatcher = *d] { dispatcher->shutdown(); });
    } else {
      (*d)->shutdown();
    }
    EXPECT_TRUE(eventually([&] {
      for (auto& l : listeners)
        if (l.shutdowns_.load() == 0) return false;
      return true;
    }));
    stop_load = true;
    load.join();
    EXPECT_TRUE(eventually([&] {
      for (auto& l : listeners)
        if (l.sends_done_.load() != l.sends_started_.load()) return false;
      return true;
    })) << "a send never completed";
    // Both counts: a buffer goes back to the pool a moment before it stops
    // counting as lent (see dispatcher_stats).
    EXPECT_TRUE(eventually([&] {
      const auto now = (*d)->stats();
      return now.buffers_in_use == 0 && now.buffers_lent == 0;
    })) << "a buffer was not given back";
    for (auto& l : listeners) {
      EXPECT_EQ(l.shutdowns_.load(), 1);
      EXPECT_EQ(l.after_shutdown_.load(), 0);
      EXPECT_EQ(l.unexpected_.load(), 0);
      EXPECT_EQ(l.sends_done_.load(), l.sends_started_.load());
    }
    const auto st = (*d)->stats();
    EXPECT_TRUE(st.shutting_down);
    EXPECT_EQ(st.buffers_lent, 0u);
    EXPECT_EQ(st.queued_queries, 0u);

    ASSERT_TRUE(test::run_on(loop.context(), [&] {
      for (auto& l : listeners) l.detach();
    }));
    d->reset();
    runner.stop();
    loop.context().restart();
    loop.context().poll();
  }
}

}  // namespace
}  // namespace uipc::dispatch
