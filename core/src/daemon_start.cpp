// Daemon start: the program search, the detached start (fork, setsid, fork,
// exec, with a report socket), and the start lock that lets racing clients
// start exactly one daemon.
#include "uipc/core/daemon_start.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string_view>
#include <thread>

#include "uipc/core/process.hpp"
#include "uipc/core/rendezvous.hpp"

#ifndef UIPC_INSTALL_BINDIR
#define UIPC_INSTALL_BINDIR "/usr/local/bin"
#endif

namespace uipc {

namespace {

error_code last_error() { return {errno, boost::system::system_category()}; }

// ---- search ---------------------------------------------------------------------

enum class candidate_state { missing, not_executable, usable };

candidate_state examine(const std::string& path, std::string& why) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    why = std::strerror(errno);
    return candidate_state::missing;
  }
  if (!S_ISREG(st.st_mode)) {
    why = "not a regular file";
    return candidate_state::not_executable;
  }
  if (::access(path.c_str(), X_OK) != 0) {
    why = "not executable: " + std::string(std::strerror(errno));
    return candidate_state::not_executable;
  }
  return candidate_state::usable;
}

std::string directory_of_self() {
  std::error_code ec;
  auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return {};
  return self.parent_path().string();
}

struct search_state {
  start_report* report;
  bool saw_unexecutable = false;

  // True when `path` is the program to run.
  bool consider(const std::string& path) {
    std::string why;
    const auto state = examine(path, why);
    if (state == candidate_state::usable) {
      if (report != nullptr) report->program = path;
      return true;
    }
    if (state == candidate_state::not_executable) saw_unexecutable = true;
    if (report != nullptr) report->tried.push_back(path + " (" + why + ")");
    return false;
  }

  result<std::string> not_found() const {
    return make_error_code(saw_unexecutable ? errc::program_not_executable
                                            : errc::program_not_found);
  }
};

// The candidates of $PATH for `name`; the first usable wins.
result<std::string> search_path(const std::string& name, search_state& state) {
  const char* path = std::getenv("PATH");
  if (path == nullptr) {
    if (state.report != nullptr) state.report->tried.push_back("$PATH (not set)");
    return state.not_found();
  }
  std::string_view rest(path);
  bool any = false;
  while (!rest.empty()) {
    const auto colon = rest.find(':');
    const std::string_view dir = rest.substr(0, colon);
    rest = colon == std::string_view::npos ? std::string_view{} : rest.substr(colon + 1);
    if (dir.empty() || dir.front() != '/') continue;  // the working directory: never
    any = true;
    std::string candidate(dir);
    candidate += '/';
    candidate += name;
    if (state.consider(candidate)) return candidate;
  }
  if (!any && state.report != nullptr)
    state.report->tried.push_back("$PATH (no absolute directory)");
  return state.not_found();
}

// ---- detached start -------------------------------------------------------------

struct spawn_message {
  // On the hand-off socket, from the middle process: 1, the daemon's pid (with
  // its pidfd when there is one); 3, the read end of the report socket. On the
  // report socket, from the daemon's process: 2, exec failed with errno `value`.
  int kind;
  int value;
};

void send_message(int fd, spawn_message m, int pass_fd) {
  iovec iov{&m, sizeof m};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  if (pass_fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
  }
  while (::sendmsg(fd, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR) {
  }
}

// Returns 0 at the end, -1 on error (EAGAIN: none yet, with MSG_DONTWAIT in
// `flags`), 1 with a message (and `fd` set when one came).
int receive_message(int fd, spawn_message& m, unique_fd& passed, int flags = 0) {
  iovec iov{&m, sizeof m};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n = 0;
  do {
    n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC | flags);
  } while (n < 0 && errno == EINTR);
  if (n <= 0) return static_cast<int>(n);
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
        c->cmsg_len == CMSG_LEN(sizeof(int))) {
      int got = -1;
      std::memcpy(&got, CMSG_DATA(c), sizeof got);
      passed.reset(got);
    }
  }
  return n == static_cast<ssize_t>(sizeof m) ? 1 : -1;
}

