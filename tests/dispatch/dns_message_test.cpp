// The DNS helpers of the programs: answers from the zone, and no read or write
// out of bounds on any input (a small randomized fuzz, run under ASan too).
#include "dns_message.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace uipc::dns {
namespace {

std::vector<std::byte> query(std::uint16_t id, const char* name, std::uint16_t type) {
  std::vector<std::byte> q(512);
  q.resize(build_query(q, id, name, type));
  return q;
}

TEST(DnsMessageTest, KnownNameGetsItsRecordsAuthoritatively) {
  auto q = query(0x1234, "WWW.uipc.test.", type_a);
  ASSERT_FALSE(q.empty());
  std::array<std::byte, 512> buf{};
  std::copy(q.begin(), q.end(), buf.begin());
  const std::size_t n = answer_in_place(buf, q.size());
  ASSERT_GT(n, q.size());
  const std::span<const std::byte> a(buf.data(), n);
  EXPECT_EQ(std::to_integer<int>(a[0]), 0x12);
  EXPECT_EQ(std::to_integer<int>(a[2]) & 0x84, 0x84);  // QR, AA
  EXPECT_EQ(rcode(a), rcode_noerror);
  EXPECT_EQ(answer_count(a), 2);
  EXPECT_TRUE(reply_matches(a, "www.uipc.test", type_a));
  EXPECT_FALSE(reply_matches(a, "www.uipc.test", type_aaaa));
}

// The answer records of `a`, from after the question: (type, ttl, rdata).
struct answer_record {
  std::uint16_t type;
  std::uint32_t ttl;
  std::vector<std::uint8_t> rdata;
};
std::vector<answer_record> answers_of(std::span<const std::byte> a) {
  auto q = parse_question(a);
  std::vector<answer_record> out;
  if (!q) return out;
  auto u8 = [&](std::size_t i) { return std::to_integer<std::uint32_t>(a[i]); };
  std::size_t at = q->end;
  for (unsigned i = 0; i < answer_count(a) && at + 12 <= a.size(); ++i) {
    const std::uint32_t length = u8(at + 10) << 8 | u8(at + 11);
    answer_record r{static_cast<std::uint16_t>(u8(at + 2) << 8 | u8(at + 3)),
                    u8(at + 6) << 24 | u8(at + 7) << 16 | u8(at + 8) << 8 | u8(at + 9),
                    {}};
    for (std::size_t b = 0; b < length && at + 12 + b < a.size(); ++b)
      r.rdata.push_back(static_cast<std::uint8_t>(u8(at + 12 + b)));
    out.push_back(std::move(r));
    at += 12 + length;
  }
  return out;
}

std::vector<std::byte> answer(const zone& z, const char* name, std::uint16_t type,
                              std::size_t room = 512) {
  auto q = query(7, name, type);
  std::vector<std::byte> buf(room);
  std::copy(q.begin(), q.end(), buf.begin());
  buf.resize(answer_in_place(buf, q.size(), z));
  return buf;
}

TEST(DnsZoneTest, ZoneFileRecordsAreAnsweredWithTheirTtls) {
  std::string error;
  auto z = zone::parse(
      "; a zone for the tests\n"
      "$ORIGIN example.test.\n"
      "$TTL 60\n"
      "@          IN A     192.0.2.1\n"
      "www        3600 IN A 192.0.2.10 ; a comment\n"
      "           A        192.0.2.11\n"
      "           AAAA     2001:db8::10\n"
      "Mail.example.test. 30 A 192.0.2.25\n"
      "txt        TXT \"hello world\" bare \"semi;colon \\\"q\\\"\"\n"
      "\n",
      error);
  ASSERT_TRUE(z) << error;
  EXPECT_EQ(z->size(), 6u);

  auto a = answer(*z, "WWW.example.test", type_a);
  ASSERT_FALSE(a.empty());
  EXPECT_EQ(rcode(a), rcode_noerror);
  auto records = answers_of(a);
  ASSERT_EQ(records.size(), 2u);
  EXPECT_EQ(records[0].ttl, 3600u);
  EXPECT_EQ(records[0].rdata, (std::vector<std::uint8_t>{192, 0, 2, 10}));
  EXPECT_EQ(records[1].ttl, 60u) << "a record without a TTL takes $TTL's";
  EXPECT_EQ(records[1].rdata, (std::vector<std::uint8_t>{192, 0, 2, 11}));

  records = answers_of(answer(*z, "www.example.test", type_aaaa));
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].rdata.size(), 16u);
  EXPECT_EQ(records[0].rdata[0], 0x20);
  EXPECT_EQ(records[0].rdata[15], 0x10);

  records = answers_of(answer(*z, "example.test", type_a));
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].rdata, (std::vector<std::uint8_t>{192, 0, 2, 1}));
  records = answers_of(answer(*z, "mail.example.test", type_a));
  ASSERT_EQ(records.size(), 1u);
  EXPECT_EQ(records[0].ttl, 30u);

  records = answers_of(answer(*z, "txt.example.test", type_txt));
  ASSERT_EQ(records.size(), 1u);
  const std::string expected =
      std::string("\x0bhello world") + "\x04" + "bare" + "\x0e" + "semi;colon \"q\"";
  EXPECT_EQ(std::string(records[0].rdata.begin(), records[0].rdata.end()), expected);

  EXPECT_EQ(rcode(answer(*z, "nosuch.example.test", type_a)), rcode_nxdomain);
  a = answer(*z, "mail.example.test", type_txt);
  EXPECT_EQ(rcode(a), rcode_noerror);
  EXPECT_EQ(answer_count(a), 0) << "NODATA: the name exists without that type";
  EXPECT_EQ(rcode(answer(*z, "www.uipc.test", type_a)), rcode_nxdomain) << "not the built-in zone";
}

