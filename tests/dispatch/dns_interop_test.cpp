// Interop with real DNS tools: uipc-dns-query against unbound, dig against uipc-dns-responder.
#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>
#include <chrono>
#include <fstream>
#include <optional>
#include <regex>
#include <string>
#include <thread>

#include "program_support.hpp"

namespace uipc::dispatch {
namespace {

using namespace std::chrono_literals;
using namespace program_test;

struct query_counts {
  long completed = -1, timed_out = -1, mismatched = -1, errors = -1, nxdomain = -1;
};

query_counts parse_counts(const std::string& out) {
  query_counts c;
  std::smatch m;
  static const std::regex line(
      R"(completed (\d+) timed_out (\d+) mismatched (\d+) errors (\d+) nxdomain (\d+))");
  if (std::regex_search(out, m, line)) {
    c.completed = std::stol(m[1]);
    c.timed_out = std::stol(m[2]);
    c.mismatched = std::stol(m[3]);
    c.errors = std::stol(m[4]);
    c.nxdomain = std::stol(m[5]);
  }
  return c;
}

class DnsInteropTest : public ::testing::Test {
 protected:
  test::temp_dir dir_;
};

TEST_F(DnsInteropTest, QueryToolResolvesNamesServedByUnbound) {
  auto unbound = find_program("unbound");
  if (!unbound) GTEST_SKIP() << "unbound is not installed (Debian package 'unbound')";
  const unsigned short port = free_udp_port();
  const std::string conf = dir_.file("unbound.conf");
  {
    std::ofstream c(conf);
    c << "server:\n"
      << "  interface: 127.0.0.1\n  port: " << port << "\n"
      << "  do-ip6: no\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n"
      << "  directory: \"" << dir_.path()
      << "\"\n  pidfile: \"\"\n  logfile: \"\"\n  use-syslog: no\n"
      << "  verbosity: 0\n  num-threads: 1\n  access-control: 127.0.0.0/8 allow\n"
      << "  local-zone: \"uipc.test.\" static\n"
      << "  local-data: \"a.uipc.test. 300 IN A 127.0.0.1\"\n"
      << "  local-data: \"www.uipc.test. 300 IN A 192.0.2.10\"\n"
      << "  local-data: \"www.uipc.test. 300 IN A 192.0.2.11\"\n"
      << "  local-data: \"txt.uipc.test. 300 IN TXT \\\"uipc\\\"\"\n"
      << "remote-control:\n  control-enable: no\n";
  }
  child server({*unbound, "-d", "-c", conf}, dir_.file("unbound.out"), dir_.file("unbound.err"));
  ASSERT_TRUE(server.started());
  const std::string names = dir_.file("names.txt");
  {
    std::ofstream n(names);
    n << "a.uipc.test A\nwww.uipc.test\ntxt.uipc.test TXT\nmissing.uipc.test A\n";
  }
  const std::string at = "127.0.0.1:" + std::to_string(port);
  // Wait until unbound answers (it takes a moment to start).
  bool up = false;
  for (auto until = std::chrono::steady_clock::now() + 10s;
       !up && std::chrono::steady_clock::now() < until;) {
    ASSERT_TRUE(server.running()) << "unbound exited: " << read_file(dir_.file("unbound.err"));
    auto out = run(dir_, {UIPC_DNS_QUERY, "--server", at, "--names", names, "--count", "1",
                          "--timeout", "200"});
    up = out && parse_counts(*out).completed == 1;
  }
  ASSERT_TRUE(up) << "unbound did not answer: " << read_file(dir_.file("unbound.err"));

  auto verbose = run(dir_, {UIPC_DNS_QUERY, "--server", at, "--names", names, "--verbose"});
  ASSERT_TRUE(verbose);
  EXPECT_NE(verbose->find("answer a.uipc.test rcode 0 answers 1"), std::string::npos) << *verbose;
  EXPECT_NE(verbose->find("answer www.uipc.test rcode 0 answers 2"), std::string::npos) << *verbose;
  EXPECT_NE(verbose->find("answer txt.uipc.test rcode 0 answers 1"), std::string::npos) << *verbose;
  EXPECT_NE(verbose->find("answer missing.uipc.test rcode 3 answers 0"), std::string::npos)
      << *verbose;

  int code = -1;
  auto out = run(dir_,
                 {UIPC_DNS_QUERY, "--server", at, "--names", names, "--count", "2000", "--inflight",
                  "32", "--timeout", "3000"},
                 30s, &code);
  ASSERT_TRUE(out);
  const auto c = parse_counts(*out);
  EXPECT_EQ(c.completed, 2000) << *out;
  EXPECT_EQ(c.timed_out, 0);
  EXPECT_EQ(c.mismatched, 0);
  EXPECT_EQ(c.errors, 0);
  EXPECT_EQ(c.nxdomain, 500);
  EXPECT_EQ(code, 0);
  EXPECT_NE(out->find("ports shared"), std::string::npos) << *out;  // loopback: shared by default

  // Each query on its own random port, its name in random case: unbound
  // answers every one, and echoes the case (checked exactly).
  out = run(dir_,
            {UIPC_DNS_QUERY, "--server", at, "--names", names, "--count", "2000", "--inflight",
             "32", "--timeout", "3000", "--random-ports", "--0x20"},
            30s, &code);
  ASSERT_TRUE(out);
  const auto r = parse_counts(*out);
  EXPECT_EQ(r.completed, 2000) << *out;
  EXPECT_EQ(r.mismatched, 0);
  EXPECT_EQ(r.errors, 0);
  EXPECT_EQ(r.nxdomain, 500);
  EXPECT_EQ(code, 0);
  EXPECT_NE(out->find("ports random unmatched_shared 0 unmatched_random 0"), std::string::npos)
      << *out;
}

TEST_F(DnsInteropTest, QueryToolCountsTimeoutsWhenNoServerAnswers) {
  const std::string names = dir_.file("names.txt");
  std::ofstream(names) << "a.uipc.test\n";
  // A bound socket that never answers: every query times out.
  boost::asio::io_context ctx;
  boost::asio::ip::udp::socket silent(ctx, {boost::asio::ip::make_address("127.0.0.1"), 0});
  const std::string at = "127.0.0.1:" + std::to_string(silent.local_endpoint().port());
  int code = -1;
  auto out = run(dir_,
                 {UIPC_DNS_QUERY, "--server", at, "--names", names, "--count", "5", "--inflight",
                  "5", "--timeout", "100"},
                 20s, &code);
  ASSERT_TRUE(out);
  const auto c = parse_counts(*out);
  EXPECT_EQ(c.completed, 0) << *out;
  EXPECT_EQ(c.timed_out, 5) << *out;
  EXPECT_EQ(code, 4) << "no query was answered";
}

TEST_F(DnsInteropTest, QueryToolSaysInItsExitStatusWhenOnlySomeQueriesWereAnswered) {
  const std::string names = dir_.file("names.txt");
  std::ofstream(names) << "a.uipc.test\n";
  // A server that answers the first query it gets (its question back, marked
  // as a response) and no other.
  boost::asio::io_context ctx;
  boost::asio::ip::udp::socket server(ctx, {boost::asio::ip::make_address("127.0.0.1"), 0});
  const std::string at = "127.0.0.1:" + std::to_string(server.local_endpoint().port());
  std::thread answer_once([&] {
    std::array<unsigned char, 512> buf;
    boost::asio::ip::udp::endpoint from;
    boost::system::error_code ec;
    const std::size_t n = server.receive_from(boost::asio::buffer(buf), from, 0, ec);
    if (ec || n < 12) return;
    buf[2] |= 0x80;  // QR: a response
    server.send_to(boost::asio::buffer(buf.data(), n), from, 0, ec);
  });
  int code = -1;
  auto out = run(dir_,
                 {UIPC_DNS_QUERY, "--server", at, "--names", names, "--count", "3", "--inflight",
                  "1", "--timeout", "200"},
                 20s, &code);
  answer_once.join();
  ASSERT_TRUE(out);
  const auto c = parse_counts(*out);
  EXPECT_EQ(c.completed, 1) << *out;
  EXPECT_EQ(c.timed_out, 2) << *out;
  EXPECT_EQ(code, 3) << "some queries timed out";
}

TEST_F(DnsInteropTest, QueryToolEndsWithOneWhenNoQueryCanBeSent) {
  const std::string names = dir_.file("names.txt");
  std::ofstream(names) << "a.uipc.test\n";
  // The only port of the range is taken: no exclusive socket can be bound, so
  // every query fails to go out. The run must still end, and say so.
  boost::asio::io_context ctx;
  boost::asio::ip::udp::socket taken(ctx, {boost::asio::ip::udp::v4(), 0});
  boost::asio::ip::udp::socket server(ctx, {boost::asio::ip::make_address("127.0.0.1"), 0});
  const std::string port = std::to_string(taken.local_endpoint().port());
  const std::string at = "127.0.0.1:" + std::to_string(server.local_endpoint().port());
  int code = -1;
  auto out = run(dir_,
                 {UIPC_DNS_QUERY, "--server", at, "--names", names, "--count", "3", "--inflight",
                  "1", "--random-ports", "--port-range", port + "-" + port, "--timeout", "200"},
                 20s, &code);
  ASSERT_TRUE(out) << "the run did not end";
  const auto c = parse_counts(*out);
  EXPECT_EQ(c.errors, 3) << *out;
  EXPECT_EQ(code, 1);
}

TEST_F(DnsInteropTest, QueryToolExitsWithTwoOnUsageErrors) {
  int code = -1;
  ASSERT_TRUE(run(dir_, {UIPC_DNS_QUERY, "--frobnicate"}, 20s, &code));
  EXPECT_EQ(code, 2);
  ASSERT_TRUE(run(dir_,
                  {UIPC_DNS_QUERY, "--server", "127.0.0.1:53", "--names", dir_.file("none.txt")},
                  20s, &code));
  EXPECT_EQ(code, 2) << "an unreadable names file";
  ASSERT_TRUE(run(dir_, {UIPC_DNS_QUERY, "--help"}, 20s, &code));
  EXPECT_EQ(code, 0);
}

/// Starts uipc-dns-responder on a port it picks and returns "ADDR" and port.
TEST_F(DnsInteropTest, DigGetsCorrectAnswersFromTheResponder) {
  auto dig = find_program("dig");
  if (!dig) GTEST_SKIP() << "dig is not installed (Debian package 'dnsutils')";
  for (const char* threads : {"1", "2"}) {
    SCOPED_TRACE(std::string("threads ") + threads);
    responder r(dir_, "127.0.0.1:0", threads);
    ASSERT_FALSE(r.port.empty()) << read_file(dir_.file("responder.err"));
    auto ask = [&](const std::string& name, const std::string& type) {
      auto out = run(dir_, {*dig, "@127.0.0.1", "-p", r.port, name, type, "+tries=2", "+time=2",
                            "+norecurse"});
      return out.value_or("");
    };
    const std::string www = ask("www.uipc.test", "A");
    EXPECT_NE(www.find("status: NOERROR"), std::string::npos) << www;
    EXPECT_NE(www.find("flags: qr aa"), std::string::npos) << www;
    EXPECT_TRUE(
        std::regex_search(www, std::regex(R"(www\.uipc\.test\.\s+300\s+IN\s+A\s+192\.0\.2\.10)")))
        << www;
    EXPECT_TRUE(
        std::regex_search(www, std::regex(R"(www\.uipc\.test\.\s+300\s+IN\s+A\s+192\.0\.2\.11)")))
        << www;
    const std::string aaaa = ask("WWW.Uipc.Test", "AAAA");
    EXPECT_TRUE(std::regex_search(aaaa, std::regex(R"(IN\s+AAAA\s+2001:db8::10)"))) << aaaa;
    const std::string txt = ask("txt.uipc.test", "TXT");
    EXPECT_TRUE(std::regex_search(txt, std::regex(R"(IN\s+TXT\s+"uipc")"))) << txt;
    const std::string nodata = ask("mail.uipc.test", "AAAA");
    EXPECT_NE(nodata.find("status: NOERROR"), std::string::npos) << nodata;
    EXPECT_NE(nodata.find("ANSWER: 0"), std::string::npos) << nodata;
    const std::string nx = ask("nothing.example", "A");
    EXPECT_NE(nx.find("status: NXDOMAIN"), std::string::npos) << nx;
    r.proc.signal(SIGTERM);
    EXPECT_EQ(r.proc.wait(10s), std::optional<int>(0)) << read_file(dir_.file("responder.err"));
  }
}

TEST_F(DnsInteropTest, QueryToolAndResponderTalkOverIpv6) {
  responder r(dir_, "[::1]:0", "1");
  if (r.port.empty()) GTEST_SKIP() << "no IPv6 loopback: " << read_file(dir_.file("responder.err"));
  const std::string names = dir_.file("names.txt");
  std::ofstream(names) << "www.uipc.test AAAA\nnope.uipc.test\n";
  auto out = run(dir_, {UIPC_DNS_QUERY, "--server", "[::1]:" + r.port, "--names", names, "--count",
                        "1000", "--inflight", "16"});
  ASSERT_TRUE(out);
  const auto c = parse_counts(*out);
  EXPECT_EQ(c.completed, 1000) << *out;
  EXPECT_EQ(c.nxdomain, 500);
  // The same on random ports drawn from a range given on the command line.
  out = run(dir_, {UIPC_DNS_QUERY, "--server", "[::1]:" + r.port, "--names", names, "--count",
                   "1000", "--inflight", "16", "--random-ports", "--port-range", "40000-40999"});
  ASSERT_TRUE(out);
  const auto random = parse_counts(*out);
  EXPECT_EQ(random.completed, 1000) << *out;
  EXPECT_NE(out->find("ports random"), std::string::npos) << *out;
  // And with a fresh port for every query.
  out = run(dir_, {UIPC_DNS_QUERY, "--server", "[::1]:" + r.port, "--names", names, "--count",
                   "300", "--inflight", "16", "--random-ports", "--port-uses", "1"});
  ASSERT_TRUE(out);
  EXPECT_EQ(parse_counts(*out).completed, 300) << *out;
  r.proc.signal(SIGTERM);
  EXPECT_EQ(r.proc.wait(10s), std::optional<int>(0));
}

/// A local IPv4 address that is not loopback (an interface's), or "".
std::string non_loopback_address() {
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return "";
  std::string found;
  for (ifaddrs* i = list; i != nullptr && found.empty(); i = i->ifa_next) {
    if (i->ifa_addr == nullptr || i->ifa_addr->sa_family != AF_INET) continue;
    if ((i->ifa_flags & IFF_UP) == 0 || (i->ifa_flags & IFF_LOOPBACK) != 0) continue;
    std::array<char, INET_ADDRSTRLEN> text{};
    const auto* in = reinterpret_cast<const sockaddr_in*>(i->ifa_addr);
    if (::inet_ntop(AF_INET, &in->sin_addr, text.data(), text.size()) != nullptr)
      found = text.data();
  }
  ::freeifaddrs(list);
  return found;
}

TEST_F(DnsInteropTest, QueryToolUsesRandomPortsByDefaultOffLoopback) {
  const std::string address = non_loopback_address();
  if (address.empty()) GTEST_SKIP() << "no non-loopback IPv4 address on this host";
  responder r(dir_, address + ":0", "1");
  ASSERT_FALSE(r.port.empty()) << read_file(dir_.file("responder.err"));
  const std::string names = dir_.file("names.txt");
  std::ofstream(names) << "www.uipc.test\nnope.uipc.test\n";
  auto out = run(dir_, {UIPC_DNS_QUERY, "--server", address + ":" + r.port, "--names", names,
                        "--count", "200", "--inflight", "8"});
  ASSERT_TRUE(out);
  EXPECT_EQ(parse_counts(*out).completed, 200) << *out;
  EXPECT_NE(out->find("ports random"), std::string::npos) << *out;
  out = run(dir_, {UIPC_DNS_QUERY, "--server", address + ":" + r.port, "--names", names, "--count",
                   "200", "--inflight", "8", "--shared-port"});
  ASSERT_TRUE(out);
  EXPECT_EQ(parse_counts(*out).completed, 200) << *out;
  EXPECT_NE(out->find("ports shared"), std::string::npos) << *out;
  r.proc.signal(SIGTERM);
  EXPECT_EQ(r.proc.wait(10s), std::optional<int>(0));
}

TEST_F(DnsInteropTest, QueryToolRefusesABadPortRangeOrPortUses) {
  const std::string names = dir_.file("names.txt");
  std::ofstream(names) << "a.uipc.test\n";
  for (const char* range : {"5-3", "0-10", "100", "1-70000", "a-b"}) {
    int code = -1;
    auto out = run(dir_,
                   {UIPC_DNS_QUERY, "--server", "127.0.0.1:53", "--names", names, "--random-ports",
                    "--port-range", range},
                   10s, &code);
    EXPECT_EQ(code, 2) << range;
  }
  for (const char* uses : {"0", "x", "2000000", "-1"}) {
    int code = -1;
    auto out = run(dir_,
                   {UIPC_DNS_QUERY, "--server", "127.0.0.1:53", "--names", names, "--random-ports",
                    "--port-uses", uses},
                   10s, &code);
    EXPECT_EQ(code, 2) << uses;
  }
}

}  // namespace
}  // namespace uipc::dispatch
