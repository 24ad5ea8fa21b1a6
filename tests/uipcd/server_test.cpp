// uipcd as its users run it: a program serving every module at once, driven
// by uipcctl, DNS queries, caps and handles clients, and signals.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "../test_support.hpp"
#include "dns_message.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/caps/point.hpp"
#include "uipc/handles/client.hpp"

namespace uipcd {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using clock = std::chrono::steady_clock;
using uipc::test::child_process;
using uipc::test::run_command;

// One UDP query to 127.0.0.1:port; the reply, or nullopt after 2 s.
std::optional<std::vector<std::byte>> ask_dns(std::uint16_t port, const std::string& name,
                                              std::uint16_t type = uipc::dns::type_a) {
  const int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return std::nullopt;
  timeval tv{2, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(port);
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::vector<std::byte> q(512);
  q.resize(uipc::dns::build_query(q, 0x4242, name, type));
  std::optional<std::vector<std::byte>> out;
  if (::sendto(fd, q.data(), q.size(), 0, reinterpret_cast<sockaddr*>(&to), sizeof to) ==
      static_cast<ssize_t>(q.size())) {
    std::vector<std::byte> reply(1500);
    const ssize_t n = ::recv(fd, reply.data(), reply.size(), 0);
    if (n >= 12) {
      reply.resize(static_cast<std::size_t>(n));
      out = std::move(reply);
    }
  }
  ::close(fd);
  return out;
}

bool holds(const std::vector<std::byte>& message, std::initializer_list<int> bytes) {
  std::vector<std::byte> want;
  for (int b : bytes) want.push_back(static_cast<std::byte>(b));
  return std::search(message.begin(), message.end(), want.begin(), want.end()) != message.end();
}

// GET `target` from 127.0.0.1:port over plain TCP: the whole response.
std::string http_get(const std::string& address, const std::string& target) {
  const auto colon = address.rfind(':');
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<std::uint16_t>(std::stoi(address.substr(colon + 1))));
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof to) == 0) {
    const std::string request = "GET " + target + " HTTP/1.1\r\nHost: localhost\r\n\r\n";
    (void)::send(fd, request.data(), request.size(), MSG_NOSIGNAL);
    char buf[4096];
    for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;)
      out.append(buf, static_cast<std::size_t>(n));
  }
  ::close(fd);
  return out;
}

// The value after `key` up to the end of its line in `text`.
std::string after(const std::string& text, const std::string& key) {
  const auto at = text.find(key);
  if (at == std::string::npos) return "(no " + key + ")";
  const auto start = at + key.size();
  return text.substr(start, text.find('\n', start) - start);
}

// The value of the row of a printed table whose first words are `words`.
std::string cell(const std::string& table, const std::string& words) {
  std::size_t at = 0;
  while (at < table.size()) {
    const auto eol = table.find('\n', at);
    const std::string line =
        table.substr(at, eol == std::string::npos ? std::string::npos : eol - at);
    at = eol == std::string::npos ? table.size() : eol + 1;
    std::istringstream in(line), want(words);
    std::string a, b;
    bool match = true;
    while (want >> b)
      if (!(in >> a) || a != b) match = false;
    if (!match) continue;
    std::string value;
    in >> value;
    return value;
  }
  return "(no row " + words + ")";
}

