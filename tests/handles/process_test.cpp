// Multi-process lifetime of the handle daemon: autostart (and its race), clients
// killed with SIGKILL holding references, owning a mutex or waiting, the daemon
// killed and restarted under live clients, linger and SIGTERM cleanup, startup
// failures that must not hang (and racing starters that each report them), and
// what another uid would try, refused.
#include <dirent.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <utility>

#include "handles_support.hpp"

namespace uipc::handles {
namespace {

using namespace std::chrono_literals;
using test::child_process;
using test::peer_args;
using test::private_location;

std::int32_t daemon_pid_from(child_process& p) {
  auto line = p.read_line();
  if (!line || line->rfind("daemon ", 0) != 0) {
    ADD_FAILURE() << "peer said: " << line.value_or("<nothing>");
    return 0;
  }
  return std::stoi(line->substr(7));
}

// Every test has a location of its own and must leave nothing there: no
// daemon (it exits with the last client), no socket.
class ProcessTest : public ::testing::Test {
 protected:
  void TearDown() override {
    EXPECT_TRUE(loc.wait_until_clean()) << "a daemon or its socket was left";
  }
  private_location loc;
};

TEST_F(ProcessTest, FirstClientStartsTheDaemonWhichLeavesWithTheLast) {
  EXPECT_FALSE(loc.socket_exists());
  std::int32_t pid = 0;
  {
    auto c = client::connect(loc.options());
    ASSERT_TRUE(c) << c.error().message();
    pid = c->daemon_pid();
    EXPECT_NE(pid, ::getpid());
    EXPECT_TRUE(loc.socket_exists());
    EXPECT_EQ(loc.daemon_pids(), std::vector<pid_t>{pid});
    auto e = c->create_event(event_reset::manual, true, "x");
    ASSERT_TRUE(e);
  }
  EXPECT_TRUE(test::wait_process_gone(pid));
  EXPECT_TRUE(loc.wait_until_clean());
}

// "Max open files  SOFT  HARD  files" of /proc/PID/limits.
std::pair<std::string, std::string> open_files_limits(std::int32_t pid) {
  std::ifstream limits("/proc/" + std::to_string(pid) + "/limits");
  for (std::string line; std::getline(limits, line);) {
    if (line.rfind("Max open files", 0) != 0) continue;
    std::istringstream fields(line.substr(14));
    std::string soft, hard;
    fields >> soft >> hard;
    return {soft, hard};
  }
  return {"?", "?"};
}

TEST_F(ProcessTest, TheDaemonRaisesItsDescriptorLimitToTheHardOne) {
  // Each client costs the daemon a socket and a pidfd: a soft limit of 1024
  // would let a few hundred clients refuse everyone else. Started with a low
  // soft limit (the client's own, inherited), it serves with the hard one.
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  if (saved.rlim_max <= 512) GTEST_SKIP() << "hard limit " << saved.rlim_max;
  rlimit low = saved;
  low.rlim_cur = 512;
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  auto c = client::connect(loc.options());
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &saved), 0);
  ASSERT_TRUE(c) << c.error().message();
  const auto [soft, hard] = open_files_limits(c->daemon_pid());
  EXPECT_NE(soft, "512");
  EXPECT_EQ(soft, hard);
}

TEST_F(ProcessTest, WithoutAutostartNoDaemonIsUnavailable) {
  auto o = loc.options();
  o.autostart = false;
  EXPECT_EQ(client::connect(o).error(), make_error_code(errc::daemon_unavailable));
}

