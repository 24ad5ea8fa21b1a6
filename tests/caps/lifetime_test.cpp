// What a service or a client leaves when its io_context goes with handlers
// never run: a coroutine that owns the service (or client) it waits on is
// destroyed with the context, as a handler in Asio's own queues would be.
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "caps_support.hpp"

namespace uipc::caps::test {
namespace {

namespace asio = boost::asio;

class Lifetime : public caps_test {};

asio::awaitable<void> receive_owning(std::unique_ptr<service> s, std::shared_ptr<int> marker) {
  co_await s->async_receive(asio::as_tuple(asio::use_awaitable));
  (void)marker;
}

asio::awaitable<void> call_owning(std::unique_ptr<client> c, std::shared_ptr<int> marker) {
  co_await c->async_call(bytes("never answered"), asio::as_tuple(asio::use_awaitable));
  (void)marker;
}

TEST_F(Lifetime, AServiceOwnedByTheCoroutineWaitingOnItGoesWithTheContext) {
  std::weak_ptr<int> alive;
  {
    asio::io_context ctx;
    auto svc = service::register_point(ctx, "life.service", options());
    ASSERT_TRUE(svc) << svc.error().message();
    auto marker = std::make_shared<int>(1);
    alive = marker;
    asio::co_spawn(ctx, receive_owning(std::move(*svc), std::move(marker)), asio::detached);
    ctx.run_for(20ms);  // the receive waits: no client, no event
    ctx.stop();
  }
  EXPECT_TRUE(alive.expired()) << "the coroutine (and the service it owns) outlived its context";
}

TEST_F(Lifetime, AClientOwnedByTheCoroutineWaitingOnACallGoesWithTheContext) {
  auto svc = serve("life.client");  // on the fixture's loop; it never answers
  ASSERT_TRUE(svc) << svc.error().message();
  std::weak_ptr<int> alive;
  {
    asio::io_context ctx;
    auto c = client::connect(ctx, address("life.client"), {});
    ASSERT_TRUE(c) << c.error().message();
    auto marker = std::make_shared<int>(1);
    alive = marker;
    asio::co_spawn(ctx, call_owning(std::move(*c), std::move(marker)), asio::detached);
    ctx.run_for(20ms);  // the call goes out; no reply comes
    const event req = next_event(**svc, event_kind::request);
    EXPECT_EQ(req.kind, event_kind::request);
    EXPECT_EQ(req.copy(), "never answered");
    ctx.stop();
  }
  EXPECT_TRUE(alive.expired()) << "the coroutine (and the client it owns) outlived its context";
}

}  // namespace
}  // namespace uipc::caps::test
