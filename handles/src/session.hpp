// A client's live connection to one daemon instance: the socket and the
// mapped segment.
#pragma once

#include <atomic>
#include <boost/container/static_vector.hpp>
#include <optional>
#include <string>

#include "protocol.hpp"
#include "segment.hpp"
#include "uipc/core/blocking_connection.hpp"
#include "uipc/core/daemon_start.hpp"
#include "uipc/core/shm.hpp"
#include "uipc/core/typed.hpp"
#include "uipc/handles/client.hpp"

namespace uipc::handles::detail {

/// The mapped segment of the daemon instance a session talks to.
struct mapping {
  std::optional<shm_segment> segment;
  segment_view view;
  std::int32_t daemon_pid = 0;
  std::atomic<bool> lost{false};
  /// Set in a child after fork(): the connection is the parent's (lost is set too).
  std::atomic<bool> forked{false};
  /// Readable once the daemon's process is gone (empty where pidfd_open is
  /// missing: then kill(pid, 0) is asked instead).
  unique_fd daemon_pidfd;
  /// CLOCK_MONOTONIC_COARSE ns before which a throttled ask does not ask again.
  std::atomic<std::int64_t> next_check_ns{0};

  /// Whether the daemon's process has died (a kill -9 publishes no state):
  /// one load of the segment's death word, so object operations stay free of
  /// system calls. A daemon that could not arm it (the word is 0: no
  /// set_robust_list under an emulator or a seccomp filter) is asked about
  /// through the kernel instead, at most every 10 ms. Marks the mapping lost
  /// when it has.
  bool daemon_gone() noexcept {
    const std::uint32_t word = view.header->death_word.load(std::memory_order_acquire);
    if (word != 0 && (word & death_mark) == 0) [[likely]]
      return false;
    if (word == 0 && !kernel_says_gone(true)) return false;
    lost.store(true);
    return true;
  }
  /// Asks the kernel whether the daemon's process is gone (its pidfd, or
  /// kill(pid, 0)); `throttled`: not again within 10 ms of the last ask. For
  /// sleepers, once a slice, beside the death word: a word another client
  /// wrote over would hide the death from the word alone.
  bool kernel_says_gone(bool throttled) noexcept;
  /// Whether operations may go on: not lost, and the daemon serves and lives.
  bool usable() noexcept { return !lost.load() && view.running() && !daemon_gone(); }

  /// Why an operation cannot go on: errc::forked_copy or errc::daemon_lost.
  error_code lost_reason() const noexcept {
    return make_error_code(forked.load() ? errc::forked_copy : errc::daemon_lost);
  }
};

/// A wait set on the stack (a wait allocates nothing): each object's slot and
/// its position in the caller's list.
struct wait_entry {
  wait_target target;
  std::size_t position;
};
struct wait_set : boost::container::static_vector<wait_entry, max_wait_objects> {};

/// Threading: call() and post() may be called from any thread; they run one at
/// a time, each on the calling thread's own sendmsg and recvmsg (a
/// blocking_connection). There is no background thread: nothing is sent
/// unasked either way, and a wait notices a daemon that died unannounced by
/// itself (see detail::wait). So a round trip costs the daemon's work and two
/// system calls here, and no hand-off between threads.
struct session {
  session();
  ~session();
  session(const session&) = delete;
  session& operator=(const session&) = delete;

  /// Sends one request and blocks for its reply. Errors of the daemon come back
  /// as they are; a broken connection is errc::daemon_lost.
  /// Gives up at `deadline` (default: now + options.call_timeout) with
  /// errc::daemon_timeout; the connection stays open (a late reply is dropped).
  result<frame> call(request_type type, std::string payload,
                     std::optional<std::chrono::steady_clock::time_point> deadline = {});
  /// call() with typed messages; a reply that does not parse is uipc::errc::bad_reply.
  template <class Reply, class Request>
  result<Reply> call(request_type type, const Request& request,
                     std::optional<std::chrono::steady_clock::time_point> deadline = {}) {
    auto reply = call(type, request.SerializeAsString(), deadline);
    if (!reply) return reply.error();
    return parse_reply<Reply>(*reply);
  }
  /// Sends one request as a notice, which the daemon serves without a reply
  /// (a close from a destructor): no round trip.
  void post(request_type type, std::string payload);

  bool usable() const noexcept { return map->usable(); }

  client_options options;
  std::optional<blocking_connection> conn;
  std::shared_ptr<mapping> map;
};

/// Connects to the daemon at `where` (no autostart): hello, map, check.
/// The hello's answer is awaited until `deadline` at most.
result<std::shared_ptr<session>> open_session(const client_options& options,
                                              const resolved_location& where,
                                              std::chrono::steady_clock::time_point deadline);

/// Whether an error of open_session() means that no daemon serves (yet).
bool retryable(const error_code& ec);

/// Reaches the daemon at `where` through `reach` (which keeps the session it
/// opened), starting a daemon when none serves: exactly one of racing clients
/// starts it (uipc::reach_or_start). Errors: those of `reach`;
/// uipc::errc::program_not_found, uipc::errc::program_not_executable;
/// errc::daemon_failed_to_start (it exited before serving);
/// errc::daemon_start_timeout. `report` says what was tried.
error_code start_daemon(const client_options& options, const resolved_location& where,
                        const reach_function& reach, std::chrono::steady_clock::time_point deadline,
                        start_report* report = nullptr);

}  // namespace uipc::handles::detail
