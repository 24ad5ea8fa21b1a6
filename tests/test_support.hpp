// Shared helpers for the test suites: bounded loop runs and private temp directories.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <utility>

namespace uipc::test {

/// Runs `ctx` until `done()` holds or `deadline` passes; fails the test on timeout.
inline bool run_until(boost::asio::io_context& ctx, const std::function<bool()>& done,
                      std::chrono::milliseconds deadline = std::chrono::seconds(10)) {
  const auto until = std::chrono::steady_clock::now() + deadline;
  if (ctx.stopped()) ctx.restart();
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) {
      ADD_FAILURE() << "deadline passed before the condition held";
      return false;
    }
    ctx.run_for(std::chrono::milliseconds(5));
    if (ctx.stopped()) ctx.restart();
  }
  return true;
}

/// A private directory, removed with everything in it when the object goes.
class temp_dir {
 public:
  temp_dir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "uipc-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    path_ = pattern;
  }
  ~temp_dir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  std::string path() const { return path_.string(); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

/// Runs a shell command line; returns its exit status (-1 if it did not exit)
/// and what it printed on stdout and stderr.
inline std::pair<int, std::string> run_command(const std::string& command) {
  std::string out;
  FILE* p = ::popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, out};
  char buf[4096];
  while (const std::size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int status = ::pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

/// How many descriptors this process has open (to prove that nothing leaked).
inline std::size_t open_fd_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

/// open_fd_count() once `ctx` has made its reactor's own descriptors (epoll,
/// eventfd, timerfd), which it does lazily on first use.
inline std::size_t descriptors_with_reactor(boost::asio::io_context& ctx) {
  boost::asio::steady_timer warm_up(ctx);
  warm_up.expires_after(std::chrono::seconds(0));
  return open_fd_count();
}

/// A test with its own io_context that ends by proving nothing leaked: the loop
/// drains what closing left behind, and the process holds the descriptors it
/// held before the test.
class loop_test : public ::testing::Test {
 protected:
  void TearDown() override {
    ctx_.restart();
    ctx_.run_for(std::chrono::milliseconds(20));
    EXPECT_EQ(open_fd_count(), fds_before_);
  }

  boost::asio::io_context ctx_;
  std::size_t fds_before_ = descriptors_with_reactor(ctx_);
};

}  // namespace uipc::test
