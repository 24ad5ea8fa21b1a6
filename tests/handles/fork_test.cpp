// Clients across fork() without exec, and what a started daemon takes from the
// client that started it.
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "handles_support.hpp"

namespace uipc::handles {
namespace {

using namespace std::chrono_literals;

class ForkTest : public ::testing::Test {
 protected:
  test::private_location loc;
};

// Exit codes of the forked processes: which check failed.
constexpr int ok = 0;
constexpr int inherited_client_usable = 10;
constexpr int connect_failed = 11;
constexpr int create_failed = 12;
constexpr int grandchild_client_usable = 13;

TEST_F(ForkTest, AForkedChildNeitherUsesNorKeepsItsParentsConnection) {
  auto mine = client::connect(loc.options(5s));
  ASSERT_TRUE(mine) << mine.error().message();
  int ready[2];
  int release[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  ASSERT_EQ(::pipe2(release, O_CLOEXEC), 0);

  // The parent P: its own client and object; then a child C that outlives it.
  const pid_t parent = ::fork();
  ASSERT_GE(parent, 0);
  if (parent == 0) {
    ::close(release[1]);
    // Inherited from the test process: not P's to use.
    if (mine->stats().error() != errc::forked_copy) ::_exit(inherited_client_usable);
    auto own = client::connect(loc.options(5s));
    if (!own) ::_exit(connect_failed);
    auto ev = own->create_event(event_reset::manual, false, "held-by-the-parent");
    if (!ev) ::_exit(create_failed);
    const pid_t child = ::fork();
    if (child == 0) {
      // C: P's client is not C's either; then C lives on until released.
      const char verdict =
          own->stats().error() == errc::forked_copy && ev->signal() == errc::forked_copy ? 'y'
                                                                                         : 'n';
      (void)::write(ready[1], &verdict, 1);
      char c;
      (void)::read(release[0], &c, 1);
      ::_exit(ok);
    }
    char verdict = 'n';
    (void)::read(ready[0], &verdict, 1);
    ::_exit(verdict == 'y' && child > 0 ? ok : grandchild_client_usable);
  }
  ::close(ready[1]);
  ::close(release[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(parent, &status, 0), parent);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), ok);

  // P is gone and C still holds copies of P's descriptors: the daemon must
  // still see P's connection end and drop what P held.
  const auto until = std::chrono::steady_clock::now() + 10s;
  result<object> still = make_error_code(errc::daemon_lost);
  for (;;) {
    still = mine->open("held-by-the-parent");
    if (!still || std::chrono::steady_clock::now() > until) break;
    still = make_error_code(errc::daemon_lost);  // drop ours before asking again
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_FALSE(still) << "the parent's event outlived the parent";
  EXPECT_EQ(still.error(), errc::name_not_found);
  // Forking did not disturb the test process's own connection.
  auto s = mine->stats();
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->handles_in_use, 0u);
  ::close(ready[0]);
  ::close(release[1]);  // C exits
}

// A program that serves handles and forks (a worker, say) whose child ends
// by returning from main: the child's copy of the daemon is stopped and
// destroyed there. The parent's daemon serves on: its clients are not told
// it stopped, its socket file stays, its sessions stay open. The daemon's
// loop is paused across the fork (no thread of it inside Asio then).
TEST_F(ForkTest, ADaemonsCopyStoppedInAForkedChildLeavesTheParentServing) {
  boost::asio::io_context ctx;
  auto work = boost::asio::make_work_guard(ctx);
  daemon_options o;
  o.where = loc.where;
  auto daemon = handle_daemon::start(ctx, std::move(o));
  ASSERT_TRUE(daemon) << daemon.error().message();
  std::thread loop([&] { ctx.run(); });
  struct joiner {
    boost::asio::io_context& ctx;
    std::thread& thread;
    ~joiner() {
      ctx.stop();
      if (thread.joinable()) thread.join();
    }
  } join_loop{ctx, loop};
  auto mine = client::connect(loc.options(5s));
  ASSERT_TRUE(mine) << mine.error().message();
  auto ev = mine->create_event(event_reset::manual, false, "made-before-the-fork");
  ASSERT_TRUE(ev) << ev.error().message();
  ctx.stop();
  loop.join();
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // As Asio asks of a child that goes on with an inherited io_context (its
    // epoll set is the parent's until then).
    ctx.notify_fork(boost::asio::execution_context::fork_child);
    (*daemon)->stop();  // as its destructor would
    ::_exit(ok);
  }
  const int status = uipc::test::wait_exit(child, 10s);
  ctx.restart();
  loop = std::thread([&] { ctx.run(); });
  EXPECT_EQ(status, ok) << "-1: stopping the copy hung in the child";

  EXPECT_FALSE(ev->signal()) << "the parent's clients were told the daemon stopped";
  auto w = ev->wait(0ns);
  ASSERT_TRUE(w) << w.error().message();
  EXPECT_EQ(*w, wait_status::signalled);
  EXPECT_TRUE(mine->list()) << "the parent's session was shut down";
  auto other = client::connect(loc.options(5s));
  EXPECT_TRUE(other) << other.error().message();
  if (other) {
    EXPECT_TRUE(other->open("made-before-the-fork")) << "a new client reached another daemon";
  }
  EXPECT_EQ((*daemon)->stats().clients, other ? 2u : 1u);
}

TEST_F(ForkTest, AStartedDaemonRunsInTheRootDirectoryWithAPrivateUmask) {
  // Started from a directory that must not stay pinned, with a lax umask.
  test::private_location elsewhere;
  const auto cwd = std::filesystem::current_path();
  std::filesystem::current_path(elsewhere.dir.path());
  const mode_t old_mask = ::umask(0);
  auto o = loc.options();
  o.daemon_path =
      std::filesystem::relative(UIPC_TEST_HANDLED_PATH).string();  // relative on purpose
  auto c = client::connect(o);
  ::umask(old_mask);
  std::filesystem::current_path(cwd);
  ASSERT_TRUE(c) << c.error().message();
  const auto pid = std::to_string(c->daemon_pid());
  EXPECT_EQ(std::filesystem::read_symlink("/proc/" + pid + "/cwd"), "/");
  std::ifstream status("/proc/" + pid + "/status");
  std::string line;
  std::string mask;
  while (std::getline(status, line)) {
    if (line.rfind("Umask:", 0) == 0) mask = line.substr(line.find_first_not_of(" \t", 6));
  }
  EXPECT_EQ(mask, "0077");
}

}  // namespace
}  // namespace uipc::handles
