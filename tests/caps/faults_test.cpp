// Peers that die or misbehave on the control line: a killed client's messages
// become DISPOSE, a killed server fails pending calls, garbage closes only the
// sender, stop() ends everyone cleanly.
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <future>
#include <set>
#include <thread>

#include "caps_support.hpp"
#include "uipc/core/blocking_connection.hpp"

namespace uipc::caps::test {
namespace {

class Faults : public caps_test {};

TEST_F(Faults, AKilledClientsMessagesAreDisposed) {
  auto svc = serve("client.dies");
  ASSERT_TRUE(svc);
  const auto a = address("client.dies");
  const pid_t child = ::fork();
  if (child == 0) {
    boost::asio::io_context ctx;
    auto c = client::connect(ctx, a);
    if (!c) ::_exit(2);
    for (int i = 0; i < 3; ++i) (void)(*c)->send(bytes("orphan"));
    ::pause();
    ::_exit(0);
  }
  std::set<message_id> requested;
  client_id who = 0;
  for (int i = 0; i < 3; ++i) {
    const event e = next_event(**svc, event_kind::request);
    requested.insert(e.id);
    who = e.client;
  }
  // One of them is answered before the client dies: it is disposed too.
  ASSERT_FALSE((*svc)->reply(who, *requested.begin(), "unread"));
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  std::set<message_id> disposed;
  for (;;) {
    auto e = (*svc)->receive(in(5s));
    ASSERT_TRUE(e) << e.error().message();
    if (e->kind == event_kind::dispose) disposed.insert(e->id);
    if (e->kind == event_kind::disconnected) break;
  }
  EXPECT_EQ(disposed, requested);
  EXPECT_EQ((*svc)->reply(who, *requested.rbegin(), "too late"),
            make_error_code(errc::disconnected));
  EXPECT_EQ((*svc)->stats().clients, 0u);
}

TEST_F(Faults, AKilledServerFailsPendingCallsWithoutAHang) {
  child_service server("server.dies", options());
  ASSERT_TRUE(server.registered());
  auto cl = connect("server.dies");
  ASSERT_TRUE(cl) << cl.error().message();
  auto pending =
      std::async(std::launch::async, [&] { return (*cl)->call("anyone?"); });  // no deadline
  std::this_thread::sleep_for(100ms);
  const auto killed = clock::now();
  server.kill();
  ASSERT_EQ(pending.wait_for(5s), std::future_status::ready);
  auto r = pending.get();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), make_error_code(errc::disconnected));
  EXPECT_LT(clock::now() - killed, 1s);
  EXPECT_EQ((*cl)->close_reason(), make_error_code(errc::disconnected));
  auto after = (*cl)->call("again", in(1s));
  EXPECT_EQ(after.error(), make_error_code(errc::disconnected));
}

TEST_F(Faults, AStoppedServerFailsConnectWithinTheHandshakeTimeout) {
  child_service server("server.stopped", options());
  ASSERT_TRUE(server.registered());
  ASSERT_EQ(::kill(server.pid(), SIGSTOP), 0);  // reachable, but it never welcomes anyone
  client_options o;
  o.handshake_timeout = 200ms;
  const auto start = clock::now();
  auto cl = connect("server.stopped", o);
  const auto took = clock::now() - start;
  ::kill(server.pid(), SIGCONT);
  ASSERT_FALSE(cl);
  EXPECT_EQ(cl.error(), uipc::condition::timed_out) << cl.error().message();
  EXPECT_GE(took, 150ms);
  EXPECT_LT(took, 2s);
}

