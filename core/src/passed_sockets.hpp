// Socket activation: listening sockets a service manager (systemd, or
// systemd-socket-activate) opened and passed to this process.
#pragma once

#include <string>

#include "uipc/core/error.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/unique_fd.hpp"

namespace uipc::detail {

/// The passed listening Unix stream socket bound to `path` (the same string,
/// or the same file), taken out of the passed set so that nobody takes it
/// twice; an empty unique_fd when none was passed for `path`.
///
/// The passed set is read once per process, by the first call: the sockets
/// are descriptors 3 .. 3 + $LISTEN_FDS - 1 when $LISTEN_PID is this process
/// (the sd_listen_fds(3) protocol). They are made close-on-exec and
/// LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from the environment,
/// so a program this process starts does not take them for its own. When
/// they are there, that first call changes the environment, which must not
/// race with another thread reading it: a daemon binds while it starts.
unique_fd take_inherited_listener(const std::string& path);

/// Gives a socket taken with take_inherited_listener() back when its listener
/// closes: the manager's socket stays open in this process for a later
/// listener of the same path (a daemon that stops and starts a server).
void return_inherited_listener(unique_fd fd);

}  // namespace uipc::detail
