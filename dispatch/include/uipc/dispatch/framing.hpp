// How a datagram carries its 16-bit message ID and its query/response flag.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace uipc::dispatch {

/// Where the message ID and the query/response flag sit in a datagram. A value
/// type, read on every datagram without a virtual call. The default is the DNS
/// header (RFC 1035 4.1.1): ID in bytes 0-1 (big-endian), QR is bit 0x80 of byte 2,
/// header 12 bytes. Datagrams shorter than header_size are counted and dropped.
struct framing {
  std::size_t header_size =
      12;                     ///< minimum length of a datagram; >= id_offset + 2 and > flag_offset
  std::size_t id_offset = 0;  ///< the ID: two bytes, big-endian
  std::size_t flag_offset = 2;        ///< the byte that carries the response flag
  std::uint8_t response_mask = 0x80;  ///< set in that byte: a response; clear: a query

  /// True when the layout is usable (offsets inside the header, a non-zero mask).
  constexpr bool valid() const noexcept {
    return response_mask != 0 && id_offset + 2 <= header_size && flag_offset < header_size;
  }
  /// The ID of a datagram of at least header_size bytes.
  std::uint16_t read_id(std::span<const std::byte> d) const noexcept {
    return static_cast<std::uint16_t>(std::to_integer<unsigned>(d[id_offset]) << 8 |
                                      std::to_integer<unsigned>(d[id_offset + 1]));
  }
  /// Writes `id` into a message of at least header_size bytes.
  void write_id(std::span<std::byte> d, std::uint16_t id) const noexcept {
    d[id_offset] = static_cast<std::byte>(id >> 8);
    d[id_offset + 1] = static_cast<std::byte>(id & 0xff);
  }
  /// True when a datagram of at least header_size bytes is a response.
  bool is_response(std::span<const std::byte> d) const noexcept {
    return (std::to_integer<std::uint8_t>(d[flag_offset]) & response_mask) != 0;
  }
};

/// The DNS header framing, so dig, dnsperf and DNS servers are peers.
constexpr framing dns_framing() noexcept { return framing{}; }

}  // namespace uipc::dispatch
