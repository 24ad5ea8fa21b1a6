// The protocol between a host and uipc-plugin-runner, over one caps point.
//
// Request:  [u8 op][u8 name length][name][payload]
//   op list: no name, no payload. Reply: text lines,
//     "plugin\t<name>\t<flags>\n" then "service\t<name>\t<flags>\n" per service.
//   op call: the bytes service <name> with <payload> as its request.
//     Reply: [i32 status][u64 result][reply bytes], little-endian.
// The host treats every reply as untrusted: sizes checked, bytes copied.
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace uipc::plugin::detail::runner_protocol {

enum op : std::uint8_t { list = 1, call = 2 };
inline constexpr std::size_t reply_header = 12;
inline constexpr std::size_t max_name = 63;

struct request {
  op kind;
  std::string_view name;
  std::span<const std::byte> payload;
};

/// Parses a request (a view into `bytes`); nullopt for a malformed one.
inline std::optional<request> parse(std::span<const std::byte> bytes) {
  if (bytes.size() < 2) return std::nullopt;
  const auto kind = static_cast<std::uint8_t>(bytes[0]);
  const auto length = static_cast<std::size_t>(bytes[1]);
  if ((kind != list && kind != call) || length > max_name || bytes.size() < 2 + length) return std::nullopt;
  return request{static_cast<op>(kind), std::string_view(reinterpret_cast<const char*>(bytes.data() + 2), length),
                 bytes.subspan(2 + length)};
}

inline void put_header(std::span<std::byte> out, std::int32_t status, std::uint64_t result) {
  std::memcpy(out.data(), &status, 4);
  std::memcpy(out.data() + 4, &result, 8);
}

}  // namespace uipc::plugin::detail::runner_protocol
