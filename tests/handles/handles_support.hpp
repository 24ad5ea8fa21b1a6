// Helpers of the handles tests: private locations, leak checks, child processes.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"
#include "uipc/core/event_loop.hpp"
#include "uipc/handles/client.hpp"
#include "uipc/handles/daemon.hpp"

namespace uipc::handles::test {

using namespace std::chrono_literals;

/// A location of its own for each test: a private directory and a unique name,
/// so tests never meet each other's daemons or a real user's.
struct private_location {
  uipc::test::temp_dir dir;
  location where;

  private_location() {
    static std::atomic<int> counter{0};
    where.directory = dir.path();
    where.name = "t" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
  }

  resolved_location resolved() const { return *resolve(where); }

  client_options options(std::chrono::milliseconds linger = 0ms) const {
    client_options o;
    o.where = where;
    o.daemon_path = UIPC_TEST_HANDLED_PATH;
    o.daemon_linger = linger;
    o.start_timeout = 20s;
    return o;
  }

  bool socket_exists() const { return std::filesystem::exists(resolved().socket_path); }

  /// The uipc-handled processes serving this location (found by their
  /// arguments in /proc; a zombie has none). Started ones only: an in-process
  /// daemon is not among them.
  std::vector<pid_t> daemon_pids() const {
    std::vector<pid_t> pids;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
      const std::string pid_text = entry.path().filename().string();
      if (pid_text.find_first_not_of("0123456789") != std::string::npos) continue;
      std::ifstream in(entry.path() / "cmdline", std::ios::binary);
      std::vector<std::string> argv;
      for (std::string arg; std::getline(in, arg, '\0');) argv.push_back(arg);
      bool directory = false;
      bool name = false;
      for (std::size_t i = 0; i + 1 < argv.size(); ++i) {
        directory = directory || (argv[i] == "--directory" && argv[i + 1] == where.directory);
        name = name || (argv[i] == "--name" && argv[i + 1] == where.name);
      }
      if (directory && name) pids.push_back(static_cast<pid_t>(std::stol(pid_text)));
    }
    return pids;
  }

  /// Waits (bounded) until no daemon of this location runs and its socket is gone.
  bool wait_until_clean(std::chrono::milliseconds deadline = 10s) const {
    const auto until = std::chrono::steady_clock::now() + deadline;
    while (socket_exists() || !daemon_pids().empty()) {
      if (std::chrono::steady_clock::now() > until) return false;
      std::this_thread::sleep_for(5ms);
    }
    return true;
  }
};

/// A daemon inside this process, on its own loop thread.
class in_process_daemon {
 public:
  explicit in_process_daemon(const location& where, std::uint32_t capacity = 64,
                             std::size_t scratch = 4096,
                             std::uint32_t max_references = daemon_options{}.max_references) {
    daemon_options o;
    o.where = where;
    o.capacity = capacity;
    o.scratch_size = scratch;
    o.max_references = max_references;
    auto d = handle_daemon::start(loop_.context(), std::move(o));
    if (!d) {
      ADD_FAILURE() << "daemon did not start: " << d.error().message();
      return;
    }
    daemon_ = std::move(*d);
    thread_ = std::thread([this] { loop_.run(); });
  }
  ~in_process_daemon() { shutdown(); }

  void shutdown() {
    if (daemon_) daemon_->stop();
    loop_.stop();
    if (thread_.joinable()) thread_.join();
    daemon_.reset();
  }

  handle_daemon& operator*() { return *daemon_; }
  handle_daemon* operator->() { return daemon_.get(); }
  explicit operator bool() const { return daemon_ != nullptr; }

 private:
  event_loop loop_{1};
  std::unique_ptr<handle_daemon> daemon_;
  std::thread thread_;
};

