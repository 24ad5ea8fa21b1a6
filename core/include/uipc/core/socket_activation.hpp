// Socket activation for daemons: the listening sockets a service manager
// (systemd, systemd-socket-activate) passed this process. listener::bind takes
// the one for its path by itself (listener_options::inherited); what is left
// untaken is uipc::untaken_passed_sockets() (framed.hpp).
#pragma once

namespace uipc {

/// Reads the sockets the service manager passed this process, once per
/// process (later calls do nothing; a child forked after it reads its own
/// environment, not its parent's sockets): they are made close-on-exec and LISTEN_PID, LISTEN_FDS
/// and LISTEN_FDNAMES leave the environment. listener::bind does it by itself;
/// a daemon that starts threads or processes before its first listener (uipcd
/// loads plug-ins, some in processes of their own) calls it first thing, so
/// that no child inherits the sockets and no thread reads the environment
/// while it changes.
void adopt_passed_sockets();

}  // namespace uipc
