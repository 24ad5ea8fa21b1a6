// uipcctl's handles subcommand, run as a program against a daemon it starts.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <utility>

#include "handles_support.hpp"

#ifdef UIPC_TEST_UIPCCTL_PATH

namespace uipc::handles {
namespace {

using namespace std::chrono_literals;
using test::child_process;
using test::private_location;

std::vector<std::string> ctl(const private_location& loc, std::vector<std::string> action) {
  std::vector<std::string> argv{UIPC_TEST_UIPCCTL_PATH,
                                "handles",
                                "--dir",
                                loc.where.directory,
                                "--name",
                                loc.where.name,
                                "--daemon",
                                UIPC_TEST_HANDLED_PATH,
                                "--linger",
                                "0"};
  argv.insert(argv.end(), action.begin(), action.end());
  return argv;
}

int run(const private_location& loc, std::vector<std::string> action, std::string* out = nullptr) {
  child_process p(ctl(loc, std::move(action)));
  if (out != nullptr) {
    while (auto line = p.read_line(10s)) *out += *line + "\n";
  }
  return p.wait_exit().value_or(-1);
}

// Every test has a location of its own and must leave nothing there: no
// daemon (it exits with the last client), no socket, no segment.
class UipcctlTest : public ::testing::Test {
 protected:
  void TearDown() override {
    EXPECT_TRUE(loc.wait_until_clean()) << "a daemon, socket or segment was left";
  }
  private_location loc;
};

TEST_F(UipcctlTest, HandlesSubcommandDrivesAnObjectEndToEnd) {
  child_process holder(ctl(loc, {"create", "auto-event", "door", "--hold", "20000"}));
  auto created = holder.read_line();
  ASSERT_TRUE(created);
  ASSERT_EQ(created->rfind("created ", 0), 0u) << *created;
  const std::string handle = created->substr(8, created->find(' ', 8) - 8);

  EXPECT_EQ(run(loc, {"wait", "door", "--timeout", "50"}), 2);
  EXPECT_EQ(run(loc, {"signal", "door"}), 0);
  EXPECT_EQ(run(loc, {"wait", handle, "--timeout", "5000"}),
            0);  // by handle, and it consumed the signal
  EXPECT_EQ(run(loc, {"wait", "door", "--timeout", "0"}), 2);
  EXPECT_EQ(run(loc, {"signal", "door"}), 0);
  EXPECT_EQ(run(loc, {"reset", "door"}), 0);
  EXPECT_EQ(run(loc, {"wait", "door", "--timeout", "0"}), 2);

  std::string listing;
  EXPECT_EQ(run(loc, {"list"}, &listing), 0);
  EXPECT_NE(listing.find("auto_event"), std::string::npos) << listing;
  EXPECT_NE(listing.find("door"), std::string::npos) << listing;
  std::string stats;
  EXPECT_EQ(run(loc, {"stats"}, &stats), 0);
  EXPECT_NE(stats.find("handles            1 in use"), std::string::npos) << stats;
  // The holder and the asking uipcctl itself.
  std::string clients;
  EXPECT_EQ(run(loc, {"clients"}, &clients), 0);
  EXPECT_NE(clients.find(" " + std::to_string(holder.pid()) + " "), std::string::npos) << clients;
  EXPECT_EQ(std::count(clients.begin(), clients.end(), '\n'), 3) << clients;  // header + 2

  // The reference belongs to the holder: another process cannot close it.
  EXPECT_EQ(run(loc, {"close", handle}), 3);
  EXPECT_EQ(run(loc, {"signal", "door"}), 0);
  // Errors and usage.
  EXPECT_EQ(run(loc, {"signal", "nobody"}), 3);
  EXPECT_EQ(run(loc, {"frobnicate"}), 64);
  EXPECT_EQ(run(loc, {"create", "semaphore", "sem", "--initial", "0", "--max", "2"}), 0);

  holder.kill(SIGKILL);
  holder.wait_exit();
  EXPECT_TRUE(loc.wait_until_clean());
}

TEST_F(UipcctlTest, WaitReportsAnAbandonedMutex) {
  child_process owner(ctl(loc, {"create", "mutex", "m", "--owned", "--hold", "20000"}));
  ASSERT_TRUE(owner.read_line());
  child_process waiter(ctl(loc, {"wait", "m", "--timeout", "20000"}));
  {
    // The owner dies only once the waiter holds its reference (refcount 2),
    // or the mutex would die with the owner and the open fail.
    auto observer = client::connect(loc.options());
    ASSERT_TRUE(observer) << observer.error().message();
    const auto until = std::chrono::steady_clock::now() + 20s;
    for (bool opened = false; !opened;) {
      auto entries = observer->list();
      ASSERT_TRUE(entries) << entries.error().message();
      for (const auto& e : *entries) opened |= e.name == "m" && e.refcount == 2;
      ASSERT_LT(std::chrono::steady_clock::now(), until) << "the waiter never opened the mutex";
      if (!opened) std::this_thread::sleep_for(2ms);
    }
  }
  owner.kill(SIGKILL);
  EXPECT_EQ(waiter.wait_exit(), 1);
  EXPECT_TRUE(loc.wait_until_clean());
}

TEST_F(UipcctlTest, WaitReleasesAMutexItWonUnlessToldToHoldIt) {
  child_process keeper(ctl(loc, {"create", "mutex", "m", "--hold", "20000"}));
  ASSERT_TRUE(keeper.read_line());
  // Won and released on the way out: the next one wins it cleanly.
  EXPECT_EQ(run(loc, {"wait", "m", "--timeout", "5000"}), 0);
  EXPECT_EQ(run(loc, {"wait", "m", "--timeout", "5000"}), 0);
  // Held while the holder sleeps; then killed holding it: abandoned.
  child_process holder(ctl(loc, {"wait", "m", "--timeout", "5000", "--hold", "20000"}));
  EXPECT_EQ(holder.read_line(), "signalled");
  EXPECT_EQ(run(loc, {"wait", "m", "--timeout", "50"}), 2);
  holder.kill(SIGKILL);
  holder.wait_exit();
  EXPECT_EQ(run(loc, {"wait", "m", "--timeout", "5000"}), 1);
  std::string stats;
  EXPECT_EQ(run(loc, {"stats"}, &stats), 0);
  EXPECT_NE(stats.find("mutexes abandoned  1"), std::string::npos) << stats;
  keeper.kill(SIGKILL);
  keeper.wait_exit();
  EXPECT_TRUE(loc.wait_until_clean());
}

TEST_F(UipcctlTest, HugeWaitTimeoutSaturatesInsteadOfWrapping) {
  child_process holder(ctl(loc, {"create", "auto-event", "door", "--hold", "20000"}));
  ASSERT_TRUE(holder.read_line());
  // 18446744073710 ms is 2^64 ns and a little: wrapped, a wait of 448 us.
  child_process waiter(ctl(loc, {"wait", "door", "--timeout", "18446744073710"}));
  EXPECT_FALSE(waiter.wait_exit(300ms)) << "the wait ended at once";
  EXPECT_EQ(run(loc, {"signal", "door"}), 0);
  EXPECT_EQ(waiter.wait_exit(), 0);
  holder.kill(SIGKILL);
  holder.wait_exit();
  EXPECT_TRUE(loc.wait_until_clean());
}

// churn --rate R: R cycles a second for the seconds asked, with a cycle's
// latency; a bad rate is a usage error.
TEST_F(UipcctlTest, ChurnRunsAtTheRateAskedAndReportsItsLatency) {
  std::string out;
  ASSERT_EQ(run(loc, {"churn", "--seconds", "1", "--rate", "200"}, &out), 0) << out;
  const auto report = uipc::test::parse_load_report(out, "cycles");
  ASSERT_TRUE(report) << out;
  EXPECT_LE(report->count, 200u);  // slots at 0, 5, ... 995 ms
  EXPECT_GE(report->count, 100u) << "a loaded machine, but not this loaded";
  EXPECT_GE(report->seconds, 0.9);
  EXPECT_GT(report->p50_us, 0.0);
  EXPECT_LE(report->p50_us, report->p99_us);
  EXPECT_EQ(run(loc, {"churn", "--rate", "0"}), 64);
  EXPECT_EQ(run(loc, {"churn", "--seconds", "1", "--rate"}), 64);
}

// What a new user does in a fresh build tree: run uipcctl with nothing
// installed, no daemon option, no $UIPC_HANDLED_PATH and an empty $PATH. The
// daemon is found beside uipcctl (every program of the build is in one place).
TEST_F(UipcctlTest, FindsTheDaemonBesideItselfWithNothingInstalled) {
  ASSERT_EQ(std::filesystem::path(UIPC_TEST_UIPCCTL_PATH).parent_path(),
            std::filesystem::path(UIPC_TEST_HANDLED_PATH).parent_path())
      << "the build no longer puts its programs in one directory";
  child_process p({UIPC_TEST_UIPCCTL_PATH, "handles", "--dir", loc.where.directory, "--name",
                   loc.where.name, "--linger", "0", "stats"},
                  std::vector<std::string>{"PATH="});
  std::string out;
  while (auto line = p.read_line(10s)) out += *line + "\n";
  EXPECT_EQ(p.wait_exit(), 0) << out;
  EXPECT_NE(out.find("handles "), std::string::npos) << out;
}

// A daemon program that is not there, or not executable, is reported as
// exactly that, naming the path tried.
TEST_F(UipcctlTest, ABrokenDaemonProgramIsReportedWithThePathTried) {
  const std::string not_executable = loc.dir.file("not-executable");
  std::ofstream(not_executable) << "#!/bin/sh\nexit 0\n";
  ASSERT_EQ(::chmod(not_executable.c_str(), 0644), 0);
  const std::pair<std::string, std::string> cases[] = {
      {loc.dir.file("no-such-daemon"), "daemon program not found"},
      {not_executable, "daemon program is not executable"},
  };
  for (const auto& [program, message] : cases) {
    // stderr is what it says: run through sh to read it.
    child_process p({"/bin/sh", "-c",
                     std::string(UIPC_TEST_UIPCCTL_PATH) + " handles --dir '" +
                         loc.where.directory + "' --name " + loc.where.name + " --daemon '" +
                         program + "' list 2>&1"});
    std::string out;
    while (auto line = p.read_line(10s)) out += *line + "\n";
    EXPECT_EQ(p.wait_exit(), 3) << out;
    EXPECT_NE(out.find(message), std::string::npos) << out;
    EXPECT_NE(out.find(program), std::string::npos) << out;
  }
}

}  // namespace
}  // namespace uipc::handles

#endif