TEST_F(ProcessTest, EightRacingClientsStartExactlyOneDaemon) {
  // The peers start the daemon through a wrapper that notes every start: with
  // a broken start lock, a second daemon that lost the location would be
  // started (and exit) unseen by the pid check below.
  const std::string starts = loc.dir.file("starts");
  const std::string wrapper = loc.dir.file("counting-handled");
  {
    std::ofstream script(wrapper);
    script << "#!/bin/sh\necho $$ >> '" << starts << "'\nexec '" << UIPC_TEST_HANDLED_PATH
           << "' \"$@\"\n";
  }
  ASSERT_EQ(::chmod(wrapper.c_str(), 0700), 0);
  std::vector<std::unique_ptr<child_process>> peers;
  for (int i = 0; i < 8; ++i) {
    auto args = peer_args(loc, {"connect"});
    args[3] = wrapper;
    peers.push_back(std::make_unique<child_process>(args));
  }
  std::set<std::int32_t> daemons;
  for (auto& p : peers) daemons.insert(daemon_pid_from(*p));
  EXPECT_EQ(daemons.size(), 1u);
  EXPECT_EQ(daemons.count(0), 0u);
  for (auto& p : peers) p->close_stdin();
  for (auto& p : peers) EXPECT_EQ(p->wait_exit(), 0);
  EXPECT_TRUE(test::wait_process_gone(*daemons.begin()));
  EXPECT_TRUE(loc.wait_until_clean());
  std::ifstream started(starts);
  int lines = 0;
  for (std::string line; std::getline(started, line);) ++lines;
  EXPECT_EQ(lines, 1) << "daemons started";
}

TEST_F(ProcessTest, KilledClientsReferencesAndScratchAreReleased) {
  auto c = client::connect(loc.options());
  ASSERT_TRUE(c);
  child_process holder(peer_args(loc, {"hold", "5"}));
  ASSERT_EQ(daemon_pid_from(holder), c->daemon_pid());
  ASSERT_EQ(holder.read_line(), "ready");
  // We share one of its objects: it must survive the holder's death.
  auto shared = c->open_event("held-0");
  ASSERT_TRUE(shared);
  auto s = c->stats();
  EXPECT_EQ(s->handles_in_use, 5u);
  EXPECT_EQ(s->scratch_blocks, 1u);
  holder.kill(SIGKILL);
  ASSERT_TRUE(holder.wait_exit());
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (c->stats()->handles_in_use != 1 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(2ms);
  s = c->stats();
  EXPECT_EQ(s->handles_in_use, 1u);
  EXPECT_EQ(s->scratch_blocks, 0u);
  EXPECT_EQ(s->scratch_in_use, 0u);
  EXPECT_EQ(s->clients, 1u);
  auto list = c->list();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].refcount, 1u);
  EXPECT_FALSE(shared->signal());
  ASSERT_FALSE(shared->close());
  EXPECT_EQ(c->stats()->handles_in_use, 0u);
  const auto pid = c->daemon_pid();
  c = make_error_code(errc::daemon_lost);  // drop the client
  EXPECT_TRUE(test::wait_process_gone(pid));
  EXPECT_TRUE(loc.wait_until_clean());
}

TEST_F(ProcessTest, MutexOfAKilledOwnerIsAbandonedToTheNextWaiter) {
  auto c = client::connect(loc.options());
  ASSERT_TRUE(c);
  child_process owner(peer_args(loc, {"own-mutex", "m"}));
  daemon_pid_from(owner);
  ASSERT_EQ(owner.read_line(), "owned");
  auto m = c->open_mutex("m");
  ASSERT_TRUE(m);
  EXPECT_EQ(*m->wait(0ns), wait_status::timed_out);
  std::optional<result<wait_status>> got;
  error_code released;
  std::thread waiter([&] {
    got = m->wait(20s);
    released = m->release();  // the waiting thread owns it now
  });
  std::this_thread::sleep_for(50ms);  // asleep on the futex by now (or still spinning: either way)
  owner.kill(SIGKILL);
  waiter.join();
  ASSERT_TRUE(got && *got);
  EXPECT_EQ(**got, wait_status::abandoned);
  EXPECT_FALSE(released);
  // No longer abandoned for the next owner.
  std::thread next([&] {
    EXPECT_EQ(*m->wait(1s), wait_status::signalled);
    EXPECT_FALSE(m->release());
  });
  next.join();
  EXPECT_EQ(c->stats()->mutexes_abandoned, 1u);
}

