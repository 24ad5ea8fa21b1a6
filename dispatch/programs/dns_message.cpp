// DNS message helpers for uipc-dns-responder and uipc-dns-query.
#include "dns_message.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cstdlib>  // arc4random_buf
#include <cstring>
#include <vector>

namespace uipc::dns {
namespace {

std::uint16_t get16(std::span<const std::byte> m, std::size_t at) {
  return static_cast<std::uint16_t>(std::to_integer<unsigned>(m[at]) << 8 |
                                    std::to_integer<unsigned>(m[at + 1]));
}

void put16(std::span<std::byte> m, std::size_t at, std::uint16_t v) {
  m[at] = static_cast<std::byte>(v >> 8);
  m[at + 1] = static_cast<std::byte>(v & 0xff);
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (!out.empty() && out.back() == '.') out.pop_back();
  return out;
}

struct record {
  const char* name;
  std::uint16_t type;
  std::vector<std::uint8_t> rdata;
};

// The built-in zone: a handful of names under uipc.test.
const std::vector<record>& zone() {
  static const std::vector<record> records = {
      {"uipc.test", type_a, {192, 0, 2, 1}},
      {"a.uipc.test", type_a, {127, 0, 0, 1}},
      {"www.uipc.test", type_a, {192, 0, 2, 10}},
      {"www.uipc.test", type_a, {192, 0, 2, 11}},
      {"www.uipc.test", type_aaaa, {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10}},
      {"mail.uipc.test", type_a, {192, 0, 2, 25}},
      {"txt.uipc.test", type_txt, {4, 'u', 'i', 'p', 'c'}},
  };
  return records;
}

}  // namespace

std::optional<std::uint16_t> parse_type(std::string_view text) {
  std::string t = lower(text);
  if (t == "a") return type_a;
  if (t == "aaaa") return type_aaaa;
  if (t == "txt") return type_txt;
  unsigned v = 0;
  auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
  if (ec == std::errc() && p == t.data() + t.size() && v > 0 && v < 65536)
    return static_cast<std::uint16_t>(v);
  return std::nullopt;
}

std::size_t build_query(std::span<std::byte> out, std::uint16_t id, std::string_view name,
                        std::uint16_t type) {
  if (!name.empty() && name.back() == '.') name.remove_suffix(1);
  if (out.size() < 12 + name.size() + 2 + 4 || name.size() > 253) return 0;
  std::memset(out.data(), 0, 12);
  put16(out, 0, id);
  out[2] = std::byte{0x01};  // RD
  put16(out, 4, 1);
  std::size_t at = 12;
  while (!name.empty()) {
    const std::size_t dot = name.find('.');
    const std::string_view label = name.substr(0, dot);
    if (label.empty() || label.size() > 63) return 0;
    out[at++] = static_cast<std::byte>(label.size());
    std::memcpy(out.data() + at, label.data(), label.size());
    at += label.size();
    if (dot == std::string_view::npos) break;
    name = name.substr(dot + 1);
    // "a.." (one dot is the final one, stripped above) ends in an empty label:
    // not a host name, and leaving the label out would ask for another name.
    if (name.empty()) return 0;
  }
  out[at++] = std::byte{0};
  put16(out, at, type);
  put16(out, at + 2, class_in);
  return at + 4;
}

std::optional<question> parse_question(std::span<const std::byte> m) {
  if (m.size() < 12 || get16(m, 4) == 0) return std::nullopt;
  question q;
  std::size_t at = 12;
  std::size_t wire_length = 0;
  for (;;) {
    if (at >= m.size()) return std::nullopt;
    const auto len = std::to_integer<unsigned>(m[at++]);
    if (len == 0) break;
    if (len > 63 || at + len > m.size()) return std::nullopt;  // also refuses pointers (0xc0..)
    wire_length += len + 1;
    if (wire_length > 254) return std::nullopt;
    if (!q.name.empty()) {
      q.name += '.';
      q.wire_name += '.';
    }
    for (std::size_t i = 0; i < len; ++i) {
      const auto c = std::to_integer<unsigned char>(m[at + i]);
      // A dot inside a label would read as two labels: "www.uipc" + "test"
      // and "www" + "uipc" + "test" are different names with one text form.
      if (c == '.') return std::nullopt;
      q.wire_name += static_cast<char>(c);
      q.name += static_cast<char>(std::tolower(c));
    }
    at += len;
  }
  if (at + 4 > m.size()) return std::nullopt;
  q.type = get16(m, at);
  q.qclass = get16(m, at + 2);
  q.end = at + 4;
  return q;
}

std::uint8_t rcode(std::span<const std::byte> m) {
  return std::to_integer<std::uint8_t>(m[3]) & 0x0f;
}

std::uint16_t answer_count(std::span<const std::byte> m) { return get16(m, 6); }

std::size_t answer_in_place(std::span<std::byte> buf, std::size_t length) {
  if (length < 12 || length > buf.size()) return 0;
  const auto flags = std::to_integer<std::uint8_t>(buf[2]);
  if ((flags & 0x80) != 0) return 0;  // a response: never answer those
  const unsigned opcode = (flags >> 3) & 0x0f;
  auto finish = [&](std::size_t end, std::uint8_t code, std::uint16_t qd, std::uint16_t an) {
    buf[2] = static_cast<std::byte>(0x80 | (flags & 0x79) |
                                    (code == rcode_formerr ? 0 : 0x04));  // QR, opcode, AA?, RD
    buf[3] = static_cast<std::byte>(code);                                // RA = 0, Z = 0
    put16(buf, 4, qd);
    put16(buf, 6, an);
    put16(buf, 8, 0);
    put16(buf, 10, 0);
    return end;
  };
  const std::span<const std::byte> query(buf.data(), length);
  if (opcode != 0) return finish(12, rcode_notimp, 0, 0);
  if (get16(query, 4) != 1) return finish(12, rcode_formerr, 0, 0);
  auto q = parse_question(query);
  if (!q) return finish(12, rcode_formerr, 0, 0);
  if (q->qclass != class_in) return finish(q->end, rcode_notimp, 1, 0);
  bool known = false;
  std::uint16_t answers = 0;
  std::size_t at = q->end;
  for (const record& r : zone()) {
    if (q->name != r.name) continue;
    known = true;
    if (r.type != q->type) continue;
    if (at + 12 + r.rdata.size() > buf.size()) break;  // no room: fewer answers
    put16(buf, at, 0xc00c);                            // the question's name
    put16(buf, at + 2, r.type);
    put16(buf, at + 4, class_in);
    put16(buf, at + 6, 0);
    put16(buf, at + 8, 300);  // TTL
    put16(buf, at + 10, static_cast<std::uint16_t>(r.rdata.size()));
    std::memcpy(buf.data() + at + 12, r.rdata.data(), r.rdata.size());
    at += 12 + r.rdata.size();
    ++answers;
  }
  return finish(at, known ? rcode_noerror : rcode_nxdomain, 1, answers);
}

bool reply_matches(std::span<const std::byte> reply, std::string_view name, std::uint16_t type,
                   bool exact_case) {
  if (reply.size() < 12 || (std::to_integer<unsigned>(reply[2]) & 0x80) == 0) return false;
  auto q = parse_question(reply);
  if (!q || q->type != type || q->qclass != class_in) return false;
  if (!exact_case) return q->name == lower(name);
  if (!name.empty() && name.back() == '.') name.remove_suffix(1);
  return q->wire_name == name;
}

std::string random_case(std::string_view name) {
  if (!name.empty() && name.back() == '.') name.remove_suffix(1);
  std::string out(name);
  std::array<std::uint8_t, 32> bits{};  // 256 letters' worth; names are at most 253 bytes
  ::arc4random_buf(bits.data(), bits.size());
  for (std::size_t i = 0; i < out.size(); ++i) {
    const auto c = static_cast<unsigned char>(out[i]);
    if (std::isalpha(c) == 0) continue;
    const bool upper = (bits[i / 8] >> (i % 8) & 1) != 0;
    out[i] = static_cast<char>(upper ? std::toupper(c) : std::tolower(c));
  }
  return out;
}

}  // namespace uipc::dns
