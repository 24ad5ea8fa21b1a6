// Receivers on several threads: async ones on a loop of two threads, blocking
// ones taking turns at the pump.
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <future>
#include <thread>
#include <vector>

#include "caps_support.hpp"

namespace uipc::caps::test {
namespace {

class Receivers : public caps_test {};

// A point served on a loop of two threads, without spinning, by one receiver
// that re-arms itself from its handler: it echoes each request and counts the
// events it was given.
class echo_on_two_threads {
 public:
  echo_on_two_threads(const std::string& name, service_options o) {
    o.max_spin = std::chrono::nanoseconds(0);
    auto s = service::register_point(io_, name, o);
    if (!s) throw std::runtime_error(name + ": " + s.error().message());
    svc_ = std::move(*s);
    a_ = std::thread([this] { io_.run(); });
    b_ = std::thread([this] { io_.run(); });
    boost::asio::post(io_, [this] { receive_next(); });
  }
  ~echo_on_two_threads() {
    svc_->stop();
    work_.reset();
    a_.join();
    b_.join();
  }
  std::atomic<int> connected{0}, disconnected{0}, requests{0};

 private:
  void receive_next() {
    svc_->async_receive([this](error_code ec, event e) {
      if (ec) return;
      if (e.kind == event_kind::request) {
        ++requests;
        (void)svc_->reply(e.client, e.id, e.view());
      }
      if (e.kind == event_kind::connected) ++connected;
      if (e.kind == event_kind::disconnected) ++disconnected;
      receive_next();
    });
  }

  boost::asio::io_context io_{2};
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_ =
      boost::asio::make_work_guard(io_);
  std::unique_ptr<service> svc_;
  std::thread a_, b_;
};

// Each request must wake the receiver. (A pump that delivered an event and
// left while another receive was armed used to leave the channels hot, so no
// doorbell rang and the next request waited for its deadline.)
TEST_F(Receivers, AsyncReceiversOnTwoThreadsMissNoRequest) {
  echo_on_two_threads server("async2", options());
  auto c = connect("async2");
  ASSERT_TRUE(c);
  int answered = 0;
  for (int i = 0; i < 20000; ++i) {
    auto r = (*c)->call("x" + std::to_string(i), std::chrono::steady_clock::now() + 2s);
    if (!r) {
      ADD_FAILURE() << "call " << i << ": " << r.error().message();
      break;
    }
    ++answered;
  }
  EXPECT_EQ(answered, 20000);
  c->reset();
}

// Several clients calling and reconnecting: the posted start and the armed
// wait's handler may pump at once, and each receive must take exactly one
// event. (Both used to pop an event for the one receiver; the second took
// the front of an empty queue and crashed uipcd under load.)
TEST_F(Receivers, OneReceiverOnTwoThreadsTakesEachEventOnce) {
  echo_on_two_threads server("async1", options());
  constexpr int clients = 3, sessions = 10, calls = 300;
  std::atomic<int> answered{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < clients; ++t)
    callers.emplace_back([&, t] {
      for (int s = 0; s < sessions; ++s) {
        auto c = connect("async1");
        if (!c) {
          ADD_FAILURE() << "connect: " << c.error().message();
          return;
        }
        for (int i = 0; i < calls; ++i) {
          const std::string text =
              std::to_string(t) + "." + std::to_string(s) + "." + std::to_string(i);
          auto r = (*c)->call(text, std::chrono::steady_clock::now() + 5s);
          if (!r) {
            ADD_FAILURE() << "call " << text << ": " << r.error().message();
            return;
          }
          if (r->copy() == text) ++answered;
        }
      }
    });
  for (auto& t : callers) t.join();
  EXPECT_EQ(answered.load(), clients * sessions * calls);
  EXPECT_EQ(server.requests.load(), clients * sessions * calls);
  const auto give_up = std::chrono::steady_clock::now() + 5s;
  while (server.disconnected.load() < clients * sessions &&
         std::chrono::steady_clock::now() < give_up)
    std::this_thread::sleep_for(1ms);
  EXPECT_EQ(server.connected.load(), clients * sessions);
  EXPECT_EQ(server.disconnected.load(), clients * sessions);
}

// Blocking receivers on several threads take turns at the pump: each event
// goes to one of them, and one waiting for its turn still keeps its deadline.
TEST_F(Receivers, BlockingReceiversOnThreeThreadsTakeTurns) {
  auto svc = serve("turns");
  ASSERT_TRUE(svc);
  {
    // One receiver holds the pump (asleep on the bells, nothing to read):
    // another's short receive times out on time instead of waiting for it.
    auto holder = std::async(std::launch::async, [&] { return (*svc)->receive(in(600ms)); });
    std::this_thread::sleep_for(50ms);
    const auto start = clock::now();
    auto short_one = (*svc)->receive(in(100ms));
    const auto took = clock::now() - start;
    EXPECT_EQ(short_one.error(), make_error_code(uipc::errc::timed_out));
    EXPECT_GE(took, 90ms);
    EXPECT_LT(took, 450ms) << "waited for the other receiver's deadline";
    EXPECT_EQ(holder.get().error(), make_error_code(uipc::errc::timed_out));
  }
  constexpr int clients = 3, calls = 400;
  std::atomic<bool> done{false};
  std::atomic<int> requests{0};
  std::vector<std::thread> receivers;
  const auto answer = [&](result<event>& e) {
    if (!e || e->kind != event_kind::request) return;
    ++requests;
    if (auto ec = (*svc)->reply(*e, e->view())) ADD_FAILURE() << ec.message();
  };
  for (int t = 0; t < 2; ++t)
    receivers.emplace_back([&] {
      while (!done.load()) {
        auto e = (*svc)->receive(in(20ms));
        answer(e);
      }
    });
  // And one with no deadline at all: a turn handed over and never noticed
  // would leave it asleep (the service's stop ends it, below).
  auto forever = std::async(std::launch::async, [&] {
    for (;;) {
      auto e = (*svc)->receive();
      if (!e && e.error() == make_error_code(errc::stopped)) return;
      answer(e);
    }
  });
  std::atomic<int> answered{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < clients; ++t)
    callers.emplace_back([&, t] {
      auto c = connect("turns");
      if (!c) return ADD_FAILURE() << "connect: " << c.error().message();
      for (int i = 0; i < calls; ++i) {
        const std::string text = std::to_string(t) + "." + std::to_string(i);
        auto r = (*c)->call(text, in(5s));
        if (!r) return ADD_FAILURE() << "call " << text << ": " << r.error().message();
        if (r->copy() == text) ++answered;
      }
    });
  for (auto& t : callers) t.join();
  done = true;
  for (auto& t : receivers) t.join();
  EXPECT_EQ(answered.load(), clients * calls);
  EXPECT_EQ(requests.load(), clients * calls) << "each request once";
  EXPECT_EQ((*svc)->stats().replies, static_cast<std::uint64_t>(clients * calls));
  (*svc)->stop();
  ASSERT_EQ(forever.wait_for(5s), std::future_status::ready) << "a receiver never woke";
}

}  // namespace
}  // namespace uipc::caps::test
