// runtime_directory: find or make a private per-user directory, and refuse foreign ones.
#include "uipc/core/runtime_dir.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

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

}  // namespace uipc