class Uipcd : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* p : {"dns_zone.so", "hello.so"})
      fs::copy_file(fs::path(UIPC_TEST_PLUGIN_DIR) / p, plugins_.file(p));
  }

  // Starts uipcd in this test's private world; waits for "uipcd: serving".
  std::unique_ptr<child_process> start(std::vector<std::string> args = {}) {
    std::vector<std::string> argv = {UIPC_TEST_UIPCD_PATH, "--dir",    dir_.path(),  "--plugins",
                                     plugins_.path(),      "--listen", "127.0.0.1:0"};
    argv.insert(argv.end(), args.begin(), args.end());
    auto p = std::make_unique<child_process>(argv);
    banner_ = p->lines_until("uipcd: serving", 20s);
    EXPECT_NE(banner_.find("uipcd: serving\n"), std::string::npos) << banner_ << p->errors();
    const std::string dns = after(banner_, "dns: 127.0.0.1:");
    port_ = static_cast<std::uint16_t>(std::atoi(dns.c_str()));
    return p;
  }

  std::pair<int, std::string> ctl(const std::string& command) const {
    return run_command(std::string(UIPC_TEST_UIPCCTL_PATH) + " " + command + " --dir " +
                       dir_.path());
  }

  // The runner process of the isolated plug-in (its caps point names it), or 0.
  pid_t runner_pid() const {
    auto points = uipc::caps::list_points(dir_.path());
    if (!points) return 0;
    for (const auto& p : *points)
      if (p.name.rfind("uipc.runner.", 0) == 0) return p.pid;
    return 0;
  }

  // A uipc-dns-query run in the background against uipcd.
  std::unique_ptr<child_process> query_load(int count, int inflight) {
    std::ofstream(dir_.file("names")) << "www.uipc.test A\nmail.uipc.test A\nnosuch.uipc.test A\n";
    return std::make_unique<child_process>(std::vector<std::string>{
        UIPC_TEST_DNS_QUERY_PATH, "--server", "127.0.0.1:" + std::to_string(port_), "--names",
        dir_.file("names"), "--count", std::to_string(count), "--inflight",
        std::to_string(inflight), "--timeout", "3000"});
  }

  uipc::test::temp_dir dir_;
  uipc::test::temp_dir plugins_;
  std::string banner_;
  std::uint16_t port_ = 0;
};