TEST_F(ProcessTest, ClientKilledWhileWaitingLeavesTheObjectWorking) {
  auto c = client::connect(loc.options());
  ASSERT_TRUE(c);
  auto e = c->create_event(event_reset::automatic, false, "ev");
  ASSERT_TRUE(e);
  child_process waiter(peer_args(loc, {"wait-event", "ev", "60000"}));
  daemon_pid_from(waiter);
  ASSERT_EQ(waiter.read_line(), "waiting");
  std::this_thread::sleep_for(50ms);
  waiter.kill(SIGKILL);
  ASSERT_TRUE(waiter.wait_exit());
  // A second waiter still gets the signal; the dead one took nothing.
  child_process second(peer_args(loc, {"wait-event", "ev", "20000"}));
  daemon_pid_from(second);
  ASSERT_EQ(second.read_line(), "waiting");
  EXPECT_FALSE(e->signal());
  EXPECT_EQ(second.wait_exit(), 0);
  EXPECT_EQ(*e->wait(0ns), wait_status::timed_out);
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (c->stats()->clients != 1 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(2ms);
  EXPECT_EQ(c->list()->at(0).refcount, 1u);
}

TEST_F(ProcessTest, CrossProcessWaitTimesOutAndIsSignalled) {
  auto c = client::connect(loc.options());
  ASSERT_TRUE(c);
  auto e = c->create_event(event_reset::manual, false, "ev");
  ASSERT_TRUE(e);
  child_process timed(peer_args(loc, {"wait-event", "ev", "50"}));
  EXPECT_EQ(timed.wait_exit(), 2);
  child_process signalled(peer_args(loc, {"wait-event", "ev", "20000"}));
  daemon_pid_from(signalled);
  ASSERT_EQ(signalled.read_line(), "waiting");
  EXPECT_FALSE(e->signal());
  EXPECT_EQ(signalled.wait_exit(), 0);
}

TEST_F(ProcessTest, CrossProcessWaitAnyWakesOnTheSignalledObject) {
  auto c = client::connect(loc.options());
  ASSERT_TRUE(c);
  auto a = c->create_event(event_reset::automatic, false, "a");
  auto b = c->create_semaphore(0, 3, "b");
  ASSERT_TRUE(a && b);
  child_process waiter(peer_args(loc, {"wait-any", "a", "b", "20000"}));
  daemon_pid_from(waiter);
  ASSERT_EQ(waiter.read_line(), "waiting");
  std::this_thread::sleep_for(50ms);  // asleep in futex_waitv by now
  ASSERT_TRUE(b->release(1));
  EXPECT_EQ(waiter.wait_exit(), 11);
  EXPECT_EQ(*b->wait(0ns), wait_status::timed_out);  // the peer took it
  EXPECT_EQ(*a->wait(0ns), wait_status::timed_out);  // and nothing else
}

TEST_F(ProcessTest, TableAndScratchAreEmptyAfterEveryClientLeft) {
  // Clients leave in every way — cleanly, by SIGKILL, by SIGTERM — while one
  // observer stays; then the table and scratch area are empty again.
  auto observer = client::connect(loc.options());
  ASSERT_TRUE(observer);
  std::vector<std::unique_ptr<child_process>> holders;
  for (int i = 0; i < 3; ++i) {
    holders.push_back(std::make_unique<child_process>(peer_args(loc, {"hold", "4"})));
    daemon_pid_from(*holders.back());
    ASSERT_EQ(holders.back()->read_line(), "ready");
  }
  auto s = observer->stats();
  EXPECT_EQ(s->handles_in_use, 10u);  // "held-0" is shared by all three
  EXPECT_EQ(s->scratch_blocks, 3u);
  holders[0]->close_stdin();
  holders[1]->kill(SIGKILL);
  holders[2]->kill(SIGTERM);
  for (auto& h : holders) ASSERT_TRUE(h->wait_exit());
  const auto until = std::chrono::steady_clock::now() + 10s;
  while (observer->stats()->clients != 1 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(2ms);
  }
  s = observer->stats();
  EXPECT_EQ(s->handles_in_use, 0u);
  EXPECT_EQ(s->scratch_blocks, 0u);
  EXPECT_EQ(s->scratch_in_use, 0u);
  EXPECT_TRUE(observer->list()->empty());
}

TEST_F(ProcessTest, DaemonKilledUnderLiveClientsIsReplacedAndReclaimed) {
  auto c = client::connect(loc.options());
  ASSERT_TRUE(c);
  const auto old_pid = c->daemon_pid();
  auto e = c->create_event(event_reset::manual, false, "ev");
  ASSERT_TRUE(e);
  // A waiter in another process and one here: both must wake with "daemon lost".
  child_process remote(peer_args(loc, {"wait-event", "ev", "60000"}));
  daemon_pid_from(remote);
  ASSERT_EQ(remote.read_line(), "waiting");
  std::optional<result<wait_status>> got;
  std::thread waiter([&] { got = e->wait(60s); });
  std::this_thread::sleep_for(50ms);
  const auto killed_at = std::chrono::steady_clock::now();
  ASSERT_EQ(::kill(old_pid, SIGKILL), 0);
  waiter.join();
  EXPECT_LT(std::chrono::steady_clock::now() - killed_at, 10s);
  ASSERT_TRUE(got);
  EXPECT_EQ(got->error(), make_error_code(errc::daemon_lost));
  EXPECT_EQ(remote.wait_exit(), 3);
  EXPECT_EQ(e->signal(), make_error_code(errc::daemon_lost));
  EXPECT_FALSE(c->connected());
  // The kill left its socket (the segment is a memfd: it went with the last
  // mapping); the next client starts a fresh daemon that takes it over.
  EXPECT_TRUE(loc.socket_exists());
  EXPECT_TRUE(loc.daemon_pids().empty());
  auto fresh = client::connect(loc.options());
  ASSERT_TRUE(fresh) << fresh.error().message();
  EXPECT_NE(fresh->daemon_pid(), old_pid);
  EXPECT_EQ(fresh->stats()->handles_in_use, 0u);
  auto e2 = fresh->create_event(event_reset::manual, false, "ev");
  ASSERT_TRUE(e2);
  EXPECT_FALSE(e2->existed());
  EXPECT_FALSE(e2->signal());
  const auto new_pid = fresh->daemon_pid();
  e = event{};
  e2 = event{};
  c = make_error_code(errc::daemon_lost);
  fresh = make_error_code(errc::daemon_lost);
  EXPECT_TRUE(test::wait_process_gone(new_pid));
  EXPECT_TRUE(loc.wait_until_clean());
}

TEST_F(ProcessTest, SigtermStopsTheDaemonInOrder) {
  auto c = client::connect(loc.options(60s));
  ASSERT_TRUE(c);
  auto e = c->create_event(event_reset::manual);
  ASSERT_TRUE(e);
  std::optional<result<wait_status>> got;
  std::thread waiter([&] { got = e->wait(60s); });
  std::this_thread::sleep_for(30ms);
  ASSERT_EQ(::kill(c->daemon_pid(), SIGTERM), 0);
  waiter.join();
  ASSERT_TRUE(got);
  EXPECT_EQ(got->error(), make_error_code(errc::daemon_lost));
  EXPECT_TRUE(test::wait_process_gone(c->daemon_pid()));
  EXPECT_TRUE(loc.wait_until_clean(1s));
}

TEST_F(ProcessTest, DaemonLingersForItsConfiguredTime) {
  std::int32_t pid = 0;
  {
    auto c = client::connect(loc.options(600ms));
    ASSERT_TRUE(c);
    pid = c->daemon_pid();
  }
  const auto left = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(200ms);
  EXPECT_FALSE(test::process_gone(pid));
  // A client within the linger finds the same daemon.
  {
    auto c = client::connect(loc.options(600ms));
    ASSERT_TRUE(c);
    EXPECT_EQ(c->daemon_pid(), pid);
  }
  EXPECT_TRUE(test::wait_process_gone(pid));
  EXPECT_GE(std::chrono::steady_clock::now() - left, 600ms);
  EXPECT_TRUE(loc.wait_until_clean());
}

// Socket activation, as systemd's uipc-handled.socket does it: the manager
// holds the socket and starts the daemon at the first connection. The library
// finds the socket served and starts nothing itself (its daemon program does
// not even exist here); the daemon leaves the manager's socket file in place
// when it exits idle, so that the next client starts it again.
TEST_F(ProcessTest, ASocketActivatedDaemonServesAndTheLibraryStartsNoOther) {
  const std::string activate = "/usr/bin/systemd-socket-activate";
  if (::access(activate.c_str(), X_OK) != 0) GTEST_SKIP() << "no " << activate;
  const std::string socket = loc.resolved().socket_path;
  child_process manager({activate, "--listen=" + socket, UIPC_TEST_HANDLED_PATH, "--directory",
                         loc.where.directory, "--name", loc.where.name, "--linger-ms", "100"});
  ASSERT_TRUE(
      uipc::test::eventually([&] { return uipc::test::unix_socket_listening(socket); }, 10s));
  const auto exe = "/proc/" + std::to_string(manager.pid()) + "/exe";
  EXPECT_NE(std::filesystem::read_symlink(exe).filename(), "uipc-handled")
      << "started before anyone connected";

  auto o = loc.options();
  o.daemon_path = loc.dir.file("no-such-daemon");  // an autostart would fail
  {
    auto c = client::connect(o);
    ASSERT_TRUE(c) << c.error().message();
    EXPECT_EQ(c->daemon_pid(), manager.pid());  // the manager became the daemon
    auto e = c->create_event(event_reset::manual, false, "activated");
    ASSERT_TRUE(e);
    ASSERT_FALSE(e->signal());
    auto w = e->wait(1s);
    ASSERT_TRUE(w);
    EXPECT_EQ(*w, wait_status::signalled);
  }
  EXPECT_EQ(manager.wait_exit(), std::optional<int>(0));  // left idle, cleanly
  EXPECT_TRUE(loc.socket_exists()) << "the manager's socket file was removed";
  std::filesystem::remove(socket);
}

TEST_F(ProcessTest, DaemonThatDiesAtStartupIsReportedNotWaitedFor) {
  // A regular file where the socket belongs: the daemon cannot bind and says so.
  {
    std::FILE* f = std::fopen(loc.resolved().socket_path.c_str(), "w");
    std::fclose(f);
  }
  const auto start = std::chrono::steady_clock::now();
  auto c = client::connect(loc.options());
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), make_error_code(errc::daemon_failed_to_start));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  std::filesystem::remove(loc.resolved().socket_path);
  EXPECT_TRUE(loc.wait_until_clean());

  // A daemon program that does not exist fails as fast, and says so.
  auto o = loc.options();
  o.daemon_path = loc.dir.file("no-such-daemon");
  auto missing = client::connect(o);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error(), make_error_code(uipc::errc::program_not_found));
}

