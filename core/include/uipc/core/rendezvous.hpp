// Rendezvous: where a server and its clients meet. Name rules, the paths
// derived from a name, a single-instance lock, and the shared directory (with
// its ownership checks) for servers that admit other users.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <string>
#include <string_view>

#include "uipc/core/error.hpp"
#include "uipc/core/runtime_dir.hpp"
#include "uipc/core/unique_fd.hpp"

namespace uipc {

struct peer_credentials;

// ---- names ----------------------------------------------------------------------

/// What a name of some kind may be: ASCII letters and digits, plus the bytes
/// in `extra_chars`, between `min_length` and `max_length` bytes long.
struct name_rules {
  std::size_t min_length = 1;
  std::size_t max_length = 64;
  /// Allowed besides letters and digits. Must not hold '/' or NUL where the
  /// name becomes part of a path.
  std::string_view extra_chars = "_-";
};

/// {} when `name` keeps `rules`, else errc::invalid_name. A name made only of
/// dots ("." or "..") is refused whatever the rules: it would name a directory.
error_code check_name(std::string_view name, const name_rules& rules);

// ---- paths ----------------------------------------------------------------------

/// The files of one server instance in its rendezvous directory.
struct rendezvous_paths {
  std::string directory;
  std::string socket_path;  ///< <directory>/<prefix><name>.sock
  std::string
      start_lock_path;  ///< <directory>/<prefix><name>.start: held by whoever starts the server
};

/// Derives the paths of instance `name` (checked against `rules`: errc::invalid_name)
/// in `directory` (taken as given: check it first with runtime_directory(),
/// checked_private_directory() or checked_shared_directory()). A socket path
/// too long for a Unix socket address is ENAMETOOLONG (system category).
result<rendezvous_paths> derive_rendezvous_paths(const std::string& directory,
                                                 std::string_view prefix, std::string_view name,
                                                 const name_rules& rules = {});

/// The lock file a listener holds beside its socket: "<socket_path>.lock".
std::string listener_lock_path(std::string_view socket_path);

// ---- single-instance lock -------------------------------------------------------

/// An exclusive flock() on a lock file: one holder per path at a time, across
/// processes and across threads (each acquisition opens its own file
/// description). The kernel drops the lock with the holder's last descriptor,
/// so a holder killed with SIGKILL leaves nothing to clean up by hand.
///
/// release() (and the destructor) removes the file while still holding it;
/// acquirers re-check after locking that the file they locked is still the one
/// at the path, so removal never lets two holders in. A copy inherited by a
/// forked child neither removes the file nor releases the parent's lock.
///
/// A lock file owned by another uid is refused (errc::foreign_owner): in a
/// shared directory someone else could otherwise hold our lock forever.
/// Move-only; not thread-safe as one object.
class instance_lock {
 public:
  instance_lock() = default;
  instance_lock(instance_lock&& other) noexcept;
  instance_lock& operator=(instance_lock&& other) noexcept;
  instance_lock(const instance_lock&) = delete;
  instance_lock& operator=(const instance_lock&) = delete;
  ~instance_lock();

  /// Takes the lock now, or fails with errc::address_in_use while another holds it.
  static result<instance_lock> try_acquire(const std::string& path);
  /// Takes the lock, waiting (polling every few milliseconds) until `deadline`;
  /// errc::address_in_use when still held then.
  static result<instance_lock> acquire(const std::string& path,
                                       std::chrono::steady_clock::time_point deadline);

  /// Removes the lock file and releases the lock; nothing when not held.
  void release() noexcept;

  bool held() const noexcept { return static_cast<bool>(fd_); }
  explicit operator bool() const noexcept { return held(); }
  const std::string& path() const noexcept { return path_; }

 private:
  instance_lock(std::string path, unique_fd fd) noexcept;

  std::string path_;
  unique_fd fd_;
  pid_t owner_ = 0;  // the process that locked: only it removes the file
};

// ---- shared rendezvous directory ------------------------------------------------

/// For a server about to bind `socket_path` in a shared directory: refuses a
/// socket file, or its listener lock file, owned by another uid
/// (errc::foreign_owner); a path with nothing there is fine. The listener
/// itself then replaces a stale socket of ours and refuses a live one.
error_code check_shared_socket(const std::string& socket_path);

/// For a client: {} when the server it reached runs as `expected_uid` (as the
/// kernel reported at connect time), else errc::wrong_server. Where anyone can
/// create a socket, this is what tells the real server from an impostor.
error_code check_server_uid(const peer_credentials& server, uid_t expected_uid);

}  // namespace uipc
