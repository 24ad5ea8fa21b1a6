// What a dispatcher leaves when its io_context goes with handlers never run: a
// coroutine that owns the response (or listener) it waits on is destroyed with
// the context, as a handler in Asio's own queues would be, and with it the
// dispatcher the party holds.
#include "dispatch_support.hpp"

namespace uipc::dispatch {
namespace {

template <class Party>
asio::awaitable<void> receive_owning(Party p, std::shared_ptr<int> marker) {
  co_await p.async_receive(asio::as_tuple(asio::use_awaitable));
  (void)marker;
}

// Waits for a port while it holds the only one (exclusive_sockets = 1).
asio::awaitable<void> add_owning(ref_ptr<dispatcher> d, response holding, udp::endpoint peer,
                                 std::shared_ptr<int> marker) {
  response_options o;
  o.ports = port_mode::exclusive;
  co_await d->async_add_response(peer, o, asio::as_tuple(asio::use_awaitable));
  (void)holding;
  (void)marker;
}

class DispatcherLifetimeTest : public ::testing::Test {
 protected:
  /// Runs `start` (which spawns the coroutine, given the marker it must own)
  /// on a context of its own, stops the context with the coroutine waiting,
  /// and destroys it: the marker must go with it.
  template <class Start>
  void expect_gone_with_the_context(dispatcher_options options, Start start) {
    std::weak_ptr<int> alive;
    {
      asio::io_context ctx;
      auto d = dispatcher::create(ctx, loopback_any, options);
      ASSERT_TRUE(d) << d.error().message();
      udp::socket silent(ctx, udp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
      auto marker = std::make_shared<int>(1);
      alive = marker;
      start(ctx, std::move(*d), silent.local_endpoint(), std::move(marker));
      ctx.run_for(std::chrono::milliseconds(20));  // the wait starts; nothing answers
      EXPECT_FALSE(alive.expired()) << "the coroutine ended: nothing was tested";
      ctx.stop();
    }
    EXPECT_TRUE(alive.expired()) << "the coroutine (and the dispatcher) outlived its context";
  }
};

TEST_F(DispatcherLifetimeTest, AResponseOnTheSharedSocket) {
  expect_gone_with_the_context(
      {}, [](auto& ctx, ref_ptr<dispatcher> d, udp::endpoint peer, std::shared_ptr<int> marker) {
        auto r = d->add_response(peer);
        ASSERT_TRUE(r);
        asio::co_spawn(ctx, receive_owning(std::move(*r), std::move(marker)), asio::detached);
      });
}

TEST_F(DispatcherLifetimeTest, AResponseOnAnExclusivePort) {
  expect_gone_with_the_context(
      {}, [](auto& ctx, ref_ptr<dispatcher> d, udp::endpoint peer, std::shared_ptr<int> marker) {
        response_options o;
        o.ports = port_mode::exclusive;
        auto r = d->add_response(peer, o);
        ASSERT_TRUE(r) << r.error().message();
        asio::co_spawn(ctx, receive_owning(std::move(*r), std::move(marker)), asio::detached);
      });
}

TEST_F(DispatcherLifetimeTest, AListener) {
  expect_gone_with_the_context(
      {}, [](auto& ctx, ref_ptr<dispatcher> d, udp::endpoint, std::shared_ptr<int> marker) {
        auto l = d->add_listener();
        ASSERT_TRUE(l);
        asio::co_spawn(ctx, receive_owning(std::move(*l), std::move(marker)), asio::detached);
      });
}

TEST_F(DispatcherLifetimeTest, AWaiterForAnExclusivePort) {
  dispatcher_options options;
  options.exclusive_sockets = 1;
  expect_gone_with_the_context(options, [](auto& ctx, ref_ptr<dispatcher> d, udp::endpoint peer,
                                           std::shared_ptr<int> marker) {
    response_options o;
    o.ports = port_mode::exclusive;
    auto only = d->add_response(peer, o);
    ASSERT_TRUE(only) << only.error().message();
    asio::co_spawn(ctx, add_owning(d, std::move(*only), peer, std::move(marker)), asio::detached);
  });
}

}  // namespace
}  // namespace uipc::dispatch