// Eight clients at once against each kind of broken daemon program: every one
// gets the error that names the fault, and quickly (nobody waits out the
// start timeout behind another's failed start).
TEST_F(ProcessTest, RacingClientsEachReportABrokenDaemonProgramDistinctly) {
  const std::string not_executable = loc.dir.file("not-executable");
  const std::string exits_at_once = loc.dir.file("exits-at-once");
  {
    std::ofstream(not_executable) << "#!/bin/sh\nexit 0\n";
    std::ofstream(exits_at_once) << "#!/bin/sh\nexit 3\n";
  }
  ASSERT_EQ(::chmod(not_executable.c_str(), 0644), 0);
  ASSERT_EQ(::chmod(exits_at_once.c_str(), 0755), 0);
  const std::pair<std::string, error_code> cases[] = {
      {loc.dir.file("missing"), make_error_code(uipc::errc::program_not_found)},
      {not_executable, make_error_code(uipc::errc::program_not_executable)},
      {exits_at_once, make_error_code(errc::daemon_failed_to_start)},
  };
  for (const auto& [program, expected] : cases) {
    auto o = loc.options();
    o.daemon_path = program;
    std::vector<error_code> got(8);
    const auto start = std::chrono::steady_clock::now();
    {
      std::vector<std::thread> racers;
      for (auto& g : got) {
        racers.emplace_back([&o, &g] {
          auto c = client::connect(o);
          g = c ? error_code{} : c.error();
        });
      }
      for (auto& t : racers) t.join();
    }
    EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << program;
    for (const auto& g : got) EXPECT_EQ(g, expected) << program << ": " << g.message();
  }
  EXPECT_FALSE(std::filesystem::exists(loc.resolved().start_lock_path));
}

