// The per-user directory where uipc daemons keep their sockets.
#pragma once

#include "uipc/core/error.hpp"

#include <string>

namespace uipc {

/// $XDG_RUNTIME_DIR when it is set; else /tmp/uipc-<uid>, created with mode 0700
/// if missing. A directory not owned by the caller, or open to group or others,
/// is refused with errc::unsafe_directory (someone else made it), also when it
/// is $XDG_RUNTIME_DIR: falling back elsewhere would split clients from daemons.
result<std::string> runtime_directory();

/// The same checks for an explicit directory (created 0700 if missing).
result<std::string> checked_private_directory(const std::string& path);

}  // namespace uipc