TEST_F(Uipcd, ServesEveryModuleAndUipcctlSeesThem) {
  std::ofstream(plugins_.file("broken.so")) << "not an ELF file";
  auto d = start({"--metrics", "127.0.0.1:0", "--set", "plugins.isolate=hello"});
  ASSERT_NE(port_, 0) << banner_;
  EXPECT_NE(banner_.find("handles: " + dir_.file("uipc-handles.sock") + "\n"), std::string::npos)
      << banner_;
  EXPECT_NE(banner_.find("control: uipc.control\n"), std::string::npos) << banner_;

  // DNS: answered by the dns_zone plug-in.
  auto a = ask_dns(port_, "www.uipc.test");
  ASSERT_TRUE(a);
  EXPECT_EQ(uipc::dns::rcode(*a), uipc::dns::rcode_noerror);
  EXPECT_EQ(uipc::dns::answer_count(*a), 2);
  EXPECT_TRUE(holds(*a, {192, 0, 2, 10}));
  a = ask_dns(port_, "nosuch.uipc.test");
  ASSERT_TRUE(a);
  EXPECT_EQ(uipc::dns::rcode(*a), uipc::dns::rcode_nxdomain);

  // Handles: a client of the location finds uipcd's daemon (and starts none).
  uipc::handles::client_options ho;
  ho.where.directory = dir_.path();
  ho.autostart = false;
  auto connected = uipc::handles::client::connect(ho);
  ASSERT_TRUE(connected) << connected.error().message();
  std::optional<uipc::handles::client> hc(std::move(*connected));
  auto ev = hc->create_event(uipc::handles::event_reset::manual, false, "demo.event");
  ASSERT_TRUE(ev) << ev.error().message();

  // Caps: the echo point.
  auto [status, out] = run_command(std::string(UIPC_TEST_UIPCCTL_PATH) + " caps --dir " +
                                   dir_.path() + " call uipc.echo ping");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out, "ping\n");

  std::tie(status, out) = ctl("status");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(cell(out, "state"), "serving") << out;
  EXPECT_NE(out.find("plugin_failure     broken.so: "), std::string::npos) << out;

  std::tie(status, out) = ctl("plugins list");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(cell(out, "dns_zone running 0 preemptive"), "in-process") << out;
  EXPECT_EQ(cell(out, "hello running 0 preemptive"), "isolated") << out;

  std::tie(status, out) = ctl("stats");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(cell(out, "dns answered"), "2") << out;
  EXPECT_EQ(cell(out, "handles handles_in_use"), "1") << out;
  EXPECT_EQ(cell(out, "plugins plugins"), "2") << out;
  EXPECT_NE(out.find("\ncaps     requests uipc.echo"), std::string::npos) << out;

  std::tie(status, out) = ctl("stats --watch 1 --count 2");
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("PER SECOND"), std::string::npos) << out;

  std::tie(status, out) = ctl("clients");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out.rfind("POINT ", 0), 0u) << out;
  // This process's session with the handle daemon: "handles SESSION PID UID -".
  EXPECT_NE(out.find(" " + std::to_string(::getpid()) + " "), std::string::npos) << out;
  EXPECT_NE(out.find("\nhandles "), std::string::npos) << out;

  // The handle daemon's objects: the event created above, by its handle.
  std::tie(status, out) = ctl("objects");
  EXPECT_EQ(status, 0) << out;
  EXPECT_EQ(out.rfind("HANDLE ", 0), 0u) << out;
  EXPECT_EQ(cell(out, uipc::handles::to_string(ev->handle()) + " manual_event 1"), "0") << out;
  EXPECT_NE(out.find(" demo.event\n"), std::string::npos) << out;
  std::tie(status, out) = ctl("points");
  EXPECT_NE(out.find("\nuipc.echo "), std::string::npos) << out;
  EXPECT_NE(out.find("\nuipc.runner."), std::string::npos) << out;
  std::tie(status, out) = ctl("frobnicate");
  EXPECT_EQ(status, 64) << out;

  // Metrics: the same figures, Prometheus text.
  const std::string metrics = after(banner_, "metrics: http://");
  const std::string body = http_get(metrics.substr(0, metrics.find('/')), "/metrics");
  EXPECT_EQ(body.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << body;
  EXPECT_NE(body.find("\nuipc_dns_answered_total 2\n"), std::string::npos) << body;
  EXPECT_NE(body.find("uipc_dns_latency_seconds{quantile=\"0.99\"}"), std::string::npos) << body;
  EXPECT_NE(body.find("uipc_caps_requests_total{point=\"uipc.echo\"} 1\n"), std::string::npos)
      << body;
  // Each family once, its samples together (two caps points interleaved them).
  std::set<std::string> families_seen;
  std::string current;
  std::istringstream lines(body.substr(body.find("\r\n\r\n") + 4));
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("# TYPE ", 0) == 0) {
      current = line.substr(7, line.find(' ', 7) - 7);
      EXPECT_TRUE(families_seen.insert(current).second) << "TYPE twice: " << current;
    } else if (!line.empty() && line[0] != '#') {
      EXPECT_EQ(line.substr(0, line.find_first_of("{ ")), current) << line;
    }
  }
  EXPECT_NE(body.find("uipc_caps_requests_total{point=\"uipc.control\"}"), std::string::npos)
      << body;
  EXPECT_EQ(body.find("_total_total"), std::string::npos) << body;
  EXPECT_EQ(http_get(metrics.substr(0, metrics.find('/')), "/other").rfind("HTTP/1.1 404", 0), 0u);

  // Connections left silent, as many as the endpoint keeps: a scrape is still
  // answered (the oldest silent one goes).
  {
    const std::string hostport = metrics.substr(0, metrics.find('/'));
    const auto colon = hostport.rfind(':');
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(static_cast<std::uint16_t>(std::stoi(hostport.substr(colon + 1))));
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::vector<int> silent;
    for (int i = 0; i < 64; ++i) {
      const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof to), 0);
      silent.push_back(fd);
    }
    std::this_thread::sleep_for(100ms);  // all accepted
    EXPECT_EQ(http_get(hostport, "/metrics").rfind("HTTP/1.1 200 OK\r\n", 0), 0u)
        << "a scrape was shut out by silent connections";
    for (const int fd : silent) ::close(fd);
  }

  ev = uipc::handles::event();  // the event and client go before the daemon
  hc.reset();
  EXPECT_EQ(d->stop(10s), 0) << d->errors();
  EXPECT_NE(d->errors().find("stopped; DNS received 2 answered 2 servfail 0 dropped 0"),
            std::string::npos)
      << d->errors();
}

