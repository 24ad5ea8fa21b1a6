// Rendezvous pieces: name rules, derived paths, the single-instance lock, and
// the ownership checks of a shared directory's sockets.
#include "uipc/core/rendezvous.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <thread>

#include "uipc/core/framed.hpp"

namespace uipc {

namespace {

error_code last_error() { return {errno, boost::system::system_category()}; }

bool is_alnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

}  // namespace

error_code check_name(std::string_view name, const name_rules& rules) {
  if (name.size() < rules.min_length || name.size() > rules.max_length) {
    return make_error_code(errc::invalid_name);
  }
  bool only_dots = true;
  for (char c : name) {
    if (c == '\0' || (!is_alnum(c) && rules.extra_chars.find(c) == std::string_view::npos)) {
      return make_error_code(errc::invalid_name);
    }
    only_dots = only_dots && c == '.';
  }
  if (only_dots && !name.empty()) return make_error_code(errc::invalid_name);
  return {};
}

result<rendezvous_paths> derive_rendezvous_paths(const std::string& directory,
                                                 std::string_view prefix, std::string_view name,
                                                 const name_rules& rules) {
  if (auto ec = check_name(name, rules)) return ec;
  if (directory.empty()) return error_code(ENOENT, boost::system::system_category());
  rendezvous_paths p;
  p.directory = directory;
  std::string stem = directory;
  if (stem.back() != '/') stem += '/';
  stem.append(prefix).append(name);
  p.socket_path = stem + ".sock";
  p.start_lock_path = stem + ".start";
  // Checked here, once, rather than by each bind and connect: the listener's
  // lock file is the longest name, but only the socket goes in an address.
  if (p.socket_path.size() >= sizeof(sockaddr_un::sun_path)) {
    return error_code(ENAMETOOLONG, boost::system::system_category());
  }
  return p;
}

std::string listener_lock_path(std::string_view socket_path) {
  std::string p(socket_path);
  p += ".lock";
  return p;
}

// ---- instance_lock ------------------------------------------------------------

instance_lock::instance_lock(std::string path, unique_fd fd) noexcept
    : path_(std::move(path)), fd_(std::move(fd)), owner_(::getpid()) {}

instance_lock::instance_lock(instance_lock&& other) noexcept
    : path_(std::move(other.path_)), fd_(std::move(other.fd_)), owner_(other.owner_) {}

instance_lock& instance_lock::operator=(instance_lock&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    fd_ = std::move(other.fd_);
    owner_ = other.owner_;
  }
  return *this;
}

instance_lock::~instance_lock() { release(); }

void instance_lock::release() noexcept {
  if (!fd_) return;
  // A forked child's copy shares the parent's lock (one file description):
  // removing the file would let a third process lock a new one beside it.
  if (owner_ == ::getpid()) ::unlink(path_.c_str());
  fd_.reset();
}

result<instance_lock> instance_lock::try_acquire(const std::string& path) {
  // A few rounds at most: each one that loses is a holder that removed the
  // file between our open and our lock, which ends once nobody is releasing.
  for (int attempt = 0; attempt < 8; ++attempt) {
    unique_fd fd(
        ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK, 0600));
    if (!fd) return last_error();
    struct stat held {};
    if (::fstat(fd.get(), &held) != 0) return last_error();
    if (!S_ISREG(held.st_mode)) return error_code(EEXIST, boost::system::system_category());
    if (held.st_uid != ::geteuid()) return make_error_code(errc::foreign_owner);
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK) return make_error_code(errc::address_in_use);
      return last_error();
    }
    // The previous holder may have removed the file between our open and our
    // lock: then we hold a lock on a dead inode and must start over.
    struct stat named {};
    if (::stat(path.c_str(), &named) == 0 && held.st_ino == named.st_ino &&
        held.st_dev == named.st_dev) {
      return instance_lock(path, std::move(fd));
    }
  }
  return make_error_code(errc::address_in_use);
}

result<instance_lock> instance_lock::acquire(const std::string& path,
                                             std::chrono::steady_clock::time_point deadline) {
  // flock() has no timeout; polling keeps this free of signals and threads.
  for (;;) {
    auto lock = try_acquire(path);
    if (lock || lock.error() != errc::address_in_use) return lock;
    if (std::chrono::steady_clock::now() >= deadline) return lock;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

// ---- shared directory checks ----------------------------------------------------

error_code check_shared_socket(const std::string& socket_path) {
  for (const std::string& p : {socket_path, listener_lock_path(socket_path)}) {
    struct stat st {};
    if (::lstat(p.c_str(), &st) != 0) {
      if (errno == ENOENT) continue;
      return last_error();
    }
    if (st.st_uid != ::geteuid()) return make_error_code(errc::foreign_owner);
  }
  return {};
}

error_code check_server_uid(const peer_credentials& server, uid_t expected_uid) {
  return server.uid == expected_uid ? error_code{} : make_error_code(errc::wrong_server);
}

}  // namespace uipc
