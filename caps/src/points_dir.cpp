#include "points_dir.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "uipc/core/runtime_dir.hpp"

namespace uipc::caps::detail {
namespace {

error_code last_error() { return {errno, boost::system::system_category()}; }

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// The instance sockets in `dir` whose name part passes `keep`. Another user's
// directory holds what that user put there: only sockets count.
template <class Keep>
std::vector<std::string> list_sockets(const std::string& dir, Keep keep) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string_view file = e->d_name;
    const auto at = file.find('@');
    if (at == std::string_view::npos || !ends_with(file, ".sock")) continue;
    if (!keep(file.substr(0, at))) continue;
    if (e->d_type != DT_SOCK) {
      struct stat st {};
      if (e->d_type != DT_UNKNOWN ||
          ::fstatat(::dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISSOCK(st.st_mode))
        continue;
    }
    out.push_back(dir + "/" + std::string(file));
  }
  ::closedir(d);
  return out;
}

std::string_view access_name(access a) {
  switch (a) {
    case access::group:
      return "group";
    case access::world:
      return "world";
    case access::user:
      break;
  }
  return "user";
}

}  // namespace

result<std::string> base_directory(const std::string& directory) {
  if (directory.empty()) return shared_rendezvous_directory();
  return checked_shared_directory(directory);
}

result<std::string> own_points_directory(const std::string& base) {
  const std::string dir = base + "/caps-" + std::to_string(::geteuid());
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) return last_error();
  return user_points_directory(base, ::geteuid());
}

result<std::string> user_points_directory(const std::string& base, uid_t uid) {
  const std::string dir = base + "/caps-" + std::to_string(uid);
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return make_error_code(errc::not_registered);
    return last_error();
  }
  if (!S_ISDIR(st.st_mode)) return make_error_code(uipc::errc::unsafe_directory);
  if (st.st_uid != uid) return make_error_code(uipc::errc::foreign_owner);
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) return make_error_code(uipc::errc::unsafe_directory);
  return dir;
}

result<unique_fd> lock_name(const std::string& dir, std::string_view name, bool exclusive) {
  const std::string path = dir + "/" + std::string(name) + ".lock";
  unique_fd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd) return last_error();
  if (::flock(fd.get(), (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) return make_error_code(errc::name_taken);
    return last_error();
  }
  return fd;
}

std::vector<std::string> instance_sockets(const std::string& dir, std::string_view name) {
  return list_sockets(dir, [name](std::string_view n) { return n == name; });
}

std::vector<std::string> all_instance_sockets(const std::string& dir) {
  return list_sockets(dir, [](std::string_view) { return true; });
}

void reclaim_dead_instances(const std::string& dir, std::string_view name) {
  for (const auto& socket : instance_sockets(dir, name)) {
    auto lock = instance_lock::try_acquire(listener_lock_path(socket));
    if (!lock) continue;  // a live listener holds it (or we cannot tell): leave it
    ::unlink(socket.c_str());
    ::unlink(info_path(socket).c_str());
  }  // releasing the lock removes its file
}

std::string info_path(const std::string& socket_path) {
  return socket_path.substr(0, socket_path.size() - 5) + ".info";
}

error_code write_info(const point_info& info) {
  const std::string path = info_path(info.socket_path);
  const std::string aside = path + ".new";
  char text[256];
  const int n = std::snprintf(text, sizeof text,
                              "uipc-caps 1 gid=%u access=%s exclusive=%d pid=%d generation=%" PRIu64
                              " clients=%" PRIu64 "\n",
                              static_cast<unsigned>(info.gid),
                              std::string(access_name(info.who)).c_str(), info.exclusive ? 1 : 0,
                              static_cast<int>(info.pid), info.generation, info.clients);
  unique_fd fd(::open(aside.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
  if (!fd) return last_error();
  error_code failed;
  if (::write(fd.get(), text, static_cast<std::size_t>(n)) != n) failed = last_error();
  fd.reset();
  if (!failed && ::rename(aside.c_str(), path.c_str()) != 0) failed = last_error();
  if (failed) ::unlink(aside.c_str());  // nobody else would remove it
  return failed;
}

std::optional<point_info> read_info(const std::string& socket_path, uid_t uid) {
  // Whatever its owner put there: without O_NONBLOCK a FIFO would hold every
  // lister's open for ever. A small regular file of that user, or nothing.
  unique_fd fd(
      ::open(info_path(socket_path).c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
  if (!fd) return std::nullopt;
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != uid || st.st_size >= 256)
    return std::nullopt;
  char text[256] = {};
  const ssize_t n = ::read(fd.get(), text, sizeof text - 1);
  if (n <= 0) return std::nullopt;
  unsigned gid = 0;
  char who[16] = {};
  int exclusive = 0, pid = 0;
  std::uint64_t generation = 0, clients = 0;
  if (std::sscanf(text,
                  "uipc-caps 1 gid=%u access=%15s exclusive=%d pid=%d generation=%" SCNu64
                  " clients=%" SCNu64,
                  &gid, who, &exclusive, &pid, &generation, &clients) != 6 ||
      pid <= 0) {
    return std::nullopt;
  }
  point_info info;
  const std::string file = socket_path.substr(socket_path.rfind('/') + 1);
  info.name = file.substr(0, file.find('@'));
  info.uid = uid;
  info.gid = gid;
  const std::string_view w = who;
  info.who = w == "world" ? access::world : w == "group" ? access::group : access::user;
  info.exclusive = exclusive != 0;
  info.pid = pid;
  info.generation = generation;
  info.clients = clients;
  info.socket_path = socket_path;
  return info;
}

bool instance_alive(const std::string& socket_path, const point_info& info) {
  // Read-only, so that a probe raises no IN_CLOSE_WRITE of its own for watchers.
  const std::string lock_path = listener_lock_path(socket_path);
  unique_fd fd(::open(lock_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK));
  bool gone = false;
  if (fd) {
    if (::flock(fd.get(), LOCK_SH | LOCK_NB) != 0) return true;  // the listener holds it
    gone = true;
  } else if (errno == ENOENT) {
    gone = true;  // the listener removes its lock last: the socket file is a leftover
  }
  if (!gone) return ::kill(info.pid, 0) == 0 || errno == EPERM;  // another user's: ask its pid
  if (info.uid == ::geteuid()) {
    ::unlink(socket_path.c_str());
    ::unlink(info_path(socket_path).c_str());
    if (fd) ::unlink(lock_path.c_str());
  }
  return false;
}

}  // namespace uipc::caps::detail