TEST(DnsZoneTest, AnswersThatDoNotFitAreLeftOut) {
  std::string error;
  std::string text = "$ORIGIN big.test.\n";
  for (int i = 0; i < 100; ++i) text += "many A 10.0.0." + std::to_string(i) + "\n";
  auto z = zone::parse(text, error);
  ASSERT_TRUE(z) << error;
  auto a = answer(*z, "many.big.test", type_a, 512);
  ASSERT_FALSE(a.empty());
  EXPECT_LE(a.size(), 512u);
  EXPECT_EQ(answers_of(a).size(), answer_count(a));
  EXPECT_GT(answer_count(a), 10);
  EXPECT_LT(answer_count(a), 100);
}

TEST(DnsZoneTest, BadZoneFilesAreRefusedWithTheLineAndTheReason) {
  const std::pair<const char*, const char*> cases[] = {
      {"www A 192.0.2.1\n", "line 1: "},  // fine: relative to the root
      {"$ORIGIN x.test.\nwww MX 10 mail\n", "line 2: type MX is not supported (A, AAAA, TXT)"},
      {"$ORIGIN x.test.\n\nwww A 300.1.2.3\n", "line 3: '300.1.2.3' is not an IPv4 address"},
      {"www AAAA 192.0.2.1\n", "line 1: '192.0.2.1' is not an IPv6 address"},
      {"www A 192.0.2.1 192.0.2.2\n", "line 1: an address record takes one address"},
      {"  A 192.0.2.1\n", "line 1: the first record needs an owner name"},
      {"www 99999999999 A 192.0.2.1\n",
       "line 1: '99999999999' is not a TTL (0 to 2147483647 seconds)"},
      {"$TTL forever\n", "line 1: 'forever' is not a TTL (0 to 2147483647 seconds)"},
      {"$ORIGIN relative\n", "line 1: $ORIGIN needs an absolute name (ending in '.')"},
      {"$INCLUDE other.zone\n", "line 1: unknown directive $INCLUDE"},
      {"www TXT \"open\n", "line 1: a quoted string is not closed"},
      {"www\n", "line 1: the record has no type"},
      {"www A\n", "line 1: the record has no data"},
      {"a..b. A 192.0.2.1\n", "line 1: the name a..b. has an empty label"},
  };
  for (const auto& [text, expected] : cases) {
    std::string error;
    auto z = zone::parse(text, error);
    if (std::string_view(expected) == "line 1: ") {
      EXPECT_TRUE(z) << error;
      continue;
    }
    EXPECT_FALSE(z) << text;
    EXPECT_EQ(error, expected) << text;
  }
  std::string error;
  EXPECT_FALSE(zone::parse(std::string(64, 'l') + ".test. A 192.0.2.1\n", error));
  EXPECT_EQ(error, "line 1: a label of " + std::string(64, 'l') + ".test. is longer than 63 bytes");
  EXPECT_FALSE(zone::parse("www TXT \"" + std::string(256, 'x') + "\"\n", error));
  EXPECT_EQ(error, "line 1: a TXT string is longer than 255 bytes");
  std::string long_name;
  for (int i = 0; i < 51; ++i) long_name += "abcd.";  // 254 bytes without the final dot
  EXPECT_FALSE(zone::parse(long_name + " A 192.0.2.1\n", error));
  EXPECT_EQ(error, "line 1: the name " + long_name + " is longer than 253 bytes");
}