// What an attacker running as another uid would try against a live daemon:
// connect to its socket, open its memfd through /proc/PID/fd, list its
// directory. Each must fail.
TEST_F(ProcessTest, AnotherUserCannotConnectOrMap) {
  auto c = client::connect(loc.options());
  ASSERT_TRUE(c);
  const auto r = loc.resolved();
  struct stat st {};
  ASSERT_EQ(::stat(r.socket_path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(::stat(r.directory.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0077, 0u);
  if (::geteuid() != 0) GTEST_SKIP() << "modes checked; a second uid needs root";

  // As root, first: the daemon's segment memfd among its descriptors (which
  // shows the path the attacker will use does reach the segment). The lowest
  // memfd descriptor that root can open: the segment lives as long as the
  // daemon, while other memfds may come and go while this looks.
  const std::string fd_dir = "/proc/" + std::to_string(c->daemon_pid()) + "/fd";
  std::map<int, std::string> memfds;
  for (const auto& entry : std::filesystem::directory_iterator(fd_dir)) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(entry.path(), ec).string();
    if (!ec && target.rfind("/memfd:", 0) == 0)
      memfds.emplace(std::stoi(entry.path().filename().string()), entry.path().string());
  }
  std::string memfd_path;
  for (const auto& [number, path] : memfds) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    ::close(fd);
    memfd_path = path;
    break;
  }
  ASSERT_FALSE(memfd_path.empty())
      << "no memfd among the daemon's descriptors that root can open: " << memfds.size()
      << " seen; the check below would prove nothing";

  // As nobody: the socket and directory are 0600/0700, and another uid may
  // not look into the daemon's descriptors (/proc's ptrace rule), so all of
  // it must fail. Exit code: a bit mask of what (wrongly) succeeded.
  const std::string socket_path = r.socket_path;
  const std::string directory = r.directory;
  const pid_t child = ::fork();
  if (child == 0) {
    if (::setgroups(0, nullptr) != 0 || ::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(100);
    int leaks = 0;
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size());
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) leaks |= 1;
    if (::open(memfd_path.c_str(), O_RDWR | O_CLOEXEC) >= 0) leaks |= 2;
    if (::open(memfd_path.c_str(), O_RDONLY | O_CLOEXEC) >= 0) leaks |= 4;
    if (DIR* d = ::opendir(directory.c_str()); d != nullptr) {
      leaks |= 8;
      ::closedir(d);
    }
    if (::opendir(fd_dir.c_str()) != nullptr) leaks |= 16;
    ::_exit(leaks);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1 connect, 2/4 memfd, 8 directory, 16 /proc fd list";
}

TEST_F(ProcessTest, StoppedDaemonTimesCallsAndConnectOutInsteadOfHanging) {
  auto o = loc.options();
  o.call_timeout = 300ms;
  auto c = client::connect(o);
  ASSERT_TRUE(c) << c.error().message();
  const auto pid = c->daemon_pid();
  ASSERT_EQ(::kill(pid, SIGSTOP), 0);
  auto start = std::chrono::steady_clock::now();
  auto s = c->stats();
  EXPECT_EQ(s.error(), make_error_code(errc::daemon_timeout));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  // connect()'s hello is bounded too (by start_timeout here).
  auto o2 = o;
  o2.call_timeout = 60s;
  o2.start_timeout = 500ms;
  start = std::chrono::steady_clock::now();
  auto late = client::connect(o2);
  EXPECT_FALSE(late);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  ASSERT_EQ(::kill(pid, SIGCONT), 0);
  // Still connected: the late reply is dropped, the next call answered.
  s = c->stats();
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->daemon_pid, pid);
  c = make_error_code(errc::daemon_lost);
  EXPECT_TRUE(test::wait_process_gone(pid));
}

