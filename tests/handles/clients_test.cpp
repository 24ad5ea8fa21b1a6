// client::clients() and `uipcctl handles clients`: who is connected, and what
// each connection holds.
#include <algorithm>

#include "handles_support.hpp"

namespace uipc::handles {
namespace {

using namespace std::chrono_literals;

TEST(ClientsTest, EachConnectionIsListedWithWhatItHolds) {
  test::private_location loc;
  auto a = client::connect(loc.options());
  ASSERT_TRUE(a) << a.error().message();
  auto b = client::connect(loc.options());
  ASSERT_TRUE(b) << b.error().message();
  auto first = a->create_event(event_reset::manual, false, "first");
  auto second = a->create_event(event_reset::manual, false, "second");
  auto block = a->store_scratch(64);
  ASSERT_TRUE(first && second && block);
  auto opened = b->open("first");
  ASSERT_TRUE(opened);

  auto all = b->clients();
  ASSERT_TRUE(all) << all.error().message();
  ASSERT_EQ(all->size(), 2u);
  auto holding = [&](std::uint32_t handles) {
    return std::count_if(all->begin(), all->end(), [&](const client_info& e) {
      return e.handles == handles && e.pid == ::getpid() && e.uid == ::geteuid();
    });
  };
  EXPECT_EQ(holding(2), 1);  // a: two events
  EXPECT_EQ(holding(1), 1);  // b: one
  const auto with_scratch = std::count_if(all->begin(), all->end(), [](const client_info& e) {
    return e.scratch_blocks == 1;
  });
  EXPECT_EQ(with_scratch, 1);
  EXPECT_NE((*all)[0].session, (*all)[1].session);

  // A client that leaves is no longer listed.
  opened = make_error_code(errc::daemon_lost);
  b = make_error_code(errc::daemon_lost);
  const auto until = std::chrono::steady_clock::now() + 10s;
  for (;;) {
    all = a->clients();
    ASSERT_TRUE(all);
    if (all->size() == 1 || std::chrono::steady_clock::now() > until) break;
    std::this_thread::sleep_for(2ms);
  }
  ASSERT_EQ(all->size(), 1u);
  EXPECT_EQ(all->front().handles, 2u);
}

}  // namespace
}  // namespace uipc::handles
