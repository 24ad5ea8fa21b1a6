// The registry behind handler_store: what a context's destruction drops, and
// registrations that end before it or after it.
#include "uipc/core/handler_store.hpp"

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <functional>
#include <memory>
#include <optional>

namespace uipc {
namespace {

namespace asio = boost::asio;

/// Counts its drops; may destroy something when dropped.
struct counting_store final : handler_store {
  counting_store(asio::io_context& ctx, int* drops) : drops_(drops) {
    registration.emplace(ctx, *this);
  }
  void drop_handlers() noexcept override {
    ++*drops_;
    if (on_drop) on_drop();
  }
  int* drops_;
  std::function<void()> on_drop;
  std::optional<handler_registration> registration;  // last
};

TEST(HandlerStoreTest, TheContextsDestructionDropsEachRegisteredStoreOnce) {
  int first = 0, second = 0, ended = 0;
  std::unique_ptr<counting_store> a, b, c;
  {
    asio::io_context ctx;
    a = std::make_unique<counting_store>(ctx, &first);
    b = std::make_unique<counting_store>(ctx, &second);
    c = std::make_unique<counting_store>(ctx, &ended);
    c->registration.reset();  // ended before: not dropped
    EXPECT_EQ(first + second + ended, 0);
  }
  EXPECT_EQ(first, 1);
  EXPECT_EQ(second, 1);
  EXPECT_EQ(ended, 0);
}

TEST(HandlerStoreTest, ARegistrationEndedAfterItsContextIsGoneIsHarmless) {
  // A store the context outlives no longer (an operation whose last holder is
  // another thread): its registration ends on a registry the context no
  // longer has (AddressSanitizer would catch a freed one).
  int drops = 0;
  std::unique_ptr<counting_store> late;
  {
    auto ctx = std::make_unique<asio::io_context>();
    late = std::make_unique<counting_store>(*ctx, &drops);
    counting_store other(*ctx, &drops);
    other.registration.reset();
    ctx.reset();
  }
  EXPECT_EQ(drops, 1);
  late->registration.reset();
  late.reset();
}

TEST(HandlerStoreTest, AStoreDestroyedByAnotherStoresDropIsNotDropped) {
  int drops = 0;
  auto* ctx = new asio::io_context;  // NOLINT(cppcoreguidelines-owning-memory): deleted below
  auto a = std::make_unique<counting_store>(*ctx, &drops);
  auto b = std::make_unique<counting_store>(*ctx, &drops);
  // Whichever goes first destroys the other: one drop in all.
  a->on_drop = [&b] { b.reset(); };
  b->on_drop = [&a] { a.reset(); };
  delete ctx;  // NOLINT(cppcoreguidelines-owning-memory): the test's own
  EXPECT_EQ(drops, 1);
  EXPECT_NE(a == nullptr, b == nullptr);
}

TEST(HandlerStoreTest, AHeldStoreWhoseOwnerIsAlreadyGoingIsSkipped) {
  // Its owner's count is zero: its destructor (here: the end of the test)
  // ends its work, so the context's destruction leaves it alone.
  int drops = 0;
  std::optional<asio::io_context> ctx(std::in_place);
  counting_store store(*ctx, &drops);
  {
    const std::shared_ptr<counting_store> owner(&store, [](counting_store*) {});
    store.registration->hold(owner);
  }
  counting_store unheld(*ctx, &drops);
  ctx.reset();
  EXPECT_EQ(drops, 1);  // `unheld` alone
}

}  // namespace
}  // namespace uipc
