// A client's live connection to one daemon instance: the socket and the
// mapped segment.
#pragma once

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <mutex>
#include <optional>
#include <string>

#include "protocol.hpp"
#include "segment.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/shm.hpp"
#include "uipc/handles/client.hpp"

namespace uipc::handles::detail {

/// The mapped segment of the daemon instance a session talks to.
struct mapping {
  std::optional<shm_segment> segment;
  segment_view view;
  std::int32_t daemon_pid = 0;
  std::atomic<bool> lost{false};
};

/// Threading: call() may be called from any thread; calls are serialized, and
/// the calling thread runs the connection's io_context until its reply is in.
/// There is no background thread: nothing is sent unasked either way, and a
/// wait notices a daemon that died unannounced by itself (see detail::wait).
/// So a round trip has no handoff between threads and no extra wake-up.
struct session {
  ~session();

  /// Sends one request and blocks for its reply. Errors of the daemon come back
  /// as they are; a broken connection is errc::daemon_lost.
  result<frame> call(request_type type, std::string payload);
  /// Sends one request without waiting for its reply (a close from a destructor).
  void post(request_type type, std::string payload);

  bool usable() const noexcept { return !map->lost.load() && map->view.running(); }

  client_options options;
  boost::asio::io_context ctx{1};  // declared before conn: outlives it
  std::mutex call_mutex;
  connection::pointer conn;
  std::shared_ptr<mapping> map;
};

/// Connects to the daemon at `where` (no autostart): hello, map, check.
result<std::shared_ptr<session>> open_session(const client_options& options,
                                              const resolved_location& where);

/// Starts a daemon for `where` and waits until it reports running; the caller
/// holds the start lock. Errors: daemon_failed_to_start, daemon_start_timeout.
error_code start_daemon(const client_options& options, const resolved_location& where,
                        std::chrono::steady_clock::time_point deadline);

}  // namespace uipc::handles::detail
