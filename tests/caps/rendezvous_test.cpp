// Registering, finding and watching points: names, exclusivity, shared names,
// leftovers of killed servers, waiting for a point, access by credentials.
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <future>
#include <set>

#include "caps_support.hpp"

namespace uipc::caps::test {
namespace {

class Rendezvous : public caps_test {};

TEST_F(Rendezvous, NamesThatBreakTheRulesAreRefused) {
  for (const std::string& bad :
       {std::string(), std::string("a/b"), std::string("a-b"), std::string("sp ace"),
        std::string(".."), std::string("."), std::string(64, 'n'), std::string("nul\0x", 5)}) {
    auto s = serve(bad);
    ASSERT_FALSE(s) << bad;
    EXPECT_EQ(s.error(), make_error_code(uipc::errc::invalid_name)) << bad;
    auto c = connect(bad);
    ASSERT_FALSE(c) << bad;
    EXPECT_EQ(c.error(), make_error_code(uipc::errc::invalid_name)) << bad;
  }
  EXPECT_TRUE(serve(std::string(63, 'n')));
  EXPECT_TRUE(serve("Dots.and_underscores.42"));
}

TEST_F(Rendezvous, AnUnregisteredPointIsNotFound) {
  auto c = connect("nobody.here");
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), make_error_code(errc::not_registered));
  EXPECT_TRUE(c.error() == condition::not_found);
}

TEST_F(Rendezvous, ExclusiveRefusesASecondLiveServer) {
  auto first = serve("only.one");
  ASSERT_TRUE(first);
  auto second = serve("only.one");
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error(), make_error_code(errc::name_taken));
  auto o = options();
  o.exclusive = false;
  auto shared = serve("only.one", o);
  ASSERT_FALSE(shared);
  EXPECT_EQ(shared.error(), make_error_code(errc::name_taken));
  (*first)->stop();
  EXPECT_TRUE(serve("only.one"));  // free again once the first is gone
}

TEST_F(Rendezvous, ServersOfASharedNameShareItsClients) {
  auto o = options();
  o.exclusive = false;
  auto a = serve("shared.name", o);
  auto b = serve("shared.name", o);
  ASSERT_TRUE(a);
  ASSERT_TRUE(b);
  EXPECT_EQ(serve("shared.name").error(),
            make_error_code(errc::name_taken));  // an exclusive one is refused
  responder ra(**a, [](service& s, const event& e) { (void)s.reply(e.client, e.id, "a"); });
  responder rb(**b, [](service& s, const event& e) { (void)s.reply(e.client, e.id, "b"); });
  std::multiset<std::string> served;
  for (int i = 0; i < 40; ++i) {
    auto c = connect("shared.name");
    ASSERT_TRUE(c) << c.error().message();
    auto r = (*c)->call("who", in(5s));
    ASSERT_TRUE(r);
    served.insert(r->copy());
  }
  EXPECT_GT(served.count("a"), 0u);
  EXPECT_GT(served.count("b"), 0u);
}

TEST_F(Rendezvous, AKilledServersLeftoversAreReclaimed) {
  child_service doomed("phoenix", options());
  ASSERT_TRUE(doomed.registered());
  doomed.kill();
  // Its socket file is still there; nobody answers it.
  auto gone = connect("phoenix");
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.error(), make_error_code(errc::not_registered));
  auto again = serve("phoenix");
  ASSERT_TRUE(again) << again.error().message();
  auto dir = points_directory(::geteuid(), dir_.path());
  ASSERT_TRUE(dir);
  std::size_t sockets = 0;
  for (const auto& f : std::filesystem::directory_iterator(*dir))
    sockets += f.path().extension() == ".sock";
  EXPECT_EQ(sockets, 1u);  // the dead one's files are gone
  responder echo(**again);
  auto cl = connect("phoenix");
  ASSERT_TRUE(cl);
  EXPECT_TRUE((*cl)->call("alive", in(5s)));
}

TEST_F(Rendezvous, AClientWaitsForAPointWithoutPolling) {
  client_options co;
  co.wait_for_point = 10s;
  std::atomic<clock::time_point> registered{};
  auto waiting = std::async(std::launch::async, [&] {
    auto c = connect("late.comer", co);
    return std::make_pair(std::move(c), clock::now());
  });
  std::this_thread::sleep_for(200ms);
  // While it waits it uses no CPU: a sleeping thread, not a loop.
  rusage before{};
  ::getrusage(RUSAGE_SELF, &before);
  std::this_thread::sleep_for(100ms);
  rusage after{};
  ::getrusage(RUSAGE_SELF, &after);
  const auto cpu_us = [](const rusage& u) {
    return u.ru_utime.tv_sec * 1'000'000L + u.ru_utime.tv_usec + u.ru_stime.tv_sec * 1'000'000L +
           u.ru_stime.tv_usec;
  };
  EXPECT_LT(cpu_us(after) - cpu_us(before), 20'000);  // the whole process, over 100 ms
  auto svc = serve("late.comer");
  registered = clock::now();
  ASSERT_TRUE(svc) << svc.error().message();
  responder echo(**svc);
  auto [c, connected_at] = waiting.get();
  ASSERT_TRUE(c) << c.error().message();
  const auto woke_after =
      std::chrono::duration_cast<std::chrono::microseconds>(connected_at - registered.load());
  std::printf("connected %lld us after the registration\n",
              static_cast<long long>(woke_after.count()));
  EXPECT_LT(woke_after, 500ms);  // within 10 ms on an idle machine; CI machines are not idle
  EXPECT_TRUE((*c)->call("hi", in(5s)));

  client_options brief;
  brief.wait_for_point = 50ms;
  auto none = connect("never.comes", brief);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error(), make_error_code(errc::not_registered));
}