TEST_F(Faults, StopFailsWaitingCallsAndReceives) {
  auto svc = serve("stopping");
  ASSERT_TRUE(svc);
  auto cl = connect("stopping");
  ASSERT_TRUE(cl);
  auto pending = std::async(std::launch::async, [&] { return (*cl)->call("hold", in(10s)); });
  (void)next_event(**svc, event_kind::request);
  auto receiving = std::async(std::launch::async, [&] { return (*svc)->receive(in(10s)); });
  std::this_thread::sleep_for(50ms);
  (*svc)->stop();
  ASSERT_EQ(pending.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(pending.get().error(), make_error_code(errc::disconnected));
  ASSERT_EQ(receiving.wait_for(5s), std::future_status::ready);
  auto got = receiving.get();
  ASSERT_FALSE(got) << "an event of kind " << static_cast<int>(got->kind);
  EXPECT_EQ(got.error(), make_error_code(errc::stopped));
  EXPECT_EQ(connect("stopping").error(), make_error_code(errc::not_registered));
}

TEST_F(Faults, GarbageOnTheControlLineClosesOnlyTheSender) {
  auto svc = serve("garbage");
  ASSERT_TRUE(svc);
  responder echo(**svc);
  auto good = connect("garbage");
  ASSERT_TRUE(good);
  auto sockets = std::filesystem::directory_iterator(*points_directory(::geteuid(), dir_.path()));
  std::string path;
  for (const auto& f : sockets) {
    if (f.path().extension() == ".sock") path = f.path().string();
  }
  ASSERT_FALSE(path.empty());
  for (int round = 0; round < 20; ++round) {
    auto raw = blocking_connection::connect(path);
    ASSERT_TRUE(raw);
    std::string junk(64 + round * 13, '\0');
    for (std::size_t i = 0; i < junk.size(); ++i)
      junk[i] = static_cast<char>((i * 131 + round * 7) & 0xff);
    frame f;
    f.kind = frame_kind::request;
    f.type = static_cast<std::uint32_t>(round * 1000);  // unknown types
    f.payload = junk;
    (void)raw->call(std::move(f), in(1s));
    auto r = (*good)->call("ok?", in(5s));
    ASSERT_TRUE(r) << round << ": " << r.error().message();
    EXPECT_EQ(r->copy(), "ok?");
  }
  // Raw bytes that are no frame at all.
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const char bad[] = "\xff\xff\xff\x7fGARBAGE GARBAGE";
  (void)::write(fd, bad, sizeof bad);
  char sink[4096];
  while (::read(fd, sink, sizeof sink) > 0) {
  }  // the server hangs up
  ::close(fd);
  auto r = (*good)->call("still here", in(5s));
  ASSERT_TRUE(r);
  for (int i = 0; i < 500 && (*svc)->stats().clients != 1; ++i) std::this_thread::sleep_for(1ms);
  EXPECT_EQ((*svc)->stats().clients, 1u);
}

TEST_F(Faults, TheEchoProgramServesAndStopsOnSigterm) {
  int out[2];
  ASSERT_EQ(::pipe(out), 0);
  const std::string dir = dir_.path();
  const pid_t child = ::fork();
  if (child == 0) {
    ::dup2(out[1], 1);
    ::execl(UIPC_TEST_CAPS_ECHO_PATH, "uipc-caps-echo", "--name", "program.echo", "--dir",
            dir.c_str(), nullptr);
    ::_exit(127);
  }
  ::close(out[1]);
  char line[512] = {};
  ASSERT_GT(::read(out[0], line, sizeof line - 1), 0);
  EXPECT_NE(std::string(line).find("serving program.echo"), std::string::npos) << line;
  auto c = connect("program.echo");
  ASSERT_TRUE(c) << c.error().message();
  auto r = (*c)->call("echo me", in(5s));
  ASSERT_TRUE(r);
  EXPECT_EQ(r->copy(), "echo me");
  r->release();
  ::kill(child, SIGTERM);
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  ::close(out[0]);
  EXPECT_EQ((*c)->call("gone", in(2s)).error(), make_error_code(errc::disconnected));
}

TEST_F(Faults, AClientKilledWhileWritingAPayloadInPlaceLeavesNothing) {
  auto svc = serve("dies.writing");
  ASSERT_TRUE(svc);
  int mid[2];
  ASSERT_EQ(::pipe(mid), 0);
  const auto a = address("dies.writing");
  const pid_t child = ::fork();
  if (child == 0) {
    boost::asio::io_context ctx;
    auto c = client::connect(ctx, a);
    if (!c) ::_exit(2);
    (void)(*c)->call_in_place(1 << 20, [&](std::span<std::byte> out) {
      std::memset(out.data(), 'h', out.size() / 2);
      (void)::write(mid[1], "h", 1);  // half written: kill me now
      ::pause();
    });
    ::_exit(0);
  }
  char c = 0;
  ASSERT_EQ(::read(mid[0], &c, 1), 1);
  ::close(mid[0]);
  ::close(mid[1]);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  // No request of it reaches the server (it was never published). It came
  // and went before the server received its connected event, so it is not
  // reported at all (service_options::max_clients), and its channel is gone.
  for (int i = 0; i < 5000 && (*svc)->stats().clients != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ((*svc)->stats().clients, 0u);
  EXPECT_EQ((*svc)->stats().clients_total, 1u);
  auto nothing = (*svc)->receive(in(200ms));
  ASSERT_FALSE(nothing) << "an event of the killed client";
  EXPECT_EQ(nothing.error(), make_error_code(uipc::errc::timed_out));
  EXPECT_EQ((*svc)->stats().requests, 0u);
  responder echo(**svc);
  auto other = connect("dies.writing");
  ASSERT_TRUE(other);
  EXPECT_TRUE((*other)->call("after", in(5s)));
}

TEST_F(Faults, AServerKilledWhileWritingAReplyFailsTheCall) {
  child_service server("dies.replying", options(), [](service& s, const child_service& self) {
    // Receives on the loop; the first request is answered in place, and the
    // child stops half-way through writing the reply.
    auto next = std::make_shared<std::function<void()>>();
    *next = [&s, &self, next] {
      s.async_receive([&s, &self, next](error_code ec, event e) {
        if (ec) return;
        if (e.kind == event_kind::request) {
          (void)s.reply_in_place(e.client, e.id, 1 << 16, [&](std::span<std::byte> out) {
            std::memset(out.data(), 'r', out.size() / 2);
            self.note();  // half the reply is written
            ::pause();
          });
        }
        (*next)();
      });
    };
    (*next)();
  });
  ASSERT_TRUE(server.registered());
  auto cl = connect("dies.replying");
  ASSERT_TRUE(cl);
  auto pending =
      std::async(std::launch::async, [&] { return (*cl)->call("write me a reply", in(10s)); });
  ASSERT_TRUE(server.wait_note());
  server.kill();
  ASSERT_EQ(pending.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(pending.get().error(), make_error_code(errc::disconnected));
}

}  // namespace
}  // namespace uipc::caps::test
