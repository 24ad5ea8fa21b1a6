// Starting a daemon: fork, new session, fork again (so the daemon is nobody's
// child and no client has to reap it), exec; then wait on the segment header.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "session.hpp"

namespace uipc::handles::detail {

namespace {

struct spawn_message {
  int kind;  // 1: the daemon's pid; 2: exec failed with errno `value`
  int value;
};

// Only async-signal-safe calls between fork and exec: the client may be multithreaded.
void exec_daemon(int report_fd, const std::vector<char*>& argv) {
  const int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd >= 0) {
    ::dup2(null_fd, 0);
    ::dup2(null_fd, 1);
    if (std::getenv("UIPC_HANDLED_STDERR") == nullptr) ::dup2(null_fd, 2);
  }
  // Nothing of the client leaks into the daemon (the report pipe is CLOEXEC too).
  ::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
  // A daemon outlives the client that started it: it must not pin the client's
  // working directory (an unmountable file system), nor inherit a umask that
  // could loosen what it creates.
  (void)::chdir("/");
  ::umask(077);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  ::signal(SIGPIPE, SIG_DFL);
  ::execvp(argv[0], argv.data());
  const spawn_message failed{2, errno};
  (void)::write(report_fd, &failed, sizeof failed);
  ::_exit(127);
}

}  // namespace

bool process_alive(std::int32_t pid) {
  if (pid <= 0) return false;
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  // A zombie is dead, whoever has yet to reap it.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;
  const auto paren = line.rfind(')');
  return paren == std::string::npos || paren + 2 >= line.size() || line[paren + 2] != 'Z';
}

result<std::shared_ptr<session>> start_daemon(const client_options& options,
                                              const resolved_location& where,
                                              std::chrono::steady_clock::time_point deadline) {
  std::string path = options.daemon_path;
  if (path.empty()) {
    const char* env = std::getenv("UIPC_HANDLED_PATH");
    path = env != nullptr ? env : "uipc-handled";
  }
  // The daemon runs in "/": a relative path (with a slash; a bare name is
  // looked up in PATH) means the client's directory.
  std::error_code ignored;
  if (path.find('/') != std::string::npos) path = std::filesystem::absolute(path, ignored).string();
  const std::string directory = std::filesystem::absolute(where.directory, ignored).string();
  std::vector<std::string> args{path,
                                "--directory",
                                directory,
                                "--name",
                                options.where.name,
                                "--linger-ms",
                                std::to_string(options.daemon_linger.count()),
                                "--capacity",
                                std::to_string(options.daemon_capacity),
                                "--scratch",
                                std::to_string(options.daemon_scratch_size)};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  int report[2];
  if (::pipe2(report, O_CLOEXEC) != 0) return make_error_code(errc::daemon_unavailable);
  unique_fd read_end(report[0]);
  unique_fd write_end(report[1]);
  const pid_t child = ::fork();
  if (child < 0) return make_error_code(errc::daemon_unavailable);
  if (child == 0) {
    ::setsid();
    const pid_t daemon = ::fork();
    if (daemon < 0) ::_exit(1);
    if (daemon > 0) {
      const spawn_message started{1, daemon};
      (void)::write(write_end.get(), &started, sizeof started);
      ::_exit(0);
    }
    exec_daemon(write_end.get(), argv);
  }
  write_end.reset();
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }

  // Read until EOF: the daemon's pid, then (only if exec failed) its errno.
  std::int32_t daemon_pid = 0;
  for (;;) {
    spawn_message m{};
    const ssize_t n = ::read(read_end.get(), &m, sizeof m);
    if (n < 0 && errno == EINTR) continue;
    if (n != static_cast<ssize_t>(sizeof m)) break;
    if (m.kind == 1) daemon_pid = m.value;
    if (m.kind == 2) return make_error_code(errc::daemon_failed_to_start);
  }
  if (daemon_pid <= 0) return make_error_code(errc::daemon_unavailable);

  // Wait until a daemon answers (a socket left by a killed one refuses
  // connections until ours binds it), never past the deadline, never on a
  // daemon that is gone: one that cannot start exits, and we see that.
  while (std::chrono::steady_clock::now() < deadline) {
    auto s = open_session(options, where, deadline);
    if (s) return s;
    if (s.error() == errc::daemon_timeout || s.error() == errc::permission_denied) return s.error();
    if (!process_alive(daemon_pid)) return make_error_code(errc::daemon_failed_to_start);
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return make_error_code(errc::daemon_start_timeout);
}

}  // namespace uipc::handles::detail
