// Errors of the handle daemon and its clients: the "uipc.handles" category.
#pragma once

#include <type_traits>

#include "uipc/core/error.hpp"

namespace uipc::handles {

/// Handle-daemon error codes. Values are stable: they travel on the wire.
/// Their conditions: daemon_lost, daemon_unavailable: disconnected; daemon_timeout,
/// daemon_start_timeout: timed_out; table_full, scratch_exhausted: no_buffers;
/// unknown_request: unimplemented; bad_request: protocol_violation; permission_denied:
/// permission_denied; name_not_found: not_found. The others: none.
enum class errc {
  invalid_handle = 1,      ///< index out of the table's range, or the null handle
  stale_handle,            ///< the slot was closed (and maybe reused) since the handle was issued
  wrong_type,              ///< the handle names an object of another type
  not_held,                ///< close without a reference held by this client
  name_too_long,           ///< names are at most 63 bytes
  name_in_use,             ///< the name belongs to an object of another type
  name_not_found,          ///< no object has this name
  table_full,              ///< every slot of the handle table is in use
  scratch_exhausted,       ///< no free scratch block is large enough
  bad_scratch_offset,      ///< not the start of a scratch block this client allocated
  bad_request,             ///< a request that does not decode or has invalid fields
  unknown_request,         ///< a frame type the daemon does not know
  not_owner,               ///< mutex release by a thread that does not own it
  semaphore_limit,         ///< release would raise the count above the maximum
  invalid_argument,        ///< bad arguments to a local call (empty or duplicate wait set, ...)
  daemon_unavailable,      ///< no daemon serves and none could be started
  daemon_failed_to_start,  ///< the started daemon died at startup
  daemon_start_timeout,    ///< the started daemon did not report "running" in time
  daemon_lost,             ///< the daemon went away; this client's handles are gone
  permission_denied,       ///< the peer runs as another user
  daemon_timeout,          ///< the daemon did not answer a request in time (stopped or stuck)
  reply_too_large,         ///< the daemon's reply would exceed its frame limit
  forked_copy,  ///< a client inherited through fork(): only the process that connected uses it
  /// the daemon serving here lays out its segment otherwise (another build of
  /// uipc): stop it, or let it go idle, and connect again
  incompatible_daemon,
  too_many_references,  ///< the object holds daemon_options::max_references already
  already_greeted,      ///< a second hello on one connection (each would pin a descriptor)
  /// another process held the object's transaction lock (a few instructions
  /// long) for a second: stopped there, or a client wrote the shared word
  object_locked,
};

/// The category of errc, named "uipc.handles".
const boost::system::error_category& handles_category() noexcept;

inline error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), handles_category()};
}

}  // namespace uipc::handles

template <>
struct boost::system::is_error_code_enum<uipc::handles::errc> : std::true_type {};
