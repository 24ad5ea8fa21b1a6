// uipcctl caps: list, call and watch, against a service of the test's own.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>

#include "caps_support.hpp"

namespace uipc::caps::test {
namespace {

using uipc::test::run_command;

class Uipcctl : public caps_test {
 protected:
  std::string ctl() const {
    return std::string(UIPC_TEST_UIPCCTL_PATH) + " caps --dir " + dir_.path() + " ";
  }
};

TEST_F(Uipcctl, ListsCallsAndReportsErrors) {
  auto o = options();
  o.who = access::world;
  auto svc = serve("ctl.echo", o);
  ASSERT_TRUE(svc);
  responder echo(
      **svc, [](service& s, const event& e) { (void)s.reply(e.client, e.id, "got " + e.copy()); });

  auto [status, out] = run_command(ctl() + "call ctl.echo hello");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out, "got hello\n");

  std::tie(status, out) = run_command(ctl() + "list");
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("ctl.echo"), std::string::npos) << out;
  EXPECT_NE(out.find("world"), std::string::npos) << out;
  EXPECT_NE(out.find(std::to_string(::getpid())), std::string::npos) << out;

  std::tie(status, out) = run_command(ctl() + "call no.such.point hello");
  EXPECT_EQ(status, 3);
  EXPECT_NE(out.find("no live server"), std::string::npos) << out;

  std::tie(status, out) = run_command(ctl() + "call bad/name hello");
  EXPECT_EQ(status, 3);

  std::tie(status, out) = run_command(ctl() + "call ctl.echo hello --uid 12345");
  EXPECT_EQ(status, 3) << out;  // nobody of that uid serves it

  std::tie(status, out) = run_command(ctl() + "frobnicate");
  EXPECT_EQ(status, 64);
}

// --count N [--rate R]: N calls, paced at R per second, with their latency.
TEST_F(Uipcctl, CountedCallsArePacedAtTheRateAskedAndReportTheirLatency) {
  auto svc = serve("ctl.echo", options());
  ASSERT_TRUE(svc);
  responder echo(**svc,
                 [](service& s, const event& e) { (void)s.reply(e.client, e.id, e.copy()); });

  const auto began = std::chrono::steady_clock::now();
  auto [status, out] = run_command(ctl() + "call ctl.echo hello --count 40 --rate 100");
  const auto took = std::chrono::steady_clock::now() - began;
  ASSERT_EQ(status, 0) << out;
  EXPECT_GE(took, std::chrono::milliseconds(390));  // the 40th call starts at 390 ms
  const auto report = uipc::test::parse_load_report(out, "calls");
  ASSERT_TRUE(report) << out;
  EXPECT_EQ(report->count, 40u);
  EXPECT_GE(report->seconds, 0.39);
  EXPECT_LE(report->rate, 103.0);
  EXPECT_GT(report->p50_us, 0.0);
  EXPECT_LE(report->p50_us, report->p99_us);

  // A rate needs a count, and is a positive whole number.
  EXPECT_EQ(run_command(ctl() + "call ctl.echo hello --rate 10").first, 64);
  EXPECT_EQ(run_command(ctl() + "call ctl.echo hello --count 5 --rate 0").first, 64);
  EXPECT_EQ(run_command(ctl() + "call ctl.echo hello --count 5 --rate fast").first, 64);
}

TEST_F(Uipcctl, WatchPrintsPointsComingAndGoing) {
  FILE* p = ::popen((ctl() + "watch --seconds 3").c_str(), "r");
  ASSERT_NE(p, nullptr);
  char line[512];
  ASSERT_NE(std::fgets(line, sizeof line, p), nullptr);  // the header: watching
  {
    auto svc = serve("ctl.watched");
    ASSERT_TRUE(svc);
    ASSERT_NE(std::fgets(line, sizeof line, p), nullptr);
    EXPECT_EQ(std::string(line).rfind("+ ctl.watched", 0), 0u) << line;
  }
  ASSERT_NE(std::fgets(line, sizeof line, p), nullptr);
  EXPECT_EQ(std::string(line).rfind("- ctl.watched", 0), 0u) << line;
  EXPECT_EQ(::pclose(p), 0);
}

}  // namespace
}  // namespace uipc::caps::test
