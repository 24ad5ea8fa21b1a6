// Just enough DNS (RFC 1035) for the dispatcher's programs and uipcd's zone
// plug-in: build a query, parse a question, read a zone file, answer from a
// zone in place, check a reply.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace uipc::dns {

inline constexpr std::uint16_t type_a = 1;
inline constexpr std::uint16_t type_txt = 16;
inline constexpr std::uint16_t type_aaaa = 28;
inline constexpr std::uint16_t class_in = 1;

inline constexpr std::uint8_t rcode_noerror = 0;
inline constexpr std::uint8_t rcode_formerr = 1;
inline constexpr std::uint8_t rcode_servfail = 2;
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

/// One resource record: its owner name in lower case without the final dot.
struct record {
  std::string name;
  std::uint16_t type = 0;
  std::uint32_t ttl = 0;
  std::vector<std::uint8_t> rdata;
};

/// The records a server answers from, by owner name.
class zone {
 public:
  /// The built-in zone: a handful of names under uipc.test.
  static const zone& builtin();

  /// Reads a zone file: a subset of the RFC 1035 master file. Per line:
  /// `[OWNER] [TTL] [IN] TYPE RDATA`, TYPE one of A, AAAA, TXT (quoted strings
  /// or bare words); an OWNER left out (a line starting with a blank) repeats
  /// the last one; `@` is the origin and a name without a final dot is
  /// relative to it; `$ORIGIN NAME.` and `$TTL SECONDS` as in the RFC; `;`
  /// starts a comment. Anything else (another type, a bad address, a label
  /// over 63 bytes, a name over 253, a TTL over 2^31 - 1, an unterminated
  /// quote) is refused: nullopt, and `error` says "line N: why".
  static std::optional<zone> parse(std::string_view text, std::string& error);

  /// Adds a record (its name lower-cased, without the final dot).
  void add(record r);
  /// The records of `name` (lower case, no final dot); null when it has none.
  const std::vector<record>* find(std::string_view name) const;
  std::size_t size() const noexcept { return count_; }

 private:
  std::unordered_map<std::string, std::vector<record>> by_name_;
  std::size_t count_ = 0;
};

/// Turns the query in buffer[0, length) into an answer in place, from `z`:
/// records for known names, NODATA for a known name without that type,
/// NXDOMAIN otherwise, FORMERR or NOTIMP for what it cannot answer. Answers
/// that do not fit in the buffer are left out. Returns the answer's length,
/// or 0 when the message must be dropped (too short for a header, or a
/// response).
std::size_t answer_in_place(std::span<std::byte> buffer, std::size_t length,
                            const zone& z = zone::builtin());

/// Turns the query in buffer[0, length) into an answer with response code
/// `code` and no records (its question kept when it has a readable one).
/// Returns its length, or 0 when the message must be dropped (too short for a
/// header, or a response).
std::size_t error_in_place(std::span<std::byte> buffer, std::size_t length, std::uint8_t code);

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
