// The files of caps points. In the shared rendezvous directory, each user has
// a directory "caps-<uid>" (0755, theirs alone to write). In it, per point name:
//   <name>.lock               flock: exclusive by an exclusive server, shared by
//                             each server of a name that is not
//   <name>@<pid>.<n>.sock     one server instance's socket (listener lock beside it)
//   <name>@<pid>.<n>.info     what the instance tells readers: gid, access, ...
// Only the uid can create files in its directory, so a squatter of another uid
// can at most make "caps-<uid>" first, which clients then refuse.
#pragma once

#include <sys/types.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "uipc/caps/point.hpp"
#include "uipc/core/unique_fd.hpp"

namespace uipc::caps::detail {

/// `directory`, checked as a shared directory, or the shared rendezvous directory when empty.
result<std::string> base_directory(const std::string& directory);
/// The caller's own points directory in `base`, created if missing.
result<std::string> own_points_directory(const std::string& base);
/// `uid`'s points directory in `base`, checked: owned by uid and writable by
/// nobody else (core foreign_owner / unsafe_directory), errc::not_registered if absent.
result<std::string> user_points_directory(const std::string& base, uid_t uid);

/// Takes the name lock of `name` (flock, exclusive or shared, never waiting):
/// errc::name_taken while a server holding it excludes us.
result<unique_fd> lock_name(const std::string& dir, std::string_view name, bool exclusive);
/// Removes the files of instances of `name` whose server is gone.
void reclaim_dead_instances(const std::string& dir, std::string_view name);
/// The socket paths of instances of `name` in `dir` (live or not).
std::vector<std::string> instance_sockets(const std::string& dir, std::string_view name);
/// Every instance socket in `dir`, of any name.
std::vector<std::string> all_instance_sockets(const std::string& dir);

std::string info_path(const std::string& socket_path);
/// Publishes `info` beside its socket (written aside, then renamed in place).
error_code write_info(const point_info& info);
/// Reads an instance's info file; nothing if absent or malformed.
std::optional<point_info> read_info(const std::string& socket_path, uid_t uid);
/// Whether the server of an instance still runs. For our own instances the
/// listener lock tells, and a dead one's files are removed; for another
/// user's, whether its pid runs.
bool instance_alive(const std::string& socket_path, const point_info& info);

}  // namespace uipc::caps::detail
