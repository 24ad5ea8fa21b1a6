// Errors of capability rendezvous: the "uipc.caps" category.
#pragma once

#include <type_traits>

#include "uipc/core/error.hpp"

namespace uipc::caps {

/// Caps error codes. Values are stable: they travel on the wire.
/// Conditions: not_registered: not_found; disconnected: disconnected;
/// no_buffers: no_buffers; protocol_violation: protocol_violation; timed_out:
/// timed_out; withdrawn, stopped: shutting_down. The others: none.
enum class errc {
  name_taken = 1,      ///< a live server holds the name in a way that excludes this registration
  not_registered,      ///< no live server serves this point
  buffer_too_small,    ///< the message is larger than the buffer given; it stays queued
  message_too_large,   ///< larger than the channel's payload arena
  no_buffers,          ///< the most messages in flight, or a full ring or arena
  unknown_message,     ///< reply to a message id not awaiting one
  withdrawn,           ///< the message was aborted by its client, or its client went
  protocol_violation,  ///< the peer broke the channel protocol; the connection is closed
  disconnected,        ///< the peer went away
  forked_copy,  ///< an object inherited through fork(): only the process that made it uses it
  wrong_gid,    ///< the point's group is not the one asked for
  timed_out,    ///< the call got no reply before its deadline (it was aborted)
  stopped,      ///< the service or client was stopped
};

/// The category of errc, named "uipc.caps".
const boost::system::error_category& caps_category() noexcept;

inline error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), caps_category()};
}

}  // namespace uipc::caps

template <>
struct boost::system::is_error_code_enum<uipc::caps::errc> : std::true_type {};
