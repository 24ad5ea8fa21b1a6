// The directories where uipc servers keep their sockets: the private per-user
// runtime directory, and the shared one for servers that admit other users.
#pragma once

#include <string>

#include "uipc/core/error.hpp"

namespace uipc {

/// $XDG_RUNTIME_DIR when it is set; else /tmp/uipc-<uid>, created with mode 0700
/// if missing. A directory not owned by the caller, or open to group or others,
/// is refused with errc::unsafe_directory (someone else made it), also when it
/// is $XDG_RUNTIME_DIR: falling back elsewhere would split clients from daemons.
result<std::string> runtime_directory();

/// The same checks for an explicit directory (created 0700 if missing).
result<std::string> checked_private_directory(const std::string& path);

/// Where servers that admit other users put their sockets: $UIPC_SHARED_DIR if
/// set, else /tmp/uipc-shared, created with mode 1777 (sticky, like /tmp) if
/// missing, then checked as checked_shared_directory() does. A set but unsafe
/// $UIPC_SHARED_DIR is an error, not a reason to look elsewhere.
result<std::string> shared_rendezvous_directory();

/// Checks (and creates with mode 1777 if missing) a shared directory. Refused:
/// not a directory, or a symlink (errc::unsafe_directory); owned by a uid other
/// than root or the caller (errc::foreign_owner); writable by group or others
/// without the sticky bit, where anyone could remove or replace our socket
/// (errc::unsafe_directory).
result<std::string> checked_shared_directory(const std::string& path);

}  // namespace uipc
