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

/// Core error conditions. Values are stable: they travel on the wire.
enum class errc {
  frame_too_large = 1,   ///< a length prefix above the connection's maximum frame size
  short_frame,           ///< the peer closed in the middle of a frame
  bad_frame,             ///< bytes that do not decode as an envelope
  peer_closed,           ///< the peer closed the connection
  shutting_down,         ///< the object is closing and accepts no new work
  address_in_use,        ///< a live listener already serves this socket path
  not_a_socket,          ///< the path exists and is not a socket: refusing to remove it
  timed_out,             ///< the peer did not send a complete frame in time
  too_many_fds,          ///< more descriptors than the connection allows in one frame
  bad_segment,           ///< a shared-memory segment with the wrong magic, version or size
  pool_exhausted,        ///< no buffer is free
  not_held,              ///< the holder has no reference to release
  unsafe_directory,      ///< a runtime directory owned by someone else or open to others
  remote_error,          ///< the peer reported an error of a category this side does not know
  bad_request,           ///< a request whose payload does not parse as its type's message
  unknown_request,       ///< no handler serves this request type
  permission_denied,     ///< the server's admission rule refused the peer
  bad_reply,             ///< a reply that does not parse as the expected message: the peer broke the protocol
  program_not_found,     ///< a daemon program found nowhere it was looked for
  program_not_executable,  ///< a daemon program that exists but cannot be executed
  program_exited,        ///< a started daemon exited before it served
  start_timeout,         ///< a started daemon did not serve in time
  invalid_name,          ///< a name that breaks the rules of its kind (characters, length)
  foreign_owner,         ///< a shared directory or socket owned by another uid
  wrong_server,          ///< the server reached runs as another uid than the one asked for
};

/// The category of errc, named "uipc.core".
const boost::system::error_category& core_category() noexcept;

inline error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), core_category()};
}

}  // namespace uipc

template <>
struct boost::system::is_error_code_enum<uipc::errc> : std::true_type {};
