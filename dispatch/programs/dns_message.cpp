// DNS message helpers for uipc-dns-responder, uipc-dns-query and uipcd's zone plug-in.
#include "dns_message.hpp"

#include <arpa/inet.h>

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

}  // namespace

// -- zones --------------------------------------------------------------------

namespace {

constexpr std::uint32_t default_ttl = 300;
constexpr std::uint32_t max_ttl = 0x7fffffff;  // RFC 2181 section 8

// A zone file line cut into fields: blanks separate them, a quoted string is
// one field (its quotes kept, so TXT can tell "a b" from a b), ';' ends the line.
bool split_fields(std::string_view line, std::vector<std::string>& fields, std::string& why) {
  fields.clear();
  std::size_t i = 0;
  while (i < line.size()) {
    const char c = line[i];
    if (c == ' ' || c == '\t' || c == '\r') {
      ++i;
    } else if (c == ';') {
      break;
    } else if (c == '"') {
      std::string field = "\"";
      ++i;
      bool closed = false;
      while (i < line.size()) {
        if (line[i] == '\\' && i + 1 < line.size()) {
          field += line[i + 1];
          i += 2;
        } else if (line[i] == '"') {
          closed = true;
          ++i;
          break;
        } else {
          field += line[i++];
        }
      }
      if (!closed) return why = "a quoted string is not closed", false;
      fields.push_back(std::move(field));
    } else {
      const std::size_t start = i;
      while (i < line.size() && line[i] != ' ' && line[i] != '\t' && line[i] != '\r' &&
             line[i] != ';' && line[i] != '"')
        ++i;
      fields.emplace_back(line.substr(start, i - start));
    }
  }
  return true;
}

// `text` as a name: absolute when it ends in a dot, else relative to `origin`;
// lower case, without the final dot. Empty optional when it breaks the rules.
std::optional<std::string> make_name(std::string_view text, const std::string& origin,
                                     std::string& why) {
  std::string name;
  if (text == "@") {
    name = origin;
  } else if (!text.empty() && text.back() == '.') {
    name = lower(text);
  } else {
    name = lower(text);
    if (!origin.empty()) name += '.' + origin;
  }
  if (name.size() > 253)
    return why = "the name " + std::string(text) + " is longer than 253 bytes", std::nullopt;
  std::string_view rest = name;
  while (!rest.empty()) {
    const std::size_t dot = rest.find('.');
    const std::size_t length = dot == std::string_view::npos ? rest.size() : dot;
    if (length == 0)
      return why = "the name " + std::string(text) + " has an empty label", std::nullopt;
    if (length > 63)
      return why = "a label of " + std::string(text) + " is longer than 63 bytes", std::nullopt;
    rest = dot == std::string_view::npos ? std::string_view() : rest.substr(dot + 1);
  }
  return name;
}

std::optional<std::uint32_t> parse_ttl(std::string_view text) {
  std::uint32_t v = 0;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size() || v > max_ttl) return std::nullopt;
  return v;
}

bool all_digits(std::string_view text) {
  return !text.empty() &&
         std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// The RDATA of (type, fields); false with `why` when it is malformed.
bool make_rdata(std::uint16_t type, std::span<const std::string> fields,
                std::vector<std::uint8_t>& out, std::string& why) {
  if (fields.empty()) return why = "the record has no data", false;
  if (type == type_a || type == type_aaaa) {
    if (fields.size() != 1) return why = "an address record takes one address", false;
    std::uint8_t bytes[16];
    const int family = type == type_a ? AF_INET : AF_INET6;
    if (::inet_pton(family, fields[0].c_str(), bytes) != 1)
      return why = "'" + fields[0] + "' is not an IPv" + (type == type_a ? "4" : "6") + " address",
             false;
    out.assign(bytes, bytes + (type == type_a ? 4 : 16));
    return true;
  }
  // TXT: one character-string per field, each at most 255 bytes.
  for (const std::string& f : fields) {
    const std::string_view text =
        f.starts_with('"') ? std::string_view(f).substr(1) : std::string_view(f);
    if (text.size() > 255) return why = "a TXT string is longer than 255 bytes", false;
    out.push_back(static_cast<std::uint8_t>(text.size()));
    out.insert(out.end(), text.begin(), text.end());
  }
  if (out.size() > 65535) return why = "the TXT record is longer than 65535 bytes", false;
  return true;
}

}  // namespace

const zone& zone::builtin() {
  static const zone z = [] {
    zone out;
    const auto add = [&out](const char* name, std::uint16_t type, std::vector<std::uint8_t> rdata) {
      out.add({name, type, default_ttl, std::move(rdata)});
    };
    add("uipc.test", type_a, {192, 0, 2, 1});
    add("a.uipc.test", type_a, {127, 0, 0, 1});
    add("www.uipc.test", type_a, {192, 0, 2, 10});
    add("www.uipc.test", type_a, {192, 0, 2, 11});
    add("www.uipc.test", type_aaaa,
        {0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10});
    add("mail.uipc.test", type_a, {192, 0, 2, 25});
    add("txt.uipc.test", type_txt, {4, 'u', 'i', 'p', 'c'});
    return out;
  }();
  return z;
}

void zone::add(record r) {
  r.name = lower(r.name);
  by_name_[r.name].push_back(std::move(r));
  ++count_;
}

const std::vector<record>* zone::find(std::string_view name) const {
  const auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &it->second;
}