// Socket activation, as uipcd.socket does it: the manager holds the handle
// daemon's socket and starts uipcd when the first handles client connects;
// uipcd serves the passed socket, and the client's library starts nothing.
TEST_F(Uipcd, SocketActivatedItServesThePassedHandlesSocket) {
  const std::string activate = "/usr/bin/systemd-socket-activate";
  if (::access(activate.c_str(), X_OK) != 0) GTEST_SKIP() << "no " << activate;
  const std::string socket = dir_.file("uipc-handles.sock");
  child_process manager({activate, "--listen=" + socket, UIPC_TEST_UIPCD_PATH, "--dir", dir_.path(),
                         "--plugins", plugins_.path(), "--listen", "127.0.0.1:0"});
  ASSERT_TRUE(
      uipc::test::eventually([&] { return uipc::test::unix_socket_listening(socket); }, 10s));

  uipc::handles::client_options ho;
  ho.where.directory = dir_.path();
  ho.autostart = false;
  {
    auto c = uipc::handles::client::connect(ho);  // starts uipcd
    ASSERT_TRUE(c) << c.error().message();
    EXPECT_EQ(c->daemon_pid(), manager.pid());
    const std::string banner = manager.lines_until("uipcd: serving", 20s);
    EXPECT_NE(banner.find("handles: " + socket + "\n"), std::string::npos) << banner;
    auto ev = c->create_event(uipc::handles::event_reset::manual, false, "activated");
    ASSERT_TRUE(ev) << ev.error().message();
    auto [status, out] = ctl("objects");
    EXPECT_EQ(status, 0) << out;
    EXPECT_NE(out.find("activated"), std::string::npos) << out;
  }
  EXPECT_EQ(manager.stop(10s), 0) << manager.errors();
  EXPECT_TRUE(fs::exists(socket)) << "the manager's socket file was removed";
}

TEST_F(Uipcd, BadConfigurationIsRefusedAtStartWithTheLineAndTheReason) {
  std::ofstream(dir_.file("bad.conf")) << "[dns]\nenabled = true\nlisten = 127.0.0.1:70000\n";
  auto [status, out] =
      run_command(std::string(UIPC_TEST_UIPCD_PATH) + " --config " + dir_.file("bad.conf"));
  EXPECT_EQ(status, 2);
  EXPECT_EQ(out, "uipcd: bad configuration: " + dir_.file("bad.conf") +
                     ": line 3: dns.listen: '127.0.0.1:70000' has no port from 0 to 65535\n");
  std::tie(status, out) = run_command(std::string(UIPC_TEST_UIPCD_PATH) + " --threads 0");
  EXPECT_EQ(status, 2);
  EXPECT_EQ(out,
            "uipcd: bad configuration: server.threads: '0' is not a whole number from 1 to 64\n");
  std::tie(status, out) = run_command(std::string(UIPC_TEST_UIPCD_PATH) + " --frobnicate");
  EXPECT_EQ(status, 64);

  // --print-config prints what the file and flags give, as a file that reads back.
  std::ofstream(dir_.file("good.conf")) << "[dns]\nlisten = 127.0.0.1:5353\n";
  std::tie(status, out) = run_command(std::string(UIPC_TEST_UIPCD_PATH) + " --config " +
                                      dir_.file("good.conf") + " --threads 3 --print-config");
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("\nlisten = 127.0.0.1:5353\n"), std::string::npos) << out;
  EXPECT_NE(out.find("\nthreads = 3\n"), std::string::npos) << out;
  std::ofstream(dir_.file("printed.conf")) << out;
  auto [again_status, again] = run_command(std::string(UIPC_TEST_UIPCD_PATH) + " --config " +
                                           dir_.file("printed.conf") + " --print-config");
  EXPECT_EQ(again_status, 0);
  EXPECT_EQ(again, out);
}

