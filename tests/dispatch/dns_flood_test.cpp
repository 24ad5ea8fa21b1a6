// uipc-dns-responder under a flood of malformed datagrams: it stays up, keeps
// its descriptors, and answers dig (and a query of ours) correctly afterwards.
// Bounded for CI; bench/faults/run.sh floods longer (UIPC_FAULT_DATAGRAMS).
#include <gtest/gtest.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <regex>
#include <string>

#include "dns_message.hpp"
#include "program_support.hpp"
#include "uipc/core/error.hpp"

namespace uipc::dispatch {
namespace {

using namespace std::chrono_literals;
using namespace program_test;
namespace asio = boost::asio;

std::size_t open_descriptors(pid_t pid) {
  std::error_code ec;
  std::size_t n = 0;
  for (auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
    ++n;
  return n;
}

std::vector<std::byte> query(std::uint16_t id, const char* name, std::uint16_t type) {
  std::vector<std::byte> q(512);
  q.resize(dns::build_query(q, id, name, type));
  return q;
}

// One malformed datagram of a kind picked by `rng`: what a scanner, a broken
// resolver or an attacker sends.
std::vector<std::byte> malformed(std::mt19937& rng) {
  auto q = query(static_cast<std::uint16_t>(rng()), "www.uipc.test", dns::type_a);
  switch (rng() % 8) {
    case 0: {  // random bytes, up to past the receive buffer
      std::vector<std::byte> r(rng() % 5000);
      for (auto& b : r) b = static_cast<std::byte>(rng());
      return r;
    }
    case 1:  // shorter than a header
      q.resize(rng() % 12);
      return q;
    case 2:  // a response: never answered
      q[2] |= std::byte{0x80};
      return q;
    case 3:  // the question cut anywhere
      q.resize(12 + rng() % (q.size() - 12));
      return q;
    case 4:  // a compression pointer where a label should be
      q[12] = std::byte{0xc0};
      return q;
    case 5:  // a label that claims more bytes than follow
      q[12] = std::byte{63};
      return q;
    case 6:  // two questions, or none
      q[5] = static_cast<std::byte>(rng() % 2 == 0 ? 2 : 0);
      return q;
    default:  // an opcode we do not serve
      q[2] = static_cast<std::byte>(static_cast<unsigned>(rng() % 15 + 1) << 3);
      return q;
  }
}

TEST(DnsFloodTest, ResponderSurvivesMalformedFloodAndStillAnswersCorrectly) {
  uipc::test::temp_dir dir;
  responder r(dir, "127.0.0.1:0", "1");
  ASSERT_FALSE(r.port.empty()) << read_file(dir.file("responder.err"));
  const char* env = std::getenv("UIPC_FAULT_DATAGRAMS");
  const long datagrams = env != nullptr && std::atol(env) > 0 ? std::atol(env) : 20000;

  asio::io_context ctx;
  const asio::ip::udp::endpoint to(asio::ip::make_address("127.0.0.1"),
                                   static_cast<unsigned short>(std::stoi(r.port)));
  asio::ip::udp::socket sock(ctx, asio::ip::udp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
  sock.non_blocking(true);
  // Answers to the flood (FORMERR, NOTIMP) are read and counted, never trusted.
  auto drain = [&] {
    long n = 0;
    for (;;) {
      std::array<std::byte, 4096> buf;
      error_code ec;
      sock.receive(asio::buffer(buf), 0, ec);
      if (ec) return n;
      ++n;
    }
  };
  // The descriptors it holds once it serves: the flood must not change them.
  std::this_thread::sleep_for(50ms);
  const std::size_t descriptors = open_descriptors(r.proc.pid());

  std::mt19937 rng(0xd05);
  long sent = 0;
  long answered = 0;
  const auto started = std::chrono::steady_clock::now();
  while (sent < datagrams) {
    const auto d = malformed(rng);
    error_code ec;
    sock.send_to(asio::buffer(d), to, 0, ec);
    if (ec == asio::error::would_block || ec == asio::error::no_buffer_space) {
      answered += drain();
      std::this_thread::sleep_for(100us);
      continue;
    }
    ASSERT_FALSE(ec && ec != asio::error::message_size) << ec.message();
    ++sent;
    if (sent % 64 == 0) answered += drain();
  }
  std::this_thread::sleep_for(100ms);
  answered += drain();
  const double took =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::printf("faults: %ld malformed datagrams in %.2f s (%.0f/s), %ld answered (FORMERR/NOTIMP)\n",
              sent, took, static_cast<double>(sent) / took, answered);
  ASSERT_TRUE(r.proc.running()) << read_file(dir.file("responder.err"));
  EXPECT_EQ(open_descriptors(r.proc.pid()), descriptors);

  // A query of ours gets the zone's answer.
  const auto q = query(0x4242, "www.uipc.test", dns::type_a);
  sock.non_blocking(false);
  sock.send_to(asio::buffer(q), to);
  std::array<std::byte, 4096> buf{};
  bool matched = false;
  for (int tries = 0; tries < 50 && !matched; ++tries) {
    error_code ec;
    sock.non_blocking(true);
    const std::size_t n = sock.receive(asio::buffer(buf), 0, ec);
    if (ec) {
      std::this_thread::sleep_for(20ms);
      continue;
    }
    const std::span<const std::byte> a(buf.data(), n);
    matched = n >= 12 && a[0] == std::byte{0x42} && a[1] == std::byte{0x42} &&
              dns::reply_matches(a, "www.uipc.test", dns::type_a) && dns::answer_count(a) == 2;
  }
  EXPECT_TRUE(matched);

  // And dig, the tool people use, gets correct answers.
  if (auto dig = find_program("dig")) {
    auto out =
        run(dir, {*dig, "@127.0.0.1", "-p", r.port, "www.uipc.test", "A", "+tries=2", "+time=2"});
    ASSERT_TRUE(out);
    EXPECT_NE(out->find("status: NOERROR"), std::string::npos) << *out;
    EXPECT_TRUE(
        std::regex_search(*out, std::regex(R"(www\.uipc\.test\.\s+300\s+IN\s+A\s+192\.0\.2\.10)")))
        << *out;
  } else {
    std::printf(
        "dig is not installed (Debian package 'dnsutils'): checked with our own query only\n");
  }
  r.proc.signal(SIGTERM);
  EXPECT_EQ(r.proc.wait(10s), std::optional<int>(0)) << read_file(dir.file("responder.err"));
}

}  // namespace
}  // namespace uipc::dispatch
