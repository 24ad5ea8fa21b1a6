// Helpers of the dispatch tests that run programs: uipc-dns-responder, dig,
// unbound. Children have their output in files and are killed when they go.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>
#include <chrono>
#include <fstream>
#include <optional>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

extern char** environ;

namespace uipc::dispatch::program_test {

using namespace std::chrono_literals;

inline std::optional<std::string> find_program(const std::string& name) {
  for (const char* dir :
       {"/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin", "/usr/local/sbin"}) {
    const std::string path = std::string(dir) + "/" + name;
    if (::access(path.c_str(), X_OK) == 0) return path;
  }
  return std::nullopt;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

/// A child process with stdout and stderr in files; killed (and reaped) when the object goes.
class child {
 public:
  child(std::vector<std::string> argv, const std::string& out, const std::string& err) {
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&fa, 2, err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    if (::posix_spawn(&pid_, args[0], &fa, nullptr, args.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&fa);
  }
  ~child() {
    if (pid_ > 0 && !status_) {
      ::kill(pid_, SIGKILL);
      int st = 0;
      ::waitpid(pid_, &st, 0);
    }
  }
  child(const child&) = delete;
  child& operator=(const child&) = delete;

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  void signal(int sig) const {
    if (pid_ > 0 && !status_) ::kill(pid_, sig);
  }
  /// The exit status once it ended within `deadline`, else nullopt.
  std::optional<int> wait(std::chrono::milliseconds deadline) {
    const auto until = std::chrono::steady_clock::now() + deadline;
    while (!status_) {
      int st = 0;
      const pid_t r = ::waitpid(pid_, &st, WNOHANG);
      if (r == pid_) {
        status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        break;
      }
      if (std::chrono::steady_clock::now() > until) return std::nullopt;
      std::this_thread::sleep_for(5ms);
    }
    return status_;
  }
  bool running() { return !wait(0ms).has_value(); }

 private:
  pid_t pid_ = -1;
  std::optional<int> status_;
};

/// Runs a program to its end (at most `deadline`); its stdout, or nullopt on timeout.
inline std::optional<std::string> run(const uipc::test::temp_dir& dir,
                                      std::vector<std::string> argv,
                                      std::chrono::milliseconds deadline = 20s,
                                      int* exit_code = nullptr) {
  static int n = 0;
  const std::string out = dir.file("run" + std::to_string(++n) + ".out");
  child c(std::move(argv), out, dir.file("run" + std::to_string(n) + ".err"));
  if (!c.started()) return std::nullopt;
  auto status = c.wait(deadline);
  if (!status) return std::nullopt;
  if (exit_code) *exit_code = *status;
  return read_file(out);
}

/// A UDP port that was free a moment ago (for servers that cannot report theirs).
inline unsigned short free_udp_port() {
  boost::asio::io_context ctx;
  boost::asio::ip::udp::socket s(
      ctx, boost::asio::ip::udp::endpoint(boost::asio::ip::make_address("127.0.0.1"), 0));
  return s.local_endpoint().port();
}

/// uipc-dns-responder on `listen`; `port` is empty when it did not come up.
struct responder {
  responder(const uipc::test::temp_dir& dir, const std::string& listen, const std::string& threads)
      : out(dir.file("responder.out")),
        proc({UIPC_DNS_RESPONDER, "--listen", listen, "--threads", threads}, out,
             dir.file("responder.err")) {
    static const std::regex ready(R"(listening on (.*):(\d+))");
    for (auto until = std::chrono::steady_clock::now() + 10s;
         std::chrono::steady_clock::now() < until;) {
      std::smatch m;
      const std::string text = read_file(out);
      if (std::regex_search(text, m, ready)) {
        port = m[2];
        return;
      }
      if (!proc.running()) return;
      std::this_thread::sleep_for(5ms);
    }
  }
  std::string out;
  child proc;
  std::string port;
};

}  // namespace uipc::dispatch::program_test
