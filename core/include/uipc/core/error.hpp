// Errors of the core layer, and the error vocabulary every module shares.
#pragma once

#include <boost/system/error_code.hpp>
#include <boost/system/result.hpp>
#include <type_traits>

namespace uipc {

/// Kept from end to end: a round trip through std::error_code breaks Asio's comparisons.
using error_code = boost::system::error_code;

/// The return type of every fallible synchronous call and factory.
template <class T>
using result = boost::system::result<T, error_code>;

/// Portable conditions: what a failure means to the caller, whichever module
/// (or the system) reported it. `ec == uipc::condition::timed_out` holds for a
/// timeout of core, handles or dispatch, for ETIMEDOUT, and for such a code
/// decoded from a peer's reply. A module declares which of its codes mean what
/// (uipc/core/error_category.hpp); system and Asio codes are mapped in core.
/// Most codes have one condition; many (a caller's bad argument) have none.
enum class condition {
  disconnected = 1,    ///< the peer went away or could not be reached (EPIPE, ECONNRESET, eof, ...)
  timed_out,           ///< no answer in time (ETIMEDOUT)
  shutting_down,       ///< the object or server is closing and takes no new work
  no_buffers,          ///< overloaded: out of buffers, slots, memory or descriptors; retry later
  unimplemented,       ///< the peer does not know the request (ENOSYS, EOPNOTSUPP)
  protocol_violation,  ///< a frame, request or reply that breaks the protocol (EPROTO, EBADMSG)
  permission_denied,   ///< refused for who the caller is (EACCES, EPERM)
  not_found,           ///< no such name, object, program or file (ENOENT)
};

/// The category of condition, named "uipc".
const boost::system::error_category& condition_category() noexcept;

inline boost::system::error_condition make_error_condition(condition c) noexcept {
  return {static_cast<int>(c), condition_category()};
}

/// Core error codes. Values are stable: they travel on the wire. New ones go at the end.
/// Their conditions: peer_closed, short_frame: disconnected; timed_out, start_timeout:
/// timed_out; shutting_down: shutting_down; pool_exhausted: no_buffers; unknown_request:
/// unimplemented; frame_too_large, bad_frame, too_many_fds, bad_segment, bad_request,
/// bad_reply: protocol_violation; permission_denied, unsafe_directory, foreign_owner,
/// wrong_server: permission_denied; program_not_found: not_found. The others: none.
enum class errc {
  frame_too_large = 1,  ///< a length prefix above the connection's maximum frame size
  short_frame,          ///< the peer closed in the middle of a frame
  bad_frame,            ///< bytes that do not decode as an envelope
  peer_closed,          ///< the peer closed the connection
  shutting_down,        ///< the object is closing and accepts no new work
  address_in_use,       ///< a live listener already serves this socket path
  not_a_socket,         ///< the path exists and is not a socket: refusing to remove it
  timed_out,            ///< the peer did not send a complete frame in time
  too_many_fds,         ///< more descriptors than the connection allows in one frame
  bad_segment,          ///< a shared-memory segment with the wrong magic, version or size
  pool_exhausted,       ///< no buffer is free
  not_held,             ///< the holder has no reference to release
  unsafe_directory,     ///< a runtime directory owned by someone else or open to others
  remote_error,         ///< the peer reported an error of a category this side does not know
  bad_request,          ///< a request whose payload does not parse as its type's message
  unknown_request,      ///< no handler serves this request type
  permission_denied,    ///< the server's admission rule refused the peer
  bad_reply,  ///< a reply that does not parse as the expected message: the peer broke the protocol
  program_not_found,       ///< a daemon program found nowhere it was looked for
  program_not_executable,  ///< a daemon program that exists but cannot be executed
  program_exited,          ///< a started daemon exited before it served
  start_timeout,           ///< a started daemon did not serve in time
  invalid_name,            ///< a name that breaks the rules of its kind (characters, length)
  foreign_owner,           ///< a shared directory or socket owned by another uid
  wrong_server,            ///< the server reached runs as another uid than the one asked for
};

/// The category of errc, named "uipc.core". Its codes compare equal to their
/// uipc::condition (peer_closed == condition::disconnected, ...) and a few also
/// to the generic one (timed_out == boost::system::errc::timed_out).
const boost::system::error_category& core_category() noexcept;

inline error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), core_category()};
}

}  // namespace uipc

template <>
struct boost::system::is_error_code_enum<uipc::errc> : std::true_type {};

template <>
struct boost::system::is_error_condition_enum<uipc::condition> : std::true_type {};