/// A child process running `argv`, its stdin and stdout on pipes. The destructor
/// kills (SIGKILL) and reaps it if it is still there.
class child_process {
 public:
  /// `env`: the child's whole environment; none: this process's.
  explicit child_process(std::vector<std::string> argv,
                         std::optional<std::vector<std::string>> env = std::nullopt) {
    int in[2];
    int out[2];
    if (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0) std::abort();
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    std::vector<char*> envp;
    if (env) {
      for (auto& e : *env) envp.push_back(e.data());
      envp.push_back(nullptr);
    }
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(in[0], 0);
      ::dup2(out[1], 1);
      if (env) {
        ::execve(args[0], args.data(), envp.data());
      } else {
        ::execv(args[0], args.data());
      }
      ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    stdin_ = in[1];
    stdout_ = out[0];
  }
  ~child_process() {
    if (stdin_ >= 0) ::close(stdin_);
    if (pid_ > 0 && !exit_code_) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
    ::close(stdout_);
  }
  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  pid_t pid() const { return pid_; }

  /// The next line the child prints, or nothing by the deadline / at EOF.
  std::optional<std::string> read_line(std::chrono::milliseconds deadline = 20s) {
    const auto until = std::chrono::steady_clock::now() + deadline;
    for (;;) {
      if (auto nl = buffer_.find('\n'); nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        return line;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          until - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{stdout_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
      char chunk[256];
      const ssize_t n = ::read(stdout_, chunk, sizeof chunk);
      if (n <= 0) return std::nullopt;
      buffer_.append(chunk, static_cast<std::size_t>(n));
    }
  }

  /// Closes the child's stdin (peers then exit in order).
  void close_stdin() {
    if (stdin_ >= 0) ::close(stdin_);
    stdin_ = -1;
  }

  void kill(int sig) { ::kill(pid_, sig); }

  /// The exit code (or 128 + signal), or nothing by the deadline.
  std::optional<int> wait_exit(std::chrono::milliseconds deadline = 20s) {
    if (exit_code_) return exit_code_;
    const auto until = std::chrono::steady_clock::now() + deadline;
    for (;;) {
      int status = 0;
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        return exit_code_;
      }
      if (std::chrono::steady_clock::now() > until) return std::nullopt;
      std::this_thread::sleep_for(2ms);
    }
  }

 private:
  pid_t pid_ = -1;
  int stdin_ = -1;
  int stdout_ = -1;
  std::string buffer_;
  std::optional<int> exit_code_;
};

/// handles_peer for `loc` running `command args...`.
inline std::vector<std::string> peer_args(const private_location& loc,
                                          std::vector<std::string> command) {
  std::vector<std::string> argv{UIPC_TEST_PEER_PATH, loc.where.directory, loc.where.name,
                                UIPC_TEST_HANDLED_PATH};
  argv.insert(argv.end(), command.begin(), command.end());
  return argv;
}

/// Whether process `pid` is gone (or a zombie).
inline bool process_gone(pid_t pid) {
  if (::kill(pid, 0) != 0) return true;
  std::string stat;
  if (FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r")) {
    char buf[512] = {};
    std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    stat = buf;
  }
  const auto paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] == 'Z';
}

/// Whether every thread of `pid` has ended: none but a zombie leader is left
/// in /proc/PID/task (or the process is gone altogether).
inline bool threads_ended(pid_t pid) {
  std::error_code ec;
  std::size_t threads = 0;
  for (std::filesystem::directory_iterator it("/proc/" + std::to_string(pid) + "/task", ec), end;
       !ec && it != end; it.increment(ec))
    ++threads;
  return threads <= 1 && process_gone(pid);
}

/// Polls `done` every `step` until it holds (true) or `deadline` passes (false).
template <class Done>
bool poll_until(Done done, std::chrono::milliseconds deadline, std::chrono::milliseconds step) {
  const auto until = std::chrono::steady_clock::now() + deadline;
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(step);
  }
  return true;
}

inline bool wait_threads_ended(pid_t pid, std::chrono::milliseconds deadline = 10s) {
  return poll_until([pid] { return threads_ended(pid); }, deadline, 1ms);
}

inline bool wait_process_gone(pid_t pid, std::chrono::milliseconds deadline = 10s) {
  return poll_until([pid] { return process_gone(pid); }, deadline, 5ms);
}

}  // namespace uipc::handles::test
