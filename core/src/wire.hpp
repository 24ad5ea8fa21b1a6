// The byte format of a frame: 4-byte little-endian length, then an Envelope.
#pragma once

#include <boost/endian/conversion.hpp>
#include <cstring>
#include <deque>
#include <span>

#include "uipc/core/framed.hpp"

namespace uipc::proto {
class Envelope;
}

namespace uipc::detail {

inline std::size_t read_prefix(const char* p) noexcept {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return boost::endian::little_to_native(v);
}

/// Prefix + envelope of `f`, moving its payload; errc::frame_too_large above `max`
/// or errc::too_many_fds... (descriptors are not touched: the caller keeps them).
result<std::string> encode_frame(frame& f, std::size_t max_frame_size);

/// Decodes one envelope of `length` bytes at `data`, taking the descriptors it
/// announces from the front of `fds`. errc::bad_frame when it does not decode,
/// has an unknown kind, a request without correlation id, or announces more
/// descriptors than arrived; errc::too_many_fds above `max_fds`.
result<frame> decode_frame(proto::Envelope& scratch, const char* data, std::size_t length,
                           std::deque<unique_fd>& fds, std::size_t max_fds);

/// A whole NOTICE frame (with prefix) that tells the peer why it is being dropped.
std::string encode_error_notice(error_code ec);

/// The error_code a wire error stands for: a category among `known` (or core's,
/// the system's or the generic one) by name, else errc::remote_error.
error_code from_wire_error(const wire_error& e,
                           std::span<const boost::system::error_category* const> known);

}  // namespace uipc::detail
