// Fuzz target: the DNS message code of uipc-dns-responder and uipc-dns-query
// (dispatch/programs/dns_message.cpp), on its own for speed: the datagram the
// responder answers in place, the reply the query program checks, and the
// name a user types, which build_query must encode or refuse.
//
// Input: [capacity byte][name length byte][name][message].
//   The message is answered in a buffer of max(its length, 4 * capacity byte) bytes;
//   the name is built into a query in 18 + 2 * capacity byte bytes.
//
// Checks: an answer fits its buffer, is a response with the query's ID and
// question, and matches the question (reply_matches) when it carries one;
// a query built from the name parses back to that name, lower-cased.
#include "dns_message.hpp"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_support.hpp"

namespace {

using namespace uipc;

std::span<const std::byte> as_bytes(std::span<const std::uint8_t> s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};  // NOLINT: a byte view of bytes
}

std::string lower_without_final_dot(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (!out.empty() && out.back() == '.') out.pop_back();
  return out;
}

void check_answer(std::span<const std::byte> query, std::size_t room) {
  const std::size_t capacity = std::max(query.size(), room);
  std::vector<std::byte> buf(capacity);
  if (!query.empty()) std::memcpy(buf.data(), query.data(), query.size());
  const auto before = dns::parse_question(query);
  const std::size_t length = dns::answer_in_place(buf, query.size());
  if (length == 0) {
    // Dropped only when too short for a header or a response already.
    UIPC_FUZZ_CHECK(query.size() < 12 || (std::to_integer<unsigned>(query[2]) & 0x80) != 0);
    return;
  }
  UIPC_FUZZ_CHECK(query.size() >= 12);
  UIPC_FUZZ_CHECK(length >= 12 && length <= capacity);
  const std::span<const std::byte> answer(buf.data(), length);
  UIPC_FUZZ_CHECK((std::to_integer<unsigned>(answer[2]) & 0x80) != 0);
  UIPC_FUZZ_CHECK(answer[0] == query[0] && answer[1] == query[1]);
  const std::uint8_t code = dns::rcode(answer);
  if (code == dns::rcode_noerror || code == dns::rcode_nxdomain) {
    UIPC_FUZZ_CHECK(before.has_value());
    UIPC_FUZZ_CHECK(dns::reply_matches(answer, before->name, before->type));
    if (code == dns::rcode_nxdomain) UIPC_FUZZ_CHECK(dns::answer_count(answer) == 0);
  }
}

void check_build(std::string_view name, std::uint16_t type, std::size_t room) {
  std::vector<std::byte> out(room);
  const std::size_t length = dns::build_query(out, 0x1234, name, type);
  if (length == 0) return;
  UIPC_FUZZ_CHECK(length <= room);
  const std::span<const std::byte> query(out.data(), length);
  const auto q = dns::parse_question(query);
  UIPC_FUZZ_CHECK(q.has_value());
  UIPC_FUZZ_CHECK(q->end == length);
  UIPC_FUZZ_CHECK(q->type == type && q->qclass == dns::class_in);
  // What was asked is what the query asks: no label may vanish or merge.
  UIPC_FUZZ_CHECK(q->name == lower_without_final_dot(name));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz::input in(data, size);
  const std::uint8_t room = in.byte();
  const auto name_bytes = in.bytes(in.byte());
  const std::string_view name(reinterpret_cast<const char*>(name_bytes.data()),
                              name_bytes.size());  // NOLINT
  const auto message = in.bytes(size);

  check_answer(as_bytes(message), 4 * std::size_t{room});
  check_build(name, static_cast<std::uint16_t>(room | 1), 12 + 2 * std::size_t{room} + 6);
  if (auto t = dns::parse_type(name)) UIPC_FUZZ_CHECK(*t != 0);
  // A reply checked against the name, as uipc-dns-query does with every datagram it gets.
  (void)dns::reply_matches(as_bytes(message), name, dns::type_a);
  return 0;
}