TEST_F(Uipcd, APortOrPointAlreadyTakenStopsTheStartWithAClearError) {
  const int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  sockaddr_in at{};
  at.sin_family = AF_INET;
  at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&at), sizeof at), 0);
  socklen_t length = sizeof at;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&at), &length);
  const std::string taken = "127.0.0.1:" + std::to_string(ntohs(at.sin_port));
  auto [status, out] = run_command(std::string(UIPC_TEST_UIPCD_PATH) + " --dir " + dir_.path() +
                                   " --plugins " + plugins_.path() + " --listen " + taken);
  ::close(fd);
  EXPECT_EQ(status, 1) << out;
  EXPECT_NE(out.find("uipcd: cannot serve DNS on " + taken + ": Address already in use\n"),
            std::string::npos)
      << out;

  auto first = start();
  std::tie(status, out) = run_command(std::string(UIPC_TEST_UIPCD_PATH) + " --dir " + dir_.path() +
                                      " --plugins " + plugins_.path() + " --listen 127.0.0.1:0");
  EXPECT_EQ(status, 1) << out;
  EXPECT_NE(out.find("uipcd: cannot start the handle daemon (handles): "), std::string::npos)
      << out;
  std::tie(status, out) =
      run_command(std::string(UIPC_TEST_UIPCD_PATH) + " --dir " + dir_.path() + " --plugins " +
                  plugins_.path() + " --listen 127.0.0.1:0 --set handles.enabled=false");
  EXPECT_EQ(status, 1) << out;
  EXPECT_NE(out.find("uipcd: cannot register the control point uipc.control: "), std::string::npos)
      << out;
  EXPECT_EQ(first->stop(10s), 0) << "the first one served on: " << first->errors();
}

TEST_F(Uipcd, SighupReloadsTheZoneAndABadFileLeavesTheRunningConfiguration) {
  std::ofstream(dir_.file("zone")) << "$ORIGIN example.test.\nwww A 192.0.2.77\n";
  std::ofstream(dir_.file("uipcd.conf")) << "[dns]\nzone = " << dir_.file("zone") << "\n";
  auto d = start({"--config", dir_.file("uipcd.conf")});
  auto a = ask_dns(port_, "www.example.test");
  ASSERT_TRUE(a);
  EXPECT_TRUE(holds(*a, {192, 0, 2, 77})) << "the zone file, not the built-in zone";

  std::ofstream(dir_.file("zone")) << "$ORIGIN example.test.\nwww A 192.0.2.78\n";
  ::kill(d->pid(), SIGHUP);
  bool changed = false;
  for (auto end = clock::now() + 10s; !changed && clock::now() < end;
       std::this_thread::sleep_for(20ms)) {
    a = ask_dns(port_, "www.example.test");
    changed = a && holds(*a, {192, 0, 2, 78});
  }
  EXPECT_TRUE(changed) << d->errors();

  // A bad zone: refused, the old one serves on, and status says why.
  std::ofstream(dir_.file("zone")) << "$ORIGIN example.test.\nwww A 192.0.2.999\n";
  auto [status, out] = ctl("reload");
  EXPECT_EQ(status, 3) << out;
  EXPECT_NE(out.find("line 2: '192.0.2.999' is not an IPv4 address"), std::string::npos) << out;
  a = ask_dns(port_, "www.example.test");
  ASSERT_TRUE(a);
  EXPECT_TRUE(holds(*a, {192, 0, 2, 78}));

  // A bad configuration file: refused whole, reported, nothing changes.
  std::ofstream(dir_.file("uipcd.conf")) << "[dns]\nzone = /nowhere\ntimeout_ms = soon\n";
  std::tie(status, out) = ctl("reload");
  EXPECT_EQ(status, 3) << out;
  EXPECT_NE(out.find("line 3: dns.timeout_ms: 'soon' is not a whole number of milliseconds"),
            std::string::npos)
      << out;
  std::tie(status, out) = ctl("status");
  EXPECT_NE(after(out, "last_reload_error").find("line 3: dns.timeout_ms"), std::string::npos)
      << out;
  a = ask_dns(port_, "www.example.test");
  ASSERT_TRUE(a);
  EXPECT_TRUE(holds(*a, {192, 0, 2, 78}));

  // A good file again, and a new build of a plug-in: the reload takes both.
  std::ofstream(dir_.file("zone")) << "$ORIGIN example.test.\nwww A 192.0.2.79\n";
  std::ofstream(dir_.file("uipcd.conf")) << "[dns]\nzone = " << dir_.file("zone") << "\n";
  fs::last_write_time(plugins_.file("hello.so"), fs::file_time_type::clock::now() + 1s);
  std::tie(status, out) = ctl("reload");
  EXPECT_EQ(status, 0) << out;
  a = ask_dns(port_, "www.example.test");
  ASSERT_TRUE(a);
  EXPECT_TRUE(holds(*a, {192, 0, 2, 79}));
  std::tie(status, out) = ctl("plugins list");
  EXPECT_EQ(cell(out, "hello running"), "1") << "reloaded: generation 1\n" << out;
  EXPECT_EQ(cell(out, "dns_zone running"), "0") << "unchanged: not reloaded\n" << out;
  EXPECT_EQ(d->stop(10s), 0) << d->errors();
}

