// The protocol between a host and uipc-plugin-runner, over caps points: the
// host asks the runner's point for the isolated plug-in's services, and the
// runner asks the host's point for the host's (the same requests both ways;
// "the runner" below is whichever side serves).
//
// Request:  [u8 op][u8 name length][name][payload]
//   op list: no name, no payload. Reply: text lines,
//     "plugin\t<name>\t<flags>\n", "version\t<n>\t0\n" (the runner's count of
//     service changes), then "service\t<name>\t<flags>\n" per service.
//   op call: the bytes service <name> with <payload> as its request.
//     Reply: [i32 status][u64 result][reply bytes], little-endian.
//   op watch: no name; payload [u64 version]. Answered when the runner's
//     version differs from it (at once if it does already): [u64 version].
//     The host then lists again: services registered or gone after Init.
// Each side treats every reply as untrusted: sizes checked, bytes copied.
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "names.hpp"
#include "uipc/plugin/abi.h"

namespace uipc::plugin::detail::runner_protocol {

enum op : std::uint8_t { list = 1, call = 2, watch = 3 };
inline constexpr std::size_t reply_header = 12;
inline constexpr std::size_t max_name = max_name_length;
/// Services one listing may name: the other side is untrusted, and each name
/// it lists costs the host a slot of its registry while listed (max_services,
/// host-wide).
inline constexpr std::size_t max_listed_services = 1024;

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
  if ((kind != list && kind != call && kind != watch) || length > max_name ||
      bytes.size() < 2 + length)
    return std::nullopt;
  if (kind == watch && (length != 0 || bytes.size() != 2 + 8)) return std::nullopt;
  return request{static_cast<op>(kind),
                 std::string_view(reinterpret_cast<const char*>(bytes.data() + 2), length),
                 bytes.subspan(2 + length)};
}

inline void put_header(std::span<std::byte> out, std::int32_t status, std::uint64_t result) {
  std::memcpy(out.data(), &status, 4);
  std::memcpy(out.data() + 4, &result, 8);
}

/// A version as a watch request's payload or its answer carries it.
inline std::uint64_t get_version(std::span<const std::byte> bytes) {
  std::uint64_t v = 0;
  std::memcpy(&v, bytes.data(), sizeof v);
  return v;
}

/// What a runner serves, from its answer to `list`.
struct listing {
  std::string plugin;
  std::uint32_t flags = 0;
  std::uint64_t version = 0;
  std::vector<std::pair<std::string, std::uint32_t>> services;  // name, flags
};

/// Parses the answer to `list`: one "plugin" line and any number of
/// "service" lines, three TAB-separated fields each, the flags in decimal.
/// nullopt for anything else (a line of another kind, a missing or second
/// plugin line, a plug-in name or a service name that breaks the rules, a
/// service named twice, more than max_listed_services, a flags field that is
/// not a number).
inline std::optional<listing> parse_listing(std::string_view text) {
  listing out;
  bool have_plugin = false;
  while (!text.empty()) {
    const auto eol = text.find('\n');
    if (eol == std::string_view::npos) return std::nullopt;  // every line ends
    std::string_view line = text.substr(0, eol);
    text.remove_prefix(eol + 1);
    const auto t1 = line.find('\t');
    const auto t2 = t1 == std::string_view::npos ? t1 : line.find('\t', t1 + 1);
    if (t2 == std::string_view::npos) return std::nullopt;
    const std::string_view kind = line.substr(0, t1), name = line.substr(t1 + 1, t2 - t1 - 1),
                           digits = line.substr(t2 + 1);
    std::uint32_t flags = 0;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), flags);
    if (ec != std::errc() || end != digits.data() + digits.size() || digits.empty())
      return std::nullopt;
    if (kind == "plugin") {
      if (have_plugin || !valid_plugin_name(name)) return std::nullopt;
      have_plugin = true;
      out.plugin = std::string(name);
      out.flags = flags;
    } else if (kind == "version") {
      const auto [vend, vec] = std::from_chars(name.data(), name.data() + name.size(), out.version);
      if (vec != std::errc() || vend != name.data() + name.size() || name.empty())
        return std::nullopt;
    } else if (kind == "service") {
      if (!valid_service_name(name) || out.services.size() == max_listed_services)
        return std::nullopt;
      out.services.emplace_back(std::string(name), flags);
    } else {
      return std::nullopt;
    }
  }
  if (!have_plugin) return std::nullopt;
  std::vector<std::string_view> names;
  names.reserve(out.services.size());
  for (const auto& [name, flags] : out.services) names.push_back(name);
  std::sort(names.begin(), names.end());
  if (std::adjacent_find(names.begin(), names.end()) != names.end()) return std::nullopt;
  return out;
}

/// A runner's answer to `call`, a view into the reply.
struct call_reply {
  std::int32_t status;
  std::uint64_t result;
  std::span<const std::byte> bytes;
};

/// Parses the answer to `call`; nullopt when it is shorter than its header or
/// its status is not one of the ABI's.
inline std::optional<call_reply> parse_reply(std::span<const std::byte> reply) {
  if (reply.size() < reply_header) return std::nullopt;
  call_reply out;
  std::memcpy(&out.status, reply.data(), 4);
  std::memcpy(&out.result, reply.data() + 4, 8);
  if (out.status < UIPC_PLUGIN_OK || out.status > UIPC_PLUGIN_E_TOO_MANY) return std::nullopt;
  out.bytes = reply.subspan(reply_header);
  return out;
}

}  // namespace uipc::plugin::detail::runner_protocol