// dns_query's --0x20 mixes the case of names from its names file before
// build_query refuses the long ones: a name past 256 bytes has every letter's
// case drawn too, with no read past the random bits (ASan).
TEST(DnsMessageTest, RandomCaseOfANameLongerThan256BytesStaysInBounds) {
  std::string name;
  while (name.size() < 300) name += "abcdefgh.";  // ends in a letter: no dot to drop
  name.resize(300);
  std::set<std::string> tails;
  for (int i = 0; i < 16; ++i) {
    const std::string mixed = random_case(name);
    ASSERT_EQ(mixed.size(), name.size());
    EXPECT_TRUE(std::equal(mixed.begin(), mixed.end(), name.begin(), [](char a, char b) {
      return std::tolower(static_cast<unsigned char>(a)) == b;
    }));
    tails.insert(mixed.substr(256));
  }
  EXPECT_GT(tails.size(), 8u);  // 40 random letters past the 256th: all but surely distinct
}

TEST(DnsMessageTest, RandomCaseKeepsTheNameAndTheReplyMustEchoItExactly) {
  const std::string name = "www.mail.example.uipc.test";
  std::set<std::string> seen;
  for (int i = 0; i < 16; ++i) {
    const std::string mixed = random_case(name + ".");
    ASSERT_EQ(mixed.size(), name.size());
    EXPECT_TRUE(std::equal(mixed.begin(), mixed.end(), name.begin(), [](char a, char b) {
      return std::tolower(static_cast<unsigned char>(a)) == b;
    }));
    seen.insert(mixed);
  }
  EXPECT_GT(seen.size(), 8u);  // 22 random letters: 16 draws are all but surely distinct
  const std::string sent = random_case("www.uipc.test");
  auto q = query(7, sent.c_str(), type_a);
  std::array<std::byte, 512> buf{};
  std::copy(q.begin(), q.end(), buf.begin());
  const std::size_t n = answer_in_place(buf, q.size());
  const std::span<const std::byte> a(buf.data(), n);
  EXPECT_TRUE(reply_matches(a, sent, type_a, /*exact_case=*/true));
  EXPECT_TRUE(reply_matches(a, "www.uipc.test", type_a));  // case-blind as before
  // A forger who answers in lower case (or any other case) is refused.
  std::string other = sent;
  other[0] = static_cast<char>(std::isupper(static_cast<unsigned char>(other[0])) ? 'w' : 'W');
  EXPECT_FALSE(reply_matches(a, other, type_a, /*exact_case=*/true));
}

TEST(DnsMessageTest, UnknownNameIsNxdomainAndKnownNameWithoutTheTypeIsNodata) {
  std::array<std::byte, 512> buf{};
  auto nx = query(1, "nope.example", type_a);
  std::copy(nx.begin(), nx.end(), buf.begin());
  std::size_t n = answer_in_place(buf, nx.size());
  EXPECT_EQ(rcode({buf.data(), n}), rcode_nxdomain);
  auto nodata = query(2, "mail.uipc.test", type_txt);
  std::copy(nodata.begin(), nodata.end(), buf.begin());
  n = answer_in_place(buf, nodata.size());
  EXPECT_EQ(rcode({buf.data(), n}), rcode_noerror);
  EXPECT_EQ(answer_count({buf.data(), n}), 0);
}