TEST_F(Uipcd, SighupDuringAQueryLoadLosesNoQuery) {
  auto d = start();
  auto load = query_load(300000, 32);
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(40ms);
    // A new build of the zone plug-in each time: its calls move to the new one.
    fs::last_write_time(plugins_.file("dns_zone.so"),
                        fs::file_time_type::clock::now() + std::chrono::seconds(i + 1));
    ::kill(d->pid(), SIGHUP);
    // Each reload seen before the next signal: two signals sent while the first
    // is handled are one (a loaded machine made a reload last longer than 40 ms).
    const std::string generation = std::to_string(i + 1);
    bool seen = false;
    for (int look = 0; look < 200 && !seen; ++look) {
      seen = cell(ctl("plugins list").second, "dns_zone running") == generation;
      if (!seen) std::this_thread::sleep_for(10ms);
    }
    ASSERT_TRUE(seen) << "reload " << i + 1 << " not seen in time";
  }
  // The reloads came while the queries ran: the load has not finished yet.
  std::string result = load->line(30ms);
  EXPECT_EQ(result.find("completed"), std::string::npos) << "the load ended before the reloads";
  result += load->lines_until("completed", 60s);
  EXPECT_EQ(load->stop(10s, 0), 0) << result << load->errors();
  EXPECT_NE(result.find("completed 300000 timed_out 0 mismatched 0 errors 0"), std::string::npos)
      << result;
  auto [status, out] = ctl("plugins list");
  EXPECT_EQ(cell(out, "dns_zone running"), "5") << out;
  std::tie(status, out) = ctl("stats");
  EXPECT_EQ(cell(out, "dns servfail"), "0") << out;
  EXPECT_EQ(d->stop(10s), 0) << d->errors();
}

TEST_F(Uipcd, TheIsolatedPluginKilledUnderLoadFailsItsQueriesAndTheRestCarryOn) {
  auto d = start({"--set", "plugins.isolate=dns_zone"});
  const pid_t runner = runner_pid();
  ASSERT_GT(runner, 0);
  auto load = query_load(100000, 8);
  std::this_thread::sleep_for(300ms);
  ASSERT_EQ(::kill(runner, SIGKILL), 0);
  // Meanwhile the other modules serve on.
  auto [status, out] = run_command(std::string(UIPC_TEST_UIPCCTL_PATH) + " caps --dir " +
                                   dir_.path() + " call uipc.echo still-here");
  EXPECT_EQ(out, "still-here\n");
  std::tie(status, out) = run_command(std::string(UIPC_TEST_UIPCCTL_PATH) + " handles --dir " +
                                      dir_.path() + " --no-start stats");
  EXPECT_EQ(status, 0) << out;

  // Every query gets an answer: SERVFAIL while the plug-in is down.
  const std::string result = load->lines_until("completed", 90s);
  EXPECT_EQ(load->stop(10s, 0), 0) << result;
  EXPECT_NE(result.find("completed 100000 timed_out 0"), std::string::npos) << result;
  std::tie(status, out) = ctl("stats");
  EXPECT_NE(cell(out, "dns servfail"), "0") << out;
  EXPECT_EQ(cell(out, "plugins crashes"), "1") << out;
  // Restarted: answers again.
  bool back = false;
  for (auto end = clock::now() + 10s; !back && clock::now() < end;
       std::this_thread::sleep_for(20ms)) {
    auto a = ask_dns(port_, "www.uipc.test");
    back = a && uipc::dns::rcode(*a) == uipc::dns::rcode_noerror;
  }
  EXPECT_TRUE(back);
  EXPECT_NE(runner_pid(), runner);
  EXPECT_EQ(d->stop(10s), 0) << d->errors();
}