// In the grandchild. Only async-signal-safe calls between fork and exec: the
// caller may be multithreaded.
[[noreturn]] void exec_daemon(int report_fd, const char* program, char* const* argv,
                              bool keep_stderr) {
  const int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd >= 0) {
    ::dup2(null_fd, 0);
    ::dup2(null_fd, 1);
    if (!keep_stderr) ::dup2(null_fd, 2);
  }
  // Nothing of the caller leaks into the daemon (the report socket is CLOEXEC too).
  ::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
  // A daemon outlives the client that started it: it must not pin the client's
  // working directory (an unmountable file system), nor inherit a umask that
  // could loosen what it creates.
  if (::chdir("/") != 0) {
    // "/" always exists; if it cannot be entered, the daemon runs where it was started.
  }
  ::umask(077);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  ::signal(SIGPIPE, SIG_DFL);
  ::execv(program, argv);
  send_message(report_fd, spawn_message{2, errno}, -1);
  ::_exit(127);
}

}  // namespace

std::string start_report::describe() const {
  std::string out;
  if (!program.empty()) {
    out = "program " + program;
  } else if (!tried.empty()) {
    out = "tried";
    for (std::size_t i = 0; i < tried.size(); ++i) out += (i == 0 ? " " : ", ") + tried[i];
  }
  if (!outcome.empty()) out += (out.empty() ? "" : ": ") + outcome;
  return out;
}

const char* install_bindir() noexcept { return UIPC_INSTALL_BINDIR; }

result<std::string> find_program(const program_search& search, start_report* report) {
  search_state state{report};
  std::string given = search.explicit_path;
  if (given.empty() && !search.environment_variable.empty()) {
    if (const char* env = std::getenv(search.environment_variable.c_str()); env != nullptr)
      given = env;
  }
  if (!given.empty()) {
    if (given.find('/') == std::string::npos) return search_path(given, state);
    std::error_code ignored;
    // The daemon runs in "/": a relative path means the caller's directory.
    std::string path = std::filesystem::absolute(given, ignored).lexically_normal().string();
    if (state.consider(path)) return path;
    return state.not_found();
  }
  if (search.name.empty() || search.name.find('/') != std::string::npos) {
    return make_error_code(errc::invalid_name);
  }
  const std::string beside = directory_of_self();
  if (!beside.empty() && state.consider(beside + "/" + search.name))
    return beside + "/" + search.name;
  const std::string bindir = install_bindir();
  if (!bindir.empty() && bindir != beside && state.consider(bindir + "/" + search.name)) {
    return bindir + "/" + search.name;
  }
  return search_path(search.name, state);
}

