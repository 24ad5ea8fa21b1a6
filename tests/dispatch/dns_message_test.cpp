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
  const unsigned char wire[] = {0x12, 0x34, 0x81, 0x00, 0, 1, 0, 0, 0, 0, 0, 0,
                                8, 'w', 'w', 'w', '.', 'u', 'i', 'p', 'c', 4, 't', 'e', 's', 't', 0,
                                0, 1, 0, 1};
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