TEST_F(ProcessTest, TheFirstOperationAfterTheDaemonDiedReportsItLost) {
  // No grace period: the kernel marks the daemon's death word as it dies, and
  // every operation reads it (a clock-throttled look at the daemon would let
  // operations "succeed" on a dead daemon's segment for a while).
  auto c = client::connect(loc.options());
  ASSERT_TRUE(c);
  const auto old_pid = c->daemon_pid();
  auto e = c->create_event(event_reset::manual, false, "ev");
  ASSERT_TRUE(e);
  auto s = c->create_semaphore(0, 10, "sem");
  ASSERT_TRUE(s);
  ASSERT_FALSE(e->signal());  // the daemon lives, and an operation knows it
  ASSERT_EQ(::kill(old_pid, SIGKILL), 0);
  // Every thread ended, not only the main one (a zombie leader can be seen
  // while the others still exit; the kernel marks the word as each ends).
  ASSERT_TRUE(test::wait_process_gone(old_pid));
  ASSERT_TRUE(test::wait_threads_ended(old_pid));
  EXPECT_EQ(e->reset(), make_error_code(errc::daemon_lost));
  EXPECT_EQ(s->release(1).error(), make_error_code(errc::daemon_lost));
  EXPECT_EQ(s->wait(0ms).error(), make_error_code(errc::daemon_lost));
  auto fresh = client::connect(loc.options());
  ASSERT_TRUE(fresh) << fresh.error().message();
  const auto new_pid = fresh->daemon_pid();
  e = event{};
  s = semaphore{};
  c = make_error_code(errc::daemon_lost);
  fresh = make_error_code(errc::daemon_lost);
  EXPECT_TRUE(test::wait_process_gone(new_pid));
}

