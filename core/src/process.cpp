// Process liveness: pidfds, and the pid-based check for where there are none.
#include "uipc/core/process.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <string_view>

namespace uipc {

unique_fd open_pidfd(pid_t pid) noexcept {
  if (pid <= 0) return {};
  return unique_fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
}

bool pidfd_exited(int pidfd) noexcept {
  pollfd p{pidfd, POLLIN, 0};
  return ::poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)) != 0;
}

namespace {
std::atomic<std::uint64_t> forks_seen{0};
void count_fork_in_child() noexcept { forks_seen.fetch_add(1, std::memory_order_relaxed); }
}  // namespace

std::uint64_t fork_epoch() noexcept {
  static const bool installed = ::pthread_atfork(nullptr, nullptr, count_fork_in_child) == 0;
  (void)installed;
  return forks_seen.load(std::memory_order_relaxed);
}

bool process_alive(std::int32_t pid) noexcept {
  if (pid <= 0) return false;
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  // A zombie is dead, whoever has yet to reap it.
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", static_cast<int>(pid));
  unique_fd fd(::open(path, O_RDONLY | O_CLOEXEC));
  if (!fd) return true;
  char buf[512];
  const ssize_t n = ::read(fd.get(), buf, sizeof buf - 1);
  if (n <= 0) return true;
  const std::string_view line(buf, static_cast<std::size_t>(n));
  const auto paren = line.rfind(')');
  return paren == std::string_view::npos || paren + 2 >= line.size() || line[paren + 2] != 'Z';
}

}  // namespace uipc
