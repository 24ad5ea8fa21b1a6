// Daemon start: the program search, the detached start, and racing starters
// against working and broken daemon programs.
#include "uipc/core/daemon_start.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"
#include "uipc/core/process.hpp"

namespace uipc {
namespace {

using namespace std::chrono_literals;
using test::temp_dir;
using steady = std::chrono::steady_clock;

void write_script(const std::string& path, const std::string& body, mode_t mode = 0755) {
  std::ofstream(path) << "#!/bin/sh\n" << body << "\n";
  ASSERT_EQ(::chmod(path.c_str(), mode), 0);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

bool wait_for_file(const std::string& path, std::chrono::milliseconds deadline = 10s) {
  const auto until = steady::now() + deadline;
  while (!std::filesystem::exists(path)) {
    if (steady::now() > until) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// Sets an environment variable for one scope.
class scoped_env {
 public:
  scoped_env(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value != nullptr) {
      ::setenv(name, value, 1);
    } else {
      ::unsetenv(name);
    }
  }
  ~scoped_env() {
    if (old_) {
      ::setenv(name_, old_->c_str(), 1);
    } else {
      ::unsetenv(name_);
    }
  }
  scoped_env(const scoped_env&) = delete;
  scoped_env& operator=(const scoped_env&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

// ---- search ---------------------------------------------------------------------

TEST(DaemonStartTest, AProgramBesideTheCallerIsFoundFirst) {
  const auto self = std::filesystem::read_symlink("/proc/self/exe");
  temp_dir dir;
  write_script(dir.file(self.filename().string()), "exit 0");
  scoped_env path("PATH", dir.path().c_str());  // also on PATH: beside wins
  start_report report;
  auto found = find_program(program_search{self.filename().string(), "", ""}, &report);
  ASSERT_TRUE(found) << found.error().message();
  EXPECT_EQ(*found, self.string());
  EXPECT_EQ(report.program, self.string());
}

TEST(DaemonStartTest, PathIsSearchedLastAndEmptyEntriesAreSkipped) {
  temp_dir dir;
  const std::string name = "uipc-test-daemon-" + std::to_string(::getpid());
  write_script(dir.file(name), "exit 0");
  {
    scoped_env path("PATH", ("::relative:" + dir.path()).c_str());
    start_report report;
    auto found = find_program(program_search{name, "", ""}, &report);
    ASSERT_TRUE(found) << found.error().message();
    EXPECT_EQ(*found, dir.file(name));
    // Beside the caller and the install bindir were tried first, and said so.
    ASSERT_GE(report.tried.size(), 1u);
    EXPECT_NE(report.tried[0].find(
                  std::filesystem::read_symlink("/proc/self/exe").parent_path().string()),
              std::string::npos);
  }
  {
    // An empty $PATH searches nothing, not even the working directory.
    scoped_env path("PATH", "");
    const auto cwd = std::filesystem::current_path();
    std::filesystem::current_path(dir.path());
    auto found = find_program(program_search{name, "", ""});
    std::filesystem::current_path(cwd);
    EXPECT_EQ(found.error(), errc::program_not_found);
  }
}

TEST(DaemonStartTest, AnExplicitPathOrTheEnvironmentIsTheOnlyCandidate) {
  temp_dir dir;
  write_script(dir.file("mine"), "exit 0");
  const auto self = std::filesystem::read_symlink("/proc/self/exe");
  // The name would be found beside us; the override is used, or fails alone.
  const program_search with_option{self.filename().string(), dir.file("mine"), "UIPC_TEST_PROGRAM"};
  EXPECT_EQ(*find_program(with_option), dir.file("mine"));
  {
    scoped_env env("UIPC_TEST_PROGRAM", dir.file("mine").c_str());
    EXPECT_EQ(*find_program(program_search{self.filename().string(), "", "UIPC_TEST_PROGRAM"}),
              dir.file("mine"));
    // The option outranks the environment.
    start_report report;
    auto missing =
        find_program(program_search{"x", dir.file("absent"), "UIPC_TEST_PROGRAM"}, &report);
    EXPECT_EQ(missing.error(), errc::program_not_found);
    ASSERT_EQ(report.tried.size(), 1u);
    EXPECT_EQ(report.tried[0].rfind(dir.file("absent"), 0), 0u) << report.tried[0];
    EXPECT_NE(report.describe().find(dir.file("absent")), std::string::npos) << report.describe();
  }
  // A relative path means the caller's working directory.
  const auto cwd = std::filesystem::current_path();
  std::filesystem::current_path(dir.path());
  auto relative = find_program(program_search{"x", "./mine", ""});
  std::filesystem::current_path(cwd);
  ASSERT_TRUE(relative);
  EXPECT_EQ(*relative, dir.file("mine"));
}

TEST(DaemonStartTest, AProgramThatCannotBeExecutedIsReportedAsSuch) {
  temp_dir dir;
  write_script(dir.file("plain"), "exit 0", 0644);
  std::filesystem::create_directory(dir.file("a-directory"));
  for (const char* name : {"plain", "a-directory"}) {
    start_report report;
    auto found = find_program(program_search{"x", dir.file(name), ""}, &report);
    EXPECT_EQ(found.error(), errc::program_not_executable) << name;
    ASSERT_EQ(report.tried.size(), 1u);
    EXPECT_NE(report.tried[0].find(dir.file(name)), std::string::npos);
  }
}

// ---- detached start -------------------------------------------------------------

TEST(DaemonStartTest, ADetachedDaemonIsNobodysChildAndRunsInRootWithATightUmask) {
  temp_dir dir;
  const std::string out = dir.file("out");
  write_script(dir.file("d"),
               "echo \"$(pwd) $(umask) $1\" > " + out + ".tmp; mv " + out + ".tmp " + out);
  auto started = spawn_detached(dir.file("d"), {"argument"});
  ASSERT_TRUE(started) << started.error().message();
  EXPECT_GT(started->pid, 0);
  ASSERT_TRUE(wait_for_file(out));
  EXPECT_EQ(read_file(out), "/ 0077 argument\n");
  int status = 0;
  EXPECT_EQ(::waitpid(started->pid, &status, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
}

TEST(DaemonStartTest, ADetachedStartIsNotHeldUpByChildrenAnotherThreadForks) {
  // Another thread of the caller forks (without exec) while the start runs:
  // a child that inherits the report socket's write end and keeps it (it
  // pauses) must not keep the start waiting for the end of its reports.
  temp_dir dir;
  write_script(dir.file("d"), "exit 0");
  std::atomic<bool> stop{false};
  std::mutex children_mutex;
  std::vector<pid_t> children;
  std::thread forker([&] {
    while (!stop.load() && children.size() < 150) {
      const pid_t c = ::fork();
      if (c == 0) {
        ::pause();
        ::_exit(0);
      }
      if (c > 0) {
        std::lock_guard lock(children_mutex);
        children.push_back(c);
      } else {
        std::this_thread::sleep_for(1ms);  // out of processes: the starts need some too
      }
    }
  });
  const auto end_children = [&] {
    stop.store(true);
    forker.join();
    std::lock_guard lock(children_mutex);
    for (const pid_t c : children) ::kill(c, SIGKILL);
    for (const pid_t c : children) ::waitpid(c, nullptr, 0);
  };
  auto starts = std::async(std::launch::async, [&] {
    steady::duration slowest{};
    for (int i = 0; i < 40 && !stop.load(); ++i) {
      const auto begin = steady::now();
      auto started = spawn_detached(dir.file("d"), {});
      if (!started) return std::optional<steady::duration>{};
      slowest = std::max(slowest, steady::now() - begin);
    }
    return std::optional<steady::duration>{slowest};
  });
  if (starts.wait_for(20s) != std::future_status::ready) {
    end_children();  // lets a start held by them return
    starts.wait();
    FAIL() << "a start waited for children another thread forked";
  }
  end_children();
  const auto slowest = starts.get();
  ASSERT_TRUE(slowest) << "a start failed";
  EXPECT_LT(*slowest, 5s);
}

// ---- racing starters ------------------------------------------------------------

// A "server" that is a file: it serves once `ready` exists.
struct file_server {
  temp_dir dir;
  std::string ready = dir.file("ready");

  server_start how(const std::string& program) const {
    server_start s;
    s.start_lock_path = dir.file("x.start");
    s.program = program_search{"x", program, ""};
    s.arguments = {dir.path()};
    return s;
  }
  error_code reach(steady::time_point) const {
    return std::filesystem::exists(ready) ? error_code{}
                                          : error_code(ENOENT, boost::system::system_category());
  }
};

bool absent(const error_code& ec) { return ec == boost::system::errc::no_such_file_or_directory; }

// Eight threads at once, each with its own report; the errors they got.
std::vector<error_code> race(const file_server& server, const server_start& how,
                             std::chrono::milliseconds timeout,
                             std::vector<start_report>* reports = nullptr) {
  std::vector<error_code> got(8);
  std::vector<start_report> own(8);
  std::vector<std::thread> racers;
  const auto deadline = steady::now() + timeout;
  for (std::size_t i = 0; i < got.size(); ++i) {
    racers.emplace_back([&, i] {
      got[i] = reach_or_start(
          how, [&](steady::time_point d) { return server.reach(d); }, absent, deadline, &own[i]);
    });
  }
  for (auto& t : racers) t.join();
  if (reports != nullptr) *reports = std::move(own);
  return got;
}

TEST(DaemonStartTest, RacingStartersStartExactlyOneDaemon) {
  file_server server;
  const std::string starts = server.dir.file("starts");
  write_script(server.dir.file("d"),
               "echo $$ >> " + starts + "; sleep 0.05; touch \"$1/ready\"; exec sleep 30");
  const auto got = race(server, server.how(server.dir.file("d")), 20s);
  for (const auto& ec : got) EXPECT_FALSE(ec) << ec.message();
  const std::string pids = read_file(starts);
  EXPECT_EQ(std::count(pids.begin(), pids.end(), '\n'), 1) << pids;
  std::istringstream each(pids);
  for (pid_t pid = 0; each >> pid;)
    ::kill(pid, SIGKILL);  // every one started, should there be more
  EXPECT_FALSE(std::filesystem::exists(server.dir.file("x.start"))) << "the start lock was left";
}

TEST(DaemonStartTest, RacingStartersEachReportABrokenProgramDistinctly) {
  file_server server;
  write_script(server.dir.file("not-executable"), "exit 0", 0644);
  write_script(server.dir.file("exits-at-once"), "exit 3");
  const std::pair<std::string, errc> cases[] = {
      {server.dir.file("missing"), errc::program_not_found},
      {server.dir.file("not-executable"), errc::program_not_executable},
      {server.dir.file("exits-at-once"), errc::program_exited},
  };
  for (const auto& [program, expected] : cases) {
    std::vector<start_report> reports;
    const auto start = steady::now();
    const auto got = race(server, server.how(program), 20s, &reports);
    EXPECT_LT(steady::now() - start, 5s) << program << ": waited instead of failing";
    for (std::size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i], expected) << program << ": " << got[i].message();
      EXPECT_NE(reports[i].describe().find(program), std::string::npos) << reports[i].describe();
    }
  }
}

TEST(DaemonStartTest, ADaemonThatNeverServesTimesOut) {
  file_server server;
  write_script(server.dir.file("silent"), "exec sleep 30");
  start_report report;
  const auto start = steady::now();
  const auto ec = reach_or_start(
      server.how(server.dir.file("silent")), [&](steady::time_point d) { return server.reach(d); },
      absent, start + 300ms, &report);
  EXPECT_EQ(ec, errc::start_timeout);
  EXPECT_GE(steady::now() - start, 300ms);
  EXPECT_LT(steady::now() - start, 5s);
  ASSERT_GT(report.pid, 0);
  EXPECT_TRUE(process_alive(report.pid));
  ::kill(report.pid, SIGKILL);
}

TEST(DaemonStartTest, AnErrorThatIsNotAnAbsenceEndsTheAttemptWithoutAStart) {
  file_server server;
  const std::string starts = server.dir.file("starts");
  write_script(server.dir.file("d"), "echo $$ >> " + starts);
  const auto ec = reach_or_start(
      server.how(server.dir.file("d")),
      [](steady::time_point) { return error_code(EACCES, boost::system::system_category()); },
      absent, steady::now() + 5s);
  EXPECT_EQ(ec, boost::system::errc::permission_denied);
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(std::filesystem::exists(starts));
}

}  // namespace
}  // namespace uipc
