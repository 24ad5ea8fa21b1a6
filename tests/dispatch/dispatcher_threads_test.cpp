// The dispatcher on a loop with two threads and a SO_REUSEPORT socket group (run under TSan too).
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <list>
#include <thread>
#include <vector>

#include "test_support.hpp"
#include "uipc/core/event_loop.hpp"
#include "uipc/dispatch/dispatcher.hpp"

namespace uipc::dispatch {
namespace {

namespace asio = boost::asio;

const udp::endpoint loopback_any(asio::ip::make_address("127.0.0.1"), 0);

/// Answers every query by flipping its QR bit, in place.
class echo_listener {
 public:
  explicit echo_listener(listener l) : l_(std::move(l)) {}
  void start() {
    l_.async_receive([this](error_code ec, event ev) {
      if (ec) return;  // detached or shut down: `this` may be gone, touch nothing
      auto data = ev.data();
      data[2] |= std::byte{0x80};
      answered_.fetch_add(1, std::memory_order_relaxed);
      (void)l_.reply(std::move(ev), data);
      start();
    });
  }
  void detach() { l_.detach(); }
  std::uint64_t answered() const { return answered_.load(std::memory_order_relaxed); }

 private:
  listener l_;
  std::atomic<std::uint64_t> answered_{0};
};

/// Keeps `inflight` transactions going from one dispatcher until `total` finished.
class client {
 public:
  client(ref_ptr<dispatcher> d, udp::endpoint server, int inflight, int total)
      : d_(std::move(d)),
        server_(server),
        slots_(static_cast<std::size_t>(inflight)),
        left_(total) {}

  void start() {
    for (auto& s : slots_) next(s);
  }
  int completed() const { return completed_.load(); }
  int failed() const { return failed_.load(); }
  void stop() {
    for (auto& s : slots_) s.r.detach();
    d_.reset();
  }

 private:
  struct slot {
    response r;
  };

  void next(slot& s) {
    s.r.detach();
    if (left_.fetch_sub(1) <= 0) return;
    auto r = d_->add_response(server_, response_options{std::chrono::seconds(5)});
    if (!r) {
      failed_.fetch_add(1);
      return;
    }
    std::vector<std::byte> q(12, std::byte{0});
    d_->frame().write_id(q, r->id());
    if (!r->send(q)) failed_.fetch_add(1);
    s.r = std::move(*r);
    s.r.async_receive([this, &s](error_code ec, event ev) {
      if (ec == asio::error::operation_aborted) return;
      const bool ok = !ec && ev.id() == s.r.id();
      ev.release();
      next(s);
      // Counted last: once every transaction is counted, no handler touches a slot.
      (ok ? completed_ : failed_).fetch_add(1);
    });
  }

  ref_ptr<dispatcher> d_;
  udp::endpoint server_;
  std::vector<slot> slots_;
  std::atomic<int> left_;
  std::atomic<int> completed_{0};
  std::atomic<int> failed_{0};
};

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
  std::thread runner([&] { loop.run(); });
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  auto finished = [&] {
    int n = 0;
    for (auto& c : all) n += c.completed() + c.failed();
    return n == clients * per_client;
  };
  while (!finished() && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  // Detach from the loop's threads, then stop.
  std::atomic<bool> detached{false};
  asio::post(loop.context(), [&] {
    for (auto& c : all) c.stop();
    for (auto& l : listeners) l.detach();
    detached = true;
  });
  while (!detached) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const auto stats = (*server)->stats();
  server->reset();
  loop.stop();
  runner.join();
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

}  // namespace
}  // namespace uipc::dispatch