// The zone the isolated plug-in serves is the one of the last reload, also
// after its process died and was restarted (it starts from uipcd's start-up
// environment, which names the first zone).
TEST_F(Uipcd, ARestartedIsolatedZonePluginServesTheZoneOfTheLastReload) {
  std::ofstream(dir_.file("zone")) << "$ORIGIN example.test.\nwww A 192.0.2.1\n";
  std::ofstream(dir_.file("uipcd.conf")) << "[dns]\nzone = " << dir_.file("zone") << "\n";
  auto d = start({"--config", dir_.file("uipcd.conf"), "--set", "plugins.isolate=dns_zone"});
  auto a = ask_dns(port_, "www.example.test");
  ASSERT_TRUE(a);
  EXPECT_TRUE(holds(*a, {192, 0, 2, 1}));
  std::ofstream(dir_.file("zone2")) << "$ORIGIN example.test.\nwww A 192.0.2.2\n";
  std::ofstream(dir_.file("uipcd.conf")) << "[dns]\nzone = " << dir_.file("zone2") << "\n";
  auto [status, out] = ctl("reload");
  ASSERT_EQ(status, 0) << out;
  a = ask_dns(port_, "www.example.test");
  ASSERT_TRUE(a);
  EXPECT_TRUE(holds(*a, {192, 0, 2, 2}));

  const pid_t runner = runner_pid();
  ASSERT_GT(runner, 0);
  ASSERT_EQ(::kill(runner, SIGKILL), 0);
  // Back, and with the reloaded zone from its first answer: queries in the
  // gap fail (SERVFAIL), none is answered from the start-up zone.
  bool back = false;
  int stale = 0;
  for (auto end = clock::now() + 10s; !back && clock::now() < end;) {  // back to back
    a = ask_dns(port_, "www.example.test");
    if (a && holds(*a, {192, 0, 2, 1})) ++stale;
    back = a && holds(*a, {192, 0, 2, 2}) && runner_pid() != runner;
  }
  EXPECT_TRUE(back) << d->errors();
  EXPECT_EQ(stale, 0) << "answers from the zone uipcd started with";
  for (int i = 0; i < 20; ++i) {
    a = ask_dns(port_, "www.example.test");
    ASSERT_TRUE(a);
    EXPECT_TRUE(holds(*a, {192, 0, 2, 2}));
  }
  std::tie(status, out) = ctl("stats");
  EXPECT_EQ(cell(out, "plugins crashes"), "1") << out;
  EXPECT_EQ(d->stop(10s), 0) << d->errors();
}

TEST_F(Uipcd, UipcctlGivesAClearErrorForAStoppedOrUnresponsiveServer) {
  auto [status, out] = ctl("status");
  EXPECT_EQ(status, 3);
  EXPECT_EQ(out.rfind("uipcctl status: no uipcd at uipc.control: ", 0), 0u) << out;

  auto d = start();
  ASSERT_EQ(::kill(d->pid(), SIGSTOP), 0);
  const auto began = clock::now();
  std::tie(status, out) = ctl("stats --timeout 300");
  const auto took = clock::now() - began;
  ::kill(d->pid(), SIGCONT);
  EXPECT_EQ(status, 3) << out;
  EXPECT_EQ(out, "uipcctl stats: the uipcd at uipc.control did not answer within 300 ms\n");
  EXPECT_LT(took, 3s);
  EXPECT_EQ(d->stop(10s), 0) << d->errors();
  std::tie(status, out) = ctl("stats");
  EXPECT_EQ(status, 3) << out;
}

