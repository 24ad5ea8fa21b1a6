// The control service of a host (control.hpp) through a caps client, and the
// programs on it: uipc-plugin-host serving, uipcctl plugins and services.
#include "uipc/plugin/control.hpp"

#include <signal.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include "../test_support.hpp"
#include "plugin_support.hpp"
#include "uipc/caps/client.hpp"

namespace uipc::plugin {
namespace {

using uipc::test::run_command;

using test::logged_host;
using namespace std::chrono_literals;
using clock = std::chrono::steady_clock;

const std::string variants = UIPC_TEST_VARIANT_DIR;
const std::string examples = UIPC_TEST_PLUGIN_DIR;

// A field of the row whose first field is `key` in a control table.
std::string cell(const std::string& table, const std::string& key, std::size_t column) {
  std::size_t at = 0;
  while (at < table.size()) {
    const auto eol = table.find('\n', at);
    const std::string line = table.substr(at, eol - at);
    at = eol == std::string::npos ? table.size() : eol + 1;
    if (line.rfind(key + '\t', 0) != 0) continue;
    std::size_t start = 0;
    for (std::size_t i = 0; i < column; ++i) start = line.find('\t', start) + 1;
    return line.substr(start, line.find('\t', start) - start);
  }
  return "(no row " + key + ")";
}

class Control : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(h_.h->load(variants + "/variant_v1.so")) << h_.log();
    ASSERT_TRUE(h_.h->load(examples + "/hello.so")) << h_.log();
    control_options o;
    o.directory = dir_.path();
    o.point = "test.control";
    auto c = control::start(io_, *h_.h, o);
    ASSERT_TRUE(c) << c.error().message();
    control_ = std::move(*c);
    loop_ = std::thread([this] { io_.run(); });
    caps::point_address a{"test.control", ::geteuid(), std::nullopt, dir_.path()};
    auto client = caps::client::connect(io_, a);
    ASSERT_TRUE(client) << client.error().message();
    client_ = std::move(*client);
  }
  void TearDown() override {
    client_.reset();
    if (control_) control_->stop();
    work_.reset();
    io_.stop();
    if (loop_.joinable()) loop_.join();
  }

  std::string ask(std::string_view request) {
    auto r = client_->call(request, clock::now() + 10s);
    if (!r) return "(call failed: " + r.error().message() + ")";
    return r->copy();
  }

  uipc::test::temp_dir dir_;
  logged_host h_;
  boost::asio::io_context io_;
  std::optional<boost::asio::executor_work_guard<boost::asio::io_context::executor_type>> work_{
      io_.get_executor()};
  std::unique_ptr<control> control_;
  std::thread loop_;
  std::unique_ptr<caps::client> client_;
};

TEST_F(Control, ListsPluginsServicesAndCounters) {
  const std::string plugins = ask("plugins");
  ASSERT_EQ(plugins.rfind("ok\nNAME\tSTATE\tGENERATION\tMODEL\tWHERE", 0), 0u) << plugins;
  EXPECT_EQ(cell(plugins, "variant", 1), "running");
  EXPECT_EQ(cell(plugins, "variant", 2), "0");
  EXPECT_EQ(cell(plugins, "variant", 3), "preemptive");
  EXPECT_EQ(cell(plugins, "hello", 3), "cooperative");
  EXPECT_EQ(cell(plugins, "hello", 4), "in-process");
  EXPECT_EQ(cell(plugins, "hello", 6), "2");  // hello, hello count
  EXPECT_EQ(cell(plugins, "hello", 8), examples + "/hello.so");

  const std::string services = ask("services");
  ASSERT_EQ(services.rfind("ok\nSERVICE\tPLUGIN\tKIND\n", 0), 0u) << services;
  EXPECT_EQ(cell(services, "hello count", 1), "hello");
  EXPECT_EQ(cell(services, "hello count", 2), "bytes");
  EXPECT_EQ(cell(services, "version", 1), "variant");
  EXPECT_EQ(cell(services, "version", 2), "pointer");
  EXPECT_LT(services.find("\nblock\t"), services.find("\nversion\t")) << "sorted by name";

  EXPECT_EQ(ask("call\thello\tcontrol"), "ok\nhello, control");
  const std::string stats = ask("stats");
  ASSERT_EQ(stats.rfind("ok\nCOUNTER\tVALUE\n", 0), 0u) << stats;
  EXPECT_EQ(cell(stats, "plugins", 1), "2");
  EXPECT_EQ(cell(stats, "services", 1),
            std::to_string(std::count(services.begin(), services.end(), '\n') - 2));
  EXPECT_GE(std::stoul(cell(stats, "calls", 1)), 1u);
  EXPECT_EQ(control_->requests(), 4u);
}

