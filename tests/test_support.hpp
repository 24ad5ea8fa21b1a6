// Shared helpers for the test suites: bounded loop runs and private temp directories.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

extern char** environ;

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

/// Whether some process listens on the Unix socket `path` (a listening socket
/// bound to it is in /proc/net/unix with the accept-connections flag). Unlike
/// connecting, asking does not disturb the listener: a socket-activation
/// manager would take a probe for its first client.
inline bool unix_socket_listening(const std::string& path) {
  std::ifstream table("/proc/net/unix");
  std::string line;
  std::getline(table, line);  // the header
  while (std::getline(table, line)) {
    std::istringstream fields(line);
    std::string slot, refs, protocol, flags, type, state, inode, bound;
    fields >> slot >> refs >> protocol >> flags >> type >> state >> inode >> bound;
    if (bound == path && flags == "00010000") return true;
  }
  return false;
}

/// Polls `done()` until it holds or `limit` passes; returns whether it held.
/// Does not fail the test by itself: callers assert what the wait means.
inline bool eventually(const std::function<bool()>& done,
                       std::chrono::milliseconds limit = std::chrono::seconds(20)) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return done();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

/// Runs `fn` on one of `ctx`'s threads and waits for it at most `limit`;
/// fails the test if it did not run in time (a loop that stopped serving).
inline bool run_on(boost::asio::io_context& ctx, std::function<void()> fn,
                   std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  auto ran = std::make_shared<std::atomic<bool>>(false);
  boost::asio::post(ctx, [ran, fn = std::move(fn)] {
    fn();
    ran->store(true);
  });
  if (eventually([&] { return ran->load(); }, limit)) return true;
  ADD_FAILURE() << "a task posted to the loop did not run within " << limit.count() << " ms";
  return false;
}

/// Runs `loop.run()` on a thread of its own. stop() (or the destructor) asks
/// the loop to stop and waits at most `limit` for run() to return: a loop that
/// does not stop fails the test and is stopped hard through its io_context, so
/// a broken stop() shows as a failure, not as a ctest timeout.
template <class Loop>
class loop_runner {
 public:
  explicit loop_runner(Loop& loop) : loop_(loop) {
    auto done = std::make_shared<std::promise<void>>();
    finished_ = done->get_future();
    thread_ = std::thread([this, done] {
      loop_.run();
      done->set_value();
    });
  }
  ~loop_runner() { stop(); }
  loop_runner(const loop_runner&) = delete;
  loop_runner& operator=(const loop_runner&) = delete;

  bool stop(std::chrono::seconds limit = std::chrono::seconds(10)) {
    if (!thread_.joinable()) return true;
    loop_.stop();
    const bool stopped = finished_.wait_for(limit) == std::future_status::ready;
    if (!stopped) {
      ADD_FAILURE() << "the loop did not stop within " << limit.count() << " s";
      loop_.context().stop();
    }
    thread_.join();
    return stopped;
  }

 private:
  Loop& loop_;
  std::future<void> finished_;
  std::thread thread_;
};

