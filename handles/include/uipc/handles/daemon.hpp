// The handle daemon: owns the shared handle table and counts every client's references.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "uipc/core/error.hpp"
#include "uipc/handles/types.hpp"

namespace boost::asio {
class io_context;
}

namespace uipc::handles {

/// How a daemon is set up.
struct daemon_options {
  location where;
  /// Slots in the handle table (slot 0 is never used, so capacity - 1 objects fit).
  std::uint32_t capacity = 1024;
  /// Bytes of the scratch area.
  std::size_t scratch_size = 256 * 1024;
  /// References one object may have, across every client (each create by
  /// name or open adds one); one more is refused with errc::too_many_references,
  /// so no count can wrap and free an object its other holders still use.
  std::uint32_t max_references = 0xffff'ffffu - 1;
  /// With on_idle: how long the daemon waits, once its last client left (or after
  /// it started, if none comes), before it calls on_idle.
  std::chrono::milliseconds linger{0};
  /// Called when the daemon has been without clients for `linger` (at least two
  /// seconds after startup). Runs on a loop thread, with no daemon lock held;
  /// usually stops the loop. Empty: the daemon serves until stop().
  std::function<void()> on_idle;
};

/// What the daemon serves right now.
struct daemon_stats {
  std::uint32_t capacity = 0;
  std::uint32_t handles_in_use = 0;
  std::uint32_t clients = 0;
  std::uint64_t scratch_size = 0;
  std::uint64_t scratch_in_use = 0;
  std::uint32_t scratch_blocks = 0;
  std::uint64_t requests = 0;
  std::uint64_t errors = 0;
  std::uint64_t mutexes_abandoned = 0;
  std::int32_t daemon_pid = 0;
};

/// The handle daemon, runnable inside any process's event loop. It takes the
/// location's socket (refusing a live daemon there, errc::address_in_use of the
/// core), creates the segment (replacing one a killed daemon left), and serves
/// clients of the same uid until stop(). When a client disconnects, cleanly or
/// by dying, every reference it held is released, scratch blocks it held are
/// freed, and (if it was the process's last connection) mutexes its process
/// owned are abandoned and their waiters woken.
///
/// Threading: every member may be called from any thread; requests are served
/// on the loop's threads. Lifetime: the io_context must outlive the daemon;
/// stop() (or the destructor) removes the segment and the socket.
class handle_daemon {
 public:
  /// Starts serving on `ctx`. Errors: the core's address_in_use when a daemon
  /// serves the location, errc::invalid_argument for bad options, system errors.
  static result<std::unique_ptr<handle_daemon>> start(boost::asio::io_context& ctx,
                                                      daemon_options options);

  ~handle_daemon();
  handle_daemon(const handle_daemon&) = delete;
  handle_daemon& operator=(const handle_daemon&) = delete;

  /// Stops in order: publishes "stopped" (waiters fail with errc::daemon_lost),
  /// closes every client, removes the segment, then the socket. Idempotent.
  void stop();

  daemon_stats stats() const;
  /// Every live object, by slot (what client::list() pages through).
  std::vector<handle_info> objects() const;
  /// Every connected client (what client::clients() returns).
  std::vector<client_info> clients() const;
  const resolved_location& where() const noexcept;

  struct impl;

 private:
  explicit handle_daemon(std::shared_ptr<impl> p);
  std::shared_ptr<impl> impl_;
};

}  // namespace uipc::handles