TEST_F(Control, ReloadsAPluginFromItsFile) {
  auto before = h_.h->new_context().value();
  EXPECT_EQ(before.call("version", nullptr).value(), 1u);
  EXPECT_EQ(ask("reload\tvariant"), "ok\n");
  EXPECT_EQ(cell(ask("plugins"), "variant", 2), "1");
  EXPECT_EQ(cell(ask("stats"), "reloads", 1), "1");
  auto after = h_.h->new_context().value();
  EXPECT_EQ(after.call("version", nullptr).value(), 1u) << "the same file, reloaded";
  EXPECT_EQ(h_.h->quiesce(5s), error_code());
  EXPECT_EQ(ask("reload\tnosuch"), "error\treload nosuch: no plug-in of this name is loaded\n");
}

TEST_F(Control, RefusesBadRequestsAndServesOn) {
  const std::string plugins = ask("plugins");
  const std::string refused = "error\tunknown request";
  for (const std::string& bad :
       {std::string(), std::string("PLUGINS"), std::string("plugins\textra"),
        std::string("plugins\n"), std::string("reload"), std::string(" reload\tvariant"),
        std::string("\xff\xfe\x00\x01", 4), std::string("call")}) {
    EXPECT_EQ(ask(bad).rfind(refused, 0), 0u) << "request: " << bad;
  }
  EXPECT_EQ(ask("call\thello"), "error\tcall needs a service name and bytes, TAB-separated\n");
  EXPECT_EQ(ask("call\tno such\tx").rfind("error\tcall no such: ", 0), 0u);
  EXPECT_EQ(ask("call\tversion\tx").rfind("error\tcall version: ", 0), 0u)
      << "a pointer service does not cross";
  EXPECT_EQ(ask("call\tbad/name\tx").rfind("error\tcall bad/name: ", 0), 0u);
  EXPECT_EQ(ask("reload\tbad\nname").rfind("error\treload bad?name: ", 0), 0u)
      << "no line break in a reply row";
  EXPECT_EQ(ask(std::string(std::size_t{1} << 21, 'x')), "error\trequest too large\n");
  EXPECT_EQ(ask("plugins"), plugins) << "nothing changed";
}

TEST_F(Control, ACallDeadlineBoundsAHangingService) {
  // In-process code cannot be interrupted; an isolated plug-in's call can.
  logged_host isolated_host;
  isolation_options iso;
  iso.runner = UIPC_TEST_RUNNER_PATH;
  iso.directory = dir_.path();
  ASSERT_TRUE(isolated_host.h->load_isolated(variants + "/variant_v1.so", iso))
      << isolated_host.log();
  control_options o;
  o.directory = dir_.path();
  o.point = "test.control.isolated";
  o.call_timeout = 200ms;
  auto c = control::start(io_, *isolated_host.h, o);
  ASSERT_TRUE(c) << c.error().message();
  caps::point_address a{"test.control.isolated", ::geteuid(), std::nullopt, dir_.path()};
  auto client = caps::client::connect(io_, a).value();
  const auto start = clock::now();
  auto r = client->call(std::string_view("call\thang\tx"), clock::now() + 10s);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->copy(), "error\tcall hang: " + make_error_code(errc::timed_out).message() + "\n");
  EXPECT_LT(clock::now() - start, 3s);
  r = client->call(std::string_view("call\techo\tping"), clock::now() + 10s);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->copy(), "ok\nping") << "the control serves on";
  client.reset();
  (*c)->stop();
}

// -- the programs -----------------------------------------------------------

// uipc-plugin-host running in the background.
class host_process : public uipc::test::child_process {
 public:
  explicit host_process(std::vector<std::string> args)
      : child_process(with_program(std::move(args))) {}
  std::string first_line(std::chrono::milliseconds limit) { return line(limit); }
  int terminate(std::chrono::milliseconds limit) { return stop(limit); }

 private:
  static std::vector<std::string> with_program(std::vector<std::string> args) {
    args.insert(args.begin(), UIPC_TEST_PLUGIN_HOST_PATH);
    return args;
  }
};

class Programs : public ::testing::Test {
 protected:
  std::string ctl(const std::string& command) const {
    return std::string(UIPC_TEST_UIPCCTL_PATH) + " " + command + " --dir " + dir_.path() + " ";
  }
  uipc::test::temp_dir dir_;
};

