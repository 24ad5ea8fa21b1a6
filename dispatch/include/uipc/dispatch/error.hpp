// Errors of the UDP dispatcher: the "uipc.dispatch" category.
#pragma once

#include <type_traits>

#include "uipc/core/error.hpp"

namespace uipc::dispatch {

/// Dispatcher error codes. Their conditions: shutting_down: shutting_down; timed_out:
/// timed_out; no_buffers, no_free_id, no_free_port: no_buffers (overloaded). The others: none.
enum class errc {
  shutting_down = 1,  ///< the dispatcher stopped after a socket error, or is closing: no new work
  no_free_id,         ///< every message ID towards this peer is held by a live response
  timed_out,          ///< a response's reply did not come in time
  no_buffers,         ///< the receive pool ran dry while only listeners held the buffers
  message_too_large,  ///< a message larger than a pool buffer (or a datagram)
  bad_options,        ///< dispatcher_options out of range
  detached,           ///< the response or listener handle is empty or was detached
  no_free_port,       ///< every exclusive socket is taken, or every port of the range is busy
};

/// The category of errc, named "uipc.dispatch".
const boost::system::error_category& dispatch_category() noexcept;

inline error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), dispatch_category()};
}

}  // namespace uipc::dispatch

template <>
struct boost::system::is_error_code_enum<uipc::dispatch::errc> : std::true_type {};
