// runtime_directory: find or make a private per-user directory, and refuse foreign ones;
// the shared directory for servers that admit other users, with its own checks.
#include "uipc/core/runtime_dir.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "uipc/core/unique_fd.hpp"

namespace uipc {

result<std::string> checked_private_directory(const std::string& path) {
  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) {
    return error_code(errno, boost::system::system_category());
  }
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return error_code(errno, boost::system::system_category());
  if (!S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 0077) != 0) {
    return make_error_code(errc::unsafe_directory);
  }
  return path;
}

result<std::string> runtime_directory() {
  // Set but unsafe is an error, not a reason to look elsewhere: a client and a
  // daemon with different environments would otherwise never meet.
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && *xdg != '\0') {
    struct stat st {};
    if (*xdg != '/' || ::stat(xdg, &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid() ||
        (st.st_mode & 0077) != 0) {
      return make_error_code(errc::unsafe_directory);
    }
    return std::string(xdg);
  }
  return checked_private_directory("/tmp/uipc-" + std::to_string(::geteuid()));
}

result<std::string> checked_shared_directory(const std::string& path) {
  if (path.empty() || path.front() != '/') return make_error_code(errc::unsafe_directory);
  // Ours alone until it is checked: created 0700, opened it without following
  // a symlink, and only then opened to everyone (fchmod, so a directory swapped
  // in meanwhile is not what we change).
  const bool created = ::mkdir(path.c_str(), 0700) == 0;
  if (!created && errno != EEXIST) return error_code(errno, boost::system::system_category());
  unique_fd dir(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!dir) {
    // ELOOP (a symlink) and ENOTDIR (a file) are someone's plant, not a fault.
    if (errno == ELOOP || errno == ENOTDIR) return make_error_code(errc::unsafe_directory);
    return error_code(errno, boost::system::system_category());
  }
  struct stat st {};
  if (::fstat(dir.get(), &st) != 0) return error_code(errno, boost::system::system_category());
  if (st.st_uid != 0 && st.st_uid != ::geteuid()) return make_error_code(errc::foreign_owner);
  if (created && st.st_uid == ::geteuid()) {
    if (::fchmod(dir.get(), 01777) != 0 || ::fstat(dir.get(), &st) != 0) {
      return error_code(errno, boost::system::system_category());
    }
  }
  if ((st.st_mode & 0022) != 0 && (st.st_mode & S_ISVTX) == 0) {
    return make_error_code(errc::unsafe_directory);
  }
  return path;
}

result<std::string> shared_rendezvous_directory() {
  if (const char* dir = std::getenv("UIPC_SHARED_DIR"); dir != nullptr && *dir != '\0') {
    return checked_shared_directory(dir);
  }
  return checked_shared_directory("/tmp/uipc-shared");
}

}  // namespace uipc