// Found by fuzz_dns_message (fuzz/regressions/dns_message/empty_last_label): the
// empty label before the final dot was dropped, and the query asked for "a.b".
TEST(DnsMessageTest, NameEndingInAnEmptyLabelIsRefused) {
  std::array<std::byte, 512> buf{};
  EXPECT_EQ(build_query(buf, 1, "a.b..", type_a), 0u);
  EXPECT_EQ(build_query(buf, 1, "wwwwww.uipc..", type_a), 0u);
  EXPECT_EQ(build_query(buf, 1, "..", type_a), 0u);
  EXPECT_EQ(build_query(buf, 1, "a..b", type_a), 0u);
  // One final dot is the root, as before; a lone dot asks for the root itself.
  EXPECT_GT(build_query(buf, 1, "a.b.", type_a), 0u);
  EXPECT_GT(build_query(buf, 1, ".", type_a), 0u);
  const std::size_t n = build_query(buf, 1, "A.b.", type_a);
  auto q = parse_question(std::span<const std::byte>(buf.data(), n));
  ASSERT_TRUE(q);
  EXPECT_EQ(q->name, "a.b");
}

// Found by fuzz_dns_message (fuzz/regressions/dns_message/dot_inside_label): a
// label holding a dot read like two labels, so a reply for the name
// ["www.uipc", "test"] matched a query for www.uipc.test.
TEST(DnsMessageTest, LabelHoldingADotIsMalformedAndMatchesNothing) {
  const unsigned char wire[] = {0x12, 0x34, 0x81, 0x00, 0,   1,   0,   0,   0,   0,   0,
                                0,    8,    'w',  'w',  'w', '.', 'u', 'i', 'p', 'c', 4,
                                't',  'e',  's',  't',  0,   0,   1,   0,   1};
  std::array<std::byte, 512> buf{};
  std::memcpy(buf.data(), wire, sizeof wire);
  const std::span<const std::byte> reply(buf.data(), sizeof wire);
  EXPECT_FALSE(parse_question(reply));
  EXPECT_FALSE(reply_matches(reply, "www.uipc.test", type_a));
  // As a query it is answered FORMERR, not NXDOMAIN for a name it never asked.
  buf[2] = std::byte{0x01};
  const std::size_t n = answer_in_place(buf, sizeof wire);
  ASSERT_GE(n, 12u);
  EXPECT_EQ(rcode(std::span<const std::byte>(buf.data(), n)), rcode_formerr);
}

TEST(DnsMessageTest, ResponsesAreNeverAnsweredAndBadQueriesGetFormerr) {
  std::array<std::byte, 512> buf{};
  auto q = query(3, "a.uipc.test", type_a);
  std::copy(q.begin(), q.end(), buf.begin());
  buf[2] |= std::byte{0x80};
  EXPECT_EQ(answer_in_place(buf, q.size()), 0u);
  std::copy(q.begin(), q.end(), buf.begin());
  buf[12] = std::byte{0xc0};  // a compression pointer in the question
  const std::size_t n = answer_in_place(buf, q.size());
  ASSERT_EQ(n, 12u);
  EXPECT_EQ(rcode({buf.data(), n}), rcode_formerr);
  EXPECT_EQ(build_query(buf, 1, std::string(64, 'a') + ".test", type_a), 0u);  // label too long
}

TEST(DnsMessageTest, RandomAndTruncatedInputsStayInBounds) {
  std::mt19937 rng(12345);
  const auto good = query(7, "www.uipc.test", type_aaaa);
  for (int i = 0; i < 100000; ++i) {
    // A buffer exactly as large as the input: any write past it is caught by ASan.
    const std::size_t room = 12 + rng() % 120;
    std::vector<std::byte> buf(room);
    std::size_t len = rng() % (room + 1);
    if (i % 2 == 0) {
      len = std::min(len, good.size());
      std::copy_n(good.begin(), len, buf.begin());
      if (len > 0 && i % 4 == 0) buf[rng() % len] = static_cast<std::byte>(rng());
    } else {
      for (std::size_t j = 0; j < len; ++j) buf[j] = static_cast<std::byte>(rng());
    }
    const std::size_t n = answer_in_place(buf, len);
    ASSERT_LE(n, room);
    (void)parse_question({buf.data(), len});
    if (n >= 12) (void)reply_matches({buf.data(), n}, "www.uipc.test", type_aaaa);
  }
}

}  // namespace
}  // namespace uipc::dns
