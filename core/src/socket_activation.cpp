// Socket activation (see passed_sockets.hpp and uipc/core/socket_activation.hpp). The protocol is
// three environment variables and a run of descriptors from 3; reading it by hand keeps libsystemd
// out of everything that links uipc::core.
#include "uipc/core/socket_activation.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <charconv>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string_view>
#include <vector>

#include "passed_sockets.hpp"

namespace uipc::detail {

namespace {

constexpr int first_passed_fd = 3;  // SD_LISTEN_FDS_START
constexpr long most_passed_fds = 4096;

template <class Int>
bool parse_whole(const char* text, Int& out) {
  if (text == nullptr) return false;
  const std::string_view s(text);
  auto r = std::from_chars(s.data(), s.data() + s.size(), out);
  return !s.empty() && r.ec == std::errc{} && r.ptr == s.data() + s.size();
}

// The descriptors passed to this process, read from the environment once.
std::vector<int> read_passed() {
  std::vector<int> fds;
  long pid = 0;
  long count = 0;
  const bool ours = parse_whole(std::getenv("LISTEN_PID"), pid) && pid == ::getpid() &&
                    parse_whole(std::getenv("LISTEN_FDS"), count) && count > 0 &&
                    count <= most_passed_fds;
  // Only what is there is removed: a process that was passed nothing does not
  // touch its environment, which other threads may be reading.
  for (const char* name : {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"})
    if (std::getenv(name) != nullptr) ::unsetenv(name);
  if (!ours) return fds;
  for (int fd = first_passed_fd; fd < first_passed_fd + count; ++fd) {
    const int flags = ::fcntl(fd, F_GETFD);
    if (flags < 0) continue;  // not open after all: nothing to take
    ::fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
    fds.push_back(fd);
  }
  return fds;
}

int socket_option(int fd, int name) {
  int value = -1;
  socklen_t size = sizeof value;
  return ::getsockopt(fd, SOL_SOCKET, name, &value, &size) == 0 ? value : -1;
}

// The path a Unix socket is bound to; empty when unnamed or abstract.
std::string bound_path(int fd) {
  sockaddr_un addr{};
  socklen_t size = sizeof addr;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &size) != 0) return {};  // NOLINT
  const auto offset = offsetof(sockaddr_un, sun_path);
  if (size <= offset || addr.sun_family != AF_UNIX || addr.sun_path[0] == '\0') return {};
  return std::string(addr.sun_path, ::strnlen(addr.sun_path, size - offset));
}

// Whether `fd` is a listening Unix stream socket bound to `path`.
bool listens_at(int fd, const std::string& path) {
  if (socket_option(fd, SO_DOMAIN) != AF_UNIX || socket_option(fd, SO_TYPE) != SOCK_STREAM ||
      socket_option(fd, SO_ACCEPTCONN) != 1) {
    return false;
  }
  const std::string bound = bound_path(fd);
  if (bound.empty()) return false;
  if (bound == path) return true;
  // The same file under another spelling ("//run/user/1000/x.sock", a symlinked directory).
  struct stat a {};
  struct stat b {};
  return ::stat(bound.c_str(), &a) == 0 && ::stat(path.c_str(), &b) == 0 && S_ISSOCK(a.st_mode) &&
         a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

// The passed descriptors no listener has taken yet, read by the first use in
// each process: a child forked after the first read starts from its own
// environment, never from the descriptors its parent was passed.
struct passed_set {
  std::mutex mutex;
  pid_t reader = 0;
  std::vector<int> fds;
};

class passed_fds {
 public:
  passed_fds() : lock_(set().mutex) {
    if (set().reader != ::getpid()) {
      set().fds = read_passed();
      set().reader = ::getpid();
    }
  }
  std::vector<int>& operator*() { return set().fds; }
  std::vector<int>* operator->() { return &set().fds; }

 private:
  static passed_set& set() {
    static passed_set s;
    return s;
  }
  std::lock_guard<std::mutex> lock_;
};

}  // namespace

unique_fd take_inherited_listener(const std::string& path) {
  passed_fds fds;
  for (auto it = fds->begin(); it != fds->end(); ++it) {
    if (listens_at(*it, path)) {
      const int fd = *it;
      fds->erase(it);
      return unique_fd(fd);
    }
  }
  return {};
}

void return_inherited_listener(unique_fd fd) {
  if (!fd) return;
  passed_fds fds;
  fds->push_back(fd.release());
}

}  // namespace uipc::detail

namespace uipc {

void adopt_passed_sockets() { detail::passed_fds read; }

std::vector<std::string> untaken_passed_sockets() {
  detail::passed_fds fds;
  std::vector<std::string> out;
  for (int fd : *fds) out.push_back(detail::bound_path(fd));
  return out;
}

}  // namespace uipc