TEST_F(Rendezvous, ListAndWatchPoints) {
  auto watch = point_watch::open(dir_.path());
  ASSERT_TRUE(watch) << watch.error().message();
  auto o = options();
  o.who = access::world;
  auto svc = serve("watched", o);
  ASSERT_TRUE(svc);
  auto e = watch->next(in(5s));
  ASSERT_TRUE(e) << e.error().message();
  EXPECT_EQ(e->what, point_event::kind::appeared);
  EXPECT_EQ(e->point.name, "watched");
  EXPECT_EQ(e->point.uid, ::geteuid());
  EXPECT_EQ(e->point.who, access::world);
  EXPECT_EQ(e->point.pid, ::getpid());
  EXPECT_EQ(e->point.generation, (*svc)->generation());

  auto c = connect("watched");
  ASSERT_TRUE(c);
  (void)next_event(**svc, event_kind::connected);
  auto list = list_points(dir_.path());
  ASSERT_TRUE(list);
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ(list->front().name, "watched");
  EXPECT_EQ(list->front().clients, 1u);
  EXPECT_TRUE(list->front().exclusive);

  (*svc)->stop();
  bool gone = false;
  for (int i = 0; i < 10 && !gone; ++i) {
    auto ev = watch->next(in(5s));
    ASSERT_TRUE(ev);
    gone = ev->what == point_event::kind::disappeared && ev->point.name == "watched";
  }
  EXPECT_TRUE(gone);
  EXPECT_TRUE(list_points(dir_.path())->empty());
}

// A user's directory holds whatever that user put there: a FIFO where an
// information file belongs (an open would wait for a writer for ever), or a
// plain file where a socket belongs, hangs no lister and no watcher, and is
// not listed.
TEST_F(Rendezvous, AFifoOrAPlainFileInThePointsDirectoryHangsNoLister) {
  auto svc = serve("real", options());
  ASSERT_TRUE(svc);
  auto dir = points_directory(::geteuid(), dir_.path());
  ASSERT_TRUE(dir);
  // A socket file whose information file is a FIFO.
  const std::string trap = *dir + "/trap@1.0";
  const int bound = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s.sock", trap.c_str());
  ASSERT_EQ(::bind(bound, reinterpret_cast<const sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::mkfifo((trap + ".info").c_str(), 0600), 0);
  // A plain file where the socket belongs, beside another FIFO.
  const std::string plain = *dir + "/plain@1.0";
  ASSERT_TRUE(std::ofstream(plain + ".sock").good());
  ASSERT_EQ(::mkfifo((plain + ".info").c_str(), 0600), 0);

  auto listed = std::async(std::launch::async, [&] { return list_points(dir_.path()); });
  auto watched = std::async(std::launch::async, [&]() -> result<point_event> {
    auto watch = point_watch::open(dir_.path());
    if (!watch) return watch.error();
    return watch->next(in(100ms));
  });
  const bool done = listed.wait_for(5s) == std::future_status::ready &&
                    watched.wait_for(5s) == std::future_status::ready;
  if (!done) {
    // Let the opens finish (a writer comes and goes on each FIFO), then fail.
    const auto stuck = [](auto& f) { return f.wait_for(10ms) != std::future_status::ready; };
    while (stuck(listed) || stuck(watched)) {
      for (const auto& fifo : {trap + ".info", plain + ".info"}) {
        const int w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
        if (w >= 0) ::close(w);
      }
    }
    ::close(bound);
    FAIL() << "a lister or a watcher waited on a FIFO";
  }
  auto list = listed.get();
  ASSERT_TRUE(list) << list.error().message();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ(list->front().name, "real");
  auto first = watched.get();
  ASSERT_TRUE(first) << first.error().message();
  EXPECT_EQ(first->point.name, "real");
  ::close(bound);
}

TEST_F(Rendezvous, AWatchSeesAKilledServerGo) {
  auto watch = point_watch::open(dir_.path());
  ASSERT_TRUE(watch);
  child_service doomed("doomed", options());
  ASSERT_TRUE(doomed.registered());
  auto up = watch->next(in(5s));
  ASSERT_TRUE(up);
  EXPECT_EQ(up->what, point_event::kind::appeared);
  doomed.kill();
  auto down = watch->next(in(5s));
  ASSERT_TRUE(down) << down.error().message();
  EXPECT_EQ(down->what, point_event::kind::disappeared);
  EXPECT_EQ(down->point.name, "doomed");
}

// As root: a child that drops to uid 65534 tries the points.
class AsAnotherUser : public caps_test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root to become another uid";
  }
  // Connects and calls as uid/gid 65534 (nobody), with `groups` as supplementary groups.
  int call_as_nobody(const std::string& name, std::vector<gid_t> groups,
                     const std::string& expect) {
    const auto a = address(name);
    return in_child([&] {
      if (::setgroups(groups.size(), groups.data()) != 0 || ::setgid(65534) != 0 ||
          ::setuid(65534) != 0)
        return 2;
      boost::asio::io_context ctx;
      auto c = client::connect(ctx, a);
      if (!c)
        return c.error() == make_error_code(uipc::errc::permission_denied) && expect == "denied"
                   ? 0
                   : 3;
      auto r = (*c)->call("who am i", in(5s));
      return r && r->copy() == expect ? 0 : 4;
    });
  }
};

