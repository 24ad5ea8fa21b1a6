// The handle daemon's state: its own record of the table, per-client references,
// and the server it serves through. Shared by daemon.cpp (lifecycle, sessions,
// repairs) and daemon_requests.cpp (one handler per request type).
//
// All of it is guarded by one std::mutex rather than a strand: stop() must
// finish synchronously from any thread (also from a destructor after the loop
// has stopped), and every handler is short and never blocks under it. The
// server kit holds no lock of its own while it calls our handlers and hooks,
// and on_idle, the only user callback, is called with no lock at all.
#pragma once

#include <boost/asio/steady_timer.hpp>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "protocol.hpp"
#include "segment.hpp"
#include "uipc/core/ledger.hpp"
#include "uipc/core/process.hpp"
#include "uipc/core/range_allocator.hpp"
#include "uipc/core/server.hpp"
#include "uipc/core/shm.hpp"
#include "uipc/handles/daemon.hpp"
#include "uipc/handles/error.hpp"

namespace uipc::handles {

namespace detail {

/// The daemon's own record of a slot; shared memory only mirrors it.
struct slot_record {
  object_type type = object_type::none;
  std::uint32_t generation = 1;
  std::uint32_t refs = 0;
  std::string name;
};

}  // namespace detail

struct handle_daemon::impl : std::enable_shared_from_this<impl> {
  impl(boost::asio::io_context& c, daemon_options o);

  boost::asio::io_context& ctx;
  daemon_options options;
  resolved_location where;
  request_router router;

  mutable std::mutex mutex;
  bool stopped = false;
  // A copy a fork gave a child (fork without exec) serves nothing: the segment
  // and the sessions are the parent's, and stopping the copy must not tell
  // the parent's clients the daemon stopped.
  fork_guard fork;
  std::optional<shm_segment> segment;
  detail::segment_view view;
  /// Holds the segment's death word while the daemon serves; let go (and
  /// destroyed, being declared after it) before the segment is unmapped.
  std::unique_ptr<death_flag> death;
  std::unique_ptr<server> serving;  // set once open() succeeded; stopped and kept by stop()

  // Repairs of dead processes that met a slot locked by a live process (or by
  // the process itself before it was seen gone): retried on this timer rather
  // than waited for under the mutex. The pidfd (a copy of the last session's;
  // empty without one) tells when the process has exited, whatever its pid
  // names by then.
  struct pending_repair {
    std::int32_t pid;
    unique_fd pidfd;
  };
  boost::asio::steady_timer repair_timer;
  std::vector<pending_repair> pending_repairs;
  bool repair_timer_armed = false;

  std::vector<detail::slot_record> records;
  std::vector<object_type> record_types;  // records[i].type, contiguous for repairs
  std::deque<std::uint32_t> free_slots;
  std::unordered_map<std::string, std::uint32_t> names;
  range_allocator scratch;  // the segment's scratch area: private books (16-byte blocks)

  // Sessions open per process: a process's mutexes are abandoned when its last goes.
  std::unordered_map<std::int32_t, std::uint32_t> sessions_per_pid;
  // Sessions that said hello: one each, since every hello pins a descriptor of
  // the segment in its reply until the client reads it.
  std::unordered_set<std::uint64_t> greeted;
  ledger<std::uint64_t, std::uint32_t> handle_refs;
  ledger<std::uint64_t, std::uint64_t> scratch_refs;
  std::uint64_t abandoned_total = 0;
  std::uint64_t unheld_closes = 0;  // closes without a reference: warned about sparingly

  // daemon.cpp
  error_code open();
  void session_started(const server_session& s);
  void session_ended(const server_session& s);
  /// `pidfd`: the process's (-1: none), asked whether it has exited.
  void repair_locked(std::int32_t pid, int pidfd);
  void arm_repair_timer();
  void stop();
  daemon_stats stats_locked() const;
  handle_info object_locked(std::uint32_t index) const;  // a live slot's record
  std::vector<client_info> clients_locked() const;

  // daemon_requests.cpp
  void register_requests();
  void drop_refs(std::uint32_t index, std::uint32_t count);
  void free_scratch_block(std::uint64_t offset);
};

}  // namespace uipc::handles