TEST_F(Programs, UipcctlListsReloadsAndCallsARunningHost) {
  // A plug-in directory with a broken shared object and one without an entry
  // point among good ones: the good ones load, the rest are reported.
  uipc::test::temp_dir plugins;
  std::filesystem::copy_file(examples + "/hello.so", plugins.file("a_hello.so"));
  std::filesystem::copy_file(variants + "/variant_no_entry.so", plugins.file("b_no_entry.so"));
  std::ofstream(plugins.file("c_broken.so")) << "not an ELF file";
  host_process host({"--dir", dir_.path(), plugins.path(), variants + "/variant_v1.so"});
  ASSERT_GT(host.pid(), 0);
  ASSERT_EQ(host.first_line(10s), "serving 2 of 4 plug-ins on uipc.plugins\n");

  auto [status, out] = run_command(ctl("plugins") + "list");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out.rfind("NAME ", 0), 0u) << out;
  EXPECT_NE(out.find("\nhello "), std::string::npos) << out;
  EXPECT_NE(out.find("\nvariant "), std::string::npos) << out;
  EXPECT_EQ(out.find("no_entry"), std::string::npos) << out;

  std::tie(status, out) = run_command(ctl("services") + "list");
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("\nhello count  hello    bytes\n"), std::string::npos) << out;
  EXPECT_NE(out.find("\nversion      variant  pointer\n"), std::string::npos) << out;

  std::tie(status, out) = run_command(ctl("services") + "call 'hello' uipcctl");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out, "hello, uipcctl\n");

  std::tie(status, out) = run_command(ctl("plugins") + "reload hello");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out, "reloaded hello\n");
  std::tie(status, out) = run_command(ctl("plugins") + "list");
  EXPECT_NE(out.find("\nhello    running  1 "), std::string::npos) << out;

  std::tie(status, out) = run_command(ctl("plugins") + "reload nosuch");
  EXPECT_EQ(status, 3);
  EXPECT_EQ(out, "uipcctl plugins: reload nosuch: no plug-in of this name is loaded\n");
  std::tie(status, out) = run_command(ctl("services") + "call version x");
  EXPECT_EQ(status, 3);
  std::tie(status, out) = run_command(ctl("plugins") + "frobnicate");
  EXPECT_EQ(status, 64);
  std::tie(status, out) = run_command(ctl("plugins") + "--timeout -5 list");
  EXPECT_EQ(status, 64);

  std::tie(status, out) = run_command(ctl("plugins") + "stats");
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("\nreloads            1\n"), std::string::npos) << out;

  EXPECT_EQ(host.terminate(10s), 0);
  std::tie(status, out) = run_command(ctl("plugins") + "list");
  EXPECT_EQ(status, 3);
  EXPECT_EQ(out.rfind("uipcctl plugins: no plug-in host at uipc.plugins: ", 0), 0u) << out;
}

TEST_F(Programs, UipcctlGivesUpOnAnUnresponsiveHostWithinItsDeadline) {
  host_process host({"--dir", dir_.path(), "--point", "stuck.host"});
  ASSERT_EQ(host.first_line(10s), "serving 0 of 0 plug-ins on stuck.host\n");
  ASSERT_EQ(::kill(host.pid(), SIGSTOP), 0);
  const auto start = clock::now();
  auto [status, out] = run_command(ctl("plugins") + "--point stuck.host --timeout 300 list");
  const auto took = clock::now() - start;
  ::kill(host.pid(), SIGCONT);
  EXPECT_EQ(status, 3) << out;
  EXPECT_EQ(out, "uipcctl plugins: the plug-in host at stuck.host did not answer within 300 ms\n");
  EXPECT_LT(took, 3s);
}

TEST_F(Programs, HostRefusesATakenPointAndBadUsage) {
  host_process first({"--dir", dir_.path(), "--point", "taken.host"});
  ASSERT_EQ(first.first_line(10s), "serving 0 of 0 plug-ins on taken.host\n");
  auto [status, out] = run_command(std::string(UIPC_TEST_PLUGIN_HOST_PATH) + " --dir " +
                                   dir_.path() + " --point taken.host");
  EXPECT_EQ(status, 2) << out;
  EXPECT_NE(out.find("cannot register taken.host"), std::string::npos) << out;
  std::tie(status, out) = run_command(std::string(UIPC_TEST_PLUGIN_HOST_PATH) + " --dir " +
                                      dir_.path() + " --point bad/name");
  EXPECT_EQ(status, 2) << out;
  std::tie(status, out) = run_command(std::string(UIPC_TEST_PLUGIN_HOST_PATH) + " --frobnicate");
  EXPECT_EQ(status, 64) << out;
}

}  // namespace
}  // namespace uipc::plugin