TEST_F(AsAnotherUser, UserPointsRefuseOthersAndWorldPointsAdmitThem) {
  responder::answer_fn uid_of = [](service& s, const event& e) {
    (void)s.reply(e.client, e.id, std::to_string(e.sender().uid));
  };
  auto mine = serve("mine.only");
  ASSERT_TRUE(mine);
  responder r1(**mine, uid_of);
  EXPECT_EQ(call_as_nobody("mine.only", {}, "denied"), 0);

  auto o = options();
  o.who = access::world;
  auto world = serve("for.everyone", o);
  ASSERT_TRUE(world);
  responder r2(**world, uid_of);
  EXPECT_EQ(call_as_nobody("for.everyone", {}, "65534"), 0);
}

TEST_F(AsAnotherUser, GroupPointsAdmitMembersBySupplementaryGroup) {
  auto o = options();
  o.who = access::group;
  o.gid = 4242;
  auto svc = serve("the.group", o);
  ASSERT_TRUE(svc) << svc.error().message();
  responder echo(**svc,
                 [](service& s, const event& e) { (void)s.reply(e.client, e.id, "member"); });
  EXPECT_EQ(call_as_nobody("the.group", {}, "denied"), 0);
  EXPECT_EQ(call_as_nobody("the.group", {4242}, "member"), 0);
}

TEST_F(AsAnotherUser, TheServerChecksCredentialsBeforeReadingAndSaysWhy) {
  // Root passes any file permission, so only the server's own check stops it:
  // a point of uid 65534 open to that user alone.
  child_service nobodys("nobodys", options(), {}, [] {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(2);
  });
  ASSERT_TRUE(nobodys.registered());
  auto a = address("nobodys");
  a.uid = 65534;
  const auto start = clock::now();
  auto cl = client::connect(loop_.ctx(), a);
  ASSERT_FALSE(cl);
  EXPECT_EQ(cl.error(), make_error_code(uipc::errc::permission_denied)) << cl.error().message();
  EXPECT_LT(clock::now() - start, 2s);  // at once, not after a timeout
}

TEST_F(AsAnotherUser, ASquatterCanDenyAPointButNeverImpersonateIt) {
  // Another user makes "caps-<our uid>" first: our registration and our
  // clients refuse that directory instead of trusting it.
  const std::string squatted = dir_.path() + "/caps-" + std::to_string(::geteuid());
  const int made = in_child([&] {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) return 2;
    return ::mkdir(squatted.c_str(), 0777) == 0 ? 0 : 3;
  });
  ASSERT_EQ(made, 0);
  auto s = serve("squatted");
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error(), make_error_code(uipc::errc::foreign_owner));
  auto c = connect("squatted");
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), make_error_code(uipc::errc::foreign_owner));
}

TEST_F(Rendezvous, AGidThatIsNotThePointsIsRefused) {
  auto svc = serve("gid.check");
  ASSERT_TRUE(svc);
  auto a = address("gid.check");
  a.gid = ::getegid() + 1;
  auto c = client::connect(loop_.ctx(), a);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), make_error_code(errc::wrong_gid));
  a.gid = ::getegid();
  EXPECT_TRUE(client::connect(loop_.ctx(), a));
}

TEST_F(Rendezvous, ARestartChangesTheGeneration) {
  auto first = serve("restarts");
  ASSERT_TRUE(first);
  const auto g1 = (*first)->generation();
  auto c1 = connect("restarts");
  ASSERT_TRUE(c1);
  EXPECT_EQ((*c1)->generation(), g1);
  (*first)->stop();
  auto second = serve("restarts");
  ASSERT_TRUE(second);
  auto c2 = connect("restarts");
  ASSERT_TRUE(c2);
  EXPECT_NE((*c2)->generation(), g1);
  auto dead = (*c1)->call("old", in(2s));
  ASSERT_FALSE(dead);
  EXPECT_TRUE(dead.error() == condition::disconnected || dead.error() == condition::shutting_down)
      << dead.error().message();
}

}  // namespace
}  // namespace uipc::caps::test
