// uipcd's configuration: the file format, its errors, flags over the file,
// what a reload may change.
#include "config.hpp"

#include <gtest/gtest.h>

#include <fstream>

#include "../test_support.hpp"

namespace uipcd {
namespace {

TEST(UipcdConfig, DefaultsServeEveryModuleOnLoopback) {
  const config c;
  EXPECT_TRUE(c.handles);
  EXPECT_TRUE(c.dns);
  EXPECT_EQ(c.dns_listen, "127.0.0.1:5300");
  EXPECT_EQ(c.control_point, "uipc.control");
  EXPECT_TRUE(c.metrics.empty()) << "metrics are off by default";
}

TEST(UipcdConfig, PrintedConfigurationReadsBackTheSame) {
  config c;
  ASSERT_EQ(set(c, "dns.listen", "[::1]:53"), "");
  ASSERT_EQ(set(c, "plugins.isolate", "a, b,c"), "");
  ASSERT_EQ(set(c, "server.threads", "4"), "");
  ASSERT_EQ(set(c, "metrics.listen", "127.0.0.1:9100"), "");
  EXPECT_EQ(c.isolate, (std::vector<std::string>{"a", "b", "c"}));
  const std::string text = print(c);
  EXPECT_NE(text.find("\n[dns]\n"), std::string::npos) << text;
  EXPECT_NE(text.find("\nlisten = [::1]:53\n"), std::string::npos) << text;
  config back;
  ASSERT_EQ(apply_text(back, text), "");
  EXPECT_EQ(back, c);
  config defaults;
  ASSERT_EQ(apply_text(defaults, print(config{})), "");
  EXPECT_EQ(defaults, config{});
}

TEST(UipcdConfig, FileKeysCommentsAndBlankLines) {
  config c;
  ASSERT_EQ(apply_text(c,
                       "# a comment\n"
                       "\n"
                       "[dns]\n"
                       "  listen =  127.0.0.1:0   # trailing comment\n"
                       "enabled = no\r\n"
                       "[handles]\n"
                       "capacity=64\n"
                       "[caps]\n"
                       "echo =\n"),
            "");
  EXPECT_EQ(c.dns_listen, "127.0.0.1:0");
  EXPECT_FALSE(c.dns);
  EXPECT_EQ(c.handles_capacity, 64u);
  EXPECT_TRUE(c.echo_point.empty());
}

TEST(UipcdConfig, BadLinesAreRefusedWithTheLineAndTheReasonAndChangeNothing) {
  const std::pair<const char*, const char*> cases[] = {
      {"[dns]\nlisten = 127.0.0.1\n", "line 2: dns.listen: '127.0.0.1' is not ADDRESS:PORT"},
      {"[dns]\nlisten = 127.0.0.1:99999\n",
       "line 2: dns.listen: '127.0.0.1:99999' has no port from 0 to 65535"},
      {"[server]\nthreads = 0\n", "line 2: server.threads: '0' is not a whole number from 1 to 64"},
      {"[server]\nthreads = two\n",
       "line 2: server.threads: 'two' is not a whole number from 1 to 64"},
      {"[server]\nthreads = -1\n",
       "line 2: server.threads: '-1' is not a whole number from 1 to 64"},
      {"[dns]\nenabled = maybe\n", "line 2: dns.enabled: 'maybe' is not true or false"},
      {"listen = 127.0.0.1:53\n", "line 1: a key before any [section]"},
      {"[dns]\nport = 53\n", "line 2: unknown key port in [dns]"},
      {"[dnz]\n", "line 1: unknown section [dnz]"},
      {"[dns\n", "line 1: a section line is [NAME]"},
      {"[dns]\njust words\n", "line 2: expected KEY = VALUE"},
      {"[metrics]\nlisten = 0.0.0.0:9100\n",
       "line 2: metrics.listen: '0.0.0.0:9100' is not on loopback (127.0.0.1 or [::1])"},
      {"[plugins]\nisolate = a,,b\n", "line 2: plugins.isolate: '' is not a plug-in file name"},
      {"[dns]\ntimeout_ms = 0\n",
       "line 2: dns.timeout_ms: '0' is not a whole number of milliseconds from 1 to 60000"},
  };
  for (const auto& [text, expected] : cases) {
    config c;
    c.dns_listen = "unchanged:1";
    EXPECT_EQ(apply_text(c, text), expected) << text;
    EXPECT_EQ(c.dns_listen, "unchanged:1") << "a refused file changes nothing";
    EXPECT_EQ(c.threads, config{}.threads);
  }
  config c;
  const std::string before = print(c);
  EXPECT_EQ(apply_text(c, "[server]\nthreads = 8\n[dns]\nlisten = x\n"),
            "line 4: dns.listen: 'x' is not ADDRESS:PORT");
  EXPECT_EQ(print(c), before) << "the lines before the bad one are not applied either";
}

TEST(UipcdConfig, FilesAreNamedInTheirErrors) {
  uipc::test::temp_dir dir;
  config c;
  EXPECT_EQ(apply_file(c, dir.file("missing.conf")),
            dir.file("missing.conf") + ": No such file or directory");
  std::ofstream(dir.file("bad.conf")) << "[dns]\n\nlisten = nowhere\n";
  EXPECT_EQ(apply_file(c, dir.file("bad.conf")),
            dir.file("bad.conf") + ": line 3: dns.listen: 'nowhere' is not ADDRESS:PORT");
  std::ofstream(dir.file("good.conf")) << "[dns]\nlisten = 127.0.0.1:5353\n";
  EXPECT_EQ(apply_file(c, dir.file("good.conf")), "");
  EXPECT_EQ(c.dns_listen, "127.0.0.1:5353");
}

TEST(UipcdConfig, UnknownKeysOfSetAreRefused) {
  config c;
  EXPECT_EQ(set(c, "dns", "x"), "unknown key dns");
  EXPECT_EQ(set(c, "dns.nosuch", "x"), "unknown key dns.nosuch");
  EXPECT_EQ(set(c, "caps.control", "a\tb"), "the value holds a TAB or a line break");
}

TEST(UipcdConfig, AReloadTakesOnlyTheReloadableKeys) {
  config running;
  config next = running;
  next.dns_zone = "/new.zone";
  next.dns_timeout = std::chrono::milliseconds(250);
  next.isolate = {"dns_zone"};
  next.dns_listen = "127.0.0.1:1053";
  next.threads = 7;
  const auto later = adopt_reloadable(running, next);
  EXPECT_EQ(running.dns_zone, "/new.zone");
  EXPECT_EQ(running.dns_timeout, std::chrono::milliseconds(250));
  EXPECT_EQ(running.isolate, std::vector<std::string>{"dns_zone"});
  EXPECT_EQ(running.dns_listen, config{}.dns_listen) << "the socket stays until a restart";
  EXPECT_EQ(running.threads, config{}.threads);
  EXPECT_EQ(later, (std::vector<std::string>{"server.threads", "dns.listen"}));
  EXPECT_TRUE(needs_restart(running, running).empty());
}

}  // namespace
}  // namespace uipcd