result<started_daemon> spawn_detached(const std::string& program,
                                      const std::vector<std::string>& arguments, bool keep_stderr,
                                      start_report* report,
                                      std::chrono::steady_clock::time_point deadline) {
  if (report != nullptr) report->program = program;
  std::vector<std::string> args{program};
  args.insert(args.end(), arguments.begin(), arguments.end());
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);

  // Sockets rather than pipes: the middle process passes the daemon's pidfd,
  // taken while the daemon is still its child (its pid cannot be reused yet).
  // Two of them. The hand-off socket is made here, so a child that another
  // thread of ours forks meanwhile (fork without exec: CLOEXEC does not close
  // it there) may keep a copy of its write end for ever; it carries the middle
  // process's two messages, read once that process is gone, never to its end. The report socket,
  // read until the daemon's exec closes its end, is made in the middle process, which has one
  // thread: nobody else holds a copy.
  int ends[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ends) != 0) return last_error();
  unique_fd handoff(ends[0]);
  unique_fd handoff_write(ends[1]);
  const pid_t child = ::fork();
  if (child < 0) return last_error();
  if (child == 0) {
    ::setsid();
    int reports[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, reports) != 0) ::_exit(1);
    const pid_t daemon = ::fork();
    if (daemon < 0) ::_exit(1);
    if (daemon > 0) {
      const int pidfd = open_pidfd(daemon).release();
      send_message(handoff_write.get(), spawn_message{1, daemon}, pidfd);
      send_message(handoff_write.get(), spawn_message{3, 0}, reports[0]);
      ::_exit(0);
    }
    exec_daemon(reports[1], args[0].c_str(), argv.data(), keep_stderr);
  }
  handoff_write.reset();
  int status = 0;
  while (::waitpid(child, &status, 0) < 0 && errno == EINTR) {
  }

  // The middle process is gone: what it sent is queued, or nothing will come.
  started_daemon started;
  unique_fd reports;
  for (;;) {
    spawn_message m{};
    unique_fd passed;
    if (receive_message(handoff.get(), m, passed, MSG_DONTWAIT) <= 0) break;
    if (m.kind == 1) {
      started.pid = m.value;
      started.pidfd = std::move(passed);
    }
    if (m.kind == 3) reports = std::move(passed);
  }
  if (report != nullptr) report->pid = started.pid;
  if (started.pid <= 0 || !reports) {
    if (report != nullptr) report->outcome = "the starting process failed before the daemon ran";
    return error_code(ECHILD, boost::system::system_category());
  }

  // Until the daemon's exec closes its end (or its exec failed, said so and
  // exited). A daemon that has not got that far by the deadline (an exec
  // stuck on a hung file system, say) counts as started: the caller watches
  // its pidfd, which reports a later death, and gives up at the same deadline.
  int exec_errno = 0;
  for (;;) {
    int wait_ms = -1;
    if (deadline != std::chrono::steady_clock::time_point::max()) {
      const auto left =
          std::chrono::ceil<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      // Past it: one look without waiting, for a report already there.
      wait_ms = static_cast<int>(std::clamp<std::int64_t>(left.count(), 0, INT_MAX));
    }
    pollfd p{reports.get(), POLLIN, 0};
    const int ready = ::poll(&p, 1, wait_ms);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) break;  // an error, or the deadline
    spawn_message m{};
    unique_fd passed;
    if (receive_message(reports.get(), m, passed) <= 0) break;
    if (m.kind == 2) exec_errno = m.value;
  }
  if (exec_errno != 0) {
    if (report != nullptr)
      report->outcome = std::string("exec failed: ") + std::strerror(exec_errno);
    return make_error_code(exec_errno == ENOENT && ::access(program.c_str(), F_OK) != 0
                               ? errc::program_not_found
                               : errc::program_not_executable);
  }
  return started;
}

error_code reach_or_start(const server_start& how, const reach_function& reach,
                          const absent_function& absent,
                          std::chrono::steady_clock::time_point deadline, start_report* report) {
  using steady = std::chrono::steady_clock;
  auto ec = reach(deadline);
  if (!ec || !absent(ec)) return ec;

  // One starter at a time: the others wait here, then find the daemon it started.
  auto lock = instance_lock::acquire(how.start_lock_path, deadline);
  if (!lock) {
    if (lock.error() == errc::address_in_use) {
      if (report != nullptr) report->outcome = "another client was still starting the daemon";
      return make_error_code(errc::start_timeout);
    }
    return lock.error();
  }
  ec = reach(deadline);
  if (!ec || !absent(ec)) return ec;

  auto program = find_program(how.program, report);
  if (!program) return program.error();
  auto daemon = spawn_detached(*program, how.arguments, how.keep_stderr, report, deadline);
  if (!daemon) return daemon.error();

  // Ask until it answers (a socket left by a killed daemon refuses connections
  // until ours binds it), never past the deadline, never on a daemon that is
  // gone: one that cannot start exits, and we see that at once.
  for (;;) {
    ec = reach(deadline);
    if (!ec || !absent(ec)) return ec;
    bool gone = false;
    if (daemon->pidfd) {
      pollfd p{daemon->pidfd.get(), POLLIN, 0};
      gone = ::poll(&p, 1, 2) > 0;
    } else {
      gone = !process_alive(daemon->pid);
      if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (gone) {
      // Ours may have lost the location to a daemon started some other way.
      ec = reach(deadline);
      if (!ec || !absent(ec)) return ec;
      if (report != nullptr) report->outcome = "exited before serving";
      return make_error_code(errc::program_exited);
    }
    if (steady::now() >= deadline) {
      if (report != nullptr)
        report->outcome = "did not serve in time (pid " + std::to_string(daemon->pid) + ")";
      return make_error_code(errc::start_timeout);
    }
  }
}

}  // namespace uipc
