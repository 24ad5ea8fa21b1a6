// Just enough DNS (RFC 1035) for the dispatcher's programs: build a query, parse a
// question, answer from a small built-in zone in place, check a reply.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace uipc::dns {

inline constexpr std::uint16_t type_a = 1;
inline constexpr std::uint16_t type_txt = 16;
inline constexpr std::uint16_t type_aaaa = 28;
inline constexpr std::uint16_t class_in = 1;

inline constexpr std::uint8_t rcode_noerror = 0;
inline constexpr std::uint8_t rcode_formerr = 1;
inline constexpr std::uint8_t rcode_nxdomain = 3;
inline constexpr std::uint8_t rcode_notimp = 4;

/// The first question of a message: its name in lower case without the final
/// dot ("" for the root), its type and class, and where the question ends.
struct question {
  std::string name;
  std::string wire_name;  ///< the same, with its letters' case as sent
  std::uint16_t type = 0;
  std::uint16_t qclass = 0;
  std::size_t end = 0;
};

/// "A", "AAAA", "TXT" or a number; nullopt for anything else.
std::optional<std::uint16_t> parse_type(std::string_view text);

/// Writes a query for (name, type, IN) with `id` and RD set; returns its length,
/// or 0 when the name is not a valid host name or `out` is too small.
std::size_t build_query(std::span<std::byte> out, std::uint16_t id, std::string_view name,
                        std::uint16_t type);

/// Parses the header and the first question of `message`; nullopt when malformed
/// (truncated, a label over 63 bytes, a name over 255 bytes, a compression pointer)
/// or when the name has no text form of its own (a label holding a dot).
std::optional<question> parse_question(std::span<const std::byte> message);

/// Turns the query in buffer[0, length) into an answer in place, from the
/// built-in zone: records for known names, NODATA for a known name without
/// that type, NXDOMAIN otherwise, FORMERR or NOTIMP for what it cannot answer.
/// Returns the answer's length, or 0 when the message must be dropped (too
/// short for a header, or a response).
std::size_t answer_in_place(std::span<std::byte> buffer, std::size_t length);

/// The response code of a message of at least 12 bytes.
std::uint8_t rcode(std::span<const std::byte> message);
/// The number of answer records.
std::uint16_t answer_count(std::span<const std::byte> message);

/// True when `reply` is a response whose question is (name, type, IN). With
/// `exact_case`, the name must come back letter for letter as sent (0x20).
bool reply_matches(std::span<const std::byte> reply, std::string_view name, std::uint16_t type,
                   bool exact_case = false);

/// 0x20 (draft-vixie-dnsext-dns0x20): `name` with each letter's case drawn from
/// a CSPRNG. Servers copy the question into the reply as it came, so a forger
/// must guess one bit per letter beside the ID (and port); check the reply with
/// reply_matches(..., exact_case = true). Without a trailing dot.
std::string random_case(std::string_view name);

}  // namespace uipc::dns
