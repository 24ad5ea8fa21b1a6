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
  const auto with_scratch = std::count_if(
      all->begin(), all->end(), [](const client_info& e) { return e.scratch_blocks == 1; });
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

// The daemon's own view, for the process that runs it (uipcd's control point):
// the same objects and clients its clients are told, and nothing once stopped.
TEST(ClientsTest, TheDaemonListsItsObjectsAndClientsInProcess) {
  test::private_location loc;
  test::in_process_daemon daemon(loc.where);
  ASSERT_TRUE(static_cast<bool>(daemon));
  EXPECT_TRUE(daemon->objects().empty());
  EXPECT_TRUE(daemon->clients().empty());
  auto a = client::connect(loc.options());
  ASSERT_TRUE(a) << a.error().message();
  auto ev = a->create_event(event_reset::manual, true, "listed");
  auto mx = a->create_mutex(false);
  ASSERT_TRUE(ev && mx);

  const auto objects = daemon->objects();
  auto listed = a->list();
  ASSERT_TRUE(listed);
  ASSERT_EQ(objects.size(), 2u);
  ASSERT_EQ(listed->size(), 2u);
  for (std::size_t i = 0; i < objects.size(); ++i) {
    EXPECT_EQ(objects[i].handle, (*listed)[i].handle);
    EXPECT_EQ(objects[i].type, (*listed)[i].type);
    EXPECT_EQ(objects[i].name, (*listed)[i].name);
    EXPECT_EQ(objects[i].refcount, 1u);
  }
  const auto named = std::find_if(objects.begin(), objects.end(),
                                  [](const handle_info& h) { return h.name == "listed"; });
  ASSERT_NE(named, objects.end());
  EXPECT_EQ(named->handle, ev->handle());
  EXPECT_EQ(named->type, object_type::manual_event);
  EXPECT_EQ(named->value, 1u);  // signalled

  const auto clients = daemon->clients();
  ASSERT_EQ(clients.size(), 1u);
  EXPECT_EQ(clients[0].pid, ::getpid());
  EXPECT_EQ(clients[0].uid, ::geteuid());
  EXPECT_EQ(clients[0].handles, 2u);

  ev = make_error_code(errc::daemon_lost);
  mx = make_error_code(errc::daemon_lost);
  a = make_error_code(errc::daemon_lost);
  EXPECT_TRUE(uipc::test::eventually([&] { return daemon->clients().empty(); }));
  EXPECT_TRUE(daemon->objects().empty());
  daemon->stop();
  EXPECT_TRUE(daemon->objects().empty());
}

}  // namespace
}  // namespace uipc::handles