TEST_F(Uipcd, AFloodOfReloadsIsAnsweredBusyBeyondTheAdminQueue) {
  // Reloads and calls wait for the admin thread, each holding its request: a
  // client sending them without end would grow that queue without bound.
  auto d = start();
  boost::asio::io_context io;
  uipc::caps::point_address a{"uipc.control", ::geteuid(), std::nullopt, dir_.path()};
  auto c = uipc::caps::client::connect(io, a);
  ASSERT_TRUE(c) << c.error().message();
  const std::string reload = "reload";
  std::vector<uipc::caps::message_id> sent;
  constexpr int flood = 120;  // within the channel's 128 in flight
  for (int i = 0; i < flood; ++i) {
    auto id = (*c)->send(std::as_bytes(std::span(reload.data(), reload.size())));
    ASSERT_TRUE(id) << id.error().message();
    sent.push_back(*id);
  }
  int ok = 0, busy = 0, other = 0;
  for (auto id : sent) {
    auto r = (*c)->wait(id, clock::now() + 60s);
    ASSERT_TRUE(r) << r.error().message();
    const std::string text = r->copy();
    if (text == "ok\n")
      ++ok;
    else if (text.rfind("error\tbusy: ", 0) == 0)
      ++busy;
    else
      ++other;
  }
  EXPECT_EQ(other, 0);
  EXPECT_GT(busy, 0);
  EXPECT_GT(ok, 0);
  EXPECT_EQ(ok + busy, flood);
  // It serves on, and a reload is taken again once the queue went down.
  auto again = (*c)->call(reload, clock::now() + 30s);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->copy(), "ok\n");
  EXPECT_EQ(ctl("status").first, 0);
  EXPECT_EQ(d->stop(15s), 0) << d->errors();
}

TEST_F(Uipcd, SigtermWithCallsInFlightAnswersEachOrFailsItClearly) {
  auto d = start();
  auto load = query_load(1000000, 16);
  std::atomic<bool> done{false};
  std::atomic<int> echoed{0}, failed{0}, wrong{0};
  std::thread caller([&] {
    boost::asio::io_context io;
    uipc::caps::point_address a{"uipc.echo", ::geteuid(), std::nullopt, dir_.path()};
    auto c = uipc::caps::client::connect(io, a);
    if (!c) return;
    for (int i = 0; !done && i < 1000000; ++i) {
      const std::string m = "call " + std::to_string(i);
      auto r = (*c)->call(m, clock::now() + 5s);
      if (!r) {
        ++failed;
        break;  // disconnected: every later call would fail the same way
      }
      (r->copy() == m ? echoed : wrong)++;
    }
  });
  std::this_thread::sleep_for(300ms);
  const auto began = clock::now();
  EXPECT_EQ(d->stop(15s), 0) << d->errors();
  EXPECT_LT(clock::now() - began, 10s);
  done = true;
  caller.join();
  EXPECT_GT(echoed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_LE(failed.load(), 1);
  // Every query uipcd read was answered before it stopped.
  const std::string errors = d->errors();
  const std::string summary = after(errors, "stopped; DNS received ");
  unsigned long long received = 0, answered = 0, servfail = 0, dropped = 0;
  ASSERT_EQ(std::sscanf(summary.c_str(), "%llu answered %llu servfail %llu dropped %llu", &received,
                        &answered, &servfail, &dropped),
            4)
      << errors;
  EXPECT_GT(received, 0u);
  // The drain first stops the dispatcher reading, then waits until every
  // datagram it read was answered: nothing read is lost (with 16 queries in
  // flight no pool runs dry and no queue fills, so nothing is dropped either).
  EXPECT_EQ(received, answered) << errors;
  EXPECT_EQ(dropped, 0u) << errors;
}

}  // namespace
}  // namespace uipcd