std::optional<zone> zone::parse(std::string_view text, std::string& error) {
  zone z;
  std::string origin;
  std::string owner;
  std::uint32_t ttl = default_ttl;
  std::vector<std::string> fields;
  std::size_t line_number = 0;
  std::string why;
  auto fail = [&](std::string reason) {
    error = "line " + std::to_string(line_number) + ": " + std::move(reason);
    return std::nullopt;
  };
  while (!text.empty()) {
    ++line_number;
    const std::size_t eol = text.find('\n');
    const std::string_view line = text.substr(0, eol);
    text = eol == std::string_view::npos ? std::string_view() : text.substr(eol + 1);
    if (!split_fields(line, fields, why)) return fail(why);
    if (fields.empty()) continue;
    if (fields[0] == "$ORIGIN" || fields[0] == "$TTL") {
      if (fields.size() != 2) return fail(fields[0] + " takes one value");
      if (fields[0] == "$TTL") {
        const auto v = parse_ttl(fields[1]);
        if (!v) return fail("'" + fields[1] + "' is not a TTL (0 to 2147483647 seconds)");
        ttl = *v;
        continue;
      }
      if (fields[1].back() != '.') return fail("$ORIGIN needs an absolute name (ending in '.')");
      auto name = make_name(fields[1], "", why);
      if (!name) return fail(why);
      origin = *name;
      continue;
    }
    if (fields[0].starts_with('$')) return fail("unknown directive " + fields[0]);
    std::size_t at = 0;
    if (line[0] != ' ' && line[0] != '\t') {  // the line names its owner
      auto name = make_name(fields[0], origin, why);
      if (!name) return fail(why);
      owner = *name;
      at = 1;
    } else if (owner.empty()) {
      return fail("the first record needs an owner name");
    }
    std::uint32_t record_ttl = ttl;
    if (at < fields.size() && all_digits(fields[at])) {
      const auto v = parse_ttl(fields[at]);
      if (!v) return fail("'" + fields[at] + "' is not a TTL (0 to 2147483647 seconds)");
      record_ttl = *v;
      ++at;
    }
    if (at < fields.size() && lower(fields[at]) == "in") ++at;
    if (at >= fields.size()) return fail("the record has no type");
    const std::string type_text = lower(fields[at]);
    std::uint16_t type = 0;
    if (type_text == "a")
      type = type_a;
    else if (type_text == "aaaa")
      type = type_aaaa;
    else if (type_text == "txt")
      type = type_txt;
    else
      return fail("type " + fields[at] + " is not supported (A, AAAA, TXT)");
    record r{owner, type, record_ttl, {}};
    if (!make_rdata(type, std::span(fields).subspan(at + 1), r.rdata, why)) return fail(why);
    z.add(std::move(r));
  }
  return z;
}

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

std::size_t answer_in_place(std::span<std::byte> buf, std::size_t length, const zone& z) {
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
  const std::vector<record>* records = z.find(q->name);
  std::uint16_t answers = 0;
  std::size_t at = q->end;
  static const std::vector<record> none;
  for (const record& r : records ? *records : none) {
    if (r.type != q->type) continue;
    if (at + 12 + r.rdata.size() > buf.size()) break;  // no room: fewer answers
    put16(buf, at, 0xc00c);                            // the question's name
    put16(buf, at + 2, r.type);
    put16(buf, at + 4, class_in);
    put16(buf, at + 6, static_cast<std::uint16_t>(r.ttl >> 16));
    put16(buf, at + 8, static_cast<std::uint16_t>(r.ttl));
    put16(buf, at + 10, static_cast<std::uint16_t>(r.rdata.size()));
    std::memcpy(buf.data() + at + 12, r.rdata.data(), r.rdata.size());
    at += 12 + r.rdata.size();
    ++answers;
  }
  return finish(at, records ? rcode_noerror : rcode_nxdomain, 1, answers);
}

std::size_t error_in_place(std::span<std::byte> buf, std::size_t length, std::uint8_t code) {
  if (length < 12 || length > buf.size()) return 0;
  const auto flags = std::to_integer<std::uint8_t>(buf[2]);
  if ((flags & 0x80) != 0) return 0;  // a response: never answer those
  const auto q = get16(buf, 4) == 1 ? parse_question(std::span<const std::byte>(buf.data(), length))
                                    : std::nullopt;
  buf[2] = static_cast<std::byte>(0x80 | (flags & 0x79));  // QR, opcode, RD; not authoritative
  buf[3] = static_cast<std::byte>(code & 0x0f);
  put16(buf, 4, q ? 1 : 0);
  put16(buf, 6, 0);
  put16(buf, 8, 0);
  put16(buf, 10, 0);
  return q ? q->end : 12;
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
  // One bit per byte, drawn 256 at a time: a name may come from a file before
  // anything checked its length (dns_query's --0x20), so it may be longer
  // than the 253 bytes a query carries.
  std::array<std::uint8_t, 32> bits{};
  constexpr std::size_t per_draw = bits.size() * 8;
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (i % per_draw == 0) ::arc4random_buf(bits.data(), bits.size());
    const auto c = static_cast<unsigned char>(out[i]);
    if (std::isalpha(c) == 0) continue;
    const std::size_t bit = i % per_draw;
    const bool upper = (bits[bit / 8] >> (bit % 8) & 1) != 0;
    out[i] = static_cast<char>(upper ? std::toupper(c) : std::tolower(c));
  }
  return out;
}

}  // namespace uipc::dns