/// Runs `loop` until it stops by itself, at most `limit`. A loop that does not
/// stop in time fails the test and is stopped hard (its io_context), so a
/// broken stop() shows as a failure here, not as a ctest timeout.
template <class Loop>
bool run_within(Loop& loop, std::chrono::seconds limit = std::chrono::seconds(10)) {
  std::promise<void> done;
  auto finished = done.get_future();
  std::thread runner([&] {
    loop.run();
    done.set_value();
  });
  const bool stopped = finished.wait_for(limit) == std::future_status::ready;
  if (!stopped) {
    ADD_FAILURE() << "the loop did not stop within " << limit.count() << " s";
    loop.context().stop();
  }
  runner.join();
  return stopped;
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

/// A program running in the background: its stdout is read line by line, its
/// stderr collected in a file; it is killed (SIGKILL) if still running when
/// the object goes.
class child_process {
 public:
  using clock = std::chrono::steady_clock;

  /// argv[0] is the program's path.
  explicit child_process(std::vector<std::string> argv) {
    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return;
    char err_path[] = "/tmp/uipc-child-stderr-XXXXXX";
    const int err = ::mkstemp(err_path);
    if (err >= 0) {
      err_path_ = err_path;
      ::unlink(err_path);  // read through err_ (kept open) only
      err_ = err;
    }
    posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    if (err_ >= 0) ::posix_spawn_file_actions_adddup2(&actions, err_, 2);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    if (::posix_spawn(&pid_, args[0], &actions, nullptr, args.data(), environ) != 0) pid_ = -1;
    ::posix_spawn_file_actions_destroy(&actions);
    ::close(out[1]);
    out_ = out[0];
  }
  ~child_process() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (out_ >= 0) ::close(out_);
    if (err_ >= 0) ::close(err_);
  }
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  pid_t pid() const { return pid_; }

  /// The next line on its stdout (with its '\n'), waiting at most `limit`;
  /// what came so far (maybe "") when the time runs out or the pipe closes.
  std::string line(std::chrono::milliseconds limit) {
    const auto end = clock::now() + limit;
    while (pending_.find('\n') == std::string::npos && clock::now() < end) {
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      char buf[512];
      const ssize_t n = ::read(out_, buf, sizeof buf);
      if (n <= 0) break;
      pending_.append(buf, static_cast<std::size_t>(n));
    }
    const auto eol = pending_.find('\n');
    std::string out = pending_.substr(0, eol == std::string::npos ? pending_.size() : eol + 1);
    pending_.erase(0, out.size());
    return out;
  }
  /// The lines on its stdout until one starts with `prefix` (that one
  /// included), waiting at most `limit` in all.
  std::string lines_until(const std::string& prefix, std::chrono::milliseconds limit) {
    const auto end = clock::now() + limit;
    std::string all;
    while (clock::now() < end) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - clock::now());
      std::string l = line(left);
      if (l.empty()) break;
      all += l;
      if (l.rfind(prefix, 0) == 0) break;
    }
    return all;
  }
  /// What it wrote on stderr so far.
  std::string errors() const {
    std::string out;
    if (err_ < 0) return out;
    char buf[4096];
    off_t at = 0;
    for (ssize_t n; (n = ::pread(err_, buf, sizeof buf, at)) > 0; at += n)
      out.append(buf, static_cast<std::size_t>(n));
    return out;
  }
  /// Sends `signal`, then waits at most `limit` for the exit: its status, 128 +
  /// the signal that killed it, or -1 if it is still running.
  int stop(std::chrono::milliseconds limit, int signal = SIGTERM) {
    if (pid_ <= 0) return -1;
    if (signal != 0) ::kill(pid_, signal);
    const auto end = clock::now() + limit;
    int status = 0;
    for (;;) {
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      if (clock::now() >= end) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  int err_ = -1;
  std::string err_path_;
  std::string pending_;
};

/// How many descriptors this process has open (to prove that nothing leaked).
/// The exit status of child `pid` (its exit code, or 128 + the signal that
/// ended it), waiting up to `limit`: a child still running then is killed
/// and -1 returned.
inline int wait_exit(pid_t pid, std::chrono::milliseconds limit) {
  const auto until = std::chrono::steady_clock::now() + limit;
  int status = 0;
  for (;;) {
    const pid_t r = ::waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (r < 0) return -2;
    if (std::chrono::steady_clock::now() >= until) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

inline std::size_t open_fd_count() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd"))
    ++n;
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

/// A load loop's report line as uipcctl prints it ("calls N seconds S
/// calls_per_second R mean_us M p50_us P p99_us Q", with `unit` for "calls"),
/// or nullopt if `text` does not start with one.
struct load_report {
  unsigned long long count = 0;
  double seconds = 0, rate = 0, mean_us = 0, p50_us = 0, p99_us = 0;
};
inline std::optional<load_report> parse_load_report(const std::string& text,
                                                    const std::string& unit) {
  load_report r;
  const std::string format =
      unit + " %llu seconds %lf " + unit + "_per_second %lf mean_us %lf p50_us %lf p99_us %lf";
  if (std::sscanf(text.c_str(), format.c_str(), &r.count, &r.seconds, &r.rate, &r.mean_us,
                  &r.p50_us, &r.p99_us) != 6)
    return std::nullopt;
  return r;
}

}  // namespace uipc::test