TEST_F(ProcessTest, DaemonKilledWithNoWaiterIsSeenBySignalAndConnected) {
  // Nobody waits, so nobody publishes "stopped": the client itself must see
  // the daemon gone.
  auto c = client::connect(loc.options());
  ASSERT_TRUE(c);
  const auto old_pid = c->daemon_pid();
  auto e = c->create_event(event_reset::manual, false, "ev");
  ASSERT_TRUE(e);
  EXPECT_TRUE(c->connected());
  ASSERT_EQ(::kill(old_pid, SIGKILL), 0);
  ASSERT_TRUE(test::wait_process_gone(old_pid));
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (!e->signal() && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(2ms);
  EXPECT_EQ(e->signal(), make_error_code(errc::daemon_lost));
  EXPECT_EQ(e->reset(), make_error_code(errc::daemon_lost));
  EXPECT_FALSE(c->connected());
  // Take the location over, so the test leaves it clean.
  auto fresh = client::connect(loc.options());
  ASSERT_TRUE(fresh) << fresh.error().message();
  const auto new_pid = fresh->daemon_pid();
  e = event{};
  c = make_error_code(errc::daemon_lost);
  fresh = make_error_code(errc::daemon_lost);
  EXPECT_TRUE(test::wait_process_gone(new_pid));
}

}  // namespace
}  // namespace uipc::handles
